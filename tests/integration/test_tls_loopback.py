"""mailsuite.tls over real sockets on 127.0.0.1.

A tiny line protocol is served by the Twisted reactor, running in a background thread for this
module, in implicit TLS (``ServerTLS.wrap_factory``) and with STARTTLS (``transport.startTLS``).
Clients are Python's ``ssl`` module trusting a trustme CA, a hand-built ClientHello (to prove the
server itself refuses TLS 1.1 and weak ciphers, whatever the local OpenSSL client allows), and
Twisted clients built by ``client_tls_options``.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from mailsuite.tls import ServerTLS, client_tls_options, ensure_self_signed, peer_tls_info
from tests.clients import read_line
from tests.reactor_thread import in_reactor
from tests.tls_helpers import CertAuthority

TIMEOUT = 10.0

# ----------------------------------------------------------------- the server side


class LineServer(LineReceiver):
    """220 greeting; STARTTLS (if offered); INFO -> peer_tls_info; SNI -> server name; echo."""

    delimiter = b"\r\n"
    factory: LineFactory

    def connectionMade(self) -> None:
        self.tls_started = False
        self.sendLine(b"220 ready" + (b" STARTTLS" if self.factory.starttls else b""))

    def lineReceived(self, line: bytes) -> None:
        if line == b"STARTTLS" and self.factory.starttls and not self.tls_started:
            self.sendLine(b"220 go ahead")
            self.clearLineBuffer()  # RFC 3207 s.4.2 / 5: drop anything pipelined after STARTTLS
            self.transport.startTLS(self.factory.server_tls)
            self.tls_started = True
        elif line == b"INFO":
            self.sendLine((peer_tls_info(self.transport) or "none").encode())
        elif line == b"SNI":
            name = self.transport.getHandle().get_servername()
            self.sendLine(name or b"none")
        else:
            self.sendLine(b"ECHO " + line)


class LineFactory(protocol.Factory):
    protocol = LineServer

    def __init__(self, server_tls: ServerTLS, starttls: bool) -> None:
        self.server_tls = server_tls
        self.starttls = starttls


def file_der(cert_path: Path) -> bytes:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)


class Listener:
    def __init__(self, reactor: Any, server_tls: ServerTLS, implicit: bool) -> None:
        self.reactor = reactor
        self.implicit = implicit
        factory: Any = LineFactory(server_tls, starttls=not implicit)
        if implicit:
            factory = server_tls.wrap_factory(factory)
        self.port = in_reactor(reactor, reactor.listenTCP, 0, factory, 50, "127.0.0.1")
        self.number = self.port.getHost().port

    def close(self) -> None:
        in_reactor(self.reactor, self.port.stopListening)


@pytest.fixture
def serve(reactor: Any) -> Iterator[Callable[[ServerTLS, bool], Listener]]:
    listeners: list[Listener] = []

    def start(server_tls: ServerTLS, implicit: bool) -> Listener:
        listener = Listener(reactor, server_tls, implicit)
        listeners.append(listener)
        return listener

    yield start
    for listener in listeners:
        listener.close()


# ----------------------------------------------------------------- python ssl clients


def plain_connect(listener: Listener) -> socket.socket:
    """TCP connect; for a STARTTLS listener, do the plaintext part up to the handshake."""
    sock = socket.create_connection(("127.0.0.1", listener.number), timeout=TIMEOUT)
    if not listener.implicit:
        assert read_line(sock) == b"220 ready STARTTLS\r\n"
        sock.sendall(b"STARTTLS\r\n")
        assert read_line(sock) == b"220 go ahead\r\n"
    return sock


def client_context(
    ca: CertAuthority,
    minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
    maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(cafile=str(ca.ca_file))
    ctx.minimum_version = minimum
    ctx.maximum_version = maximum
    return ctx


class Session:
    def __init__(self, sock: ssl.SSLSocket, implicit: bool) -> None:
        self.sock = sock
        if implicit:
            assert read_line(sock) == b"220 ready\r\n"

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return read_line(self.sock).removesuffix(b"\r\n")

    @property
    def peer_der(self) -> bytes:
        der = self.sock.getpeercert(binary_form=True)
        assert der is not None
        return der

    def close(self) -> None:
        self.sock.close()


def tls_connect(
    listener: Listener, ctx: ssl.SSLContext, server_hostname: str | None = "mail.example.test"
) -> Session:
    sock = plain_connect(listener)
    try:
        tls_sock = ctx.wrap_socket(sock, server_hostname=server_hostname)
    except BaseException:
        sock.close()
        raise
    return Session(tls_sock, listener.implicit)


# ----------------------------------------------------------------- raw ClientHello


def client_hello(version: int, ciphers: list[int], host: bytes = b"mail.example.test") -> bytes:
    """A minimal TLS ClientHello record with no supported_versions extension."""
    suites = b"".join(struct.pack(">H", c) for c in ciphers)
    body = struct.pack(">H", version) + os.urandom(32) + b"\x00"
    body += struct.pack(">H", len(suites)) + suites + b"\x01\x00"
    server_name = struct.pack(">BH", 0, len(host)) + host
    exts = struct.pack(">HH", 0, len(server_name) + 2) + struct.pack(">H", len(server_name))
    exts += server_name
    groups = struct.pack(">HH", 23, 29)  # secp256r1, x25519
    exts += struct.pack(">HHH", 10, len(groups) + 2, len(groups)) + groups
    exts += struct.pack(">HHBB", 11, 2, 1, 0)  # ec_point_formats: uncompressed
    sigalgs = struct.pack(">HHHH", 0x0403, 0x0804, 0x0401, 0x0201)
    exts += struct.pack(">HHH", 13, len(sigalgs) + 2, len(sigalgs)) + sigalgs
    body += struct.pack(">H", len(exts)) + exts
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack(">H", len(handshake)) + handshake


def first_record(listener: Listener, hello: bytes) -> tuple[int, bytes]:
    """Send a ClientHello; return (content type, first bytes of the fragment)."""
    sock = plain_connect(listener)
    try:
        sock.sendall(hello)
        header = b""
        while len(header) < 5:
            chunk = sock.recv(5 - len(header))
            if not chunk:
                raise ConnectionError("closed without a TLS record")
            header += chunk
        fragment = sock.recv(2)
        return header[0], fragment
    finally:
        sock.close()


ALERT, HANDSHAKE = 21, 22
PROTOCOL_VERSION_ALERT, HANDSHAKE_FAILURE_ALERT = 70, 40
GOOD_TLS12 = [0xC02B, 0xC02F, 0xC02C, 0xC030]  # ECDHE-{ECDSA,RSA}-AES-GCM
WEAK = [
    0x000A,  # RSA 3DES
    0xC008,  # ECDHE-ECDSA 3DES
    0xC012,  # ECDHE-RSA 3DES
    0x0005,  # RSA RC4
    0xC007,  # ECDHE-ECDSA RC4
    0x0003,  # EXPORT RC4
    0x0002,  # NULL-SHA
    0xC006,  # ECDHE-ECDSA-NULL
    0x0034,  # ADH AES128 (anonymous)
    0xC018,  # AECDH AES128 (anonymous)
    0xC009,  # ECDHE-ECDSA-AES128-SHA (CBC)
    0xC013,  # ECDHE-RSA-AES128-SHA (CBC)
]


# ----------------------------------------------------------------- fixtures per test


@pytest.fixture
def single(ca: CertAuthority, tmp_path: Path) -> tuple[ServerTLS, tuple[Path, Path]]:
    pair = ca.issue("mail.example.test", stem="mail", directory=tmp_path)
    return ServerTLS([pair], check_interval=None), pair


MODES = pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "starttls"])


# ----------------------------------------------------------------- versions and ciphers


@MODES
@pytest.mark.parametrize(
    ("version", "name"),
    [(ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3, "TLSv1.3")],
)
def test_tls12_and_tls13_accepted(
    serve: Any, ca: CertAuthority, single: Any, implicit: bool, version: Any, name: str
) -> None:
    server_tls, pair = single
    listener = serve(server_tls, implicit)
    session = tls_connect(listener, client_context(ca, version, version))
    try:
        assert session.sock.version() == name
        cipher = session.sock.cipher()
        assert cipher is not None
        assert session.command(b"INFO") == f"version={name} cipher={cipher[0]}".encode()
        assert session.command(b"hello") == b"ECHO hello"
        assert session.peer_der == file_der(pair[0])
        if name == "TLSv1.2":
            assert cipher[0].startswith("ECDHE-") and ("GCM" in cipher[0] or "CHACHA" in cipher[0])
    finally:
        session.close()


@MODES
def test_tls11_client_hello_refused_by_server(serve: Any, single: Any, implicit: bool) -> None:
    listener = serve(single[0], implicit)
    # control: the same hand-built hello at TLS 1.2 gets a ServerHello
    assert first_record(listener, client_hello(0x0303, GOOD_TLS12))[0] == HANDSHAKE
    content_type, fragment = first_record(listener, client_hello(0x0302, GOOD_TLS12 + WEAK))
    assert content_type == ALERT
    assert fragment[1] == PROTOCOL_VERSION_ALERT
    content_type, fragment = first_record(listener, client_hello(0x0301, GOOD_TLS12 + WEAK))
    assert content_type == ALERT


@MODES
def test_weak_ciphers_refused(serve: Any, single: Any, implicit: bool) -> None:
    listener = serve(single[0], implicit)
    content_type, fragment = first_record(listener, client_hello(0x0303, WEAK))
    assert content_type == ALERT
    assert fragment[1] == HANDSHAKE_FAILURE_ALERT


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1:DeprecationWarning")
def test_tls11_python_client_fails(serve: Any, ca: CertAuthority, single: Any) -> None:
    listener = serve(single[0], True)
    ctx = client_context(ca, ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1_1)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the local client really offer TLS 1.1
    try:
        tls_connect(listener, ctx).close()
    except ssl.SSLError as e:
        if "NO_PROTOCOLS_AVAILABLE" in str(e) or "NO_CIPHERS" in str(e):
            pytest.skip(f"local OpenSSL cannot offer TLS 1.1: {e}")
        assert "ALERT_PROTOCOL_VERSION" in str(e)  # the server's protocol_version alert
    else:
        pytest.fail("TLS 1.1 handshake succeeded")


# ----------------------------------------------------------------- SNI


@MODES
def test_sni_picks_the_matching_certificate(
    serve: Any, ca: CertAuthority, tmp_path: Path, implicit: bool
) -> None:
    mail = ca.issue("mail.example.test", stem="mail", directory=tmp_path)
    other = ca.issue("*.other.test", "other.test", stem="other", directory=tmp_path)
    listener = serve(ServerTLS([mail, other], check_interval=None), implicit)
    ctx = client_context(ca)
    for hostname, pair in [
        ("mail.example.test", mail),
        ("imap.other.test", other),
        ("other.test", other),
    ]:
        session = tls_connect(listener, ctx, hostname)  # also verifies the hostname
        try:
            assert session.peer_der == file_der(pair[0])
            assert session.command(b"SNI") == hostname.encode()
        finally:
            session.close()
    lax = client_context(ca)
    lax.check_hostname = False
    for hostname in ("unknown.test", None):
        session = tls_connect(listener, lax, hostname)
        try:
            assert session.peer_der == file_der(mail[0])  # the default: the first pair
        finally:
            session.close()


# ----------------------------------------------------------------- reload


@MODES
def test_reload_serves_new_cert_while_old_connection_lives(
    reactor: Any, serve: Any, ca: CertAuthority, single: Any, tmp_path: Path, implicit: bool
) -> None:
    server_tls, pair = single
    listener = serve(server_tls, implicit)
    ctx = client_context(ca)
    old_der = file_der(pair[0])
    old = tls_connect(listener, ctx)
    try:
        assert old.peer_der == old_der
        ca.issue("mail.example.test", stem="mail", directory=tmp_path)  # renewed in place
        new_der = file_der(pair[0])
        assert new_der != old_der
        assert in_reactor(reactor, server_tls.reload) is True

        new = tls_connect(listener, ctx)
        try:
            assert new.peer_der == new_der
            assert new.command(b"new") == b"ECHO new"
        finally:
            new.close()
        assert old.command(b"still here") == b"ECHO still here"
        assert old.command(b"INFO").startswith(b"version=TLSv1.3 ")
    finally:
        old.close()


@MODES
def test_failed_reload_keeps_old_cert(
    reactor: Any, serve: Any, ca: CertAuthority, single: Any, tmp_path: Path, implicit: bool
) -> None:
    server_tls, pair = single
    listener = serve(server_tls, implicit)
    ctx = client_context(ca)
    good_der = file_der(pair[0])

    pair[0].write_bytes(b"this is not a certificate\n")
    assert in_reactor(reactor, server_tls.reload) is False
    assert "not PEM" in (server_tls.last_error or "")
    session = tls_connect(listener, ctx)
    try:
        assert session.peer_der == good_der
    finally:
        session.close()

    # a renewed certificate whose key was not updated: mismatched, refused
    renewed = ca.ca.issue_cert("mail.example.test")
    pair[0].write_bytes(renewed.cert_chain_pems[0].bytes())
    assert in_reactor(reactor, server_tls.reload) is False
    assert "does not match" in (server_tls.last_error or "")
    session = tls_connect(listener, ctx)
    try:
        assert session.peer_der == good_der
    finally:
        session.close()


def test_changed_files_picked_up_on_new_connection(
    serve: Any, ca: CertAuthority, tmp_path: Path
) -> None:
    pair = ca.issue("mail.example.test", stem="mail", directory=tmp_path)
    listener = serve(ServerTLS([pair], check_interval=0), True)  # stat() on every connection
    ctx = client_context(ca)
    first = tls_connect(listener, ctx)
    try:
        assert first.peer_der == file_der(pair[0])
    finally:
        first.close()
    ca.issue("mail.example.test", stem="mail", directory=tmp_path)  # no explicit reload()
    second = tls_connect(listener, ctx)
    try:
        assert second.peer_der == file_der(pair[0])
    finally:
        second.close()


def test_self_signed_pair_serves(serve: Any, tmp_path: Path) -> None:
    cert_path, key_path = ensure_self_signed(tmp_path, "mx.example.test")
    listener = serve(ServerTLS([(cert_path, key_path)]), True)
    ctx = ssl.create_default_context(cafile=str(cert_path))
    for hostname in ("mx.example.test", "localhost"):
        session = tls_connect(listener, ctx, hostname)
        try:
            assert session.command(b"ping") == b"ECHO ping"
        finally:
            session.close()


# ----------------------------------------------------------------- Twisted clients


class StartTLSClient(LineReceiver):
    """Outbound-relay shape: greeting, STARTTLS, then INFO and SNI over TLS."""

    delimiter = b"\r\n"

    def __init__(self, creator: Any) -> None:
        self.creator = creator
        self.lines: list[bytes] = []
        self.done: defer.Deferred[list[bytes]] = defer.Deferred()

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)
        if line.startswith(b"220 ready"):
            self.sendLine(b"STARTTLS")
        elif line == b"220 go ahead":
            self.transport.startTLS(self.creator)
            self.sendLine(b"INFO")
            self.sendLine(b"SNI")
        elif len(self.lines) == 4:
            self.transport.loseConnection()
            self.done.callback(self.lines[2:])

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if not self.done.called:
            self.done.errback(reason)


def run_client(reactor: Any, port: int, creator: Any) -> list[bytes]:
    def go() -> defer.Deferred[list[bytes]]:
        client = StartTLSClient(creator)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=TIMEOUT)
        d = connectProtocol(endpoint, client)
        d.addCallback(lambda _: client.done)
        d.addTimeout(TIMEOUT, reactor)
        return d

    return in_reactor(reactor, go)


def test_client_verifying(reactor: Any, serve: Any, ca: CertAuthority, single: Any, tmp_path: Path):
    listener = serve(single[0], False)
    ca_file = ca.ca_file
    creator = client_tls_options("mail.example.test", verify=True, trust_root=ca_file)
    info, sni = run_client(reactor, listener.number, creator)
    assert info.startswith(b"version=TLSv1.3 cipher=")
    assert sni == b"mail.example.test"


def test_client_verifying_rejects_wrong_name_and_unknown_ca(
    reactor: Any, serve: Any, ca: CertAuthority, single: Any, tmp_path: Path
) -> None:
    listener = serve(single[0], False)
    ca_file = ca.ca_file
    wrong_name = client_tls_options("other.example.test", verify=True, trust_root=ca_file)
    with pytest.raises(VerificationError):
        run_client(reactor, listener.number, wrong_name)
    stranger = tmp_path / "stranger.pem"
    trustme.CA().cert_pem.write_to_path(str(stranger))
    unknown_ca = client_tls_options("mail.example.test", verify=True, trust_root=stranger)
    with pytest.raises(SSL.Error, match="certificate verify failed"):
        run_client(reactor, listener.number, unknown_ca)


def test_client_opportunistic_accepts_any_cert_and_sends_sni(
    reactor: Any, serve: Any, single: Any
) -> None:
    listener = serve(single[0], False)
    creator = client_tls_options("mx.elsewhere.test", verify=False)  # name not in the cert
    info, sni = run_client(reactor, listener.number, creator)
    assert info.startswith(b"version=TLSv1.3 cipher=")
    assert sni == b"mx.elsewhere.test"
