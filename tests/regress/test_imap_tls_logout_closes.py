"""Regression (issue 9): IMAP LOGOUT over TLS must close the connection.

On 993, and after STARTTLS on 143, ``* BYE`` and the tagged OK arrived but the socket stayed
open: the session's output producer stayed registered on the TLS transport, and Twisted's
``TLSMemoryBIOProtocol.loseConnection`` waits for the producer to be unregistered before it
sends close_notify and closes.  mbsync waits for that close and hung until its own timeout.
Plain-text IMAP closed at once, which is why the plain-text tests never saw it.

RFC 3501 6.1.3: after the tagged OK to LOGOUT "the server ... closes the network connection".
"""

from __future__ import annotations

import imaplib
import socket
import ssl
import time
from pathlib import Path

import pytest

from tests.harness import PASSWORD, Server, ServerFactory, server_connections, wait_until
from tests.tls_helpers import HOSTNAME, CertAuthority

USER = "tls@example.test"
CLOSE_WITHIN = 2.0  # seconds from the tagged OK to the end of the stream


@pytest.fixture(scope="module")
def server(module_servers: ServerFactory) -> Server:
    return module_servers(("imap", "imaps"), tls=True, users=(USER,))


def _read_until_tag(f: object, tag: bytes) -> list[bytes]:
    out = []
    while True:
        line = f.readline()  # type: ignore[attr-defined]
        assert line, f"connection closed before {tag!r}: {out}"
        out.append(line)
        if line.startswith(tag + b" "):
            return out


def _tls_session(server: Server, ca: CertAuthority, mode: str) -> ssl.SSLSocket:
    """A verified TLS connection past the greeting: implicit (imaps) or via STARTTLS."""
    if mode == "imaps":
        sock = socket.create_connection(("127.0.0.1", server.port("imaps")), timeout=10)
        tls = ca.client_context().wrap_socket(sock, server_hostname=HOSTNAME)
        assert tls.recv(4096).startswith(b"* OK")
        return tls
    sock = socket.create_connection(("127.0.0.1", server.port("imap")), timeout=10)
    f = sock.makefile("rb")
    assert f.readline().startswith(b"* OK")
    sock.sendall(b"s STARTTLS\r\n")
    assert f.readline().startswith(b"s OK")
    return ca.client_context().wrap_socket(sock, server_hostname=HOSTNAME)


def _logout_then_eof(tls: ssl.SSLSocket, port: int) -> float:
    """Send LOGOUT; return the seconds from its tagged OK until the stream has ended and the
    server has closed its end of the TCP connection (while we keep ours open: a client that
    reads close_notify as the end and never answers it must not pin a connection)."""
    f = tls.makefile("rb")
    tls.sendall(b"z LOGOUT\r\n")
    lines = _read_until_tag(f, b"z")
    assert lines[0].startswith(b"* BYE") and lines[-1].startswith(b"z OK"), lines
    t0 = time.monotonic()
    tls.settimeout(CLOSE_WITHIN + 3)
    try:
        rest = f.read()  # b"" at a clean close (close_notify) or EOF
    except TimeoutError:
        pytest.fail(
            f"the server kept the TLS connection open {CLOSE_WITHIN + 3:.0f} s after LOGOUT"
        )
    except (ssl.SSLError, ConnectionResetError) as exc:
        pytest.fail(f"LOGOUT did not end TLS cleanly: {exc!r}")
    assert rest == b""
    wait_until(
        lambda: server_connections(port) == [],
        t0 + CLOSE_WITHIN + 3 - time.monotonic(),
        "the server to close the TCP connection",
    )
    return time.monotonic() - t0


@pytest.mark.parametrize("mode", ["imaps", "starttls"])
@pytest.mark.parametrize("logged_in", [False, True], ids=["before-login", "after-login"])
def test_logout_over_tls_closes_the_connection(
    server: Server, ca: CertAuthority, mode: str, logged_in: bool
) -> None:
    tls = _tls_session(server, ca, mode)
    try:
        if logged_in:
            tls.sendall(f'a LOGIN {USER} "{PASSWORD}"\r\nb SELECT INBOX\r\n'.encode())
            f = tls.makefile("rb")
            assert _read_until_tag(f, b"a")[-1].startswith(b"a OK")
            assert _read_until_tag(f, b"b")[-1].startswith(b"b OK")
        port = server.port("imaps" if mode == "imaps" else "imap")
        assert _logout_then_eof(tls, port) < CLOSE_WITHIN
    finally:
        tls.close()


@pytest.mark.parametrize("mode", ["imaps", "starttls"])
def test_imaplib_logout_over_tls_is_prompt_and_closes(
    server: Server, ca: CertAuthority, mode: str
) -> None:
    ctx = ca.client_context()
    if mode == "imaps":
        port = server.port("imaps")
        m: imaplib.IMAP4 = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=ctx, timeout=10)
    else:
        port = server.port("imap")
        m = imaplib.IMAP4("127.0.0.1", port, timeout=10)
        m.host = HOSTNAME  # the name starttls() checks the certificate against
        m.starttls(ctx)
    m.login(USER, PASSWORD)
    assert m.select("INBOX")[0] == "OK"
    assert server_connections(port) == ["ESTABLISHED"]
    # imaplib.logout() closes its own socket after the BYE, which would end the connection
    # whatever the server does: send LOGOUT, then wait for the server to end the stream.
    t0 = time.monotonic()
    m.state = "LOGOUT"
    typ, _ = m._simple_command("LOGOUT")
    assert typ == "BYE"  # imaplib reports the untagged BYE it expected for LOGOUT
    m.sock.settimeout(CLOSE_WITHIN + 3)
    rest = []
    try:
        while line := m.file.readline():  # the tagged OK follows the BYE imaplib stopped at
            rest.append(line)
    except TimeoutError:
        pytest.fail("the server kept the connection open after LOGOUT")
    assert len(rest) == 1 and rest[0].split()[1] == b"OK", rest
    assert time.monotonic() - t0 < CLOSE_WITHIN
    m.shutdown()
    # and the server holds nothing for it (no CLOSE_WAIT left behind)
    wait_until(
        lambda: server_connections(port) == [],
        CLOSE_WITHIN,
        "the server to close the TCP connection",
    )


def test_plain_logout_still_closes(server: Server, tmp_path: Path) -> None:
    sock = socket.create_connection(("127.0.0.1", server.port("imap")), timeout=10)
    try:
        f = sock.makefile("rb")
        assert f.readline().startswith(b"* OK")
        sock.sendall(b"z LOGOUT\r\n")
        _read_until_tag(f, b"z")
        sock.settimeout(CLOSE_WITHIN)
        assert f.read() == b""
    finally:
        sock.close()
