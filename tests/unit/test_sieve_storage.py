"""Script storage (Dovecot layout), the delivery entry point ``evaluate`` and the helpers
that apply its actions to the store."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailsuite.sieve.actions import Discard, FileInto, Keep, Redirect, Reject
from mailsuite.sieve.apply import prepare_folder, rejection_message, smtp_reply, store_message
from mailsuite.sieve.engine import KEEP, SieveSettings, evaluate
from mailsuite.sieve.interpreter import Limits, SieveEnvelope
from mailsuite.sieve.storage import MAX_LOG, ScriptError, ScriptStore
from mailsuite.store.index import FolderIndex
from mailsuite.store.mailbox import Account
from mailsuite.store.maildir import ensure_folder

ENV = SieveEnvelope("friend@example.org", "alice+news@example.test", "alice@example.test")
HEAD = b"Return-Path: <friend@example.org>\nDelivered-To: alice@example.test\n"
MSG = (
    b"From: friend@example.org\nTo: alice@example.test\nSubject: hello\n"
    b"Message-ID: <m@example.org>\n\nbody\n"
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return ensure_folder(tmp_path / "alice")


@pytest.fixture
def message(tmp_path: Path) -> Path:
    path = tmp_path / "msg"
    path.write_bytes(HEAD + MSG)
    return path


# -- storage ----------------------------------------------------------------------------------


def test_put_list_activate_in_dovecot_layout(root: Path) -> None:
    store = ScriptStore(root)
    store.put("b", "keep;")
    store.put("a", "discard;")
    assert store.names() == ["a", "b"]
    assert store.active() is None and store.active_path() is None
    store.activate("a")
    assert (root / ".dovecot.sieve").readlink() == Path("sieve/a.sieve")
    assert store.active() == "a" and store.active_path() == root / "sieve" / "a.sieve"
    assert (root / "sieve" / "b.sieve").read_text() == "keep;"
    assert Account(root).names() == ["INBOX"]  # the link is not taken for a folder
    store.activate(None)
    assert store.active() is None and not os.path.lexists(root / ".dovecot.sieve")
    assert not [p for p in (root / "sieve").iterdir() if p.name.endswith(".tmp")]


def test_names_cannot_escape(root: Path) -> None:
    store = ScriptStore(root)
    for bad in ("../x", "a/b", ".hidden", "", "a\nb"):
        with pytest.raises(ScriptError):
            store.put(bad, "keep;")
    assert not (root.parent / "x.sieve").exists()


def test_active_script_cannot_be_deleted_but_can_be_renamed(root: Path) -> None:
    store = ScriptStore(root)
    store.put("a", "keep;")
    store.activate("a")
    with pytest.raises(ScriptError) as info:
        store.delete("a")
    assert info.value.code == "ACTIVE"
    store.rename("a", "b")
    assert store.names() == ["b"] and store.active() == "b"
    store.put("c", "keep;")
    with pytest.raises(ScriptError) as info:
        store.rename("c", "b")
    assert info.value.code == "ALREADYEXISTS"
    with pytest.raises(ScriptError) as info:
        store.delete("zz")
    assert info.value.code == "NONEXISTENT"
    store.delete("c")
    assert store.names() == ["b"]


def test_quota(root: Path) -> None:
    store = ScriptStore(root, max_scripts=2, max_size=10)
    store.put("a", "keep;")
    store.put("b", "keep;")
    store.put("a", "stop;")  # replacing is not a new script
    with pytest.raises(ScriptError) as info:
        store.put("c", "keep;")
    assert info.value.code == "QUOTA/MAXSCRIPTS"
    with pytest.raises(ScriptError) as info:
        store.check_space("a", 11)
    assert info.value.code == "QUOTA/MAXSIZE"


def test_log_is_bounded(root: Path) -> None:
    store = ScriptStore(root)
    for i in range(MAX_LOG // 100 + 50):
        store.append_log(f"entry {i} " + "x" * 80)
    assert (root / "sieve" / "sieve.log").stat().st_size <= MAX_LOG
    assert store.read_log().splitlines()[-1].endswith("x" * 80)
    assert "entry 0 " not in store.read_log()


# -- evaluate ---------------------------------------------------------------------------------


def settings(**kw: object) -> SieveSettings:
    return SieveSettings(hostname="mx.example.test", **kw)  # type: ignore[arg-type]


def active(root: Path, text: str) -> ScriptStore:
    store = ScriptStore(root)
    store.put("main", text)
    store.activate("main")
    return store


def test_no_active_script_is_keep(root: Path, message: Path) -> None:
    assert evaluate(root, message, ENV, settings()) is KEEP


def test_script_runs_with_subaddress_and_folder_checks(root: Path, message: Path) -> None:
    ensure_folder(root / ".News")
    active(
        root,
        'require ["envelope", "subaddress", "fileinto", "mailbox"];\n'
        'if allof (envelope :detail "to" "news", mailboxexists "News")'
        ' { fileinto "News"; }',
    )
    out = evaluate(root, message, ENV, settings())
    assert out.actions == (FileInto("News"),) and out.script == "main" and out.error is None


def test_every_change_of_the_active_script_is_seen_by_the_next_delivery(
    root: Path, message: Path
) -> None:
    """evaluate keeps each root's active script by the identity of the link and of its file
    (two stat calls a delivery): every way the script can change must still show."""

    def run() -> tuple[object, ...]:
        out = evaluate(root, message, ENV, settings())
        return (*out.actions, out.script)

    store = ScriptStore(root)
    store.put("a", 'require "fileinto"; fileinto "A";')
    store.activate("a")
    assert run() == (FileInto("A"), "a")
    assert run() == (FileInto("A"), "a")  # (from the cache)
    store.put("a", 'require "fileinto"; fileinto "B";')  # same name, new file
    assert run() == (FileInto("B"), "a")
    store.put("c", "discard;")
    store.activate("c")  # another script
    assert run() == (Discard(), "c")
    store.rename("c", "d")  # same file, new name
    assert run() == (Discard(), "d")
    path = root / "sieve" / "d.sieve"
    stamp = path.stat().st_mtime_ns
    path.write_text("keep ;  ")  # edited in place, same size as "discard;"
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))  # (a later write has a later mtime)
    assert run() == (Keep(), "d")
    store.activate(None)
    assert evaluate(root, message, ENV, settings()) is KEEP
    (root / ".dovecot.sieve").write_text('require "fileinto"; fileinto "P";')  # a plain file
    assert run() == (FileInto("P"), ".dovecot.sieve")
    (root / ".dovecot.sieve").unlink()
    (root / ".dovecot.sieve").symlink_to("sieve/gone.sieve")  # a link to nothing
    assert evaluate(root, message, ENV, settings()) is KEEP
    (root / ".dovecot.sieve").unlink()
    (root / ".dovecot.sieve").symlink_to("../elsewhere/a.sieve")  # outside sieve/: not run
    (root.parent / "elsewhere").mkdir()
    (root.parent / "elsewhere" / "a.sieve").write_text("discard;")
    assert evaluate(root, message, ENV, settings()) is KEEP


def test_runtime_failure_keeps_and_logs_for_the_user(root: Path, message: Path) -> None:
    store = active(root, 'require "fileinto";' + "".join(f'fileinto "f{i}";' for i in range(5)))
    out = evaluate(root, message, ENV, settings(limits=Limits(max_actions=3)))
    assert out.actions == (Keep(),) and out.error and "more than 3 actions" in out.error
    assert "failed, message kept in INBOX" in store.read_log()


def test_broken_script_on_disk_keeps(root: Path, message: Path) -> None:
    store = active(root, "keep;")
    (root / "sieve" / "main.sieve").write_text("if {")
    out = evaluate(root, message, ENV, settings())
    assert out.actions == (Keep(),) and "does not compile" in (out.error or "")
    assert "line 1" in store.read_log()


def test_redirect_loop_through_our_delivered_to(tmp_path: Path, root: Path) -> None:
    active(root, 'redirect "elsewhere@example.org";')
    fresh = tmp_path / "fresh"
    fresh.write_bytes(HEAD + MSG)
    out = evaluate(root, fresh, ENV, settings())
    assert out.actions == (Redirect("elsewhere@example.org"),)
    looped = tmp_path / "looped"
    looped.write_bytes(HEAD + b"Delivered-To: alice@example.test\n" + MSG)
    out = evaluate(root, looped, ENV, settings())
    assert out.actions == (Keep(),) and "loop" in out.notes[0]


def test_vacation_replies_once_then_remembers(root: Path, message: Path) -> None:
    active(root, 'require "vacation"; vacation :days 1 "Away.";')
    now = datetime(2024, 10, 1, 12, tzinfo=UTC)
    first = evaluate(root, message, ENV, settings(), now=now)
    assert first.actions == (Keep(),)
    assert first.vacation is not None and first.vacation.recipient == "friend@example.org"
    assert first.vacation.sender == "" and b"Auto-Submitted: auto-replied" in first.vacation.message
    second = evaluate(root, message, ENV, settings(), now=now)
    assert second.vacation is None and "already replied" in second.notes[0]


def test_discard_and_reject_outcomes(root: Path, message: Path) -> None:
    active(root, "discard;")
    assert evaluate(root, message, ENV, settings()).actions == (Discard(),)
    active(root, 'require "reject"; reject "Not here.";')
    assert evaluate(root, message, ENV, settings()).actions == (Reject("Not here."),)


# -- applying ---------------------------------------------------------------------------------


def test_prepare_folder_create_missing_and_invalid(root: Path) -> None:
    path, note = prepare_folder(root, "Lists/acme", create=True)
    assert path == root / ".Lists.acme" and note is None
    assert (path / "cur").is_dir() and "Lists.acme" in Account(root).subscriptions()
    path, note = prepare_folder(root, "Nope", create=False)
    assert path == root and note and "no such folder" in note
    path, note = prepare_folder(root, "../../etc", create=True)
    assert path == root and note
    path, _ = prepare_folder(root, "Entwürfe", create=True)
    assert path == root / ".Entw&APw-rfe"
    assert prepare_folder(root, "inbox", create=False) == (root, None)


def test_store_message_with_and_without_flags(root: Path, message: Path) -> None:
    store_message(message, len(HEAD.split(b"\n")[0]) + 1, b"Return-Path: <x>\n", root, frozenset())
    new = list((root / "new").iterdir())
    assert len(new) == 1 and new[0].read_bytes().startswith(b"Return-Path: <x>\nDelivered-To")
    store_message(message, 0, b"", root, frozenset({"\\Seen", "$Label1"}))
    index = FolderIndex(root)
    try:
        index.sync()
        flags = sorted(sorted(m.flags) for m in index.messages())
    finally:
        index.close()
    assert flags == [[], ["$Label1", "\\Seen"]]


def test_reject_replies() -> None:
    reply = smtp_reply(Reject("Go\r\naway\x00 please"))
    assert reply.encode() == b"550 5.7.1 Go away please\r\n"
    data = rejection_message(
        Reject("Not wanted."), ENV, MSG.split(b"\n\n")[0] + b"\n", "mx.example.test"
    )
    assert b"Disposition: automatic-action/MDN-sent-automatically; deleted" in data
    assert b"To: <friend@example.org>" in data and b"Original-Message-ID: <m@example.org>" in data
    assert b"Not wanted." in data
