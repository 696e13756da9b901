"""The sandbox's Mailpit-compatible API over the real server: every endpoint, its JSON compared
with the fields Mailpit documents, search, read state, deletion, wait, events, release."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from mailsuite.testing.mx import spawn_mx_server
from tests.harness import Server
from tests.sandbox_helpers import (
    ADDRESS,
    APP_INFO,
    ATTACHMENT,
    MESSAGE,
    MESSAGE_SUMMARY,
    MESSAGES_SUMMARY,
    RUNTIME_STATS,
    call,
    get_json,
    message,
    no_traceback,
    sandbox_server,
    send,
    wait_for,
)

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = sandbox_server(tmp_path_factory.mktemp("sandbox-api") / "srv")
    with server:
        yield server
    no_traceback(server)


@pytest.fixture(autouse=True)
def empty(srv: Server) -> None:
    status, _, body = call(srv, "DELETE", "/api/v1/messages")
    assert (status, body) == (200, b"ok")


def rich_message() -> Any:
    msg = message(
        subject="Welcome, Ann",
        to="Ann <ann@example.com>",
        Cc="carol@example.com",
        Reply_To="help@example.org",
        X_Tags="signup, Onboarding",
        List_Unsubscribe="<mailto:unsub@example.org>, <https://example.org/unsub?u=1>",
        text="Hi Ann, your verification code is 482913.\nConfirm: https://example.org/c?t=abc\n",
        html=(
            '<p>Hi Ann, your code is <b>482913</b>. <a href="https://example.org/c?t=abc">'
            'Confirm</a> <img src="cid:logo@example.org"> '
            '<img src="https://tracker.example/p.gif"></p>'
        ),
    )
    html_part = msg.get_payload()[1]
    html_part.add_related(
        PNG, maintype="image", subtype="png", cid="<logo@example.org>", filename="logo.png"
    )
    msg.add_attachment(
        b"%PDF-1.4 test", maintype="application", subtype="pdf", filename="invoice.pdf"
    )
    return msg


def only(srv: Server, query: str = "") -> dict[str, Any]:
    data = get_json(srv, f"/api/v1/search?query={query}" if query else "/api/v1/messages")
    assert len(data["messages"]) == 1, data
    return data["messages"][0]


def check_address(a: dict[str, Any]) -> None:
    assert set(a) == ADDRESS and all(isinstance(v, str) for v in a.values())


def test_listing_matches_mailpits_shape_newest_first_per_inbox(srv: Server) -> None:
    send(srv, message("first"))
    send(srv, rich_message(), user="Alice")
    data = get_json(srv, "/api/v1/messages")
    assert set(data) >= MESSAGES_SUMMARY
    assert (
        data["total"],
        data["unread"],
        data["count"],
        data["messages_count"],
        data["start"],
    ) == (2, 2, 2, 2, 0)
    assert data["tags"] == ["Onboarding", "signup"]
    newest, oldest = data["messages"]
    assert (newest["Subject"], oldest["Subject"]) == ("Welcome, Ann", "first")
    for m in data["messages"]:
        assert set(m) >= MESSAGE_SUMMARY
        check_address(m["From"])
        for field in ("To", "Cc", "Bcc", "ReplyTo"):
            assert isinstance(m[field], list)
            for a in m[field]:
                check_address(a)
        assert isinstance(m["Size"], int) and m["Size"] > 0
        assert isinstance(m["Read"], bool) and isinstance(m["Attachments"], int)
        datetime.fromisoformat(m["Created"].replace("Z", "+00:00"))
    assert newest["From"] == {"Name": "App", "Address": "app@example.org"}
    assert newest["To"] == [{"Name": "Ann", "Address": "ann@example.com"}]
    assert newest["ReplyTo"] == [{"Name": "", "Address": "help@example.org"}]
    assert (newest["Username"], newest["Inbox"], oldest["Username"], oldest["Inbox"]) == (
        "alice",
        "alice",
        "",
        "default",
    )
    assert newest["Attachments"] == 1 and newest["Tags"] == ["signup", "Onboarding"]
    assert newest["Snippet"].startswith("Hi Ann, your verification code is 482913.")
    assert newest["Codes"] == ["482913"]
    assert newest["Links"] == ["https://example.org/c?t=abc"]
    alice = get_json(srv, "/api/v1/messages?inbox=ALICE")
    assert [m["Subject"] for m in alice["messages"]] == ["Welcome, Ann"]
    assert (alice["total"], alice["messages_count"]) == (1, 1)
    page = get_json(srv, "/api/v1/messages?start=1&limit=1")
    assert [m["Subject"] for m in page["messages"]] == ["first"] and page["start"] == 1


def test_message_text_html_attachments_and_read(srv: Server) -> None:
    send(srv, rich_message())
    mid = only(srv)["ID"]
    msg = get_json(srv, f"/api/v1/message/{mid}")
    assert set(msg) >= MESSAGE
    assert msg["ID"] == mid and msg["Subject"] == "Welcome, Ann"
    assert (
        msg["Text"].startswith("Hi Ann") and '<a href="https://example.org/c?t=abc">' in msg["HTML"]
    )
    assert msg["ReturnPath"] == "app@example.org"
    assert msg["ListUnsubscribe"]["Links"] == [
        "mailto:unsub@example.org",
        "https://example.org/unsub?u=1",
    ]
    (att,) = msg["Attachments"]
    (inline,) = msg["Inline"]
    for part in (att, inline):
        assert set(part) >= ATTACHMENT
    assert (att["FileName"], att["ContentType"], att["Size"]) == (
        "invoice.pdf",
        "application/pdf",
        13,
    )
    assert att["Checksums"]["MD5"] == hashlib.md5(b"%PDF-1.4 test").hexdigest()
    assert (inline["ContentID"], inline["ContentType"]) == ("logo@example.org", "image/png")
    assert only(srv)["Read"] is True  # reading it marked it read
    assert get_json(srv, "/api/v1/message/latest")["ID"] == mid
    status, headers, body = call(srv, "GET", f"/api/v1/message/{mid}/part/{att['PartID']}")
    assert (status, headers["content-type"], body) == (200, "application/pdf", b"%PDF-1.4 test")
    assert 'filename="invoice.pdf"' in headers["content-disposition"]
    # whatever type the sender gave a part, it runs no script in our origin
    assert headers["content-security-policy"].startswith("sandbox; default-src 'none'")
    status, headers, body = call(srv, "GET", f"/api/v1/message/{mid}/part/{inline['PartID']}")
    assert (status, headers["content-type"], body) == (200, "image/png", PNG)
    assert call(srv, "GET", f"/api/v1/message/{mid}/part/9.9")[0] == 404


def test_raw_and_headers(srv: Server) -> None:
    send(srv, message("raw me", Message_ID="<raw-1@example.org>"))
    mid = only(srv)["ID"]
    status, headers, raw = call(srv, "GET", f"/api/v1/message/{mid}/raw")
    assert status == 200 and headers["content-type"] == "text/plain; charset=utf-8"
    assert b"\r\nSubject: raw me\r\n" in raw and b"\r\n\r\nHello there.\r\n" in raw
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF, as on the wire
    assert raw.startswith(b"Return-Path: <app@example.org>\r\n") and b"Received: from" in raw
    status, headers, _ = call(srv, "GET", f"/api/v1/message/{mid}/raw?dl=1")
    assert headers["content-disposition"] == f'attachment; filename="{mid}.eml"'
    fields = get_json(srv, f"/api/v1/message/{mid}/headers")
    assert list(fields) == sorted(fields)
    assert fields["Message-Id"] == ["<raw-1@example.org>"]
    assert fields["Subject"] == ["raw me"] and fields["Return-Path"] == ["<app@example.org>"]
    assert all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in fields.values())


def test_search_syntax_and_delete_by_search(srv: Server) -> None:
    send(srv, message("Invoice 42", sender="Shop <shop@example.net>", text="Pay soon"))
    send(srv, message("Weekly news", to="bob@example.com", text="Nothing to pay"))
    send(srv, rich_message(), user="alice")

    def subjects(q: str) -> list[str]:
        return sorted(m["Subject"] for m in get_json(srv, f"/api/v1/search?query={q}")["messages"])

    assert subjects("from:shop") == ["Invoice 42"]
    assert subjects("-from:shop") == ["Weekly news", "Welcome, Ann"]
    assert subjects("to:bob@example.com") == ["Weekly news"]
    assert subjects("subject:%22weekly%20news%22") == ["Weekly news"]
    assert subjects("has:attachment") == ["Welcome, Ann"]
    assert subjects("pay") == ["Invoice 42", "Weekly news"]
    assert subjects("pay%20!invoice") == ["Weekly news"]
    assert subjects("tag:onboarding") == ["Welcome, Ann"]
    assert subjects("inbox:alice") == ["Welcome, Ann"]
    get_json(srv, f"/api/v1/message/{only(srv, 'from:shop')['ID']}")
    assert subjects("is:read") == ["Invoice 42"]
    assert subjects("is:unread") == ["Weekly news", "Welcome, Ann"]
    data = get_json(srv, "/api/v1/search?query=pay")
    assert (data["messages_count"], data["total"]) == (2, 3)
    assert subjects("pay&inbox=alice") == []
    assert call(srv, "GET", "/api/v1/search")[0] == 400
    assert call(srv, "DELETE", "/api/v1/search?query=pay")[:1] == (200,)
    assert subjects("subject:w") == ["Weekly news", "Welcome, Ann"][1:]
    assert get_json(srv, "/api/v1/messages")["total"] == 1


def test_read_unread_and_delete_by_ids_all_and_per_inbox(srv: Server) -> None:
    send(srv, message("a"))
    send(srv, message("b"), user="bob")
    send(srv, message("c"), user="bob")
    ids = {m["Subject"]: m["ID"] for m in get_json(srv, "/api/v1/messages")["messages"]}
    assert call(srv, "PUT", "/api/v1/messages", {"IDs": [ids["a"]], "Read": True})[2] == b"ok"
    assert get_json(srv, "/api/v1/messages")["unread"] == 2
    assert call(srv, "PUT", "/api/v1/messages?inbox=bob", {"Read": True})[0] == 200
    assert get_json(srv, "/api/v1/messages")["unread"] == 0
    assert call(srv, "PUT", "/api/v1/messages", {"IDs": [ids["b"]], "Read": False})[0] == 200
    assert [m["Subject"] for m in get_json(srv, "/api/v1/search?query=is:unread")["messages"]] == [
        "b"
    ]
    assert call(srv, "DELETE", "/api/v1/messages", {"IDs": [ids["c"]]})[0] == 200
    assert call(srv, "GET", f"/api/v1/message/{ids['c']}")[0] == 404
    assert call(srv, "DELETE", "/api/v1/messages?inbox=bob")[0] == 200
    assert [m["Subject"] for m in get_json(srv, "/api/v1/messages")["messages"]] == ["a"]


def test_bad_requests_get_short_answers(srv: Server) -> None:
    send(srv, message("x"))
    assert call(srv, "GET", "/api/v1/message/NoSuchId")[:1] == (404,)
    assert call(srv, "GET", "/api/v1/nothing")[0] == 404
    status, headers, _ = call(srv, "POST", "/api/v1/messages")
    assert status == 405 and headers["allow"] == "DELETE, GET, HEAD, PUT"
    conn = http.client.HTTPConnection("127.0.0.1", srv.port("web"), timeout=10)
    conn.request("PUT", "/api/v1/messages", body=b"{not json")
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (400, b"the body is not valid JSON\n")
    conn.close()
    assert call(srv, "PUT", "/api/v1/messages", {"IDs": "x", "Read": True})[0] == 400
    assert call(srv, "GET", "/api/v1/messages?inbox=a%00b")[0] == 400
    assert call(srv, "GET", "/api/v1/messages?limit=ten")[0] == 400
    assert get_json(srv, "/api/v1/messages")["total"] == 1  # nothing deleted by mistake


def test_other_web_sites_cannot_change_anything(srv: Server) -> None:
    send(srv, message("precious"))
    evil = {"Origin": "http://evil.example"}
    assert call(srv, "DELETE", "/api/v1/messages", headers=evil)[0] == 403
    assert call(srv, "PUT", "/api/v1/messages", {"Read": True}, headers=evil)[0] == 403
    assert get_json(srv, "/api/v1/messages")["unread"] == 1
    ours = {"Origin": f"http://127.0.0.1:{srv.port('web')}"}
    assert call(srv, "PUT", "/api/v1/messages", {"Read": True}, headers=ours)[0] == 200
    assert get_json(srv, "/api/v1/messages")["unread"] == 0


def test_info_counts_and_runtime_stats(srv: Server) -> None:
    before = get_json(srv, "/api/v1/info")
    send(srv, message("i1"), user="carol")
    send(srv, message("i2"))
    info = get_json(srv, "/api/v1/info")
    assert set(info) >= APP_INFO and set(info["RuntimeStats"]) >= RUNTIME_STATS
    assert (info["Messages"], info["Unread"]) == (2, 2)
    stats, earlier = info["RuntimeStats"], before["RuntimeStats"]
    assert stats["SMTPAccepted"] == earlier["SMTPAccepted"] + 2
    assert stats["SMTPAcceptedSize"] > earlier["SMTPAcceptedSize"]
    assert info["Inboxes"]["carol"] == {"Messages": 1, "Unread": 1}
    assert get_json(srv, "/api/v1/info?inbox=carol")["Messages"] == 1
    assert get_json(srv, "/api/v1/webui")["MessageRelay"]["Enabled"] is False


def test_wait_returns_within_a_second_of_delivery_and_408_on_timeout(srv: Server) -> None:
    result: dict[str, Any] = {}

    def waiting() -> None:
        result["answer"] = call(srv, "GET", "/api/v1/wait?query=subject:token&timeout=20")
        result["at"] = time.monotonic()

    thread = threading.Thread(target=waiting)
    thread.start()
    time.sleep(0.5)  # the waiter is registered; a non-matching message must not answer it
    send(srv, message("unrelated"))
    time.sleep(0.3)
    assert thread.is_alive()
    send(srv, message("Your token", text="Your login code is 556677"))
    delivered = time.monotonic()
    thread.join(10)
    status, _, body = result["answer"]
    assert status == 200 and result["at"] - delivered < 1.0
    summary = json.loads(body)
    assert set(summary) >= MESSAGE_SUMMARY
    assert summary["Subject"] == "Your token" and summary["Codes"] == ["556677"]
    # one that is there already comes back at once
    start = time.monotonic()
    assert json.loads(call(srv, "GET", "/api/v1/wait?query=token")[2])["ID"] == summary["ID"]
    assert time.monotonic() - start < 1.0
    start = time.monotonic()
    status, _, body = call(srv, "GET", "/api/v1/wait?query=nothing-like-this&timeout=0.5")
    assert status == 408 and 0.45 < time.monotonic() - start < 3
    assert call(srv, "GET", "/api/v1/wait?timeout=-1")[0] == 400
    assert call(srv, "GET", "/api/v1/wait?inbox=zed&timeout=0.3")[0] == 408


class EventReader:
    """Reads one Server-Sent Events stream in a thread."""

    def __init__(self, srv: Server, path: str = "/api/v1/events") -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", srv.port("web"), timeout=30)
        self.conn.request("GET", path)
        self.sock = self.conn.sock  # the connection lets go of it once the stream starts
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200
        assert self.resp.getheader("Content-Type") == "text/event-stream; charset=utf-8"
        self.events: list[tuple[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        kind = None
        try:
            for raw in self.resp:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: ") and kind:
                    self.events.append((kind, json.loads(line[6:])))
                    kind = None
        except (OSError, ValueError, AttributeError):
            pass  # closed by close(): http.client drops its file under the reader

    def close(self) -> None:
        """Hang up.  The shutdown wakes the thread blocked reading the stream; a close
        alone waits for that read (the buffer's lock), i.e. the server's next keep-alive,
        15 s later."""
        if self.sock is not None:
            self.sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()


def test_events_new_read_deleted_and_per_inbox(srv: Server) -> None:
    everything = EventReader(srv)
    dana_only = EventReader(srv, "/api/v1/events?inbox=dana")
    send(srv, message("evented"), user="dana")
    send(srv, message("elsewhere"))
    assert wait_for(lambda: len(everything.events) >= 2)
    kinds = [(k, d.get("Subject")) for k, d in everything.events]
    assert kinds == [("new", "evented"), ("new", "elsewhere")]
    new = everything.events[0][1]
    assert set(new) >= MESSAGE_SUMMARY and new["Inbox"] == "dana"
    call(srv, "PUT", "/api/v1/messages", {"IDs": [new["ID"]], "Read": True})
    call(srv, "DELETE", "/api/v1/messages", {"IDs": [new["ID"]]})
    assert wait_for(lambda: len(everything.events) >= 4)
    assert everything.events[2:] == [
        ("read", {"ID": new["ID"], "Read": True}),
        ("deleted", {"ID": new["ID"]}),
    ]
    assert wait_for(lambda: len(dana_only.events) >= 3)
    assert [k for k, _ in dana_only.events] == ["new", "read", "deleted"]
    everything.close()
    dana_only.close()


def test_message_view_blocks_scripts_and_remote_content(srv: Server) -> None:
    send(srv, rich_message())
    mid = only(srv)["ID"]
    status, headers, body = call(srv, "GET", f"/view/{mid}.html")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    policy = headers["content-security-policy"]
    assert policy.startswith("sandbox ") and "allow-scripts" not in policy
    assert "default-src 'none'" in policy and "img-src data:;" in policy
    assert b'src="data:image/png;base64,' + base64.b64encode(PNG) + b'"' in body
    assert b'src="https://tracker.example/p.gif"' in body  # there, but not loaded
    remote = call(srv, "GET", f"/view/{mid}.html?remote=1")[1]["content-security-policy"]
    assert "img-src data: https: http:" in remote and "allow-scripts" not in remote
    status, _, text = call(srv, "GET", f"/view/{mid}.txt")
    assert status == 200 and text.startswith(b"Hi Ann")
    status, headers, page = call(srv, "GET", "/")
    assert status == 200 and b'<script src="/static/app.js"' in page
    assert "script-src 'self'" in headers["content-security-policy"]
    assert call(srv, "GET", "/static/app.js")[1]["content-type"].startswith("text/javascript")
    assert call(srv, "GET", "/static/../catalog.py")[0] == 404


def test_release_is_off_by_default(srv: Server) -> None:
    send(srv, message("keep me"))
    mid = only(srv)["ID"]
    status, _, body = call(srv, "POST", f"/api/v1/message/{mid}/release", {"To": ["x@example.com"]})
    assert status == 403 and b"[sandbox] release" in body
    assert not any((srv.data / "queue" / "env").glob("*.json"))


def test_release_sends_through_the_queue_to_the_recipients(tmp_path: Path) -> None:
    record = tmp_path / "sink"
    record.mkdir()
    sink, port = spawn_mx_server("127.0.0.1:0", str(record))
    try:
        extra = (
            f'[sandbox]\nrelease = true\n\n[relay.routes."*"]\n'
            f'host = "[127.0.0.1]:{port}"\ntls = "none"\n'
        )
        with sandbox_server(tmp_path / "srv", extra) as srv:
            send(srv, rich_message(), rcpts=["ann@example.com", "secret@example.com"])
            mid = only(srv)["ID"]
            assert get_json(srv, "/api/v1/webui")["MessageRelay"]["Enabled"] is True
            bad = call(srv, "POST", f"/api/v1/message/{mid}/release", {"To": ["not an address"]})
            assert bad[0] == 400
            status, _, body = call(
                srv,
                "POST",
                f"/api/v1/message/{mid}/release",
                {"To": ["Real Person <real@example.net>", "qa@example.net"]},
            )
            assert (status, body) == (200, b"ok")
            assert wait_for(lambda: (record / "0001.eml").exists(), 20)
            envelope = json.loads((record / "0001.json").read_text())
            assert envelope["mail_from"] == "app@example.org"
            assert sorted(envelope["rcpts"]) == ["qa@example.net", "real@example.net"]
            sent = (record / "0001.eml").read_bytes()
            assert b"Subject: Welcome, Ann" in sent and b"invoice.pdf" in sent
            assert b"\r\nBcc:" not in sent and b"Delivered-To" not in sent
            assert not sent.startswith(b"Return-Path")
            assert get_json(srv, "/api/v1/messages")["total"] == 1  # the capture stays
            no_traceback(srv)
    finally:
        sink.kill()
        sink.wait(5)
