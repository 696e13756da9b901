"""Regression: ``DELE 0`` / ``DELE -1`` must not delete anything.

twisted.mail.pop3 had no lower bound, so index -1 marked the *last* message deleted
(research/twisted-mail.md 3.1)."""

from __future__ import annotations

from mailsuite.auth import LoginResult, Outcome
from mailsuite.pop3.session import Options, Session
from tests.pop3_helpers import FakeMaildrop


def test_dele_zero_and_negative_are_errors() -> None:
    s = Session(Options(), tls=True)
    s.line(b"USER a@example.test")
    s.line(b"PASS pw")
    md = FakeMaildrop([b"a\n", b"b\n"])
    s.login_finished(LoginResult(Outcome.OK, "a@example.test"), md)
    for arg in (b"0", b"-1", b"-5", b"00", b"3"):
        assert s.line(b"DELE " + arg).out.startswith(b"-ERR")
    assert md.deleted == set()
    assert s.line(b"STAT").out == b"+OK 2 6\r\n"
