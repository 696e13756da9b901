"""CREATE and RENAME across the hierarchy (RFC 3501 6.3.3, 6.3.5; issue 9)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailsuite.store.mailbox import Account, MailboxError
from mailsuite.store.maildir import ensure_folder
from mailsuite.store.write import write_message


@pytest.fixture
def acct(tmp_path: Path) -> Account:
    return Account(ensure_folder(tmp_path / "u"))


def test_create_makes_the_superior_names(acct: Account) -> None:
    acct.create("a.b.c")
    assert acct.names() == ["INBOX", "a", "a.b", "a.b.c"]
    acct.create("a.x")  # superiors that exist are left alone
    assert acct.names() == ["INBOX", "a", "a.b", "a.b.c", "a.x"]
    with pytest.raises(MailboxError) as err:
        acct.create("a.b")
    assert err.value.code == "ALREADYEXISTS"
    acct.create("INBOX.sub")  # INBOX is never created again
    assert "INBOX.sub" in acct.names()


def test_a_bad_name_creates_no_superior(acct: Account) -> None:
    with pytest.raises(MailboxError):
        acct.create("ok.~bad")
    assert acct.names() == ["INBOX"]


def test_rename_moves_every_inferior_name(acct: Account) -> None:
    acct.create("a.b.c")
    write_message(acct.path("a.b"), [b"Subject: kept\n\nx\n"])
    acct.subscribe("a.b")
    acct.rename("a", "x")
    assert acct.names() == ["INBOX", "x", "x.b", "x.b.c"]
    assert len(list((acct.path("x.b") / "new").iterdir())) == 1
    assert acct.subscriptions() == ["x.b"]


def test_rename_a_parent_only_its_children_imply(acct: Account) -> None:
    # Maildir++ trees made by other tools often have .p.q without .p
    ensure_folder(acct.root / ".p.q")
    ensure_folder(acct.root / ".p.r.s")
    assert not acct.exists("p")
    acct.rename("p", "n")  # was: NO [NONEXISTENT]
    assert acct.names() == ["INBOX", "n.q", "n.r.s"]
    with pytest.raises(MailboxError) as err:
        acct.rename("nothing", "y")
    assert err.value.code == "NONEXISTENT"


def test_rename_makes_the_superior_names_of_the_target(acct: Account) -> None:
    acct.create("a")
    acct.rename("a", "m.n")
    assert acct.names() == ["INBOX", "m", "m.n"]


def test_rename_refusals(acct: Account) -> None:
    acct.create("a.b")
    acct.create("z")
    for old, new, code in (
        ("a", "a.b.c", "CANNOT"),
        ("a", "z", "ALREADYEXISTS"),
        ("a", "INBOX", "ALREADYEXISTS"),
        ("a.b", "z.c", None),
    ):
        if code is None:
            acct.rename(old, new)
            continue
        with pytest.raises(MailboxError) as err:
            acct.rename(old, new)
        assert err.value.code == code
    assert acct.names() == ["INBOX", "a", "z", "z.c"]


def test_rename_inbox_leaves_its_inferiors(acct: Account) -> None:
    acct.create("INBOX.child")
    assert acct.rename("INBOX", "Old.Inbox") == []  # the caller moves the messages
    assert acct.names() == ["INBOX", "INBOX.child", "Old"]  # superior made, child stays
