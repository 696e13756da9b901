"""Smarthost over implicit TLS (RFC 8314, port 465 style) with AUTH, over real sockets: the
Relay against the recording SMTP server listening behind TLS on 127.0.0.2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trustme

from mailsuite.config import parse_config
from mailsuite.outbound.relay import SMARTHOST_ROUTE, Relay
from mailsuite.outbound.wire import scan_message
from mailsuite.testing.mx import RecordingSMTPServer, _Factory
from mailsuite.tls import ServerTLS
from tests.reactor_thread import in_reactor
from tests.tls_helpers import CertAuthority


def _relay(reactor: Any, tmp_path: Path, port: int, ca: Path, how: str = "smarthost") -> Relay:
    """A smarthost, or the same next hop as a per-domain route (one code path)."""
    if how == "smarthost":
        relay = {
            "smarthost": f"127.0.0.2:{port}",
            "smarthost_tls": "implicit",
            "smarthost_user": "relayuser",
            "smarthost_password": "relay-secret",
        }
    else:
        relay = {
            "routes": {
                "far.test": {
                    "host": f"[127.0.0.2]:{port}",
                    "tls": "implicit",
                    "user": "relayuser",
                    "password": "relay-secret",
                }
            }
        }
    data = {"server": {"hostname": "mx.example.test"}, "relay": {**relay, "tls_ca": str(ca)}}
    return Relay(parse_config(data, None, tmp_path), reactor)


@pytest.mark.parametrize("how", ["smarthost", "route"])
def test_implicit_tls_smarthost_with_auth(
    reactor: Any, ca: CertAuthority, tmp_path: Path, how: str
) -> None:
    server = RecordingSMTPServer({"auth": {"relayuser": "relay-secret"}})
    context = ServerTLS([ca.issue("127.0.0.2", stem="smarthost-ip")], check_interval=None)
    # The recorder offers AUTH only once it believes TLS is on: mark every session so.
    factory = _Factory(server)
    build = factory.buildProtocol

    def build_tls(addr):  # type: ignore[no-untyped-def]
        p = build(addr)
        p.s.tls = True
        return p

    factory.buildProtocol = build_tls  # type: ignore[method-assign]
    listener = in_reactor(reactor, reactor.listenSSL, 0, factory, context, interface="127.0.0.2")
    try:
        port = listener.getHost().port
        msg = tmp_path / "msg"
        msg.write_bytes(b"Subject: implicit\n\nhello\n")
        relay = _relay(reactor, tmp_path, port, ca.ca_file, how)
        route = relay.route_key("b@far.test")
        assert route == (SMARTHOST_ROUTE if how == "smarthost" else "[route far.test]")
        out = in_reactor(
            reactor, relay.send, route, "a@example.test", ["b@far.test"], msg, scan_message(msg)
        )
        assert out["b@far.test"].reply.positive, out
        (t,) = server.transactions
        assert t.auth_user == "relayuser" and t.rcpts == ["b@far.test"]
        assert b"Subject: implicit" in t.data

        # a certificate we cannot verify: no delivery, no credentials sent, try later
        other = trustme.CA()
        other.cert_pem.write_to_path(str(tmp_path / "other.pem"))
        relay = _relay(reactor, tmp_path, port, tmp_path / "other.pem", how)
        out = in_reactor(
            reactor, relay.send, route, "a@example.test", ["c@far.test"], msg, scan_message(msg)
        )
        assert out["c@far.test"].reply.transient, out
        assert len(server.transactions) == 1
    finally:
        in_reactor(reactor, listener.stopListening)
