"""Outbound relay end to end: the real server, a twisted.names DNS server on 127.0.0.1 and
recording/failing SMTP servers on 127.0.0.x (all on one port, ``[relay] port``).

What the remote servers saw is read from their record directories (``NNNN.json`` envelope,
``NNNN.eml`` data), what came back to the sender from her Maildir.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.harness import ALICE as SENDER
from tests.harness import Server, ServerFactory, wait_until
from tests.loopback import MX, Net, entries_for, queue_ids, send, show, with_subject
from tests.tls_helpers import CertAuthority

ZONE = {
    "order.test": {"MX": [[20, "mx4.test"], [10, "mx2.test"]]},
    "fallback.test": {"MX": [[10, "mx3.test"], [20, "mx2.test"]]},
    "fallback4xx.test": {"MX": [[10, "mx5.test"], [20, "mx4.test"]]},
    "amx.test": {"A": ["127.0.0.4"]},
    "nullmx.test": {"MX": [[0, "."]]},
    "mixed.test": {"MX": [[10, "mx2.test"]]},
    "retry.test": {"MX": [[10, "mx6.test"]]},
    "kill.test": {"MX": [[10, "mx8.test"]]},
    "up.test": {"MX": [[10, "mx2.test"]]},
    "smarthost.test": {"A": ["127.0.0.7"]},
    "mx2.test": {"A": ["127.0.0.2"]},
    "mx3.test": {"A": ["127.0.0.3"]},
    "mx4.test": {"A": ["127.0.0.4"]},
    "mx5.test": {"A": ["127.0.0.5"]},
    "mx6.test": {"A": ["127.0.0.6"]},
    "mx8.test": {"A": ["127.0.0.8"]},
    "servfail.test": "servfail",
    # the loop rule (RFC 5321 5.1): mx.example.test is the server's own [server] hostname and
    # self.test resolves to the address it listens on
    "mx.example.test": {"A": ["127.0.0.1"]},
    "self.test": {"A": ["127.0.0.1"]},
    "loopname.test": {"MX": [[10, "mx.example.test"], [20, "mx2.test"]]},
    "loopaddr.test": {"MX": [[10, "self.test"]]},
    "seven.test": {"MX": [[10, "mx11.test"]]},
    "mx11.test": {"A": ["127.0.0.11"]},
    "limited.test": {"MX": [[10, "mx10.test"]]},
    "mx10.test": {"A": ["127.0.0.10"]},
    "backupmx.test": {"MX": [[5, "mx4.test"], [10, "mx.example.test"], [20, "mx2.test"]]},
}

MIXED_SCRIPT = {
    "rcpt": {
        "bad@mixed.test": [550, "5.1.1 no such user here"],
        "later@mixed.test": [451, "4.2.1 mailbox busy, try later"],
    }
}


@dataclass
class Remotes:
    """The loopback network of this module and its standing MX servers."""

    net: Net
    rec2: MX  # records, refuses some recipients (MIXED_SCRIPT)
    failing3: MX  # refuses the greeting
    rec4: MX  # records
    busy5: MX  # 451 to MAIL

    def mx(self, address: str, script: dict[str, Any] | None = None) -> MX:
        return self.net.mx(address, script)

    def relay_toml(self, extra: str = "") -> str:
        return self.net.relay_toml(extra)


@pytest.fixture(scope="module")
def net(loopback_net: Callable[[dict[str, Any]], Net]) -> Remotes:
    n = loopback_net(ZONE)
    return Remotes(
        n,
        n.mx("127.0.0.2", MIXED_SCRIPT),
        n.mx("127.0.0.3", {"greeting": [554, "5.7.1 not today"]}),
        n.mx("127.0.0.4"),
        n.mx("127.0.0.5", {"mail": [451, "4.3.2 busy, try another"]}),
    )


@pytest.fixture(scope="module")
def srv(net: Remotes, module_servers: ServerFactory) -> Server:
    return module_servers(("smtp",), users=(SENDER,), extra_toml=net.relay_toml())


def bounces(server: Server, recipient: str) -> list[email.message.Message]:
    """The DSNs in the sender's INBOX that report on ``recipient``."""
    out = []
    marker = f"Final-Recipient: rfc822; {recipient}\n".encode()
    for raw in server.messages(SENDER) if server.maildir(SENDER).exists() else []:
        if marker in raw and b"multipart/report" in raw:
            out.append(email.message_from_bytes(raw))
    return out


def dsn_fields(msg: email.message.Message) -> str:
    for part in msg.walk():
        if part.get_content_type() == "message/delivery-status":
            return "\n".join(str(p) for p in part.get_payload())
    raise AssertionError("no message/delivery-status part")


# --------------------------------------------------------------------------------- routing


def test_mx_preference_order(net: Remotes, srv: Server) -> None:
    send(srv, ["bob@order.test"], "order")
    got = wait_until(lambda: with_subject(net.rec2.transactions(), "order"), what="delivery")
    assert got[0]["rcpts"] == ["bob@order.test"]
    assert got[0]["mail_from"] == SENDER
    assert got[0]["helo"] == "mx.example.test"
    assert with_subject(net.rec4.transactions(), "order") == []
    # our Received header travelled with the message
    assert b"Received: from " in got[0]["data"]


def test_fallback_to_next_mx_when_first_refuses_greeting(net: Remotes, srv: Server) -> None:
    send(srv, ["carol@fallback.test"], "fallback")
    got = wait_until(lambda: with_subject(net.rec2.transactions(), "fallback"), what="delivery")
    assert got[0]["rcpts"] == ["carol@fallback.test"]


def test_fallback_to_next_mx_on_4xx(net: Remotes, srv: Server) -> None:
    send(srv, ["dave@fallback4xx.test"], "fallback4xx")
    got = wait_until(lambda: with_subject(net.rec4.transactions(), "fallback4xx"), what="delivery")
    assert got[0]["rcpts"] == ["dave@fallback4xx.test"]


def test_no_mx_uses_the_domains_address(net: Remotes, srv: Server) -> None:
    send(srv, ["erin@amx.test"], "amx")
    got = wait_until(lambda: with_subject(net.rec4.transactions(), "amx"), what="delivery")
    assert got[0]["rcpts"] == ["erin@amx.test"]


def test_null_mx_bounces_at_once(srv: Server) -> None:
    send(srv, ["frank@nullmx.test"], "nullmx")
    dsn = wait_until(lambda: bounces(srv, "frank@nullmx.test"), what="the bounce")[0]
    fields = dsn_fields(dsn)
    assert "Action: failed" in fields and "Status: 5.1.10" in fields
    assert dsn.get_content_type() == "multipart/report"
    assert dsn["To"] == f"<{SENDER}>"
    raw = dsn.as_bytes()
    assert b"Subject: nullmx" in raw  # the original headers are returned
    wait_until(lambda: not queue_ids(srv), what="the queue to empty")


def test_nxdomain_bounces(srv: Server) -> None:
    send(srv, ["gina@nowhere.test"], "nxdomain")
    dsn = wait_until(lambda: bounces(srv, "gina@nowhere.test"), what="the bounce")[0]
    assert "Status: 5.1.2" in dsn_fields(dsn)


def test_servfail_is_retried_not_bounced(srv: Server) -> None:
    send(srv, ["hal@servfail.test"], "servfail")

    def attempted_twice() -> bool:
        for qid in queue_ids(srv):
            out = show(srv, qid)
            if "hal@servfail.test" in out and "attempts:     2" in out:
                return True
        return False

    wait_until(attempted_twice, what="two attempts")
    assert bounces(srv, "hal@servfail.test") == []
    listing = srv.cli("queue", "list").stdout
    assert "hal@servfail.test" in listing and "pending" in listing
    qid = next(q for q in queue_ids(srv) if "hal@" in show(srv, q))
    assert "4.4.3" in show(srv, qid)
    srv.cli("queue", "delete", qid)
    assert qid not in queue_ids(srv)
    assert bounces(srv, "hal@servfail.test") == []  # delete is silent


@pytest.mark.parametrize("domain", ["loopname.test", "loopaddr.test"])
def test_mx_pointing_at_ourselves_bounces_5_4_6(net: Remotes, srv: Server, domain: str) -> None:
    rcpt = f"mo@{domain}"
    send(srv, [rcpt], f"loop-{domain}")
    dsn = wait_until(lambda: bounces(srv, rcpt), what="the bounce")[0]
    fields = dsn_fields(dsn)
    assert "Status: 5.4.6" in fields and "loops back to myself" in fields
    # never sent anywhere: not to ourselves, not to the worse MX
    assert with_subject(net.rec2.transactions(), f"loop-{domain}") == []
    wait_until(lambda: not entries_for(srv, rcpt), what="the entry to leave the queue")


def test_as_backup_mx_only_better_hosts_are_used(net: Remotes, srv: Server) -> None:
    send(srv, ["nell@backupmx.test"], "backupmx")
    got = wait_until(lambda: with_subject(net.rec4.transactions(), "backupmx"), what="delivery")
    assert got[0]["rcpts"] == ["nell@backupmx.test"]
    assert with_subject(net.rec2.transactions(), "backupmx") == []


# ----------------------------------------------------------------------------- per recipient


def test_mixed_recipient_results(net: Remotes, srv: Server) -> None:
    send(srv, ["good@mixed.test", "bad@mixed.test", "later@mixed.test"], "mixed")
    got = wait_until(lambda: with_subject(net.rec2.transactions(), "mixed"), what="delivery")
    assert got[0]["rcpts"] == ["good@mixed.test"]  # one transaction, one accepted recipient
    dsn = wait_until(lambda: bounces(srv, "bad@mixed.test"), what="the bounce")[0]
    fields = dsn_fields(dsn)
    assert "bad@mixed.test" in fields and "Status: 5.1.1" in fields
    assert "good@mixed.test" not in fields and "later@mixed.test" not in fields
    assert "Remote-MTA: dns; mx2.test" in fields
    assert "no such user here" in fields
    # the 4xx recipient stays queued, alone
    ids = wait_until(
        lambda: [q for q in queue_ids(srv) if "later@mixed.test" in show(srv, q)],
        what="the pending entry",
    )
    shown = show(srv, ids[0])
    assert "4.2.1" in shown and "mailbox busy" in shown
    assert "good@mixed.test" in shown and "delivered" in shown
    srv.cli("queue", "bounce", ids[0])
    dsn2 = wait_until(lambda: bounces(srv, "later@mixed.test"), what="the operator's bounce")[0]
    assert "later@mixed.test" in dsn_fields(dsn2)
    assert ids[0] not in queue_ids(srv)
    # the delivered recipient was never sent again
    assert len(with_subject(net.rec2.transactions(), "mixed")) == 1


def test_no_bounce_for_null_sender(net: Remotes, srv: Server) -> None:
    send(srv, ["ivan@nullmx.test"], "nullsender", sender="")
    # the runner logs its decision where it would have made the bounce: wait for that
    wait_until(
        lambda: [
            ln
            for ln in srv.log.read_text(errors="replace").splitlines()
            if "null sender: no bounce" in ln and "ivan@nullmx.test" in ln
        ],
        what="the runner's decision not to bounce",
    )
    wait_until(lambda: not entries_for(srv, "ivan@nullmx.test"), what="the entry to go")
    assert bounces(srv, "ivan@nullmx.test") == []


def test_temporary_failure_then_success_on_retry(net: Remotes, srv: Server) -> None:
    failing = net.mx("127.0.0.6", {"mail": [451, "4.3.0 greylisted"]})
    send(srv, ["judy@retry.test"], "retry")

    def attempted() -> bool:
        for q in queue_ids(srv):
            shown = show(srv, q)
            if "judy@retry.test" in shown and "greylisted" in shown:
                return True
        return False

    wait_until(attempted, what="the first attempt")
    failing.stop()
    recording = net.mx("127.0.0.6")
    got = wait_until(
        lambda: with_subject(recording.transactions(), "retry"), timeout=30, what="the retry"
    )
    assert got[0]["rcpts"] == ["judy@retry.test"]
    wait_until(lambda: not [q for q in queue_ids(srv) if "judy@" in show(srv, q)], what="cleanup")
    assert bounces(srv, "judy@retry.test") == []
    recording.stop()


def test_flush_prints_progress(net: Remotes, srv: Server) -> None:
    send(srv, ["kim@servfail.test"], "flushme")
    qid = wait_until(lambda: [q for q in queue_ids(srv) if "kim@" in show(srv, q)], what="entry")[0]
    out = srv.cli("queue", "flush", qid, "--timeout", "20").stdout
    assert "flushing 1 entry" in out and f"{qid}: 1 pending" in out
    srv.cli("queue", "delete", qid)


def test_trusted_network_relays_and_untrusted_does_not(net: Remotes, srv: Server) -> None:
    with smtplib.SMTP("127.0.0.1", srv.port("smtp"), timeout=10) as s:
        s.ehlo("trusted")
        s.mail(SENDER)
        assert s.rcpt("x@up.test")[0] == 250
    with smtplib.SMTP(
        "127.0.0.1", srv.port("smtp"), timeout=10, source_address=("127.0.0.9", 0)
    ) as s:
        s.ehlo("untrusted")
        s.mail("someone@elsewhere.test")
        code, text = s.rcpt("x@up.test")
        assert code == 554 and b"5.7.1" in text


# ------------------------------------------------------------------------------- smarthost


def smarthost_and_server(
    net: Remotes, servers: ServerFactory, ca: CertAuthority, password: str
) -> tuple[MX, Server]:
    """A recording smarthost on 127.0.0.7 with STARTTLS (test CA) and AUTH relayuser /
    relay-secret, and a mailsuite server (not started) relaying everything to it with
    ``password``."""
    cert, key = ca.issue("smarthost.test", stem="smarthost")
    smarthost = net.mx(
        "127.0.0.7",
        {
            "starttls": {"cert": str(cert), "key": str(key)},
            "auth": {"relayuser": "relay-secret"},
        },
    )
    extra = (
        f'smarthost = "smarthost.test:{net.net.port}"\n'
        f'smarthost_user = "relayuser"\nsmarthost_password = "{password}"\n'
        f'tls_ca = "{ca.ca_file}"\n'
    )
    server = servers(("smtp",), users=(SENDER,), extra_toml=net.relay_toml(extra), start=False)
    return smarthost, server


def test_smarthost_with_auth_over_tls(
    net: Remotes, servers: ServerFactory, ca: CertAuthority
) -> None:
    smarthost, server = smarthost_and_server(net, servers, ca, password="relay-secret")
    with server:
        send(server, ["one@order.test", "two@nullmx.test"], "via-smarthost")
        got = wait_until(
            lambda: with_subject(smarthost.transactions(), "via-smarthost"),
            what="delivery to the smarthost",
        )
    t = got[0]
    # every remote recipient goes to the smarthost, even a null-MX domain (no MX lookup)
    assert sorted(t["rcpts"]) == ["one@order.test", "two@nullmx.test"]
    assert t["tls"] is True and t["auth_user"] == "relayuser"
    assert with_subject(net.rec2.transactions(), "via-smarthost") == []
    smarthost.stop()


def test_smarthost_with_wrong_password_is_retried(
    net: Remotes, servers: ServerFactory, ca: CertAuthority
) -> None:
    smarthost, server = smarthost_and_server(net, servers, ca, password="wrong")
    with server:
        send(server, ["one@order.test"], "bad-auth")
        wait_until(
            lambda: any("5.7.8" in show(server, q) for q in queue_ids(server)),
            what="the refused attempt",
        )
        assert smarthost.transactions() == []
        assert queue_ids(server)  # 535 from the smarthost is not the recipient's fault
    smarthost.stop()


def test_too_many_recipients_are_sent_at_once_in_new_transactions(
    net: Remotes, servers: ServerFactory
) -> None:
    """A server that takes 2 recipients per transaction (452 4.5.3 for the rest): the rest go
    in new transactions right away, not after the retry delay (here 10 minutes)."""
    limited = net.mx("127.0.0.10", {"max_rcpts": 2})
    slow_retry = net.relay_toml().replace(
        "retry_initial = 1\nretry_max = 2", "retry_initial = 600\nretry_max = 600"
    )
    server = servers(("smtp",), users=(SENDER,), extra_toml=slow_retry, start=False)
    rcpts = [f"r{i}@limited.test" for i in range(5)]
    with server:
        send(server, rcpts, "limited")
        got = wait_until(
            lambda: len(limited.transactions()) >= 3 and limited.transactions(),
            timeout=15,
            what="three transactions",
        )
        wait_until(lambda: not queue_ids(server), what="the queue to empty")
    assert [t["rcpts"] for t in got] == [rcpts[:2], rcpts[2:4], rcpts[4:]]
    assert len(limited.transactions()) == 3
    assert bounces(server, rcpts[4]) == []
    limited.stop()


def test_8bit_message_to_a_server_without_8bitmime_is_converted(net: Remotes, srv: Server) -> None:
    """RFC 6152 3: the recording MX does not offer 8BITMIME; the text arrives as 7-bit
    quoted-printable that decodes back to the original, and no converted copy is left."""
    seven = net.mx("127.0.0.11", {"extensions": ["PIPELINING", "ENHANCEDSTATUSCODES"]})
    text = "Grüße aus Köln — “quoted”, trailing blanks   \n.dot line\n" + "ä" * 200 + "\n"
    msg = (
        "From: <alice@example.test>\r\nTo: <olga@seven.test>\r\nSubject: eightbit\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n" + text.replace("\n", "\r\n")
    )
    with smtplib.SMTP("127.0.0.1", srv.port("smtp"), timeout=15) as s:
        s.sendmail(SENDER, ["olga@seven.test"], msg.encode(), mail_options=["BODY=8BITMIME"])
    got = wait_until(lambda: with_subject(seven.transactions(), "eightbit"), what="delivery")
    t = got[0]
    assert "BODY=8BITMIME" not in " ".join(t["mail_params"]).upper()
    assert t["data"].isascii()
    parsed = email.message_from_bytes(t["data"], policy=email.policy.default)
    assert parsed["Content-Transfer-Encoding"] == "quoted-printable"
    assert parsed.get_content().replace("\r\n", "\n") == text
    assert b"Received: from " in t["data"]  # our trace header is still there
    wait_until(lambda: not entries_for(srv, "olga@seven.test"), what="the queue to empty")
    assert list((srv.data / "queue" / "tmp").iterdir()) == []  # the 7-bit copy was removed

    # raw 8-bit in a header cannot be converted: bounced with 5.6.3 as before
    bad = ("From: <alice@example.test>\r\nSubject: Grüße\r\n\r\nä\r\n").encode()
    with smtplib.SMTP("127.0.0.1", srv.port("smtp"), timeout=15) as s:
        s.sendmail(SENDER, ["pia@seven.test"], bad, mail_options=["BODY=8BITMIME"])
    dsn = wait_until(lambda: bounces(srv, "pia@seven.test"), what="the bounce")[0]
    fields = dsn_fields(dsn)
    assert "Status: 5.6.3" in fields and "message header" in fields
    assert len(seven.transactions()) == 1
    seven.stop()


# ----------------------------------------------------------------------------- durability


def test_kill9_then_restart_delivers_everything_once(net: Remotes, servers: ServerFactory) -> None:
    server = servers(("smtp",), users=(SENDER,), extra_toml=net.relay_toml())
    for i in range(3):
        send(server, [f"u{i}@up.test"], f"k-up-{i}")
    for i in range(4):
        send(server, [f"d{i}@kill.test"], f"k-down-{i}")
    send(server, ["both@up.test", "both@kill.test"], "k-both")
    wait_until(
        lambda: len([t for t in net.rec2.transactions() if b"Subject: k-" in t["data"]]) >= 4,
        what="the up deliveries",
    )
    # the down domain has been tried at least once for every entry, and the queue has
    # recorded the up half of k-both as delivered (the MX has it a moment before that: a
    # kill -9 in between sends it again, which SMTP allows; what the queue recorded it must
    # never send again)
    wait_until(
        lambda: (
            len(queue_ids(server)) == 5
            and all("attempts:     0" not in show(server, q) for q in queue_ids(server))
            and any(
                "recipient: both@up.test\n    state:        delivered" in show(server, q)
                for q in queue_ids(server)
            )
        ),
        what="first attempts",
    )
    server.kill9()
    pending = queue_ids(server)
    assert len(pending) == 5
    kill_mx = net.mx("127.0.0.8")
    server.start()
    got = wait_until(
        lambda: len(kill_mx.transactions()) >= 5 and kill_mx.transactions(),
        timeout=30,
        what="deliveries after the restart",
    )
    wait_until(lambda: not queue_ids(server), what="the queue to empty")
    # restart once more: nothing is left on disk to send again, and a new message is
    # the only thing the MX sees
    server.stop()
    assert queue_ids(server) == []
    server.start()
    send(server, ["marker@kill.test"], "k-marker")
    wait_until(
        lambda: with_subject(kill_mx.transactions(), "k-marker"),
        what="the message sent after the second restart",
    )
    wait_until(lambda: not queue_ids(server), what="the queue to empty again")
    subjects = [t["data"].split(b"Subject: ")[1].split(b"\r\n")[0] for t in got]
    assert sorted(subjects) == sorted([f"k-down-{i}".encode() for i in range(4)] + [b"k-both"])
    assert len(kill_mx.transactions()) == 6  # the five, once each, and the marker
    both = with_subject(kill_mx.transactions(), "k-both")
    assert both[0]["rcpts"] == ["both@kill.test"]
    up = [t for t in net.rec2.transactions() if b"Subject: k-" in t["data"]]
    assert len(up) == 4  # 3 singles and the up half of k-both: none of them twice
    kill_mx.stop()


def test_queue_cli_list_and_show(net: Remotes, srv: Server) -> None:
    send(srv, ["leo@servfail.test"], "listme")
    qid = wait_until(lambda: [q for q in queue_ids(srv) if "leo@" in show(srv, q)], what="entry")[0]
    listing = srv.cli("queue", "list").stdout
    assert qid in listing and f"<{SENDER}>" in listing and "leo@servfail.test" in listing
    shown = srv.cli("queue", "show", qid).stdout  # the command as a person runs it
    assert "Subject: listme" in shown and "next attempt" in shown
    assert srv.cli("queue", "show", "nonsense", check=False).returncode != 0
    srv.cli("queue", "delete", qid)


# ------------------------------------------------------------------- the queue command


def test_queue_cli_reads_well_for_a_person(
    net: Remotes, srv: Server, servers: ServerFactory
) -> None:
    import re

    from mailsuite.queue.cli import _age

    assert [_age(s) for s in (5, 185, 7300, 200000)] == ["5s", "3m", "2h", "2d"]
    send(srv, ["pat@servfail.test"], "readable")
    qid = wait_until(
        lambda: [q for q in queue_ids(srv) if "pat@" in show(srv, q) and "4.4.3" in show(srv, q)],
        what="a failed attempt",
    )[0]
    listing = srv.cli("queue", "list").stdout
    lines = listing.splitlines()
    assert re.match(r"ID\s+AGE\s+SIZE\s+SENDER$", lines[0])
    entry = next(ln for ln in lines if ln.startswith(qid))
    assert re.match(rf"{qid}\s+\d+[smhd]\s+[\d.]+ (B|KiB)\s+<{SENDER}>$", entry), entry
    i = lines.index(next(ln for ln in lines if "pat@servfail.test" in ln))
    assert re.search(r"(retry in \d+[smhd]|due now|sending) .*pat@servfail.test", lines[i])
    assert "last reply:" in lines[i + 1] and "4.4.3" in lines[i + 1]
    assert "(details: mailsuite queue show ID)" in listing
    assert "no running server" not in listing  # this one is running
    shown = show(srv, qid)
    assert re.search(r"queued: .* \(\d+[smhd] ago\)", shown)
    assert re.search(r"gives up: .* \(in \d+[dh]\)", shown)
    assert re.search(r"next attempt: .* \((now|in \d+[smhd])\)", shown)
    srv.cli("queue", "delete", qid)

    # errors say what is wrong and what to do, on stderr, with a non-zero status
    gone = srv.cli("queue", "show", qid, check=False)
    assert gone.returncode == 1 and gone.stdout == ""
    assert f"no queue entry {qid}" in gone.stderr and "mailsuite queue list" in gone.stderr
    bad = srv.cli("queue", "delete", "not-an-id", check=False)
    assert bad.returncode == 2 and "is not a queue id" in bad.stderr
    assert "mailsuite queue list" in bad.stderr

    # no server running
    idle = servers(("smtp",), extra_toml=net.relay_toml(), start=False)
    flush = idle.cli("queue", "flush", check=False)
    assert flush.returncode == 1 and "no running server" in flush.stderr
    assert "twistd -n mailsuite" in flush.stderr
    empty = idle.cli("queue", "list").stdout
    assert "the queue is empty" in empty and "no running server" in empty
