"""Sieve at local delivery over the real server: messages arrive by SMTP, each recipient's
active script runs in the delivery, and what leaves the server lands on a loopback recording
MX (the ``"*"`` route): redirects, rejection notices, vacation replies, bounces.

Covers issue 16's list: redirect (with and without ``:copy``), reject at SMTP time for the
only recipient and as a notice with several, vacation (once per period; never to lists, bulk,
auto-submitted mail or the null sender), a script that fails at run time (kept, logged for the
user), DSNs to a local user going through her script, and a kill -9 in the middle of a load
with a script active (nothing acknowledged is lost).
"""

from __future__ import annotations

import email
import smtplib
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.harness import Server, ServerFactory, wait_until
from tests.loopback import MX, Net, queue_ids

SINK_SCRIPT = {"rcpt": {"nobody@remote.test": [550, "5.1.1 no such user here"]}}


def to(sink: MX, rcpt: str) -> list[dict[str, Any]]:
    """What the sink accepted for ``rcpt``."""
    return [t for t in sink.transactions() if rcpt in t["rcpts"]]


def toml(net: Net, sink: MX) -> str:
    """Every remote recipient goes to ``sink`` (the "*" route, no MX lookup)."""
    return (
        "[auth]\nallow_plaintext = true\n\n"
        + net.relay_toml()
        + f'\n[relay.routes]\n"*" = "[{sink.address}]:{sink.port}"\n\n'
        "[sieve]\nvacation_min_period = 1\n"
    )


@pytest.fixture(scope="module")
def net(loopback_net: Callable[[dict[str, Any]], Net]) -> Net:
    return loopback_net({})


@pytest.fixture(scope="module")
def sink(net: Net) -> MX:
    return net.mx("127.0.0.2", SINK_SCRIPT)


@pytest.fixture(scope="module")
def server(module_servers: ServerFactory, net: Net, sink: MX) -> Server:
    return module_servers(("smtp",), extra_toml=toml(net, sink))


def settle(server: Server) -> None:
    """Wait until everything queued so far has left (delivered to the sink or bounced).
    A delivery queues its replies before its 250, so after this nothing more is coming."""
    wait_until(lambda: not queue_ids(server), timeout=20, what="an empty queue")


def user(server: Server, name: str, script: str | None) -> str:
    address = f"{name}@example.test"
    server.add_user(address)
    if script is not None:
        server.cli("sieve", "put", address, "rules", "-", "--activate", stdin=script)
    return address


def message(
    subject: str, to: str, sender: str = "bob@remote.test", extra: str = "", body: str = "hello\r\n"
) -> bytes:
    return (
        f"From: Bob <{sender or 'mailer-daemon@remote.test'}>\r\nTo: {to}\r\n"
        f"Subject: {subject}\r\nMessage-ID: <{subject.replace(' ', '.')}@remote.test>\r\n"
        f"{extra}\r\n{body}"
    ).encode()


def send(server: Server, sender: str, rcpts: list[str], data: bytes) -> tuple[int, bytes]:
    """One SMTP transaction; the reply to the end of the data."""
    with smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=20) as s:
        s.ehlo("client.remote.test")
        assert s.mail(sender)[0] == 250
        for r in rcpts:
            assert s.rcpt(r)[0] == 250
        return s.data(data)


def stored(server: Server, address: str, folder: str = "") -> list[bytes]:
    box = server.maildir(address, folder)
    return server.messages(address, folder) if (box / "new").is_dir() else []


def test_redirect_goes_out_with_the_original_sender(server: Server, sink: MX) -> None:
    carol = user(server, "carol", 'redirect "fwd@remote.test";\n')
    code, _ = send(server, "bob@remote.test", [carol], message("forward me", carol))
    assert code == 250
    (t,) = wait_until(lambda: to(sink, "fwd@remote.test"), what="the redirect")
    assert t["mail_from"] == "bob@remote.test"  # RFC 5228 4.2: the original envelope sender
    head = t["data"].split(b"\r\n\r\n", 1)[0]
    assert b"Delivered-To: carol@example.test" in head  # how a loop is recognised
    assert b"Subject: forward me" in head and not head.startswith(b"Return-Path")
    assert stored(server, carol) == []  # redirect cancels the implicit keep


def test_redirect_copy_keeps_a_copy(server: Server, sink: MX) -> None:
    cora = user(server, "cora", 'require "copy";\nredirect :copy "fwd2@remote.test";\n')
    assert send(server, "bob@remote.test", [cora], message("copy me", cora))[0] == 250
    wait_until(lambda: to(sink, "fwd2@remote.test"), what="the redirect")
    (kept,) = stored(server, cora)
    assert kept.startswith(b"Return-Path: <bob@remote.test>\nDelivered-To: cora@example.test\n")


def test_reject_for_the_only_recipient_is_an_smtp_refusal(server: Server, sink: MX) -> None:
    rita = user(
        server,
        "rita",
        'require "reject";\n'
        'if header :contains "subject" "offer" { reject "No offers, thanks."; }\n',
    )
    code, text = send(server, "bob@remote.test", [rita], message("great offer", rita))
    assert (code, text) == (550, b"5.7.1 No offers, thanks.")
    settle(server)
    assert stored(server, rita) == []
    assert to(sink, "bob@remote.test") == []  # refused in the dialogue: no notice as well
    assert send(server, "bob@remote.test", [rita], message("lunch", rita))[0] == 250
    assert len(stored(server, rita)) == 1


def test_reject_with_several_recipients_sends_a_notice(server: Server, sink: MX) -> None:
    rosa = user(server, "rosa", 'require "reject";\nreject "Not for me.";\n')
    tom = user(server, "tom", None)
    code, _ = send(server, "zed@remote.test", [rosa, tom], message("for two", f"{rosa}, {tom}"))
    assert code == 250  # tom takes it, so the transaction cannot be refused
    assert len(stored(server, tom)) == 1 and stored(server, rosa) == []
    (notice,) = wait_until(lambda: to(sink, "zed@remote.test"), what="the rejection notice")
    assert notice["mail_from"] == ""  # RFC 5429 2.2: null reverse-path
    msg = email.message_from_bytes(notice["data"])
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg.get_content_type() == "multipart/report"
    text = notice["data"].decode()
    assert "Not for me." in text and "Disposition: automatic-action/" in text
    assert "Final-Recipient: rfc822; rosa@example.test" in text


VACATION = """require ["vacation", "vacation-seconds"];
vacation :seconds 2 :subject "Away" "I am away until Monday.";
"""


def test_vacation_replies_once_per_period(server: Server, sink: MX) -> None:
    val = user(server, "val", VACATION)
    first = time.monotonic()
    assert send(server, "ann@remote.test", [val], message("one", val))[0] == 250
    (reply,) = wait_until(lambda: to(sink, "ann@remote.test"), what="the vacation reply")
    assert reply["mail_from"] == ""  # RFC 3834 3.3
    msg = email.message_from_bytes(reply["data"])
    assert msg["Subject"] == "Away" and msg["Auto-Submitted"] == "auto-replied"
    assert msg["In-Reply-To"] == "<one@remote.test>"
    assert "I am away until Monday." in reply["data"].decode()
    assert send(server, "ann@remote.test", [val], message("two", val))[0] == 250
    settle(server)
    assert len(to(sink, "ann@remote.test")) == 1  # within the period: no second reply
    wait_until(lambda: time.monotonic() - first > 2.5, what="the end of the period")
    assert send(server, "ann@remote.test", [val], message("three", val))[0] == 250
    wait_until(lambda: len(to(sink, "ann@remote.test")) == 2, what="the next period's reply")
    assert len(stored(server, val)) == 3  # vacation does not cancel the keep


@pytest.mark.parametrize(
    ("sender", "extra"),
    [
        ("list-owner@remote.test", "List-Id: <news.remote.test>\r\n"),
        ("bulk@remote.test", "Precedence: bulk\r\n"),
        ("robot@remote.test", "Auto-Submitted: auto-generated\r\n"),
        ("", ""),
    ],
)
def test_vacation_never_answers_lists_bulk_robots_or_the_null_sender(
    server: Server, sink: MX, sender: str, extra: str
) -> None:
    name = "vic" + str(abs(hash(sender)) % 10_000)
    vic = user(server, name, VACATION)
    assert send(server, sender, [vic], message("news", vic, sender, extra))[0] == 250
    settle(server)
    who = sender or "mailer-daemon@remote.test"
    assert to(sink, sender) == [] and to(sink, who) == []
    assert len(stored(server, vic)) == 1


def test_failing_script_keeps_the_message_and_tells_the_user(server: Server) -> None:
    fay = user(server, "fay", "".join(f'redirect "r{i}@remote.test";\n' for i in range(6)))
    assert send(server, "bob@remote.test", [fay], message("too many", fay))[0] == 250
    (kept,) = stored(server, fay)  # more redirects than [sieve] max_redirects: kept
    assert b"Subject: too many" in kept
    log = server.cli("sieve", "log", fay).stdout
    assert "failed, message kept in INBOX" in log


def test_bounces_to_a_local_user_go_through_her_script(server: Server, sink: MX) -> None:
    dora = user(
        server,
        "dora",
        'require ["fileinto", "mailbox"];\n'
        'if header :contains "content-type" "report" '
        '{ fileinto :create "Bounces"; }\n',
    )
    assert (
        send(server, dora, ["nobody@remote.test"], message("lost", "nobody@remote.test", dora))[0]
        == 250
    )
    dsn = wait_until(lambda: stored(server, dora, "Bounces"), what="the DSN in Bounces")
    assert b"Final-Recipient: rfc822; nobody@remote.test" in dsn[0]
    assert dsn[0].startswith(b"Return-Path: <>\nDelivered-To: dora@example.test\n")
    assert stored(server, dora) == []


def test_aliases_and_several_recipients_each_run_their_own_script(server: Server) -> None:
    ida = user(server, "ida", 'require "fileinto";\nfileinto "Archive";\n')
    joe = user(server, "joe", 'require ["imap4flags"];\nsetflag "\\\\Flagged";\n')
    kim = user(server, "kim", None)
    server.cli("alias", "add", "team@example.test", ida, joe)
    code, _ = send(
        server,
        "bob@remote.test",
        ["team@example.test", kim],
        message("to the team", "team@example.test"),
    )
    assert code == 250
    (filed,) = stored(server, ida, "Archive")
    assert filed.startswith(b"Return-Path: <bob@remote.test>\nDelivered-To: ida@example.test\n")
    assert stored(server, ida) == []
    (flagged,) = stored(server, joe)
    assert flagged.startswith(b"Return-Path: <bob@remote.test>\nDelivered-To: joe@example.test\n")
    names = [p.name for p in (server.maildir(joe) / "cur").iterdir()]
    assert len(names) == 1 and names[0].endswith(":2,F")
    assert len(stored(server, kim)) == 1
    for m in (filed, flagged, stored(server, kim)[0]):
        assert m.count(b"\nReceived: ") == 1 and m.endswith(b"hello\n")


def test_kill_9_during_delivery_with_a_script_loses_nothing(
    servers: ServerFactory, net: Net, sink: MX
) -> None:
    crash = "crash@example.test"
    srv = servers(("smtp",), extra_toml=toml(net, sink), users=(crash,), start=False)
    srv.cli(
        "sieve",
        "put",
        crash,
        "rules",
        "-",
        "--activate",
        stdin=(
            'require ["fileinto", "mailbox", "imap4flags"];\n'
            'if header :contains "subject" "odd" { fileinto :create "Odd"; }\n'
            'else { addflag "$Seen-By-Sieve"; }\n'
        ),
    )
    acked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    srv.start()
    port = srv.port("smtp")

    def client(c: int) -> None:
        i = 0
        while not stop.is_set() and i < 300:
            tag = f"{c}-{i}-{'odd' if i % 2 else 'even'}"
            i += 1
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                    s.sendmail("s@remote.test", [crash], message(tag, crash))
            except (OSError, smtplib.SMTPException):
                return  # the server died under us: this message was not acknowledged
            with lock:
                acked.append(tag)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(6)]
    for t in threads:
        t.start()
    wait_until(lambda: len(acked) >= 100, timeout=60, what="100 acknowledged messages")
    srv.kill9()  # in the middle of the load
    stop.set()
    for t in threads:
        t.join(30)
    srv.start()  # the index and the folders come back (stopped by the fixture)
    found = set()
    for folder in ("", "Odd"):
        for raw in stored(srv, crash, folder):
            subject = email.message_from_bytes(raw)["Subject"]
            found.add(subject)
            if not folder:
                assert "odd" not in subject
    missing = [tag for tag in acked if tag not in found]
    assert missing == [], f"{len(missing)} acknowledged messages lost: {missing[:5]}"
    assert stored(srv, crash, "Odd")  # the script ran: filed, and flagged in cur/
    assert any(p.name.endswith(":2,a") for p in (srv.maildir(crash) / "cur").iterdir())
