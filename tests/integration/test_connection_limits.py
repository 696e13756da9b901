"""Connection limits of SMTP, submission, IMAP and POP3 against the real server: N+1
connections and the last one is refused with the protocol's temporary refusal; close one and
a new one is let in.  Clients connect from several 127.0.0.x source addresses."""

from __future__ import annotations

import base64
import ssl

import pytest

from tests.clients import LineClient
from tests.harness import ALICE, BOB, PASSWORD, Server, ServerFactory

LIMITS = """
[smtp]
max_connections = 4
max_connections_per_ip = 2

[imap]
max_connections = 4
max_connections_per_ip = 2
max_userip_connections = 2

[pop3]
max_connections = 4
max_connections_per_ip = 2

[relay]
trusted_networks = ["127.0.0.9/32"]

[auth]
allow_plaintext = true
"""


@pytest.fixture(scope="module")
def srv(module_servers: ServerFactory) -> Server:
    return module_servers(
        ("smtp", "submission", "submissions", "imap", "imaps", "pop3", "pop3s"),
        users=(ALICE, BOB),
        extra_toml=LIMITS,
    )


class Conn(LineClient):
    """One raw client connection from ``source``; ``greeting`` is the server's first line.
    With ``tls`` the connection is implicit TLS (the server's self-signed certificate)."""

    def __init__(self, port: int, source: str = "127.0.0.1", tls: bool = False) -> None:
        context = None
        if tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        super().__init__(port, source=source, tls=context, timeout=10)
        self.greeting = self.line()

    def smtp(self, text: str) -> str:
        """The last line of the reply to ``text``."""
        self.send_line(text)
        while True:
            line = self.line()
            if line[3:4] != "-":
                return line

    def imap(self, tag: str, text: str) -> str:
        """The tagged reply to ``tag text``."""
        self.send_line(f"{tag} {text}")
        while True:
            line = self.line()
            if not line or line.startswith(tag + " "):
                return line

    def pop3(self, text: str) -> str:
        self.send_line(text)
        return self.line()


def test_smtp_per_ip_limit_refuses_with_421_and_frees_the_slot(srv: Server) -> None:
    port = srv.port("smtp")
    held = [Conn(port) for _ in range(2)]
    assert all(c.greeting.startswith("220 ") for c in held)
    refused = Conn(port)
    assert refused.greeting.startswith("421 4.7.0 ") and "your address" in refused.greeting
    assert refused.closed_by_server()
    # another address is not affected
    other = Conn(port, "127.0.0.2")
    assert other.greeting.startswith("220 ")
    # submission is counted apart: a flood on the MX port does not lock users out
    sub = Conn(srv.port("submission"))
    assert sub.greeting.startswith("220 ")
    # close one (QUIT, then the server closes): a new connection from the address is let in
    assert held[0].smtp("QUIT").startswith("221")
    assert held[0].closed_by_server()
    again = Conn(port)
    assert again.greeting.startswith("220 ")
    for c in [*held, refused, other, sub, again]:
        c.close()


def test_smtp_total_limit_and_trusted_networks(srv: Server) -> None:
    port = srv.port("smtp")
    # [relay] trusted_networks are exempt from the per-IP limit, not from the total
    trusted = [Conn(port, "127.0.0.9") for _ in range(3)]
    assert all(c.greeting.startswith("220 ") for c in trusted)
    fourth = Conn(port, "127.0.0.3")
    assert fourth.greeting.startswith("220 ")
    refused = Conn(port, "127.0.0.4")
    assert refused.greeting.startswith("421 4.7.0 Too many connections")
    assert refused.closed_by_server()
    assert trusted[0].smtp("QUIT").startswith("221") and trusted[0].closed_by_server()
    again = Conn(port, "127.0.0.4")
    assert again.greeting.startswith("220 ")
    for c in [*trusted, fourth, refused, again]:
        c.close()


def test_submission_auth_leaves_the_per_ip_count(srv: Server) -> None:
    port = srv.port("submission")
    first, second = Conn(port), Conn(port)
    assert Conn(port).greeting.startswith("421 4.7.0 ")
    token = base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode()).decode()
    for c in (first, second):
        assert c.smtp("EHLO client.example").startswith("250 ")
        assert c.smtp(f"AUTH PLAIN {token}").startswith("235 ")
    # both logged in: the address may open new (not yet authenticated) connections
    third = Conn(port)
    assert third.greeting.startswith("220 ")
    for c in (first, second, third):
        c.close()


def test_imap_per_ip_limit_before_login(srv: Server) -> None:
    port = srv.port("imap")
    held = [Conn(port) for _ in range(2)]
    assert all(c.greeting.startswith("* OK ") for c in held)
    refused = Conn(port)
    assert refused.greeting == (
        "* BYE [UNAVAILABLE] Too many connections from your address, try later"
    )
    assert refused.closed_by_server()
    assert held[0].imap("a1", "LOGOUT").startswith("a1 OK")
    assert held[0].closed_by_server()
    again = Conn(port)
    assert again.greeting.startswith("* OK ")
    for c in [*held, refused, again]:
        c.close()


def test_imap_user_ip_limit_after_login(srv: Server) -> None:
    port = srv.port("imap")
    logged = []
    for i in range(2):
        c = Conn(port, "127.0.0.5")
        assert c.imap(f"l{i}", f'LOGIN {ALICE} "{PASSWORD}"').startswith(f"l{i} OK")
        logged.append(c)
    # logged-in sessions left the per-IP count: a third connection is let in ...
    third = Conn(port, "127.0.0.5")
    assert third.greeting.startswith("* OK ")
    # ... but alice has her two sessions from this address: NO [UNAVAILABLE], session goes on
    answer = third.imap("l3", f'LOGIN {ALICE} "{PASSWORD}"')
    assert answer == (
        "l3 NO [UNAVAILABLE] Maximum number of connections from user+IP "
        "exceeded (max_userip_connections=2)"
    )
    assert third.imap("n1", "NOOP").startswith("n1 OK")
    # another user from the same address, and alice from another address, are not affected
    assert third.imap("l4", f'LOGIN {BOB} "{PASSWORD}"').startswith("l4 OK")
    elsewhere = Conn(port, "127.0.0.6")
    assert elsewhere.imap("l5", f'LOGIN {ALICE} "{PASSWORD}"').startswith("l5 OK")
    # one of alice's sessions ends: she may log in from the address again
    assert logged[0].imap("o1", "LOGOUT").startswith("o1 OK") and logged[0].closed_by_server()
    fresh = Conn(port, "127.0.0.5")
    assert fresh.imap("l6", f'LOGIN {ALICE} "{PASSWORD}"').startswith("l6 OK")
    for c in [*logged, third, elsewhere, fresh]:
        c.close()


def test_imap_total_limit(srv: Server) -> None:
    port = srv.port("imap")
    held = [Conn(port, f"127.0.0.{i}") for i in (7, 7, 8, 8)]
    assert all(c.greeting.startswith("* OK ") for c in held)
    refused = Conn(port, "127.0.0.10")
    assert refused.greeting == "* BYE [UNAVAILABLE] Too many connections, try later"
    assert refused.closed_by_server()
    assert held[0].imap("a1", "LOGOUT").startswith("a1 OK") and held[0].closed_by_server()
    again = Conn(port, "127.0.0.10")
    assert again.greeting.startswith("* OK ")
    for c in [*held, refused, again]:
        c.close()


def test_pop3_per_ip_and_total_limits(srv: Server) -> None:
    port = srv.port("pop3")
    held = [Conn(port) for _ in range(2)]
    assert all(c.greeting.startswith("+OK ") for c in held)
    refused = Conn(port)
    assert refused.greeting == (
        "-ERR [SYS/TEMP] Too many connections from your address, try again later"
    )
    assert refused.closed_by_server()
    # a logged-in session leaves the per-IP count
    assert held[0].pop3(f"USER {ALICE}").startswith("+OK")
    assert held[0].pop3(f"PASS {PASSWORD}").startswith("+OK")
    third = Conn(port)
    assert third.greeting.startswith("+OK ")
    # four open now (held x2, third, and one more from elsewhere): the total is reached
    fourth = Conn(port, "127.0.0.2")
    assert fourth.greeting.startswith("+OK ")
    over = Conn(port, "127.0.0.3")
    assert over.greeting == "-ERR [SYS/TEMP] Too many connections, try again later"
    assert over.closed_by_server()
    assert held[1].pop3("QUIT").startswith("+OK") and held[1].closed_by_server()
    again = Conn(port, "127.0.0.3")
    assert again.greeting.startswith("+OK ")
    for c in [*held, refused, third, fourth, over, again]:
        c.close()


@pytest.mark.parametrize(
    ("plain", "implicit", "refusal"),
    [
        ("submission", "submissions", "421 4.7.0 Too many connections from your address"),
        ("imap", "imaps", "* BYE [UNAVAILABLE] Too many connections from your address"),
        ("pop3", "pop3s", "-ERR [SYS/TEMP] Too many connections from your address"),
    ],
)
def test_tls_listeners_share_the_count_and_refuse_over_tls(
    srv: Server, plain: str, implicit: str, refusal: str
) -> None:
    """The plain and implicit-TLS listeners of a service count together; the refusal is
    sent inside TLS, then the connection is closed."""
    first = Conn(srv.port(plain), "127.0.0.20")
    second = Conn(srv.port(implicit), "127.0.0.20", tls=True)
    assert not second.greeting.startswith(("421", "* BYE", "-ERR"))
    third = Conn(srv.port(implicit), "127.0.0.20", tls=True)
    assert third.greeting.startswith(refusal)
    assert third.closed_by_server()
    for c in (first, second, third):
        c.close()
