"""Sandbox capture over the real server: SMTP takes anything and keeps each transaction once
in its inbox, faults on demand, retention, IMAP and POP3 per inbox, and ``--sandbox``."""

from __future__ import annotations

import email
import imaplib
import poplib
import smtplib
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailsuite.testing.process import mailsuite_argv
from tests.harness import Server, wait_port
from tests.sandbox_helpers import (
    call,
    get_json,
    message,
    no_traceback,
    sandbox_server,
    send,
    wait_for,
)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = sandbox_server(
        tmp_path_factory.mktemp("sandbox-capture") / "srv", "[smtp]\nmax_message_size = 100000\n"
    )
    with server:
        yield server
    no_traceback(server)


@pytest.fixture(autouse=True)
def empty(srv: Server) -> None:
    assert call(srv, "DELETE", "/api/v1/messages")[0] == 200


def subjects(srv: Server, inbox: str | None = None) -> list[str]:
    path = "/api/v1/messages" + (f"?inbox={inbox}" if inbox else "")
    return [m["Subject"] for m in get_json(srv, path)["messages"]]


def test_any_sender_recipient_and_password_with_or_without_tls(srv: Server) -> None:
    send(srv, message("plain, no auth", to="someone@anywhere.invalid"))
    send(srv, message("plain auth"), user="Alice", password="wrong? never")
    send(srv, message("tls auth"), user="alice", password="x", tls=True)
    send(srv, message("null sender"), sender="")
    assert subjects(srv, "default") == ["null sender", "plain, no auth"]
    assert subjects(srv, "alice") == ["tls auth", "plain auth"]
    with smtplib.SMTP("127.0.0.1", srv.port("smtp"), timeout=10) as s:
        code, caps = s.ehlo()
        assert code == 250 and b"STARTTLS" in caps and b"AUTH PLAIN LOGIN" in caps
        code, _ = s.docmd("AUTH", "LOGIN")
        assert code == 334
        s.docmd("Ym9i")  # "bob"
        code, _ = s.docmd("eA==")  # any password
        assert code == 235
    # nothing ever goes to the outbound queue
    assert not any((srv.data / "queue" / "env").glob("*.json"))


def test_one_copy_per_transaction_with_its_envelope(srv: Server) -> None:
    rcpts = ["to@example.com", "cc@example.com", "hidden@example.com", "other@example.net"]
    msg = message("many recipients", to="To <to@example.com>", Cc="cc@example.com")
    send(srv, msg, rcpts=rcpts, sender="bounces@example.org")
    (summary,) = get_json(srv, "/api/v1/messages")["messages"]
    # envelope recipients missing from To/Cc are shown as Bcc, as Mailpit does
    assert [a["Address"] for a in summary["Bcc"]] == ["hidden@example.com", "other@example.net"]
    full = get_json(srv, f"/api/v1/message/{summary['ID']}")
    assert full["ReturnPath"] == "bounces@example.org"
    assert full["MessageID"]  # one was added: the message had none


@pytest.mark.parametrize(
    ("rcpt", "code"),
    [
        ("reject-550@example.com", 550),
        ("reject-553@example.com", 553),
        ("defer-451@example.com", 451),
        ("defer-452@example.com", 452),
    ],
)
def test_rcpt_faults(srv: Server, rcpt: str, code: int) -> None:
    with smtplib.SMTP("127.0.0.1", srv.port("smtp"), timeout=10) as s:
        s.ehlo()
        s.mail("app@example.org")
        got, text = s.rcpt(rcpt)
        assert got == code and b"sandbox fault" in text
        assert s.rcpt("fine@example.com")[0] == 250
        s.data(message("partly refused", to="fine@example.com").as_bytes())
    (summary,) = get_json(srv, "/api/v1/messages")["messages"]
    assert summary["Bcc"] == [] and summary["To"][0]["Address"] == "fine@example.com"
    assert get_json(srv, "/api/v1/info")["RuntimeStats"]["SMTPRejected"] >= 1


def test_data_faults_fail_drop_and_slow(srv: Server) -> None:
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(srv, message("fails"), rcpts=["fail-554@example.com"])
    assert refused.value.smtp_code == 554
    with pytest.raises(smtplib.SMTPDataError) as deferred:
        send(srv, message("later"), rcpts=["ok@example.com", "fail-421@example.com"])
    assert deferred.value.smtp_code == 421
    start = time.monotonic()
    with pytest.raises(smtplib.SMTPServerDisconnected):
        send(srv, message("dropped"), rcpts=["drop@example.com", "ok@example.com"])
    assert time.monotonic() - start < 5
    start = time.monotonic()
    send(srv, message("slow one"), rcpts=["slow-2@example.com"])
    assert 1.9 < time.monotonic() - start < 6
    assert subjects(srv) == ["slow one"]  # nothing else was captured


def test_size_limit_still_applies(srv: Server) -> None:
    with pytest.raises(smtplib.SMTPException):
        send(srv, message("big", text="x" * 200_000))
    assert subjects(srv) == []


def test_imap_and_pop3_log_in_with_the_inbox_name_and_any_password(srv: Server) -> None:
    send(srv, message("for imap"), user="qa-team")
    send(srv, message("not for imap"))
    imap = imaplib.IMAP4("127.0.0.1", srv.port("imap"))
    try:
        imap.login("QA-Team", "anything at all")
        typ, data = imap.select("INBOX")
        assert (typ, data) == ("OK", [b"1"])
        _, fetched = imap.fetch("1", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert b"Subject: for imap" in fetched[0][1] and b"\\Seen" not in fetched[0][0]
        (mid,) = [m["ID"] for m in get_json(srv, "/api/v1/messages?inbox=qa-team")["messages"]]
        imap.store("1", "+FLAGS", "(\\Seen)")
        assert wait_for(lambda: get_json(srv, "/api/v1/messages?inbox=qa-team")["unread"] == 0)
        get_json(srv, f"/api/v1/message/{mid}")  # read over the API too
        call(srv, "PUT", "/api/v1/messages", {"IDs": [mid], "Read": False})
        imap.noop()
        _, flags = imap.fetch("1", "(FLAGS)")
        assert b"\\Seen" not in flags[0]
        imap.store("1", "+FLAGS", "(\\Deleted)")
        imap.expunge()
        assert wait_for(lambda: subjects(srv, "qa-team") == [])
    finally:
        imap.logout()
    pop = poplib.POP3("127.0.0.1", srv.port("pop3"), timeout=10)
    try:
        pop.user("default")
        pop.pass_("whatever")
        count, _ = pop.stat()
        assert count == 1
        lines = pop.retr(1)[1]
        assert email.message_from_bytes(b"\r\n".join(lines))["Subject"] == "not for imap"
    finally:
        pop.quit()
    assert wait_for(lambda: get_json(srv, "/api/v1/messages?inbox=default")["unread"] == 0)


def test_retention_keeps_the_newest(tmp_path: Path) -> None:
    with sandbox_server(tmp_path / "srv", "[sandbox]\nmax_messages = 3\n") as srv:
        for i in range(5):
            send(srv, message(f"m{i}"))
        assert wait_for(lambda: subjects(srv) == ["m4", "m3", "m2"])
        imap = imaplib.IMAP4("127.0.0.1", srv.port("imap"))
        imap.login("default", "x")
        assert imap.select("INBOX")[1] == [b"3"]
        imap.logout()
        files = list((srv.data / "mail" / "default" / "new").iterdir()) + list(
            (srv.data / "mail" / "default" / "cur").iterdir()
        )
        assert len(files) == 3
        assert get_json(srv, "/api/v1/info")["RuntimeStats"]["MessagesDeleted"] == 2
        no_traceback(srv)


def _free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as twistd binds
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_sandbox_option_serves_mailpits_ports(tmp_path: Path) -> None:
    ports = (1025, 8025, 1143, 1110)
    if not all(_free(p) for p in ports):
        pytest.skip("the sandbox's fixed ports (1025, 8025, 1143, 1110) are in use here")
    argv = [*mailsuite_argv(None, logfile=str(tmp_path / "tw.log")), "--sandbox"]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        for p in ports:
            wait_port("127.0.0.1", p, proc=proc)
        with smtplib.SMTP("127.0.0.1", 1025, timeout=10) as s:
            s.send_message(message("via the defaults"))
        with urllib.request.urlopen("http://127.0.0.1:8025/api/v1/messages", timeout=10) as r:
            assert b'"via the defaults"' in r.read()
        assert (tmp_path / "mailsuite-sandbox" / "mail" / "default").is_dir()
    finally:
        proc.terminate()
        proc.wait(15)
    assert "Traceback" not in (tmp_path / "tw.log").read_text()
