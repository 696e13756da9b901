"""CVE-2011-0411 class: commands pipelined in clear text after STARTTLS must be thrown away,
never executed inside the TLS session (RFC 3207 section 4.2).  Raw sockets, real server."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.harness import PASSWORD, Server
from tests.tls_helpers import HOSTNAME, CertAuthority, plain

ALICE = "alice@example.test"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    root: Path = tmp_path_factory.mktemp("inject")
    ca = CertAuthority(root / "pki")
    srv = Server(root / "srv", services=("smtp", "submission"), tls=ca.issue())
    srv.start()
    srv.add_user(ALICE)
    yield srv, ca
    srv.stop()


def read_reply(f) -> list[bytes]:  # type: ignore[no-untyped-def]
    lines = []
    while True:
        line = f.readline()
        if not line:
            raise ConnectionError(f"closed after {lines}")
        lines.append(line)
        if line[3:4] != b"-":
            return lines


def inject(port: int, ca: CertAuthority, injected: bytes) -> list[list[bytes]]:
    """STARTTLS with ``injected`` in the same segment; return the replies seen inside TLS to
    EHLO then NOOP then QUIT."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    f = sock.makefile("rb")
    read_reply(f)
    sock.sendall(b"EHLO attacker.example\r\n")
    read_reply(f)
    sock.sendall(b"STARTTLS\r\n" + injected)  # one write: both arrive before the handshake
    assert read_reply(f)[0].startswith(b"220")
    tls = ca.client_context().wrap_socket(sock, server_hostname=HOSTNAME)
    tf = tls.makefile("rb")
    tls.sendall(b"EHLO client.example\r\nNOOP\r\nQUIT\r\n")
    replies = [read_reply(tf) for _ in range(3)]
    tls.close()
    return replies


@pytest.mark.parametrize("service", ["smtp", "submission"])
def test_commands_pipelined_after_starttls_are_discarded(env, service):
    srv, ca = env
    replies = inject(
        srv.port(service),
        ca,
        b"HELP\r\nMAIL FROM:<alice@example.test>\r\nRCPT TO:<alice@example.test>\r\n",
    )
    # The first reply inside TLS answers our EHLO (not the injected HELP or MAIL).
    assert replies[0][0].startswith(b"250-"), replies
    assert not any(b"214" in line for reply in replies for line in reply)
    assert replies[1] == [b"250 2.0.0 OK\r\n"]
    assert replies[2][0].startswith(b"221")
    # And the injected transaction does not exist: MAIL would have made RCPT/DATA possible.


def test_injected_auth_is_not_executed(env):
    """An attacker-in-the-middle appending AUTH/MAIL cannot ride the victim's TLS session."""
    srv, ca = env
    replies = inject(
        srv.port("submission"),
        ca,
        b"AUTH PLAIN "
        + plain(ALICE, PASSWORD).encode()
        + b"\r\nMAIL FROM:<alice@example.test>\r\n",
    )
    assert replies[0][0].startswith(b"250-")
    assert not any(line.startswith(b"235") for reply in replies for line in reply)
    # Inside TLS, the session is not authenticated: AUTH is still offered.
    assert any(b"AUTH PLAIN LOGIN" in line for line in replies[0])
    assert "logged in" not in srv.output()


def test_injected_bytes_split_across_segments_do_not_run(env):
    """Bytes sent after the 220 in clear text hit the TLS layer and break the handshake;
    they are never read as commands."""
    srv, ca = env
    sock = socket.create_connection(("127.0.0.1", srv.port("submission")), timeout=15)
    f = sock.makefile("rb")
    read_reply(f)
    sock.sendall(b"EHLO a\r\n")
    read_reply(f)
    sock.sendall(b"STARTTLS\r\n")
    assert read_reply(f)[0].startswith(b"220")
    sock.sendall(b"HELP\r\n")
    data = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    sock.close()
    assert b"214" not in data
