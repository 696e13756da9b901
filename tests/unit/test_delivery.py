"""The delivery path itself, on a real file system with file work run synchronously: what the
SMTP server (and the end-of-data checks of issue 12) ask of it -- a header edit while the final
copy is made, every copy into a folder such as Junk, the Sieve reject that becomes the SMTP
reply -- and that nothing is copied when nothing changes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer

from mailsuite.config import parse_config
from mailsuite.delivery import (
    DeliveryResult,
    Envelope,
    IncomingMessage,
    deliver_bytes,
    deliver_file,
)
from mailsuite.directory import Directory, LocalBox
from mailsuite.queue.spool import Spool
from mailsuite.sieve.engine import SieveFilter, SieveSettings
from mailsuite.sieve.storage import ScriptStore
from mailsuite.smtp.headers import HeaderEdit
from mailsuite.store import quota
from mailsuite.store.events import ChangeHub
from mailsuite.store.index import crlf_size

RECEIVED = b"Received: from client.test ([127.0.0.1])\n\tby mx.example.test; now\n"
HEAD = b"From: <bob@remote.test>\nTo: <alice@example.test>\nSubject: hi\n"
BODY = b"\nhello\nworld\n"


def sync(f: Any, *args: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(f, *args)


class Runtime:
    """What delivery reads of the runtime: config, directory, change hub, queue, sieve."""

    def __init__(self, tmp: Path, sieve: bool = True) -> None:
        data = {
            "server": {"hostname": "mx.example.test", "data_dir": str(tmp / "data")},
            "domains": {"local": ["example.test"]},
        }
        self.config = parse_config(data, None, tmp)
        self.config.mail_dir.mkdir(parents=True)
        self.directory = Directory(
            self.config.directory_file, self.config.mail_dir, self.config.local_domains
        )
        for user in ("alice@example.test", "bob@example.test"):
            self.directory.add_user(user, "x")
        self.changes = ChangeHub()
        self.notified: list[Path] = []
        self.changes.subscribe(
            self.directory.mailbox_root("alice@example.test"), self.notified.append
        )
        self.queue = Spool(self.config.data_dir / "queue").ensure()
        self.sieve = (
            SieveFilter(SieveSettings(hostname="mx.example.test"), self.directory)
            if sieve
            else None
        )
        self.mail_auth = None

    def box(self, user: str) -> LocalBox:
        (box,) = self.directory.resolve(user).local
        return box

    def files(self, user: str, folder: str = "", sub: str = "new") -> list[Path]:
        root = self.directory.mailbox_root(user)
        d = (root / f".{folder}" if folder else root) / sub
        return sorted(d.iterdir()) if d.is_dir() else []


@pytest.fixture
def rt(tmp_path: Path) -> Runtime:
    return Runtime(tmp_path)


def receive(
    rt: Runtime,
    rcpts: list[str],
    body: bytes = BODY,
    sender: str = "bob@remote.test",
    remote: tuple[str, ...] = (),
) -> IncomingMessage:
    env = Envelope(sender, [rt.box(r) for r in rcpts], list(remote))
    msg = IncomingMessage(rt, env, RECEIVED, blocking=sync)
    msg.write_body(HEAD + body)
    return msg


def finish(msg: IncomingMessage, **kwargs: Any) -> DeliveryResult:
    results: list[DeliveryResult] = []
    msg.finish(**kwargs).addCallback(results.append)
    assert len(results) == 1
    return results[0]


def check_sizes(path: Path) -> None:
    """The name's ,S= and ,W= are the file's size and its CRLF size (IMAP trusts them)."""
    parts = dict(p.split("=") for p in path.name.split(":")[0].split(",")[1:])
    assert int(parts["S"]) == path.stat().st_size
    assert int(parts["W"]) == crlf_size(path)


def no_leftovers(rt: Runtime, *users: str) -> None:
    for user in users:
        root = rt.directory.mailbox_root(user)
        for tmp in [root / "tmp", *root.glob(".*/tmp")]:
            assert list(tmp.iterdir()) == [], tmp
    assert (
        list((rt.config.data_dir / "spool" / "incoming").glob("*")) == []
        if (rt.config.data_dir / "spool" / "incoming").exists()
        else True
    )


def test_plain_delivery_renames_the_received_file_without_a_copy(rt: Runtime) -> None:
    msg = receive(rt, ["alice@example.test"], BODY + b"y\n" * 200_000)  # > one flush: on disk
    written = msg.path.stat().st_ino
    result = finish(msg)
    assert result == DeliveryResult(None, (rt.directory.mailbox_root("alice@example.test"),))
    (stored,) = rt.files("alice@example.test")
    assert stored.stat().st_ino == written  # the file written as data arrived: no copy
    check_sizes(stored)
    assert rt.notified  # the folder's sessions were told
    no_leftovers(rt, "alice@example.test")


@pytest.mark.parametrize("size", ["small", "large"])
def test_head_edit_rewrites_the_header_section_once(rt: Runtime, size: str) -> None:
    body = BODY if size == "small" else BODY + b"line of the body\n" * 40_000
    msg = receive(
        rt, ["alice@example.test", "bob@example.test"], body, remote=("carol@remote.test",)
    )
    forged = len(b"From: <bob@remote.test>\n")  # replaces the first field (a forged A-R)
    edit = HeaderEdit(
        forged, b"Authentication-Results: mx.example.test; spf=pass\nFrom: <bob@remote.test>\n"
    )
    finish(msg, head_edit=edit)
    for user in ("alice@example.test", "bob@example.test"):
        (stored,) = rt.files(user)
        data = stored.read_bytes()
        trace = b"Return-Path: <bob@remote.test>\nDelivered-To: " + user.encode() + b"\n" + RECEIVED
        assert data == trace + edit.new + HEAD[forged:] + body
        check_sizes(stored)
    (queued,) = rt.queue.ids()
    assert rt.queue.message_path(queued).read_bytes() == RECEIVED + edit.new + HEAD[forged:] + body
    no_leftovers(rt, "alice@example.test", "bob@example.test")


def test_prepended_signature_goes_to_the_queue_entry_and_local_copies(rt: Runtime) -> None:
    msg = receive(rt, ["alice@example.test"], remote=("carol@remote.test",))
    sig = b"DKIM-Signature: v=1; a=ed25519-sha256; d=example.test; s=s1;\n\tb=abc\n"
    finish(msg, head_edit=HeaderEdit(0, sig))
    (queued,) = rt.queue.ids()
    assert rt.queue.message_path(queued).read_bytes() == RECEIVED + sig + HEAD + BODY
    (stored,) = rt.files("alice@example.test")
    assert stored.read_bytes().endswith(RECEIVED + sig + HEAD + BODY)


def test_folder_override_stores_every_copy_in_junk_without_running_scripts(rt: Runtime) -> None:
    root = rt.directory.mailbox_root("alice@example.test")
    ScriptStore(root).put("rules", 'redirect "out@remote.test";\n')
    ScriptStore(root).activate("rules")
    shutil.rmtree(rt.directory.mailbox_root("bob@example.test") / ".Junk")  # bob deleted his
    msg = receive(rt, ["alice@example.test", "bob@example.test"])
    result = finish(msg, folder="Junk")
    for user in ("alice@example.test", "bob@example.test"):
        (stored,) = rt.files(user, "Junk")
        assert stored.read_bytes().endswith(HEAD + BODY)
        assert rt.files(user) == []
    # made again where it was missing, and subscribed so that clients show it
    subscriptions = rt.directory.mailbox_root("bob@example.test") / "subscriptions"
    assert "Junk" in subscriptions.read_text().split()
    assert rt.queue.ids() == []  # the redirect did not run: suspect mail is not forwarded
    assert len(result.folders) == 2
    no_leftovers(rt, "alice@example.test", "bob@example.test")


def test_only_recipients_reject_is_the_smtp_reply(rt: Runtime) -> None:
    root = rt.directory.mailbox_root("alice@example.test")
    ScriptStore(root).put("rules", 'require "reject";\nreject "Go away.";\n')
    ScriptStore(root).activate("rules")
    result = finish(receive(rt, ["alice@example.test"]))
    assert result.reply is not None
    assert (result.reply.code, result.reply.enhanced, result.reply.text) == (
        550,
        "5.7.1",
        "Go away.",
    )
    assert rt.files("alice@example.test") == [] and rt.queue.ids() == []
    no_leftovers(rt, "alice@example.test")
    # with a second recipient it is a notice to the sender instead
    result = finish(receive(rt, ["alice@example.test", "bob@example.test"]))
    assert result.reply is None and len(rt.files("bob@example.test")) == 1
    (notice,) = rt.queue.ids()
    entry = rt.queue.load(notice)
    assert entry.sender == "" and [r.address for r in entry.recipients] == ["bob@remote.test"]


def test_failure_after_the_data_leaves_no_copy_anywhere(rt: Runtime) -> None:
    bob_tmp = rt.directory.mailbox_root("bob@example.test") / "tmp"
    bob_tmp.rmdir()
    bob_tmp.write_text("not a directory")
    msg = receive(rt, ["alice@example.test", "bob@example.test"])
    failures: list[Any] = []
    msg.finish().addErrback(failures.append)
    assert len(failures) == 1
    assert rt.files("alice@example.test") == []
    assert list((rt.directory.mailbox_root("alice@example.test") / "tmp").iterdir()) == []


def test_deliver_bytes_and_file_run_the_script(rt: Runtime, tmp_path: Path) -> None:
    root = rt.directory.mailbox_root("alice@example.test")
    ScriptStore(root).put(
        "rules", 'require ["fileinto", "mailbox"];\nfileinto :create "Reports";\n'
    )
    ScriptStore(root).activate("rules")
    done: list[DeliveryResult] = []
    deliver_bytes(
        rt, "", [rt.box("alice@example.test")], b"Subject: dsn\n\nx\n", blocking=sync
    ).addCallback(done.append)
    (dsn,) = rt.files("alice@example.test", "Reports")
    assert (
        dsn.read_bytes() == b"Return-Path: <>\nDelivered-To: alice@example.test\n"
        b"Subject: dsn\n\nx\n"
    )
    check_sizes(dsn)
    queued = tmp_path / "queued"
    queued.write_bytes(RECEIVED + HEAD + BODY)
    deliver_file(
        rt,
        "bob@remote.test",
        [rt.box("alice@example.test"), rt.box("bob@example.test")],
        queued,
        blocking=sync,
    ).addCallback(done.append)
    assert len(done) == 2
    assert len(rt.files("alice@example.test", "Reports")) == 2
    (plain,) = rt.files("bob@example.test")
    assert plain.read_bytes() == (
        b"Return-Path: <bob@remote.test>\nDelivered-To: bob@example.test\n" + RECEIVED + HEAD + BODY
    )
    assert queued.exists()  # the queue's file is the queue's
    no_leftovers(rt, "alice@example.test", "bob@example.test")


class Signer:
    """Plays ``runtime.mail_auth``: DKIM-Signature fields for what it is asked to sign."""

    def __init__(self) -> None:
        self.signed: list[bytes] = []

    def sign(self, message: bytes) -> defer.Deferred[bytes]:
        self.signed.append(message)
        return defer.succeed(b"DKIM-Signature: v=1; d=example.test; s=s1; b=x\n")


def test_vacation_reply_is_signed_and_queued_once(rt: Runtime) -> None:
    rt.mail_auth = Signer()  # type: ignore[assignment]
    root = rt.directory.mailbox_root("alice@example.test")
    ScriptStore(root).put("rules", 'require "vacation";\nvacation :days 1 "Away.";\n')
    ScriptStore(root).activate("rules")
    for _ in range(2):
        finish(receive(rt, ["alice@example.test"]))
    assert len(rt.files("alice@example.test")) == 2  # kept both times
    (queued,) = rt.queue.ids()  # one reply per sender per period
    entry = rt.queue.load(queued)
    assert entry.sender == "" and [r.address for r in entry.recipients] == ["bob@remote.test"]
    data = rt.queue.message_path(queued).read_bytes()
    (signed,) = rt.mail_auth.signed  # type: ignore[attr-defined]
    assert data == b"DKIM-Signature: v=1; d=example.test; s=s1; b=x\n" + signed
    assert b"Auto-Submitted: auto-replied" in signed and b"Away." in signed


def test_quota_file_is_looked_for_once_per_recipient_and_still_counts(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's quota check tells the rename whether the user has a limit: a user without
    a quota file costs one look for it per delivery (each look is a system call in a disk
    thread, a GIL hand-over), a user with one is still counted."""
    looks: list[str] = []
    real_access = os.access

    def access(path: Any, mode: int, **kw: Any) -> bool:
        if str(path).endswith(quota.FILE_NAME):
            looks.append(str(path))
        return real_access(path, mode, **kw)

    monkeypatch.setattr(os, "access", access)
    finish(receive(rt, ["alice@example.test"]))
    assert len(looks) == 1 and len(rt.files("alice@example.test")) == 1
    root = rt.directory.mailbox_root("alice@example.test")
    before = quota.recount(root, 10**9)
    looks.clear()
    finish(receive(rt, ["alice@example.test", "bob@example.test"]))
    assert len(looks) == 3  # alice: checked and counted; bob (no file): checked only
    stored = rt.files("alice@example.test")
    assert quota.usage(root) == quota.Usage(
        10**9, sum(p.stat().st_size for p in stored), len(stored)
    )
    assert before.messages == 1 and len(stored) == 2
