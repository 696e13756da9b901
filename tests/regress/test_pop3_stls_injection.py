"""Regression: commands pipelined after STLS are discarded, not run after the handshake
(the STARTTLS command-injection class, CVE-2011-0411 and relatives; RFC 2595 4)."""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from mailsuite.pop3.server import POP3Protocol
from mailsuite.pop3.session import Options
from tests.fakes import FakeRuntime, TLSStringTransport


def test_pipelined_user_after_stls_is_dropped() -> None:
    proto = POP3Protocol(
        FakeRuntime(),  # type: ignore[arg-type]
        Options(tls_available=True),
        implicit_tls=False,
        login_timeout=180,
    )
    transport = TLSStringTransport()
    proto.makeConnection(transport)
    transport.clear()
    proto.dataReceived(b"STLS\r\nUSER victim@example.test\r\nPASS x\r\n")
    assert transport.value() == b"+OK Begin TLS negotiation\r\n"
    assert transport.tls_started and proto.session.tls
    assert proto.session.username is None
    transport.clear()
    proto.dataReceived(b"PASS x\r\n")  # after the handshake: the injected USER is gone
    assert transport.value().startswith(b"-ERR")
    proto.connectionLost(Failure(ConnectionDone()))
