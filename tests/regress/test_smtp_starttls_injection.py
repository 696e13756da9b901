"""CVE-2011-0411 class: commands pipelined in clear text after STARTTLS must be thrown away,
never executed inside the TLS session (RFC 3207 section 4.2).  Raw sockets, real server."""

from __future__ import annotations

import pytest

from tests.clients import Reply, SMTPClient, read_line
from tests.harness import ALICE, PASSWORD, Server, ServerFactory
from tests.tls_helpers import CertAuthority, plain


@pytest.fixture(scope="module")
def env(module_servers: ServerFactory, ca: CertAuthority) -> tuple[Server, CertAuthority]:
    return module_servers(("smtp", "submission"), tls=True, users=(ALICE,)), ca


def inject(port: int, ca: CertAuthority, injected: bytes) -> list[Reply]:
    """STARTTLS with ``injected`` in the same segment; return the replies seen inside TLS to
    EHLO then NOOP then QUIT."""
    client = SMTPClient(port, timeout=15)
    client.cmd("EHLO attacker.example")
    client.start_tls(ca.client_context(), injected=injected)  # both arrive before the handshake
    client.send(b"EHLO client.example\r\nNOOP\r\nQUIT\r\n")
    replies = [client.reply() for _ in range(3)]
    client.close()
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
    assert replies[0].text.startswith("250-"), replies
    assert not any(line.startswith("214") for reply in replies for line in reply.lines)
    assert replies[1].text == "250 2.0.0 OK"
    assert replies[2].code == 221
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
    assert replies[0].text.startswith("250-")
    assert not any(line.startswith("235") for reply in replies for line in reply.lines)
    # Inside TLS, the session is not authenticated: AUTH is still offered.
    assert any("AUTH PLAIN LOGIN" in line for line in replies[0].lines)
    assert "logged in" not in srv.output()


def test_injected_bytes_split_across_segments_do_not_run(
    env: tuple[Server, CertAuthority],
) -> None:
    """Bytes sent after the 220 in clear text hit the TLS layer and break the handshake;
    they are never read as commands: the server closes the connection (a TLS alert at
    most), and a wait past the timeout fails the test instead of passing it."""
    srv, _ = env
    client = SMTPClient(srv.port("submission"), timeout=15)
    client.cmd("EHLO a")
    client.send(b"STARTTLS\r\n")
    assert read_line(client.sock).startswith(b"220 ")
    client.send(b"HELP\r\n")
    data = b""
    try:
        while chunk := client.sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    client.sock.close()
    assert b"214" not in data and (data == b"" or data[:1] == b"\x15"), data  # a TLS alert
