"""POP3 session state machine and dot-stuffing, with plain objects (no sockets)."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailsuite.auth import LoginResult, Outcome
from mailsuite.dotstuff import DotStuffer, stuff_all
from mailsuite.pop3.maildrop import Expiry, LoginTooSoon, MaildropInUse
from mailsuite.pop3.session import (
    Authenticate,
    Close,
    Options,
    Session,
    StartTLS,
    State,
    Stream,
    Update,
)
from tests.pop3_helpers import FakeMaildrop, crlf

# -- stuffing -------------------------------------------------------------------------------


def unstuff(wire: bytes) -> bytes:
    """What a POP3 client reconstructs: lines up to the terminator, leading dot removed."""
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    lines = wire.split(b"\r\n")
    out = []
    for line in lines:
        if line == b".":
            break
        assert not line.startswith(b".") or line.startswith(b"..")
        out.append(line[1:] if line.startswith(b".") else line)
    return b"".join(x + b"\r\n" for x in out)


def test_stuffing_basic() -> None:
    assert stuff_all(b"a\n.b\n..c\n.\n") == b"a\r\n..b\r\n...c\r\n..\r\n.\r\n"
    assert stuff_all(b".start") == b"..start\r\n.\r\n"
    assert stuff_all(b"") == b".\r\n"
    assert stuff_all(b"crlf\r\nalready\r\n") == b"crlf\r\nalready\r\n.\r\n"


def test_stuffing_across_chunk_boundaries() -> None:
    # The twisted.mail.pop3 bug: a "." line right at a chunk boundary ended the response.
    s = DotStuffer()
    wire = s.feed(b"x" * 10 + b"\n") + s.feed(b".\n+OK forged\n") + s.finish()
    assert b"\r\n.\r\n+OK" not in wire
    assert wire == b"xxxxxxxxxx\r\n..\r\n+OK forged\r\n.\r\n"
    # CR at the end of one chunk, LF at the start of the next: one CRLF, not CR CR LF
    s = DotStuffer()
    wire = s.feed(b"a\r") + s.feed(b"\n.b\r") + s.feed(b"\n") + s.finish()
    assert wire == b"a\r\n..b\r\n.\r\n"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from([b"\n", b"\r\n", b"\r", b".", b"..", b"a", b"+OK x", b" "]), max_size=40
    ),
    st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=10),
)
def test_stuffing_property(pieces: list[bytes], cuts: list[int]) -> None:
    data = b"".join(pieces)
    s = DotStuffer()
    out, pos, i = [], 0, 0
    while pos < len(data):
        size = cuts[i % len(cuts)]
        out.append(s.feed(data[pos : pos + size]))
        pos += size
        i += 1
    wire = b"".join(out) + s.finish()
    assert wire == stuff_all(data)
    # exactly one terminator, at the end, and no bare LF
    assert wire.count(b"\r\n.\r\n") + wire.startswith(b".\r\n") == 1
    assert b"\n" not in wire.replace(b"\r\n", b"")
    if b"\r" not in data.replace(b"\r\n", b""):
        assert unstuff(wire) == crlf(data)


# -- session with a fake maildrop ------------------------------------------------------------


def logged_in(bodies: list[bytes] | None = None, **opts: object) -> tuple[Session, FakeMaildrop]:
    s = Session(Options(tls_available=True, **opts), tls=True)  # type: ignore[arg-type]
    assert s.line(b"USER a@example.test").out.startswith(b"+OK")
    step = s.line(b"PASS secret word")
    assert step.action == Authenticate("a@example.test", "secret word")
    md = FakeMaildrop(bodies if bodies is not None else [b"S: 1\n\nbody one\n", b"S: 2\n\ntwo\n"])
    step = s.login_finished(LoginResult(Outcome.OK, "a@example.test"), md)
    assert step.out.startswith(b"+OK") and s.state is State.TRANSACTION
    return s, md


def test_capa_before_and_after_tls() -> None:
    s = Session(Options(tls_available=True))
    capa = s.line(b"CAPA").out.decode()
    assert "STLS\r\n" in capa and "USER" not in capa and "SASL" not in capa
    step = s.line(b"STLS")
    assert step.out == b"+OK Begin TLS negotiation\r\n" and isinstance(step.action, StartTLS)
    s.tls_started()
    capa = s.line(b"capa").out.decode()
    assert "STLS" not in capa and "USER\r\n" in capa and "SASL PLAIN\r\n" in capa
    for cap in ("TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"):
        assert f"\r\n{cap}\r\n" in capa
    assert s.line(b"STLS").out.startswith(b"-ERR")


def test_capa_expire_login_delay_and_plaintext_option() -> None:
    s = Session(Options(allow_plaintext=True, expiry=Expiry.parse("30"), login_delay=60))
    capa = s.line(b"CAPA").out.decode()
    assert "EXPIRE 30\r\n" in capa and "LOGIN-DELAY 60\r\n" in capa and "USER\r\n" in capa
    assert "STLS" not in capa  # no certificate
    assert Expiry.parse("never").capability() == "EXPIRE NEVER"
    with pytest.raises(ValueError):
        Expiry.parse("soon")


def test_user_pass_refused_before_tls() -> None:
    s = Session(Options(tls_available=True))
    assert s.line(b"USER a@example.test").out.startswith(b"-ERR [AUTH]")
    assert s.line(b"AUTH PLAIN AGEAYg==").out.startswith(b"-ERR [AUTH]")


def test_auth_plain_initial_and_continued() -> None:
    s = Session(Options(), tls=True)
    ir = base64.b64encode(b"\0a@example.test\0pw").decode()
    step = s.line(f"AUTH PLAIN {ir}".encode())
    assert step.action == Authenticate("a@example.test", "pw")
    s.login_finished(LoginResult(Outcome.BAD_CREDENTIALS))
    assert s.state is State.AUTHORIZATION
    assert s.line(b"AUTH PLAIN").out == b"+ \r\n"
    assert s.line(ir.encode()).action == Authenticate("a@example.test", "pw")
    s.login_finished(LoginResult(Outcome.BAD_CREDENTIALS))
    assert s.line(b"AUTH PLAIN").out == b"+ \r\n"
    assert s.line(b"*").out.startswith(b"-ERR")
    assert s.line(b"AUTH PLAIN !!!").out.startswith(b"-ERR")
    other = base64.b64encode(b"b@example.test\0a@example.test\0pw").decode()
    assert s.line(f"AUTH PLAIN {other}".encode()).out.startswith(b"-ERR [AUTH]")
    assert s.line(b"AUTH CRAM-MD5").out.startswith(b"-ERR")
    assert s.line(b"AUTH").out == b"+OK Mechanisms follow\r\nPLAIN\r\n.\r\n"


def test_login_outcomes_response_codes() -> None:
    for result, failure, code in [
        (LoginResult(Outcome.BAD_CREDENTIALS), None, b"-ERR [AUTH]"),
        (LoginResult(Outcome.THROTTLED), None, b"-ERR [SYS/TEMP]"),
        (LoginResult(Outcome.OK, "a@x.test"), MaildropInUse("x"), b"-ERR [IN-USE]"),
        (LoginResult(Outcome.OK, "a@x.test"), LoginTooSoon("x"), b"-ERR [LOGIN-DELAY]"),
        (LoginResult(Outcome.OK, "a@x.test"), OSError("disk"), b"-ERR [SYS/TEMP]"),
        (None, None, b"-ERR [SYS/TEMP]"),
    ]:
        s = Session(Options(), tls=True)
        s.line(b"USER a@x.test")
        s.line(b"PASS pw")
        assert s.login_finished(result, None, failure).out.startswith(code)
        assert s.state is State.AUTHORIZATION


def test_transaction_commands() -> None:
    s, md = logged_in()
    assert s.line(b"STAT").out == b"+OK 2 31\r\n"
    assert s.line(b"LIST").out == b"+OK 2 messages (31 octets)\r\n1 18\r\n2 13\r\n.\r\n"
    assert s.line(b"LIST 2").out == b"+OK 2 13\r\n"
    assert s.line(b"UIDL").out == b"+OK Unique-ID listing follows\r\n1 abc.a\r\n2 abc.b\r\n.\r\n"
    assert s.line(b"UIDL 1").out == b"+OK 1 abc.a\r\n"
    assert s.line(b"RETR 1").out == b"+OK 18 octets\r\nS: 1\r\n\r\nbody one\r\n.\r\n"
    assert md.seen == {1} and md.retrieved == {1}
    assert s.line(b"TOP 1 0").out == b"+OK Top of message follows\r\nS: 1\r\n\r\n.\r\n"
    assert s.line(b"NOOP").out.startswith(b"+OK")
    assert s.line(b"DELE 1").out.startswith(b"+OK")
    assert s.line(b"DELE 1").out.startswith(b"-ERR")
    assert s.line(b"RETR 1").out.startswith(b"-ERR")
    assert s.line(b"LIST 1").out.startswith(b"-ERR")
    assert s.line(b"STAT").out == b"+OK 1 13\r\n"
    assert s.line(b"LIST").out.endswith(b"\r\n2 13\r\n.\r\n")
    assert s.line(b"UIDL").out == b"+OK Unique-ID listing follows\r\n2 abc.b\r\n.\r\n"
    assert s.line(b"RSET").out.startswith(b"+OK 2 messages")
    assert s.line(b"STAT").out == b"+OK 2 31\r\n"
    s.line(b"DELE 2")
    step = s.line(b"QUIT")
    assert isinstance(step.action, Update) and s.state is State.UPDATE
    step = s.update_finished([11])
    assert step.out.startswith(b"+OK") and isinstance(step.action, Close)


def test_bad_message_numbers_never_touch_other_messages() -> None:
    s, md = logged_in()
    for arg in (b"0", b"-1", b"3", b"1x", b"", b"99999999999999999999", b"+1", b" 1"):
        assert s.line(b"DELE " + arg).out.startswith(b"-ERR"), arg
    assert md.deleted == set()
    assert s.line(b"TOP 1").out.startswith(b"-ERR")
    assert s.line(b"TOP 1 -1").out.startswith(b"-ERR")


def test_state_rules_and_error_limit() -> None:
    s = Session(Options(max_errors=3), tls=True)
    assert s.line(b"STAT").out.startswith(b"-ERR")  # wrong state
    assert s.line(b"PASS x").out.startswith(b"-ERR")  # USER first
    step = s.line(b"FROB")
    assert step.out.startswith(b"-ERR") and isinstance(step.action, Close)
    s, _ = logged_in()
    assert s.line(b"USER x").out.startswith(b"-ERR")
    assert s.line(b"STLS").out.startswith(b"-ERR")
    assert s.line(b"\xff\xfe").out.startswith(b"-ERR")


def test_keywords_are_ascii_letters_in_any_case() -> None:
    """RFC 1939 3: keywords are ASCII, case-insensitive.  Old main upper-cased the decoded
    line with Unicode's case mapping, so U+017F LATIN SMALL LETTER LONG S ("\u017ftat")
    was taken for STAT and a Kelvin sign for a K.  Such a line is not a command here."""
    s, _ = logged_in()
    assert s.line(b"stat").out.startswith(b"+OK")
    assert s.line(b"NoOp").out == b"+OK\r\n"
    assert s.line("\u017ftat".encode()).out.startswith(b"-ERR Unknown command")
    assert s.line("noop\u0130".encode()).out.startswith(b"-ERR Unknown command")
    assert s.line(b"NOOP \xff").out.startswith(b"-ERR Syntax error")  # argument not UTF-8


def test_large_message_is_streamed_and_gone_message_reported() -> None:
    big = b"H: x\n\n" + b"line\n.\n" * 100_000
    s, md = logged_in([big, b"a\n"])
    step = s.line(b"RETR 1")
    assert step.out.startswith(b"+OK") and isinstance(step.action, Stream)
    step = s.line(b"TOP 1 99999")  # TOP of a big message is streamed too
    assert step.out == b"+OK Top of message follows\r\n" and isinstance(step.action, Stream)
    md.gone.add(2)
    assert s.line(b"RETR 2").out.startswith(b"-ERR [SYS/TEMP]")


def test_expire_zero_capability_and_update_failure() -> None:
    s, _ = logged_in(expiry=Expiry(0))
    assert "EXPIRE 0" in s.line(b"CAPA").out.decode()
    s.line(b"QUIT")
    step = s.update_finished(None, OSError("disk"))
    assert step.out.startswith(b"-ERR [SYS/TEMP]") and isinstance(step.action, Close)
