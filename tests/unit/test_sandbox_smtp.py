"""The sandbox's SMTP profile on the session core, without sockets: routing every recipient to
the session's inbox, the fault recipients, and the envelope written into the message."""

from __future__ import annotations

from collections.abc import Awaitable
from pathlib import Path

import pytest

from mailsuite.config import parse_config
from mailsuite.sandbox.inboxes import SandboxDirectory
from mailsuite.sandbox.smtp import EnvelopeFields, Fault, fault_of, sandbox_profile
from mailsuite.smtp.policy import ReceivedMessage
from mailsuite.smtp.session import (
    AbortMessage,
    Close,
    Deliver,
    LoginAnswer,
    Options,
    Session,
    State,
)
from tests.smtp_session_helpers import cmd, code, reader_of, run, send_data, status, transaction


class Counters:
    def __init__(self) -> None:
        self.accepted: list[int] = []
        self.rejected = 0

    def captured(self, size: int) -> None:
        self.accepted.append(size)

    def refused(self) -> None:
        self.rejected += 1


class Sleeps:
    """A sleep that records how long it was asked to wait and returns at once."""

    def __init__(self) -> None:
        self.asked: list[float] = []

    def __call__(self, seconds: float) -> Awaitable[object]:
        self.asked.append(seconds)

        async def done() -> None:
            return None

        return done()


@pytest.fixture
def parts(tmp_path: Path) -> tuple[Session, Counters, Sleeps, SandboxDirectory]:
    cfg = parse_config({"server": {"mode": "sandbox", "hostname": "sandbox.test"}}, None, tmp_path)
    directory = SandboxDirectory(cfg)
    counters, sleeps = Counters(), Sleeps()
    profile = sandbox_profile(directory, counters, "sandbox.test", 100, sleeps)
    options = Options(hostname="sandbox.test", tls_available=True, allow_plaintext=True)
    return (
        Session(options, profile, directory, client_ip="127.0.0.1"),
        counters,
        sleeps,
        directory,
    )


def test_fault_forms() -> None:
    assert fault_of("reject-550@example.com") == Fault("rcpt", 550, name="reject-550")
    assert fault_of("DEFER-451@Example.COM") == Fault("rcpt", 451, name="defer-451")
    assert fault_of("fail-554@x.test") == Fault("fail", 554, name="fail-554")
    assert fault_of("drop@x.test") == Fault("drop", name="drop")
    assert fault_of("slow-10@x.test") == Fault("slow", seconds=10, name="slow-10")
    for ordinary in (
        "user@x.test",
        "reject-650@x",
        "reject-5@x",
        "reject-550+t@x",
        "slow-0@x",
        "slow-301@x",
        "dropped@x",
        "fail-499x@x",
    ):
        assert fault_of(ordinary) is None, ordinary
    assert Fault("rcpt", 550, name="reject-550").reply().enhanced == "5.1.1"
    assert Fault("rcpt", 459, name="defer-459").reply().enhanced == "4.0.0"


def test_every_recipient_goes_to_the_sessions_inbox_once(parts: tuple) -> None:
    s, _, _, directory = parts
    transaction(s, "a@one.test", "b@two.test", "c@three.test")
    assert s.transaction is not None
    assert [box.user for box in s.transaction.local] == ["default"]
    assert s.transaction.remote == []  # nothing is ever relayed
    assert s.transaction.local[0].root == directory.mailbox_root("default")
    assert code(cmd(s, "RSET")) == 250
    step = cmd(s, "AUTH PLAIN AGFsaWNlAGFueQ==")  # alice / any
    assert step.action is not None
    assert code(s.login_finished(LoginAnswer.OK, "alice")) == 235
    transaction(s, "x@y.test")
    assert [box.user for box in s.transaction.local] == ["alice"]


def test_rcpt_faults_and_421_closes(parts: tuple) -> None:
    s, counters, _, _ = parts
    transaction(s, "ok@x.test")
    step = cmd(s, "RCPT TO:<reject-550@x.test>")
    assert status(step) == "550 5.1.1" and "sandbox fault reject-550" in step.replies[0].text
    assert status(cmd(s, "RCPT TO:<defer-452@x.test>")) == "452 4.2.2"
    assert s.transaction is not None and s.transaction.recipients == ["ok@x.test"]
    step = cmd(s, "RCPT TO:<defer-421@x.test>")
    assert status(step) == "421 4.3.2" and isinstance(step.action, Close)
    assert s.state is State.CLOSED and counters.rejected == 3


BODY = b"From: a@x.test\r\nTo: ok@x.test\r\nSubject: s\r\n\r\nhello\r\n"


def test_data_faults(parts: tuple) -> None:
    s, counters, sleeps, _ = parts
    transaction(s, "ok@x.test", "fail-554@x.test")
    step = send_data(s, BODY)
    assert status(step) == "554 5.7.1" and isinstance(step.action, AbortMessage)
    transaction(s, "slow-7@x.test", "ok@x.test")
    step = send_data(s, BODY)
    assert code(step) == 250 and sleeps.asked == [7]
    transaction(s, "drop@x.test", "slow-3@x.test", "fail-451@x.test")
    step = send_data(s, BODY)
    assert step.replies == () and isinstance(step.action, Close)  # no reply at all
    assert s.state is State.CLOSED and sleeps.asked == [7]
    assert counters.rejected == 2 and len(counters.accepted) == 1


def test_fail_421_closes_after_the_reply(parts: tuple) -> None:
    s, _, _, _ = parts
    transaction(s, "fail-421@x.test")
    step = send_data(s, BODY)
    assert status(step) == "421 4.3.2" and isinstance(step.action, Close)


def test_envelope_fields_bcc_and_message_id() -> None:
    counters = Counters()
    check = EnvelopeFields("sandbox.test", counters.captured)
    headers = (
        b"From: a@x.test\nTo: To <to@x.test>\nCc: cc@x.test,\n  other@x.test\n"
        b"Bcc: old@x.test\nSubject: s"
    )
    message = ReceivedMessage(
        "a@x.test",
        ("to@x.test", "OTHER@x.test", "new@x.test", "old@x.test"),
        headers,
        123,
        reader_of(b""),
    )
    verdict = run(check.end_of_data(None, message))  # type: ignore[arg-type]
    assert verdict.remove == (b"Bcc: old@x.test",)
    assert verdict.prepend[0] == "Bcc: old@x.test, new@x.test"
    assert verdict.prepend[1].startswith("Message-ID: <") and verdict.prepend[1].endswith(
        "@sandbox.test>"
    )
    assert counters.accepted == [123]
    complete = ReceivedMessage(
        "a@x.test", ("to@x.test",), b"To: to@x.test\nMessage-ID: <m@x>", 5, reader_of(b"")
    )
    assert run(check.end_of_data(None, complete)).prepend == ()  # type: ignore[arg-type]


def test_delivery_step_carries_the_header_edit(parts: tuple) -> None:
    s, _, _, _ = parts
    transaction(s, "hidden@x.test")
    step = cmd(s, "DATA")
    s.message_opened(True)
    s.data(BODY + b".\r\n")
    step = s.end_of_data(reader_of(BODY))
    verdict = run(s.profile.policy.end_of_data(s, step.action.message))
    step = s.checks_done(verdict)
    assert isinstance(step.action, Deliver) and step.action.header is not None
    assert b"Bcc: hidden@x.test" in step.action.header.new
