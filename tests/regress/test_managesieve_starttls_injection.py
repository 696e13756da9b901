"""Regression (by design): commands pipelined after ManageSieve STARTTLS are discarded, not run
after the handshake (the STARTTLS command-injection class, RFC 5804 2.2), and an oversized
literal is skipped without being buffered."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from mailsuite.managesieve.server import ManageSieveProtocol
from mailsuite.managesieve.session import Options
from tests.fakes import FakeRuntime, TLSStringTransport


class Inline(ManageSieveProtocol):
    def _in_thread(self, f: Any, *args: Any) -> defer.Deferred[Any]:
        return defer.maybeDeferred(f, *args)


def connect() -> tuple[Inline, TLSStringTransport]:
    options = Options(tls_available=True, max_script_size=64)
    proto = Inline(
        FakeRuntime(),
        options,
        implicit_tls=False,
        login_timeout=180,  # type: ignore[arg-type]
    )
    transport = TLSStringTransport()
    proto.makeConnection(transport)
    transport.clear()
    return proto, transport


def test_pipelined_command_after_starttls_is_dropped() -> None:
    proto, transport = connect()
    proto.dataReceived(b'STARTTLS\r\nAUTHENTICATE "PLAIN" "AGFAYgBj"\r\n')
    out = transport.value()
    assert out.startswith(b'OK "Begin TLS negotiation now"\r\n')
    assert transport.tls_started and proto.session.tls
    assert out.endswith(b'OK "TLS negotiation successful"\r\n')  # and no AUTHENTICATE answer
    assert out.count(b"\r\nOK") + out.startswith(b"OK") == 2 and b"NO" not in out
    proto.connectionLost(Failure(ConnectionDone()))


def test_oversized_literal_is_skipped_and_the_session_goes_on() -> None:
    proto, transport = connect()
    proto.dataReceived(b"CHECKSCRIPT {100+}\r\n" + b"x" * 100 + b'\r\nNOOP "t"\r\n')
    out = transport.value()
    assert out.startswith(b"NO (QUOTA/MAXSIZE)")
    assert out.endswith(b'OK (TAG "t") "Done"\r\n')
    assert len(proto._buffer) == 0
    proto.connectionLost(Failure(ConnectionDone()))
