"""IMAP conformance defects found by acceptance testing (issue 9), end to end: the real twistd
on loopback, driven by imaplib and by a raw socket where the exact bytes matter.  Each test
names the defect it guards against; the pure logic behind it has unit tests too."""

from __future__ import annotations

import imaplib
import itertools
import re

import pytest

from mailsuite.store.maildir import ensure_folder
from mailsuite.store.write import write_message
from tests.clients import IMAPClient
from tests.harness import PASSWORD, Server, ServerFactory

_users = itertools.count()


@pytest.fixture(scope="module")
def server(module_servers: ServerFactory) -> Server:
    return module_servers(("imap",), extra_toml="[auth]\nallow_plaintext = true\n")


@pytest.fixture
def user(server: Server) -> str:
    """A fresh user for each test, so tests never see each other's mailboxes."""
    name = f"u{next(_users)}@example.test"
    server.add_user(name)
    return name


def login(server: Server, user: str) -> imaplib.IMAP4:
    m = imaplib.IMAP4("127.0.0.1", server.port("imap"), timeout=20)
    m.login(user, PASSWORD)
    return m


def append(m: imaplib.IMAP4, box: str, msg: bytes, flags: str | None = None) -> tuple[int, int]:
    typ, data = m.append(box, flags, None, msg)
    assert typ == "OK", data
    uidvalidity, uid = re.search(rb"APPENDUID (\d+) (\d+)", data[0]).groups()  # type: ignore[union-attr]
    return int(uidvalidity), int(uid)


MSG = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n"


# -- UIDVALIDITY (RFC 3501 2.3.1.1) -----------------------------------------------------------


def test_uidvalidity_is_never_reused_for_a_name_created_again(server: Server, user: str) -> None:
    """Issue 9: DELETE + CREATE + APPEND within one second gave the new mailbox the old
    UIDVALIDITY and UID 1 again, so clients showed the old message for the new one."""
    m = login(server, user)
    seen = []
    for _ in range(3):  # well within one second: on the old code two rounds always collided
        assert m.create("Again")[0] == "OK"
        uidvalidity, uid = append(m, "Again", MSG)
        assert uid == 1
        status = m.status("Again", "(UIDVALIDITY UIDNEXT)")[1][0]
        assert re.search(rb"UIDVALIDITY (\d+)", status).group(1) == b"%d" % uidvalidity  # type: ignore[union-attr]
        seen.append(uidvalidity)
        assert m.delete("Again")[0] == "OK"
    assert seen == sorted(set(seen)), f"UIDVALIDITY must grow with every incarnation: {seen}"
    m.logout()


# -- new keywords are announced (RFC 3501 7.2.6, 7.1) ------------------------------------------

SYSTEM = b"\\Answered \\Flagged \\Deleted \\Seen \\Draft"


def test_a_new_keyword_is_announced_before_the_fetch_that_shows_it(
    server: Server, user: str
) -> None:
    """Issue 9: STORE +FLAGS ($hello) answered with FETCH (FLAGS ($hello)) without first
    sending FLAGS / PERMANENTFLAGS that list $hello; other sessions never learnt it."""
    m = login(server, user)
    m.create("Kw")
    append(m, "Kw", MSG)
    append(m, "Kw", MSG, "($old)")
    m.logout()
    a, b, c = (
        IMAPClient(server.port("imap"), user),
        IMAPClient(server.port("imap"), user),
        IMAPClient(server.port("imap"), user),
    )
    got = a.ok("SELECT Kw")
    assert got[0] == b"* FLAGS (" + SYSTEM + b" $old)"
    b.ok("SELECT Kw")
    c.ok("EXAMINE Kw")
    got = a.ok("STORE 1 +FLAGS ($hello)")
    assert got == [
        b"* FLAGS (" + SYSTEM + b" $hello $old)",
        b"* OK [PERMANENTFLAGS (" + SYSTEM + b" $hello $old \\*)] Flags permitted",
        b"* 1 FETCH (FLAGS ($hello \\Recent))",
    ]
    # a keyword the session knows already is not announced again
    assert a.ok("STORE 2 +FLAGS ($hello)") == [b"* 2 FETCH (FLAGS ($hello $old \\Recent))"]
    # the other sessions learn it with their next updates, before the FETCH
    got = b.ok("NOOP")
    assert got[:2] == [
        b"* FLAGS (" + SYSTEM + b" $hello $old)",
        b"* OK [PERMANENTFLAGS (" + SYSTEM + b" $hello $old \\*)] Flags permitted",
    ]
    assert got[2:] == [
        b"* 1 FETCH (UID 1 FLAGS ($hello))",
        b"* 2 FETCH (UID 2 FLAGS ($hello $old))",
    ]
    got = c.ok("NOOP")
    assert got[:2] == [
        b"* FLAGS (" + SYSTEM + b" $hello $old)",
        b"* OK [PERMANENTFLAGS ()] Read-only mailbox",
    ]
    assert b.ok("NOOP") == []  # said once
    # a keyword another session sets silently is announced too
    a.ok("STORE 1 +FLAGS.SILENT ($third)")
    assert b.ok("NOOP")[0] == b"* FLAGS (" + SYSTEM + b" $hello $old $third)"
    for r in (a, b, c):
        r.close()


# -- addresses: ENVELOPE names in comment form, SEARCH on parsed addresses --------------------


def test_envelope_name_in_comment_form_and_search_through_comments(
    server: Server, user: str
) -> None:
    """Issue 9: ``From: user@domain (Real Name)`` gave the name NIL in ENVELOPE, and SEARCH
    FROM user-from@domain.org missed ``<user-from (comment)@ (comment) domain.org>``."""
    m = login(server, user)
    m.create("Addr")
    append(m, "Addr", b"From: user@domain (Real Name)\r\nSubject: a\r\n\r\nx\r\n")
    append(
        m,
        "Addr",
        b"From: <user-from (comment)@ (comment) domain.org>\r\n"
        b"To: Someone (Team\r\n Lead) <to@domain.org>\r\nSubject: b\r\n\r\nx\r\n",
    )
    m.select("Addr")
    env = m.fetch("1", "(ENVELOPE)")[1][0]
    assert b'(("Real Name" NIL "user" "domain"))' in env
    assert m.search(None, "FROM", "user-from@domain.org")[1] == [b"2"]
    assert m.uid("SEARCH", "FROM", "user-from@domain.org")[1] == [b"2"]
    assert m.search(None, "FROM", '"Real Name <user@domain>"')[1] == [b"1"]
    assert m.search(None, "TO", '"Someone <to@domain.org>"')[1] == [b"2"]
    assert m.search(None, "OR", "FROM", "user@domain", "TO", "to@domain.org")[1] == [b"1 2"]
    m.logout()


# -- \Recent and EXAMINE (RFC 3501 2.3.2, 6.3.2) ----------------------------------------------


def _count(lines: list[bytes], what: bytes) -> int:
    (n,) = [int(ln.split()[1]) for ln in lines if ln.endswith(b" " + what)]
    return n


def _status_recent(r: IMAPClient, box: str) -> int:
    (line,) = r.ok(f"STATUS {box} (RECENT)")
    return int(re.search(rb"RECENT (\d+)", line).group(1))  # type: ignore[union-attr]


def test_examine_shows_recent_without_claiming_it(server: Server, user: str) -> None:
    """Issue 9: EXAMINE reported RECENT 0 for two messages just appended (no session had
    selected the mailbox since); STATUS said 2."""
    r = IMAPClient(server.port("imap"), user)
    r.ok("CREATE Rec")
    for _ in range(2):
        r.ok(b"APPEND Rec {3+}\r\nx\r\n")
    assert _status_recent(r, "Rec") == 2
    for _ in range(2):  # EXAMINE twice: the first must not have cleared \Recent
        got = r.ok("EXAMINE Rec")
        assert _count(got, b"EXISTS") == 2 and _count(got, b"RECENT") == 2, got
        assert r.ok("FETCH 1:* (FLAGS)") == [
            b"* 1 FETCH (FLAGS (\\Recent))",
            b"* 2 FETCH (FLAGS (\\Recent))",
        ]
        assert r.ok("SEARCH RECENT") == [b"* SEARCH 1 2"]
        assert _status_recent(r, "Rec") == 2
        r.ok("CLOSE")
    # a delivery while the mailbox is examined is recent there too, and still unclaimed
    other = IMAPClient(server.port("imap"), user)
    r.ok("EXAMINE Rec")
    other.ok(b"APPEND Rec {3+}\r\ny\r\n")
    got = r.ok("NOOP")
    assert b"* 3 EXISTS" in got and b"* 3 RECENT" in got, got
    assert _status_recent(other, "Rec") == 3
    # SELECT claims them; after that nobody else sees them as recent
    got = other.ok("SELECT Rec")
    assert _count(got, b"RECENT") == 3
    r.ok("CLOSE")
    got = r.ok("EXAMINE Rec")
    assert _count(got, b"RECENT") == 0
    assert _status_recent(r, "Rec") == 0
    r.close()
    other.close()


# -- subscriptions outlive their mailboxes (RFC 3501 6.3.6, 6.3.9; RFC 5258 3) ---------------


def test_a_deleted_mailbox_stays_subscribed(server: Server, user: str) -> None:
    """Issue 9: LIST (SUBSCRIBED) left out a subscribed mailbox that no longer exists: DELETE
    removed the subscription, which the server must never do on its own."""
    r = IMAPClient(server.port("imap"), user)
    for name in ("Gone", "Kept", "Kept.Sub"):
        r.ok(f"CREATE {name}")
        r.ok(f"SUBSCRIBE {name}")
    r.ok("DELETE Gone")
    r.ok("DELETE Kept.Sub")
    got = [ln for ln in r.ok('LIST (SUBSCRIBED) "" "*"') if ln.startswith(b"* LIST")]
    assert got == [
        b'* LIST (\\NonExistent \\Subscribed) "." "Gone"',
        b'* LIST (\\HasNoChildren \\Subscribed) "." "Kept"',
        b'* LIST (\\NonExistent \\Subscribed) "." "Kept.Sub"',
    ]
    # a plain LIST shows only what exists, and RETURN (SUBSCRIBED) marks it
    assert r.ok('LIST "" "Kept*" RETURN (SUBSCRIBED)') == [
        b'* LIST (\\HasNoChildren \\Subscribed) "." "Kept"'
    ]
    assert r.ok('LIST "" "Gone"') == []
    # LSUB (RFC 3501 6.3.9) still lists it; it cannot be selected
    assert r.ok('LSUB "" "*"') == [
        b'* LSUB (\\Noselect) "." "Gone"',
        b'* LSUB () "." "Kept"',
        b'* LSUB (\\Noselect) "." "Kept.Sub"',
    ]
    assert r.cmd("SELECT Gone")[-1].split()[1:3] == [b"NO", b"[NONEXISTENT]"]
    # created again, it is subscribed as before; UNSUBSCRIBE is what removes it
    r.ok("CREATE Gone")
    assert r.ok('LSUB "" "Gone"') == [b'* LSUB () "." "Gone"']
    r.ok("UNSUBSCRIBE Gone")
    assert r.ok('LSUB "" "Gone"') == []
    r.close()


# -- CONDSTORE (RFC 7162 3.1, 3.1.5) ---------------------------------------------------------


def _highestmodseq(lines: list[bytes]) -> list[int]:
    return [
        int(m.group(1)) for ln in lines if (m := re.match(rb"\* OK \[HIGHESTMODSEQ (\d+)\]", ln))
    ]


def _modseqs(r: IMAPClient) -> dict[int, int]:
    got = r.ok("UID FETCH 1:* (MODSEQ)")
    return {
        int(m.group(1)): int(m.group(2))
        for ln in got
        if (m := re.search(rb"UID (\d+) MODSEQ \((\d+)\)", ln))
    }


@pytest.fixture(scope="module")
def cs_user(server: Server) -> str:
    name = f"u{next(_users)}@example.test"
    server.add_user(name)
    return name


_boxes = itertools.count()


@pytest.fixture
def cs_box(server: Server, cs_user: str) -> tuple[str, str]:
    """(user, mailbox): a new mailbox with three messages, the second with the highest
    mod-sequence."""
    box = f"Cs{next(_boxes)}"
    m = login(server, cs_user)
    m.create(box)
    for _ in range(3):
        append(m, box, MSG)
    m.select(box)
    m.store("2", "+FLAGS", "(\\Flagged)")
    m.logout()
    return cs_user, box


@pytest.mark.parametrize(
    "command",
    [
        "FETCH 1 (MODSEQ)",
        "FETCH 1:* (FLAGS) (CHANGEDSINCE 1)",
        "SEARCH MODSEQ 1",
        "UID SEARCH RETURN (COUNT) MODSEQ 1",
        "STORE 1 (UNCHANGEDSINCE 1000) +FLAGS (\\Seen)",
        "STATUS INBOX (HIGHESTMODSEQ)",
        "ENABLE CONDSTORE",
    ],
)
def test_the_first_condstore_enabling_command_reports_highestmodseq(
    server: Server, cs_box: tuple[str, str], command: str
) -> None:
    """Issue 9: after a plain SELECT, the first CONDSTORE enabling command must send
    * OK [HIGHESTMODSEQ n] (RFC 7162 3.1); it sent nothing."""
    r = IMAPClient(server.port("imap"), cs_box[0])
    (selected,) = _highestmodseq(r.ok(f"SELECT {cs_box[1]}"))
    got = r.ok(command)
    assert _highestmodseq(got) == [selected], got
    assert _highestmodseq(r.ok("FETCH 1 (MODSEQ)")) == []  # once only
    r.close()


def test_highestmodseq_stays_below_changes_not_yet_announced(
    server: Server, cs_box: tuple[str, str]
) -> None:
    user, box = cs_box
    a, b = IMAPClient(server.port("imap"), user), IMAPClient(server.port("imap"), user)
    (selected,) = _highestmodseq(a.ok(f"SELECT {box}"))
    b.ok(f"SELECT {box}")
    b.ok("STORE 3 +FLAGS (\\Answered)")  # news for a, not told yet
    got = a.ok("FETCH 1 (MODSEQ)")
    assert _highestmodseq(got) == [selected]
    # the change then arrives with UID and MODSEQ (RFC 7162 3.1)
    assert any(
        re.match(rb"\* 3 FETCH \(UID 3 FLAGS \(\\Answered\) MODSEQ \(\d+\)\)", ln) for ln in got
    ), got
    # and a STORE's own FETCH responses carry UID once CONDSTORE is on
    assert re.match(
        rb"\* 1 FETCH \(UID 1 FLAGS \(\\Seen\) MODSEQ \(\d+\)\)", a.ok("STORE 1 +FLAGS (\\Seen)")[0]
    )
    a.close()
    b.close()


def test_esearch_modseq_is_that_of_the_message_returned(
    server: Server, cs_box: tuple[str, str]
) -> None:
    """Issue 9: SEARCH RETURN (MIN) ... MODSEQ gave the highest mod-sequence of all matches,
    not that of the message MIN returned (RFC 7162 3.1.5)."""
    r = IMAPClient(server.port("imap"), cs_box[0])
    r.ok(f"SELECT {cs_box[1]}")
    ms = _modseqs(r)
    assert ms[2] > max(ms[1], ms[3])
    assert r.ok("SEARCH RETURN (MIN) MODSEQ 1") == [
        f'* ESEARCH (TAG "r{r.n}") MIN 1 MODSEQ {ms[1]}'.encode()
    ]
    assert r.ok("UID SEARCH RETURN (MAX) MODSEQ 1") == [
        f'* ESEARCH (TAG "r{r.n}") UID MAX 3 MODSEQ {ms[3]}'.encode()
    ]
    assert r.ok("SEARCH RETURN (MIN MAX) MODSEQ 1") == [
        f'* ESEARCH (TAG "r{r.n}") MIN 1 MAX 3 MODSEQ {max(ms[1], ms[3])}'.encode()
    ]
    assert r.ok("SEARCH RETURN (COUNT) MODSEQ 1") == [
        f'* ESEARCH (TAG "r{r.n}") COUNT 3 MODSEQ {ms[2]}'.encode()
    ]
    assert r.ok("SEARCH MODSEQ 1") == [f"* SEARCH 1 2 3 (MODSEQ {ms[2]})".encode()]
    r.close()


# -- CREATE and RENAME across the hierarchy (RFC 3501 6.3.3, 6.3.5) ---------------------------


def _names(m: imaplib.IMAP4, pattern: str) -> dict[str, bytes]:
    out = {}
    for line in m.list('""', pattern)[1]:
        if line is None:  # imaplib's way of saying nothing matched
            continue
        attrs, name = re.match(rb'\((.*?)\) "\." "?(.*?)"?$', line).groups()  # type: ignore[union-attr]
        out[name.decode()] = attrs
    return out


def test_create_makes_superiors_and_rename_moves_inferiors(server: Server, user: str) -> None:
    """Issue 9: CREATE a.b left no mailbox a (RFC 3501 6.3.3 SHOULD create it), and RENAME
    of a parent that only its children implied answered NO [NONEXISTENT] (6.3.5)."""
    m = login(server, user)
    assert m.create("Proj.Sub")[0] == "OK"
    assert _names(m, "Proj*") == {"Proj": b"\\HasChildren", "Proj.Sub": b"\\HasNoChildren"}
    assert m.select("Proj")[0] == "OK"  # a real mailbox, not \Noselect
    m.close()
    append(m, "Proj.Sub", MSG)
    assert m.rename("Proj", "Done.Proj")[0] == "OK"
    assert _names(m, "Done*") == {
        "Done": b"\\HasChildren",
        "Done.Proj": b"\\HasChildren",
        "Done.Proj.Sub": b"\\HasNoChildren",
    }
    assert _names(m, "Proj*") == {}
    assert m.status("Done.Proj.Sub", "(MESSAGES)")[1][0].endswith(b"(MESSAGES 1)")
    # a tree another Maildir++ tool made: .Tree.Leaf without .Tree
    write_message(ensure_folder(server.maildir(user, "Tree.Leaf")), [b"Subject: t\n\nx\n"])
    assert _names(m, "Tree*") == {
        "Tree": b"\\Noselect \\HasChildren",
        "Tree.Leaf": b"\\HasNoChildren",
    }
    assert m.rename("Tree", "Forest")[0] == "OK"
    assert _names(m, "Forest*") == {
        "Forest": b"\\Noselect \\HasChildren",
        "Forest.Leaf": b"\\HasNoChildren",
    }
    assert m.status("Forest.Leaf", "(MESSAGES)")[1][0].endswith(b"(MESSAGES 1)")
    typ, data = m.rename("Nothing", "Else")
    assert typ == "NO" and b"[NONEXISTENT]" in data[0]
    m.logout()


def test_rename_inbox_moves_its_messages_and_leaves_its_inferiors(
    server: Server, user: str
) -> None:
    m = login(server, user)
    append(m, "INBOX", MSG)
    append(m, "INBOX", MSG)
    assert m.create("INBOX.Child")[0] == "OK"
    append(m, "INBOX.Child", MSG)
    assert m.rename("INBOX", "Old.Inbox")[0] == "OK"
    assert m.status("Old.Inbox", "(MESSAGES)")[1][0].endswith(b"(MESSAGES 2)")
    assert m.status("INBOX", "(MESSAGES)")[1][0].endswith(b"(MESSAGES 0)")
    assert m.status("INBOX.Child", "(MESSAGES)")[1][0].endswith(b"(MESSAGES 1)")
    assert _names(m, "Old") == {"Old": b"\\HasChildren"}  # the superior name was made
    assert _names(m, "Old.Inbox.*") == {}  # INBOX's inferiors did not move
    typ, data = m.rename("Old.Inbox", "INBOX")
    assert typ == "NO" and b"[ALREADYEXISTS]" in data[0]
    m.logout()
