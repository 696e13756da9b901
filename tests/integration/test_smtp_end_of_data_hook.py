"""The end-of-data hook (where SPF/DKIM/DMARC plug in) through the real Twisted adapter and the
real delivery, over a loopback socket with smtplib: a check's verdict rejects, sends the
message to Junk, adds and removes header fields, and can read the stored message, for a
message held in memory and for one already streamed to disk (over 256 KiB)."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailsuite.auth import hash_password
from mailsuite.config import parse_config
from mailsuite.runtime import Runtime
from mailsuite.service import build_runtime
from mailsuite.smtp import replies as R
from mailsuite.smtp.policy import Check, Facts, Profile, ReceivedMessage, Verdict, refuse
from mailsuite.smtp.protocol import SMTPFactory, mx_factory
from tests.harness import wait_until
from tests.reactor_thread import in_reactor, running_reactor

ALICE = "alice@example.test"
OURS = b"Authentication-Results: mx.example.test;\n\tdkim=pass header.d=bank.example"


class MailAuthLike(Check):
    """What the mail-authentication checks will do, scripted by the message's Subject."""

    def __init__(self) -> None:
        self.read: list[bytes] = []
        self.facts: list[tuple[str, str | None, str | None]] = []

    async def end_of_data(self, facts: Facts, message: ReceivedMessage) -> Verdict:
        data = await message.read()
        self.read.append(data)
        self.facts.append((facts.client_ip, facts.helo, facts.user))
        if b"Subject: reject" in message.headers:
            return refuse(R.AUTH_POLICY_REJECT, "dmarc=fail (p=reject)")
        if b"Subject: crash" in message.headers:
            raise RuntimeError("a check's bug")
        forged = tuple(
            f for f in message.headers.split(b"\nX-Sep: -\n") if f.startswith(b"Authentication")
        )
        return Verdict(
            junk=b"Subject: junk" in message.headers,
            prepend=("Authentication-Results: mx.example.test; dmarc=fail",),
            remove=forged,
        )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Runtime, Any]]:
    root = tmp_path_factory.mktemp("hook")
    reactor = running_reactor()
    cfg = parse_config(
        {
            "server": {"hostname": "mx.example.test", "data_dir": str(root / "data")},
            "listen": {"smtp": ["tcp:0:interface=127.0.0.1"]},
            "domains": {"local": ["example.test"]},
        },
        None,
        root,
    )
    runtime = build_runtime(cfg, reactor)
    runtime.directory.add_user(ALICE, hash_password("pw"))
    check = MailAuthLike()

    def listen() -> Any:
        base = mx_factory(runtime, False)
        assert isinstance(base, SMTPFactory)
        p = base.profile
        profile = Profile(p.name, p.auth, p.requires_auth, p.policy.with_checks(check))
        return reactor.listenTCP(0, SMTPFactory(runtime, profile, False), interface="127.0.0.1")

    port = in_reactor(reactor, listen)
    yield port.getHost().port, runtime, check
    in_reactor(reactor, port.stopListening)


def folder(runtime: Runtime, name: str) -> Path:
    root = runtime.directory.mailbox_root(ALICE)
    return root if name == "INBOX" else root / f".{name}"


def stored(runtime: Runtime, name: str, subject: bytes) -> list[tuple[str, bytes]]:
    out = []
    for path in (folder(runtime, name) / "new").iterdir():
        data = path.read_bytes()
        if b"Subject: " + subject + b"\n" in data:
            out.append((path.name, data))
    return out


def message(subject: str, pad: int = 0) -> bytes:
    head = (
        b"Authentication-Results: mx.example.test;\r\n\tdkim=pass header.d=bank.example\r\n"
        b"X-Sep: -\r\n"
        b"Authentication-Results: other.example; spf=pass\r\n"
        b"From: a@bank.example\r\n" + f"Subject: {subject}\r\n\r\n".encode()
    )
    return head + b"body line\r\n" + (b"x" * 70 + b"\r\n") * pad


def send(port: int, data: bytes) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("client.example")
        return client.sendmail("a@bank.example", [ALICE], data)  # type: ignore[no-any-return]


@pytest.mark.parametrize("pad", [0, 5000], ids=["in-memory", "on-disk"])
def test_verdict_edits_the_header_and_files_into_junk(server: Any, pad: int) -> None:
    port, runtime, check = server
    subject = f"junk {pad}"
    data = message(subject, pad)
    send(port, data)
    assert stored(runtime, "INBOX", subject.encode()) == []
    [(name, mail)] = stored(runtime, "Junk", subject.encode())
    assert check.read[-1] == data.replace(b"\r\n", b"\n")  # read() gave the message as sent
    assert check.facts[-1] == ("127.0.0.1", "client.example", None)
    lines = mail.split(b"\n")
    assert lines[0] == b"Return-Path: <a@bank.example>"
    assert lines[1] == b"Delivered-To: alice@example.test"
    assert lines[2].startswith(b"Received: from client.example ([127.0.0.1])")
    at = lines.index(b"Authentication-Results: mx.example.test; dmarc=fail")
    assert lines[at - 1].startswith(b"\t") and lines[at + 1] == b"X-Sep: -"  # below Received
    assert OURS not in mail  # the forged field is gone, the other one kept
    assert b"Authentication-Results: other.example; spf=pass\n" in mail
    assert mail.endswith(b"body line\n" + (b"x" * 70 + b"\n") * pad)
    # the sizes in the file name describe the file as it is now
    size, wire = (int(part[2:]) for part in name.split(",")[-2:])
    assert size == len(mail) and wire == len(mail) + mail.count(b"\n")


def test_header_edit_without_junk_goes_to_the_inbox(server: Any) -> None:
    port, runtime, _ = server
    send(port, message("plain"))
    [(_, mail)] = stored(runtime, "INBOX", b"plain")
    assert b"dmarc=fail" in mail and OURS not in mail


@pytest.mark.parametrize(
    ("subject", "expected"),
    [("reject", (550, b"5.7.26")), ("crash", (451, b"4.3.0"))],
)
@pytest.mark.parametrize("pad", [0, 5000], ids=["in-memory", "on-disk"])
def test_refusal_and_a_failing_check_keep_no_copy(
    server: Any, subject: str, expected: tuple[int, bytes], pad: int
) -> None:
    port, runtime, _ = server
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("client.example")
        with pytest.raises(smtplib.SMTPDataError) as e:
            client.sendmail("a@bank.example", [ALICE], message(subject, pad))
        assert (e.value.smtp_code, e.value.smtp_error[: len(expected[1])]) == expected
        assert client.noop()[0] == 250  # the session goes on
    for name in ("INBOX", "Junk"):
        assert stored(runtime, name, subject.encode()) == []
    # the refused message's file is removed by a thread-pool job queued with the reply
    tmp = folder(runtime, "INBOX") / "tmp"
    wait_until(lambda: not list(tmp.iterdir()), what=f"{tmp} to empty")
