"""Regression (found while fixing issue 9): commands pipelined after LOGIN ran before it.

The adapter held input back only when the command's Deferred had not ``called`` yet; the
LOGIN Deferred is "called" at once (the per-IP semaphore's Deferred) while it waits on the
password check, so ``a LOGIN ...`` + ``b SELECT INBOX`` sent together got
``b BAD SELECT is not allowed in the not authenticated state`` before ``a OK``.  RFC 3501 5.5:
a command whose outcome the next depends on must finish first; our tests never pipelined
after LOGIN (imaplib waits for each reply).
"""

from __future__ import annotations

import base64
import socket
import ssl

import pytest

from tests.harness import PASSWORD, Server, ServerFactory
from tests.tls_helpers import HOSTNAME, CertAuthority

USER = "pipe@example.test"


@pytest.fixture(scope="module")
def server(module_servers: ServerFactory) -> Server:
    return module_servers(
        ("imap", "imaps"), tls=True, users=(USER,), extra_toml="[auth]\nallow_plaintext = true\n"
    )


def _connect(server: Server, ca: CertAuthority, tls: bool) -> socket.socket | ssl.SSLSocket:
    sock = socket.create_connection(
        ("127.0.0.1", server.port("imaps" if tls else "imap")), timeout=10
    )
    if tls:
        return ca.client_context().wrap_socket(sock, server_hostname=HOSTNAME)
    return sock


def _tagged_in_order(sock: socket.socket, tags: list[bytes]) -> list[bytes]:
    """Every line up to the last tag's reply; the tagged replies must come in ``tags`` order."""
    f = sock.makefile("rb")
    assert f.readline().startswith(b"* OK")
    lines = []
    seen: list[bytes] = []
    while len(seen) < len(tags):
        line = f.readline()
        assert line, f"connection closed: {lines}"
        lines.append(line)
        if not line.startswith((b"*", b"+")):
            seen.append(line.split()[0])
    assert seen == tags, lines
    return lines


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "imaps"])
def test_commands_pipelined_after_login_wait_for_it(
    server: Server, ca: CertAuthority, tls: bool
) -> None:
    sock = _connect(server, ca, tls)
    try:
        sock.sendall(
            f'a LOGIN {USER} "{PASSWORD}"\r\nb SELECT INBOX\r\nc NOOP\r\nd LOGOUT\r\n'.encode()
        )
        lines = _tagged_in_order(sock, [b"a", b"b", b"c", b"d"])
        status = {ln.split()[0]: ln.split()[1] for ln in lines if not ln.startswith(b"*")}
        assert status == {b"a": b"OK", b"b": b"OK", b"c": b"OK", b"d": b"OK"}, lines
    finally:
        sock.close()


def test_commands_pipelined_after_authenticate_wait_for_it(
    server: Server, ca: CertAuthority
) -> None:
    sock = _connect(server, ca, True)
    ir = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    try:
        sock.sendall(f"a AUTHENTICATE PLAIN {ir}\r\nb SELECT INBOX\r\nc LOGOUT\r\n".encode())
        lines = _tagged_in_order(sock, [b"a", b"b", b"c"])
        assert [ln.split()[1] for ln in lines if not ln.startswith(b"*")] == [b"OK"] * 3
    finally:
        sock.close()
