"""Helpers for the sandbox tests: a sandbox-mode server, SMTP sends, HTTP calls, and the field
names of Mailpit's API v1 (from its swagger.json and Go structs) that answers must carry."""

from __future__ import annotations

import http.client
import json
import smtplib
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from tests.harness import Server

# Mailpit's documented fields (server/apiv1 MessagesSummary, internal/storage structs.go).
MESSAGES_SUMMARY = {"total", "unread", "count", "messages_count", "start", "tags", "messages"}
MESSAGE_SUMMARY = {
    "ID",
    "MessageID",
    "Read",
    "From",
    "To",
    "Cc",
    "Bcc",
    "ReplyTo",
    "Subject",
    "Created",
    "Username",
    "Tags",
    "Size",
    "Attachments",
    "Snippet",
}
MESSAGE = {
    "ID",
    "MessageID",
    "From",
    "To",
    "Cc",
    "Bcc",
    "ReplyTo",
    "ReturnPath",
    "Subject",
    "ListUnsubscribe",
    "Date",
    "Tags",
    "Username",
    "Text",
    "HTML",
    "Size",
    "Inline",
    "Attachments",
}
ATTACHMENT = {"PartID", "FileName", "ContentType", "ContentID", "Size", "Checksums"}
ADDRESS = {"Name", "Address"}
APP_INFO = {
    "Version",
    "LatestVersion",
    "Database",
    "DatabaseSize",
    "Messages",
    "Unread",
    "Tags",
    "RuntimeStats",
}
RUNTIME_STATS = {
    "Uptime",
    "Memory",
    "MessagesDeleted",
    "SMTPAccepted",
    "SMTPAcceptedSize",
    "SMTPRejected",
    "SMTPIgnored",
}


def sandbox_server(
    root: Path, extra: str = "", services: tuple[str, ...] = ("smtp", "web", "imap", "pop3")
) -> Server:
    return Server(
        root, services=services, server_toml='mode = "sandbox"', extra_toml=extra, domains=()
    )


def message(
    subject: str = "Hello",
    to: str = "rcpt@example.com",
    sender: str = "App <app@example.org>",
    text: str | None = "Hello there.",
    html: str | None = None,
    **headers: str,
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    for k, v in headers.items():
        msg[k.replace("_", "-")] = v
    if text is not None:
        msg.set_content(text)
    if html is not None:
        if text is None:
            msg.set_content(html, subtype="html")
        else:
            msg.add_alternative(html, subtype="html")
    return msg


def send(
    srv: Server,
    msg: EmailMessage,
    user: str | None = None,
    password: str = "any",
    rcpts: list[str] | None = None,
    sender: str | None = None,
    tls: bool = False,
) -> None:
    with smtplib.SMTP("127.0.0.1", srv.port("smtp"), timeout=30) as s:
        if tls:
            import ssl

            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            s.starttls(context=ctx)
        if user is not None:
            s.login(user, password)
        s.send_message(msg, from_addr=sender, to_addrs=rcpts)


def call(
    srv: Server,
    method: str,
    path: str,
    body: object = None,
    timeout: float = 30,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port("web"), timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        sent = {"Content-Type": "application/json"} if data else {}
        sent.update(headers or {})
        conn.request(method, path, body=data, headers=sent)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def get_json(srv: Server, path: str) -> Any:
    status, headers, body = call(srv, "GET", path)
    assert status == 200, (path, status, body)
    assert headers["content-type"].startswith("application/json")
    return json.loads(body)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def no_traceback(srv: Server) -> None:
    log = srv.log.read_text(errors="replace") if srv.log.exists() else ""
    assert "Traceback" not in log, log[-4000:]
