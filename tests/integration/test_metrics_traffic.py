"""/metrics moving with real traffic (issue 13): SMTP messages by listener and reply class,
local deliveries and stored bytes, outbound attempts by result, logins by protocol and result
with the throttled addresses, IMAP and POP3 commands by name (an unknown one counted as
"other").  The page is parsed with prometheus-client's own parser and compared before and
after the traffic, over the real server, its real listeners and a recording remote MX."""

from __future__ import annotations

import base64
import http.client
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.clients import IMAPClient, LineClient, SMTPClient
from tests.harness import ALICE, PASSWORD, Server, ServerFactory, wait_until
from tests.loopback import Net, with_subject

ZONE = {"remote.test": {"MX": [[10, "mx.remote.test"]]}, "mx.remote.test": {"A": ["127.0.0.2"]}}

Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metrics(srv: Server) -> Metrics:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port("web"), timeout=10)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200
        body = resp.read().decode()
    finally:
        conn.close()
    out: Metrics = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(m: Metrics, name: str, **labels: str) -> float:
    """A sample's value; a labelled series that never moved is not exported yet: 0."""
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def env(loopback_net: Callable[[dict[str, Any]], Net], servers: ServerFactory) -> dict[str, Any]:
    net = loopback_net(ZONE)
    mx = net.mx("127.0.0.2")
    srv = servers(
        ("smtp", "submission", "imap", "pop3", "web"),
        users=(ALICE,),
        extra_toml=net.relay_toml() + "[auth]\nallow_plaintext = true\nmax_failures_per_ip = 2\n",
    )
    return {"srv": srv, "mx": mx}


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def submit(srv: Server, password: str, source: str = "127.0.0.1") -> int:
    """AUTH PLAIN on the submission port; the reply code."""
    c = SMTPClient(srv.port("submission"), source=source)
    try:
        c.cmd("EHLO client.example.org")
        return c.cmd(f"AUTH PLAIN {plain(ALICE, password)}").code
    finally:
        c.close()


def test_metrics_move_with_smtp_imap_pop3_and_login_traffic(env: dict[str, Any]) -> None:
    srv: Server = env["srv"]
    before = metrics(srv)
    assert all(name.startswith("mailsuite_") for name, _ in before)
    assert value(before, "mailsuite_auth_throttled_ips") == 0

    # MX: one message accepted, one refused at the end of its data (a mail loop: 5xx)
    c = SMTPClient(srv.port("smtp"))
    c.cmd("EHLO client.example.org")
    for received in (0, 60):
        assert c.cmd("MAIL FROM:<someone@example.org>").code == 250
        assert c.cmd(f"RCPT TO:<{ALICE}>").code == 250
        assert c.cmd("DATA").code == 354
        trace = "Received: from a by b; Tue, 1 Dec 2026 10:00:00 +0000\r\n" * received
        c.send(f"{trace}Subject: in\r\n\r\nhello\r\n.\r\n".encode())
        assert c.reply().code == (250 if not received else 554)
    c.close()

    # submission: a wrong password, then a message out to the remote MX
    assert submit(srv, "wrong password", source="127.0.0.7") == 535
    c = SMTPClient(srv.port("submission"))
    c.cmd("EHLO client.example.org")
    assert c.cmd(f"AUTH PLAIN {plain(ALICE, PASSWORD)}").code == 235
    assert c.cmd(f"MAIL FROM:<{ALICE}>").code == 250
    assert c.cmd("RCPT TO:<ann@remote.test>").code == 250
    assert c.cmd("DATA").code == 354
    c.send(f"From: {ALICE}\r\nSubject: out-metrics\r\n\r\nbye\r\n.\r\n".encode())
    assert c.reply().code == 250
    c.close()
    wait_until(
        lambda: with_subject(env["mx"].transactions(), "out-metrics"),
        20,
        "the remote MX to get the message",
    )

    # throttling, from another address: two failures, then refused without a check
    assert submit(srv, "bad one", source="127.0.0.9") == 535
    assert submit(srv, "bad two", source="127.0.0.9") == 535
    assert submit(srv, PASSWORD, source="127.0.0.9") == 454

    # IMAP: a failed and a good login, some commands, one the server does not know
    bad = IMAPClient(srv.port("imap"))
    assert b"NO" in bad.cmd(f'LOGIN "{ALICE}" "nope"')[-1]
    bad.close()
    imap = IMAPClient(srv.port("imap"), ALICE)
    imap.ok("SELECT INBOX")
    imap.ok("NOOP")
    assert b"BAD" in imap.cmd("XYZZY")[-1]
    imap.close()

    # POP3: a login, STAT, an unknown command
    pop = LineClient(srv.port("pop3"))
    assert pop.line().startswith("+OK")
    for line, ok in (
        (f"USER {ALICE}", True),
        (f"PASS {PASSWORD}", True),
        ("STAT", True),
        ("FROB", False),
        ("QUIT", True),
    ):
        pop.send_line(line)
        assert pop.line().startswith("+OK" if ok else "-ERR"), line
    pop.close()

    def moved() -> Metrics | None:
        m = metrics(srv)
        return (
            m
            if value(m, "mailsuite_outbound_attempts_total", result="delivered")
            >= value(before, "mailsuite_outbound_attempts_total", result="delivered") + 1
            else None
        )

    after = wait_until(moved, 20, "the outbound attempt in the metrics")

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("mailsuite_smtp_messages_total", listener="mx", **{"class": "2xx"}) == 1
    assert delta("mailsuite_smtp_messages_total", listener="mx", **{"class": "5xx"}) == 1
    assert delta("mailsuite_smtp_messages_total", listener="submission", **{"class": "2xx"}) == 1
    assert delta("mailsuite_local_deliveries_total") == 1
    assert delta("mailsuite_stored_bytes_total") > len("Subject: in\n\nhello\n")
    assert delta("mailsuite_outbound_attempts_total", result="delivered") == 1
    assert delta("mailsuite_logins_total", protocol="smtp", result="ok") == 1
    assert delta("mailsuite_logins_total", protocol="smtp", result="failed") == 3
    assert delta("mailsuite_logins_total", protocol="smtp", result="throttled") == 1
    assert delta("mailsuite_logins_total", protocol="imap", result="ok") == 1
    assert delta("mailsuite_logins_total", protocol="imap", result="failed") == 1
    assert delta("mailsuite_logins_total", protocol="pop3", result="ok") == 1
    assert value(after, "mailsuite_auth_throttled_ips") == 1
    assert delta("mailsuite_imap_commands_total", command="LOGIN") == 2
    assert delta("mailsuite_imap_commands_total", command="SELECT") == 1
    assert delta("mailsuite_imap_commands_total", command="LOGOUT") == 2
    assert delta("mailsuite_imap_commands_total", command="other") == 1
    assert delta("mailsuite_pop3_commands_total", command="STAT") == 1
    assert delta("mailsuite_pop3_commands_total", command="PASS") == 1
    assert delta("mailsuite_pop3_commands_total", command="other") == 1
    # the unknown names never became labels of their own
    names = {dict(labels).get("command") for name, labels in after if "commands" in name}
    assert not names & {"XYZZY", "FROB"}


def test_metrics_page_lists_only_bounded_label_values(tmp_path: Path) -> None:
    """Commands named by a client only ever land in the fixed tables or "other"."""
    with Server(
        tmp_path, services=("imap", "web"), extra_toml="[auth]\nallow_plaintext = true\n"
    ) as srv:
        c = IMAPClient(srv.port("imap"))
        for i in range(5):
            c.cmd(f"NOSUCH{i}")
        c.close()
        m = wait_until(
            lambda: (
                (m := metrics(srv))
                and value(m, "mailsuite_imap_commands_total", command="other") >= 5
                and m
            ),
            10,
            "the unknown commands counted",
        )
        labels = {
            dict(lab).get("command") for name, lab in m if name == "mailsuite_imap_commands_total"
        }
        assert labels <= {"other", "LOGOUT", "CAPABILITY", "NOOP"}, labels
