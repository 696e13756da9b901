"""The ManageSieve session core (RFC 5804) and its command reader, with plain objects."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from mailsuite.auth import LoginResult, Outcome
from mailsuite.managesieve.parser import BadCommand, Command, CommandReader, NeedLiteral
from mailsuite.managesieve.session import (
    Authenticate,
    Close,
    Options,
    Session,
    StartTLS,
    State,
    quote,
)
from mailsuite.sieve.storage import ScriptStore


def plain(user: str = "alice@example.test", password: str = "pw", authzid: str = "") -> str:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


@pytest.fixture
def session(tmp_path: Path) -> Session:
    return Session(
        Options(tls_available=True, max_script_size=200, max_scripts=3),
        lambda user: ScriptStore(tmp_path / user, 3, 200),
    )


def login(s: Session) -> None:
    s.tls = True
    step = s.command(Command("AUTHENTICATE", ["PLAIN", plain()]))
    assert isinstance(step.action, Authenticate) and step.action.password == "pw"
    assert s.login_finished(LoginResult(Outcome.OK, "alice@example.test")).out == (
        b'OK "Logged in"\r\n'
    )


# -- reader ------------------------------------------------------------------------------------


def test_reader_strings_numbers_and_literals() -> None:
    r = CommandReader(max_literal=100)
    assert r.feed_line(b'havespace "my \\"script\\"" 123') == Command(
        "HAVESPACE", ['my "script"', 123]
    )
    assert r.feed_line(b'PUTSCRIPT "a" {5+}') == NeedLiteral(5)
    assert r.feed_literal(b"keep;") is None
    assert r.feed_line(b"") == Command("PUTSCRIPT", ["a", "keep;"])
    assert r.feed_line(b"PUTSCRIPT {1}") == NeedLiteral(1)  # {N} is taken like {N+}
    r.feed_literal(b"x")
    assert r.feed_line(b" {2+}") == NeedLiteral(2)
    r.feed_literal(b"yz")
    assert r.feed_line(b"") == Command("PUTSCRIPT", ["x", "yz"])
    assert r.feed_line(b'"c2FzbA=="') == Command("", ["c2FzbA=="])  # a SASL answer line


@pytest.mark.parametrize(
    "line",
    [
        b'NOOP "unterminated',
        b'NOOP "bad \\x escape"',
        b'NOOP  "two spaces"',
        b"N0OP",
        b"NOOP atom",
        b'NOOP {3+} "after"',
        b"NOOP {x+}",
        b"NOOP 12ab",
        b"\xff",
    ],
)
def test_reader_refuses_bad_syntax(line: bytes) -> None:
    assert isinstance(CommandReader(100).feed_line(line), BadCommand)


def test_reader_skips_oversized_literals() -> None:
    result = CommandReader(100).feed_line(b'PUTSCRIPT "a" {101+}')
    assert isinstance(result, BadCommand) and result.discard == 101
    assert result.code == "QUOTA/MAXSIZE"
    huge = CommandReader(100).feed_line(b'PUTSCRIPT "a" {9999999999+}')
    assert isinstance(huge, BadCommand) and huge.close


def test_quote_uses_a_literal_for_line_breaks() -> None:
    assert quote('a "b" \\') == '"a \\"b\\" \\\\"'
    assert quote("two\nlines") == "{9}\r\ntwo\nlines"


# -- session -------------------------------------------------------------------------------------


def test_capabilities_before_and_after_tls(session: Session) -> None:
    caps = session.greeting().decode()
    assert '"SASL" ""' in caps and '"STARTTLS"' in caps and '"VERSION" "1.0"' in caps
    assert '"IMPLEMENTATION" "mailsuite"' in caps and '"MAXREDIRECTS" "4"' in caps
    assert "vacation-seconds" in caps and "comparator-i;ascii-numeric" in caps
    step = session.command(Command("STARTTLS"))
    assert isinstance(step.action, StartTLS)
    after = session.tls_started().decode()
    assert '"SASL" "PLAIN"' in after and "STARTTLS" not in after
    assert after.endswith('OK "TLS negotiation successful"\r\n')


def test_no_authentication_without_tls(session: Session) -> None:
    step = session.command(Command("AUTHENTICATE", ["PLAIN", plain()]))
    assert step.out.startswith(b"NO (ENCRYPT-NEEDED)") and step.action is None


def test_authenticate_with_continuation_and_cancel(session: Session) -> None:
    session.tls = True
    assert session.command(Command("AUTHENTICATE", ["PLAIN"])).out == b'""\r\n'
    assert session.state is State.SASL
    step = session.command(Command("", [plain()]))
    assert isinstance(step.action, Authenticate)
    session.login_finished(LoginResult(Outcome.BAD_CREDENTIALS))
    assert session.command(Command("AUTHENTICATE", ["PLAIN"])).out == b'""\r\n'
    assert session.command(Command("", ["*"])).out == b'NO "Authentication cancelled"\r\n'
    assert session.command(Command("AUTHENTICATE", ["LOGIN"])).out.startswith(b"NO")
    step = session.command(Command("AUTHENTICATE", ["PLAIN", plain(authzid="bob@x.test")]))
    assert step.out.startswith(b"NO") and step.action is None


def test_login_failures(session: Session) -> None:
    session.tls = True
    session.command(Command("AUTHENTICATE", ["PLAIN", plain()]))
    assert session.login_finished(LoginResult(Outcome.THROTTLED)).out.startswith(b"NO (TRYLATER)")
    session.command(Command("AUTHENTICATE", ["PLAIN", plain()]))
    assert session.login_finished(LoginResult(Outcome.BAD_CREDENTIALS)).out == (
        b'NO "Authentication failed"\r\n'
    )
    assert session.state is State.NONAUTH


def test_script_commands(session: Session) -> None:
    assert session.command(Command("LISTSCRIPTS")).out == b'NO "Authenticate first"\r\n'
    login(session)
    run = lambda *a: session.command(Command(*a)).out  # noqa: E731
    assert run("HAVESPACE", ["s", 50]) == b'OK "Putscript would succeed"\r\n'
    assert run("HAVESPACE", ["s", 500]).startswith(b"NO (QUOTA/MAXSIZE)")
    assert run("PUTSCRIPT", ["s", "keep;"]) == b'OK "Putscript completed"\r\n'
    assert run("PUTSCRIPT", ["t", "if true {\nfileinto;"]) == (
        b"NO \"line 2: missing '}' at end of script\"\r\n"
    )
    assert run("CHECKSCRIPT", ['fileinto "x";']) == (
        b'NO "line 1: command \'fileinto\' needs require \\"fileinto\\""\r\n'
    )
    assert run("CHECKSCRIPT", ["stop;"]) == b'OK "Script is valid"\r\n'
    assert run("SETACTIVE", ["nope"]).startswith(b"NO (NONEXISTENT)")
    assert run("SETACTIVE", ["s"]) == b'OK "s is active now"\r\n'
    assert run("LISTSCRIPTS", []) == b'"s" ACTIVE\r\nOK "Listscripts completed"\r\n'
    assert run("GETSCRIPT", ["s"]) == b'{5}\r\nkeep;\r\nOK "Getscript completed"\r\n'
    assert run("DELETESCRIPT", ["s"]).startswith(b"NO (ACTIVE)")
    assert run("RENAMESCRIPT", ["s", "u"]) == b'OK "Renamescript completed"\r\n'
    assert run("LISTSCRIPTS", []) == b'"u" ACTIVE\r\nOK "Listscripts completed"\r\n'
    assert run("SETACTIVE", [""]) == b'OK "No script is active now"\r\n'
    assert run("DELETESCRIPT", ["u"]) == b'OK "Deletescript completed"\r\n'
    assert run("GETSCRIPT", ["u"]).startswith(b"NO (NONEXISTENT)")
    assert run("PUTSCRIPT", ["../x", "keep;"]).startswith(b"NO ")
    for name in ("a", "b", "c"):
        run("PUTSCRIPT", [name, "keep;"])
    assert run("PUTSCRIPT", ["d", "keep;"]).startswith(b"NO (QUOTA/MAXSCRIPTS)")
    assert run("NOOP", ["tag1"]) == b'OK (TAG "tag1") "Done"\r\n'
    assert b'"OWNER" "alice@example.test"' in run("CAPABILITY", [])
    assert run("STARTTLS", []) == b'NO "Command not valid in this state"\r\n'
    assert run("UNAUTHENTICATE", []) == b'OK "Unauthenticate completed"\r\n'
    assert run("LISTSCRIPTS", []) == b'NO "Authenticate first"\r\n'
    step = session.command(Command("LOGOUT"))
    assert step.out == b'OK "Logout complete"\r\n' and isinstance(step.action, Close)


def test_argument_errors_and_too_many_errors(session: Session) -> None:
    login(session)
    assert session.command(Command("HAVESPACE", ["s", "x"])).out.startswith(b'NO "Syntax')
    assert session.command(Command("GETSCRIPT", [])).out.startswith(b'NO "Syntax')
    assert session.command(Command("FROB")).out == b'NO "Unknown command"\r\n'
    for _ in range(10):
        step = session.command(Command("FROB"))
        if isinstance(step.action, Close):
            break
    assert isinstance(step.action, Close) and b"BYE" in step.out
