"""The receiving ESMTP service (port 25 role) against the real server over real sockets."""

from __future__ import annotations

import re
import smtplib

import pytest

from tests.clients import SMTPClient as Raw
from tests.harness import ALICE, BOB, Server, ServerFactory, wait_until


@pytest.fixture(scope="module")
def mx(module_servers: ServerFactory) -> Server:
    srv = module_servers(
        ("smtp",),
        users=(ALICE, BOB, "jörg@example.test"),
        extra_toml="[smtp]\nmax_message_size = 100000\nmax_recipients = 100\n",
        start=False,
    )
    srv.cli("alias", "add", "team@example.test", ALICE, BOB)
    srv.cli("alias", "add", "ext@example.test", "someone@remote.test")
    return srv.start()


def box(srv: Server, user: str) -> list[bytes]:
    return srv.messages(user)


def wait_count(srv: Server, user: str, n: int, timeout: float = 5) -> list[bytes]:
    """``user``'s messages once there are at least ``n``."""
    return wait_until(
        lambda: len(got := box(srv, user)) >= n and got, timeout, f"{n} messages for {user}"
    )


def test_delivery_lands_in_maildir_with_trace_headers(mx: Server) -> None:
    before = len(box(mx, "alice@example.test"))
    with smtplib.SMTP("127.0.0.1", mx.port("smtp")) as s:
        s.ehlo("client.example.org")
        s.sendmail(
            "sender@remote.test", ["alice@example.test"], b"Subject: hello\r\n\r\nbody line\r\n"
        )
    msgs = wait_count(mx, "alice@example.test", before + 1)
    new = [m for m in msgs if b"Subject: hello" in m][-1]
    lines = new.split(b"\n")
    assert lines[0] == b"Return-Path: <sender@remote.test>"
    assert lines[1] == b"Delivered-To: alice@example.test"
    assert lines[2].startswith(b"Received: from client.example.org ([127.0.0.1])")
    assert b"by mx.example.test (mailsuite) with ESMTP" in new
    assert b"for <alice@example.test>;" in new
    assert new.endswith(b"Subject: hello\n\nbody line\n")
    assert b"\r" not in new  # stored with LF line ends (Maildir convention)
    # the file name records its sizes
    names = [p.name for p in (mx.maildir("alice@example.test") / "new").iterdir()]
    assert all(re.search(r",S=\d+,W=\d+$", n) for n in names)


def test_ehlo_advertises_extensions(mx: Server) -> None:
    raw = Raw(mx.port("smtp"))
    assert raw.greeting[0] == 220
    code, text = raw.cmd("EHLO client.example.org")
    assert code == 250
    for ext in ("PIPELINING", "8BITMIME", "SIZE 100000", "ENHANCEDSTATUSCODES", "SMTPUTF8"):
        assert ext in text.split("\n")[1:] or f"250-{ext}" in text or f"250 {ext}" in text
    assert "AUTH" not in text  # never on the MX service
    assert "STARTTLS" not in text  # no certificate configured here
    raw.close()


def test_pipelined_commands_answered_in_order(mx: Server) -> None:
    before = len(box(mx, "bob@example.test"))
    raw = Raw(mx.port("smtp"))
    raw.send(
        b"EHLO c.example.org\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.test>\r\n"
        b"RCPT TO:<nobody@example.test>\r\nRCPT TO:<x@elsewhere.test>\r\nDATA\r\n"
        b"Subject: pipelined\r\n\r\nhi\r\n.\r\nMAIL FROM:<b@remote.test>\r\n"
        b"RCPT TO:<bob@example.test>\r\nDATA\r\nSubject: second\r\n\r\nyo\r\n.\r\nQUIT\r\n"
    )
    codes = [raw.reply()[0] for _ in range(11)]
    assert codes == [250, 250, 250, 550, 554, 354, 250, 250, 250, 354, 250]
    assert raw.reply()[0] == 221
    raw.close()
    msgs = wait_count(mx, "bob@example.test", before + 2)
    assert sum(b"Subject: pipelined" in m for m in msgs) == 1
    assert sum(b"Subject: second" in m for m in msgs) == 1


def test_dot_stuffing_round_trip(mx: Server) -> None:
    body = b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nx\r\n"
    with smtplib.SMTP("127.0.0.1", mx.port("smtp")) as s:
        s.sendmail("a@remote.test", ["alice@example.test"], body)  # smtplib stuffs
    msg = [m for m in box(mx, "alice@example.test") if b"Subject: dots" in m][-1]
    assert msg.endswith(b"Subject: dots\n\n.leading dot\n..two dots\n.\nx\n")


def test_8bit_and_smtputf8(mx: Server) -> None:
    body = "Subject: Grüße\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nÄpfel und Öl\r\n"
    with smtplib.SMTP("127.0.0.1", mx.port("smtp")) as s:
        s.ehlo()
        s.sendmail(
            "ünïcode@remote.test",
            ["jörg@example.test"],
            body.encode(),
            mail_options=["SMTPUTF8", "BODY=8BITMIME"],
        )
    msg = box(mx, "jörg@example.test")[-1]
    assert "Äpfel und Öl".encode() in msg
    assert "Return-Path: <ünïcode@remote.test>".encode() in msg
    assert b"with UTF8SMTP" in msg


def test_utf8_address_without_smtputf8_refused(mx: Server) -> None:
    raw = Raw(mx.port("smtp"))
    raw.cmd("EHLO c")
    code, text = raw.cmd("MAIL FROM:<ünï@remote.test>")
    assert code == 553 and "5.6.7" in text
    raw.close()


def test_size_limits(mx: Server) -> None:
    raw = Raw(mx.port("smtp"))
    raw.cmd("EHLO c")
    code, text = raw.cmd("MAIL FROM:<a@remote.test> SIZE=200000")
    assert code == 552 and "5.3.4" in text
    assert raw.cmd("MAIL FROM:<a@remote.test> SIZE=1000")[0] == 250
    assert raw.cmd("RCPT TO:<alice@example.test>")[0] == 250
    assert raw.cmd("DATA")[0] == 354
    line = b"x" * 900 + b"\r\n"
    raw.send(b"Subject: big\r\n\r\n" + line * 150 + b".\r\n")
    code, text = raw.reply()
    assert code == 552 and "5.3.4" in text
    assert raw.cmd("NOOP")[0] == 250  # the session goes on
    raw.close()
    assert not any(b"Subject: big" in m for m in box(mx, "alice@example.test"))


def test_unknown_param_refused(mx: Server) -> None:
    raw = Raw(mx.port("smtp"))
    raw.cmd("EHLO c")
    code, text = raw.cmd("MAIL FROM:<a@remote.test> FOO=bar")
    assert code == 555 and "5.5.4" in text
    assert raw.cmd("MAIL FROM:<a@remote.test> BODY=8BITMIME")[0] == 250
    code, text = raw.cmd("RCPT TO:<alice@example.test> NOTIFY=NEVER")
    assert code == 555 and "5.5.4" in text
    raw.close()


def test_unknown_user_and_relay_refused(mx: Server) -> None:
    raw = Raw(mx.port("smtp"))
    raw.cmd("EHLO c")
    raw.cmd("MAIL FROM:<a@remote.test>")
    code, text = raw.cmd("RCPT TO:<nobody@example.test>")
    assert code == 550 and "5.1.1" in text
    code, text = raw.cmd("RCPT TO:<victim@gmail.example>")
    assert code == 554 and "5.7.1" in text
    # an alias that points outside is accepted: the copy goes to the outbound queue
    code, text = raw.cmd("RCPT TO:<ext@example.test>")
    assert code == 250, text
    raw.close()


def test_routing_aliases_subaddress_postmaster_null_sender(mx: Server) -> None:
    a0 = len(box(mx, "alice@example.test"))
    b0 = len(box(mx, "bob@example.test"))
    with smtplib.SMTP("127.0.0.1", mx.port("smtp")) as s:
        s.sendmail("", ["team@example.test"], b"Subject: to team\r\n\r\nx\r\n")
        s.sendmail("a@remote.test", ["alice+lists@example.test"], b"Subject: tagged\r\n\r\nx\r\n")
        s.sendmail("a@remote.test", ["Postmaster@example.test"], b"Subject: pm\r\n\r\nx\r\n")
        code, _ = s.docmd("MAIL FROM:<>")
        assert code == 250
        assert s.docmd("RCPT TO:<Postmaster>")[0] == 250
        s.rset()
    alice = wait_count(mx, "alice@example.test", a0 + 2)
    bob = wait_count(mx, "bob@example.test", b0 + 1)
    team = [m for m in alice if b"Subject: to team" in m]
    assert team and team[-1].startswith(b"Return-Path: <>\nDelivered-To: alice@example.test\n")
    assert any(b"Subject: to team" in m and b"Delivered-To: bob@example.test" in m for m in bob)
    assert any(b"Subject: tagged" in m for m in alice)
    assert any(b"Subject: pm" in m for m in box(mx, "postmaster@example.test"))


def test_directory_changes_apply_without_restart(mx: Server) -> None:
    raw = Raw(mx.port("smtp"))
    raw.cmd("EHLO c")
    raw.cmd("MAIL FROM:<a@remote.test>")
    assert raw.cmd("RCPT TO:<carol@example.test>")[0] == 550
    mx.add_user("carol@example.test")
    assert raw.cmd("RCPT TO:<carol@example.test>")[0] == 250
    assert raw.cmd("RCPT TO:<anything@newdomain.test>")[0] == 554
    mx.cli("domain", "add", "newdomain.test")
    mx.cli("alias", "add", "@newdomain.test", "carol@example.test")
    assert raw.cmd("RCPT TO:<anything@newdomain.test>")[0] == 250
    raw.close()


@pytest.mark.parametrize("evil", [b"\n.\n", b"\r.\n", b"\n.\r\n", b"\r.\r\n"])
def test_smuggling_delivers_exactly_one_message(mx: Server, evil: bytes) -> None:
    before = box(mx, "alice@example.test")
    raw = Raw(mx.port("smtp"))
    raw.cmd("EHLO c")
    raw.cmd("MAIL FROM:<a@remote.test>")
    raw.cmd("RCPT TO:<alice@example.test>")
    assert raw.cmd("DATA")[0] == 354
    raw.send(
        b"Subject: smuggle\r\n\r\nfirst"
        + evil
        + b"MAIL FROM:<admin@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nevil\r\n.\r\n"
    )
    assert raw.reply()[0] == 250
    assert raw.cmd("QUIT")[0] == 221
    raw.close()
    after = wait_count(mx, "alice@example.test", len(before) + 1)
    assert len(after) == len(before) + 1
    new = next(m for m in after if m not in before)
    assert b"Subject: smuggled" in new  # the smuggled text stayed inside the one message
    assert not any(b"Subject: smuggled" in m for m in box(mx, "bob@example.test"))


def test_long_lines(mx: Server) -> None:
    raw = Raw(mx.port("smtp"))
    raw.cmd("EHLO c")
    raw.cmd("MAIL FROM:<a@remote.test>")
    raw.cmd("RCPT TO:<alice@example.test>")
    raw.cmd("DATA")
    raw.send(b"Subject: long\r\n\r\n" + b"y" * 5000 + b"\r\n.\r\n")
    code, text = raw.reply()
    assert code == 550 and "5.6.0" in text
    code, text = raw.cmd("NOOP " + "z" * 5000)  # command line over the limit: 500, closed
    assert code == 500 and "5.5.2" in text
    raw.close()


@pytest.fixture(scope="module")
def strict(module_servers: ServerFactory) -> Server:
    return module_servers(
        ("smtp",),
        users=(ALICE,),
        extra_toml="[smtp]\nmax_recipients = 100\nmax_errors = 3\ntimeout = 2\n",
    )


def test_recipient_limit(strict: Server) -> None:
    raw = Raw(strict.port("smtp"))
    raw.cmd("EHLO c")
    raw.cmd("MAIL FROM:<a@remote.test>")
    raw.send(b"".join(b"RCPT TO:<alice+%d@example.test>\r\n" % i for i in range(101)))
    codes = [raw.reply()[0] for _ in range(101)]
    assert codes[:100] == [250] * 100
    assert codes[100] == 452
    raw.close()


def test_error_limit_and_timeout(strict: Server) -> None:
    raw = Raw(strict.port("smtp"))
    assert raw.cmd("BOGUS")[0] == 500
    assert raw.cmd("MAIL FROM:<a@b.test>")[0] == 503  # before EHLO
    code, text = raw.cmd("ALSOBOGUS")
    assert code == 421 and "4.7.0" in text
    raw.close()
    raw = Raw(strict.port("smtp"))
    code, text = raw.reply()  # idle for the 2 s timeout
    assert code == 421 and "4.4.2" in text
    raw.close()


def test_helo_cannot_inject_headers(mx: Server) -> None:
    raw = Raw(mx.port("smtp"))
    raw.cmd("EHLO evil(comment)\tX-Injected:yes")
    raw.cmd("MAIL FROM:<a@remote.test>")
    raw.cmd("RCPT TO:<alice@example.test>")
    raw.cmd("DATA")
    raw.send(b"Subject: inject\r\n\r\nx\r\n.\r\n")
    assert raw.reply()[0] == 250
    raw.close()
    msg = [m for m in box(mx, "alice@example.test") if b"Subject: inject" in m][-1]
    head = msg.split(b"\n\n", 1)[0]
    # the tab and parentheses were neutralised: no new header line, no comment syntax
    assert not any(line.startswith(b"X-Injected") for line in head.split(b"\n"))
    assert b"Received: from evil_comment__X-Injected:yes ([127.0.0.1])" in head


@pytest.mark.parametrize("broken", ["first", "second"])
def test_delivery_failure_is_temporary_and_loses_nothing(
    servers: ServerFactory, broken: str
) -> None:
    """A store that cannot be written answers 451 and leaves no half-delivered copy: with the
    first recipient broken the refusal comes at DATA, with the second after the data, and
    then the first recipient must not have received a copy either (the client retries)."""
    srv = servers(("smtp",), users=(ALICE, BOB), start=False)
    victim = ALICE if broken == "first" else BOB
    with srv:
        sub = srv.maildir(victim) / "tmp"
        sub.rmdir()
        sub.write_text("not a directory")  # writing there fails, even as root
        with smtplib.SMTP("127.0.0.1", srv.port("smtp")) as s:
            s.ehlo()
            s.mail("a@remote.test")
            s.rcpt("alice@example.test")
            s.rcpt("bob@example.test")
            code, text = s.docmd("DATA")
            if broken == "second":
                assert code == 354
                s.send(b"Subject: x\r\n\r\ny\r\n.\r\n")
                code, text = s.getreply()
            assert code == 451 and b"4.3.0" in text
            assert s.noop()[0] == 250
        assert srv.proc is not None and srv.proc.poll() is None  # still running
        for user in ("alice@example.test", "bob@example.test"):
            root = srv.maildir(user)
            for name in ("new", "cur", "tmp"):
                if (root / name).is_dir():
                    assert list((root / name).iterdir()) == [], (user, name)
