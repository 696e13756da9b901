"""deliver() over real sockets against mailsuite.testing.mx listening on 127.0.0.2."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet import ssl

from mailsuite.outbound.client import deliver
from mailsuite.outbound.result import Outcome, Timeouts
from mailsuite.outbound.wire import scan_message
from mailsuite.testing.mx import spawn_mx_server
from tests.reactor_thread import in_reactor
from tests.tls_helpers import CertAuthority

MX_ADDR = "127.0.0.2"  # where the mx_serverss fixture listens


@pytest.fixture(scope="module")
def pki(ca: CertAuthority) -> dict[str, Any]:
    """The recording MX's certificate for mx.test, and the test CA as a trust root."""
    cert, key = ca.issue("mx.test", stem="mx-test")
    return {
        "cert": str(cert),
        "key": str(key),
        "trust": ssl.Certificate.loadPEM(ca.ca_file.read_bytes()),
    }


@pytest.fixture
def message(tmp_path):
    def write(data: bytes) -> str:
        path = tmp_path / f"msg{len(list(tmp_path.iterdir()))}"
        path.write_bytes(data)
        return str(path)

    return write


def send(reactor, port, path, rcpts=("bob@mx.test",), **kwargs):
    kwargs.setdefault("tls", "none")
    kwargs.setdefault(
        "timeouts",
        Timeouts(
            connect=5,
            greeting=5,
            command=5,
            mail=5,
            rcpt=5,
            data_init=5,
            data_block=5,
            data_term=5,
            quit=5,
        ),
    )
    addresses = kwargs.pop("addresses", [MX_ADDR])
    return in_reactor(
        reactor,
        deliver,
        reactor,
        "mx.test",
        port,
        addresses,
        "client.test",
        "alice@client.test",
        list(rcpts),
        path,
        **kwargs,
    )


def test_delivery_with_refused_recipient(reactor, mx_servers, message):
    server = mx_servers({"rcpt": {"nobody@mx.test": [550, "5.1.1 no such user"]}})
    path = message(b"Subject: hi\n\n.hidden\nbody\n")
    r = send(reactor, server.port, path, rcpts=("bob@mx.test", "nobody@mx.test"))
    assert r.outcome is Outcome.DELIVERED and r.address == MX_ADDR
    assert r.delivered == ["bob@mx.test"] and r.permanent_failures == ["nobody@mx.test"]
    [t] = server.transactions
    assert t.data == b"Subject: hi\r\n\r\n.hidden\r\nbody\r\n"
    assert t.rcpts == ["bob@mx.test"]
    assert server.commands[-1] == "QUIT"


def test_next_address_when_connection_refused(reactor, mx_servers, message):
    server = mx_servers()
    r = send(reactor, server.port, message(b"x\n"), addresses=["127.0.0.5", MX_ADDR])
    assert r.outcome is Outcome.DELIVERED and r.address == MX_ADDR


def test_connect_failed(reactor, mx_servers, message):
    server = mx_servers()
    r = send(reactor, server.port, message(b"x\n"), addresses=["127.0.0.5"])
    assert r.outcome is Outcome.CONNECT_FAILED and r.try_next_mx
    assert r.transient_failures == ["bob@mx.test"]


def test_smuggling_at_chunk_boundary_stays_one_message(reactor, mx_servers, message):
    """Regression (research 4.2): Twisted's client let this through as a second message."""
    server = mx_servers()
    head = b"Subject: pad\n\n"
    padding = head + b"x" * (65536 - len(head) - 1) + b"\n"
    smuggle = (
        b".\nMAIL FROM:<smuggled@evil.test>\nRCPT TO:<victim@mx.test>\nDATA\n"
        b"Subject: SMUGGLED\n\nevil\n.\n"
    )
    r = send(reactor, server.port, message(padding + smuggle))
    assert r.outcome is Outcome.DELIVERED
    assert len(server.transactions) == 1
    data = server.transactions[0].data
    assert b"\r\n.\r\nMAIL FROM:<smuggled@evil.test>\r\n" in data  # it stayed message text
    assert data.endswith(b"Subject: SMUGGLED\r\n\r\nevil\r\n.\r\n")
    assert not any("smuggled" in c for c in server.commands)


def test_large_message_over_starttls(reactor, mx_servers, message, pki):
    server = mx_servers({"starttls": pki, "extensions": ["PIPELINING", "8BITMIME"]})
    line = b"." + b"y" * 77 + b"\n"
    path = message(b"Subject: big\n\n" + line * 70000)  # ~5.5 MB
    ctx = ssl.optionsForClientTLS("mx.test", trustRoot=pki["trust"])
    r = send(reactor, server.port, path, tls="required", tls_client_context=ctx)
    assert r.outcome is Outcome.DELIVERED and r.tls
    [t] = server.transactions
    assert t.tls
    assert len(t.data) == scan_message(path).wire_size


def test_starttls_verification_failure_no_fallback(reactor, mx_servers, message, pki):
    server = mx_servers({"starttls": pki})
    r = send(reactor, server.port, message(b"x\n"), tls="opportunistic", tls_verify=True)
    assert r.outcome is Outcome.TLS_FAILED and r.try_next_mx
    assert server.transactions == []


def test_opportunistic_tls_falls_back_to_plaintext(reactor, mx_servers, message, pki):
    server = mx_servers({"starttls": pki})
    wrong_name = ssl.optionsForClientTLS("other.test", trustRoot=pki["trust"])
    r = send(
        reactor, server.port, message(b"x\n"), tls="opportunistic", tls_client_context=wrong_name
    )
    assert r.outcome is Outcome.DELIVERED and not r.tls and r.tls_fallback
    assert server.connections == 2


def test_auth_over_starttls(reactor, mx_servers, message, pki):
    server = mx_servers({"starttls": pki, "auth": {"alice": "pw"}})
    ctx = ssl.optionsForClientTLS("mx.test", trustRoot=pki["trust"])
    r = send(
        reactor,
        server.port,
        message(b"x\n"),
        tls="required",
        tls_client_context=ctx,
        auth=("alice", "pw"),
    )
    assert r.outcome is Outcome.DELIVERED
    assert server.transactions[0].auth_user == "alice"
    r = send(
        reactor,
        server.port,
        message(b"x\n"),
        tls="required",
        tls_client_context=ctx,
        auth=("alice", "bad"),
    )
    assert r.outcome is Outcome.AUTH_FAILED and r.reply.code == 535


def test_size_refusal(reactor, mx_servers, message):
    server = mx_servers({"size": 100})
    r = send(reactor, server.port, message(b"x" * 200 + b"\n"))
    assert r.outcome is Outcome.MESSAGE_UNSENDABLE and r.reply.status == "5.3.4"
    assert r.permanent_failures == ["bob@mx.test"]
    assert not any(c.startswith("MAIL") for c in server.commands)


def test_size_declared(reactor, mx_servers, message):
    server = mx_servers({"size": 1000})
    path = message(b"x" * 200 + b"\n")
    r = send(reactor, server.port, path, size=scan_message(path).wire_size)
    assert r.outcome is Outcome.DELIVERED
    assert server.transactions[0].mail_params == ["SIZE=202"]


def test_8bit_handling(reactor, mx_servers, message):
    path = message("Subject: grüße\n\nüber\n".encode())
    info = scan_message(path)
    assert info.eight_bit
    with_8bit = mx_servers()
    r = send(reactor, with_8bit.port, path, body_8bit=info.eight_bit)
    assert r.outcome is Outcome.DELIVERED
    assert with_8bit.transactions[0].mail_params == ["BODY=8BITMIME"]
    assert with_8bit.transactions[0].data == "Subject: grüße\r\n\r\nüber\r\n".encode()

    seven_bit_only = mx_servers({"extensions": ["PIPELINING"]})
    r = send(reactor, seven_bit_only.port, path, body_8bit=True)
    assert r.outcome is Outcome.MESSAGE_UNSENDABLE and r.reply.status == "5.6.3"
    assert seven_bit_only.transactions == []


def test_smtputf8(reactor, mx_servers, message):
    server = mx_servers({"smtputf8": True})
    r = send(reactor, server.port, message(b"x\n"), rcpts=("jörg@mx.test",))
    assert r.outcome is Outcome.DELIVERED
    assert server.transactions[0].rcpts == ["jörg@mx.test"]
    assert "SMTPUTF8" in server.transactions[0].mail_params


def test_helo_fallback(reactor, mx_servers, message):
    server = mx_servers({"ehlo": False})
    r = send(reactor, server.port, message(b"x\n"))
    assert r.outcome is Outcome.DELIVERED
    assert [c.split()[0] for c in server.commands[:2]] == ["EHLO", "HELO"]


def test_greeting_refused(reactor, mx_servers, message):
    server = mx_servers({"greeting": [554, "5.7.1 no service"]})
    r = send(reactor, server.port, message(b"x\n"))
    assert r.outcome is Outcome.GREETING_REFUSED and r.reply.code == 554 and r.try_next_mx


def test_data_end_timeout(reactor, mx_servers, message):
    server = mx_servers({"silent": ["data_end"]})
    r = send(
        reactor,
        server.port,
        message(b"x\n"),
        timeouts=Timeouts(
            greeting=5, command=5, mail=5, rcpt=5, data_init=5, data_block=5, data_term=0.5
        ),
    )
    assert r.outcome is Outcome.TIMEOUT and r.stage == "data-end"
    assert r.transient_failures == ["bob@mx.test"] and not r.try_next_mx


def test_scripted_data_refusal(reactor, mx_servers, message):
    server = mx_servers({"data_end": [452, "4.3.1 full"]})
    r = send(reactor, server.port, message(b"x\n"))
    assert r.outcome is Outcome.DATA_REFUSED and r.transient_failures == ["bob@mx.test"]


def test_mx_subprocess_records_to_directory(reactor, tmp_path, message):
    record = tmp_path / "rec"
    record.mkdir()
    proc, port = spawn_mx_server(
        f"{MX_ADDR}:0", str(record), {"rcpt": {"no@mx.test": [550, "5.1.1 no"]}}
    )
    try:
        r = send(
            reactor, port, message(b"Subject: s\n\nhello\n"), rcpts=("bob@mx.test", "no@mx.test")
        )
        assert r.outcome is Outcome.DELIVERED
        assert (record / "0001.eml").read_bytes() == b"Subject: s\r\n\r\nhello\r\n"
        envelope = json.loads((record / "0001.json").read_text())
        assert envelope["rcpts"] == ["bob@mx.test"]
        assert envelope["refused_rcpts"] == ["no@mx.test"]
    finally:
        proc.terminate()
        proc.wait(10)
