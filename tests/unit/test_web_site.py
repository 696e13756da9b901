"""The web listener's plumbing without sockets: mounting, short answers, request bounds."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource

from mailsuite.web.site import MAX_BODY, RECEIVE_DEADLINE, Endpoint, WebRoot, WebSite, reply

PEER = IPv4Address("TCP", "127.0.0.1", 40000)


class Text(Endpoint):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def answer(self, request: Any) -> bytes:
        return reply(request, 200, self.text)


class Broken(Endpoint):
    def answer(self, request: Any) -> bytes:
        raise ZeroDivisionError("a bug")


class Echo(Endpoint):
    methods = (b"POST",)

    def answer(self, request: Any) -> bytes:
        return reply(request, 200, b"%d bytes" % len(request.content.read()))


def connect(root: WebRoot, clock: Clock | None = None) -> tuple[StringTransport, Any, Clock]:
    clock = clock or Clock()
    site = WebSite(root, clock)
    proto = site.buildProtocol(PEER)
    transport = StringTransport(peerAddress=PEER)
    proto.makeConnection(transport)
    return transport, proto, clock


def ask(root: WebRoot, data: bytes) -> tuple[int, dict[bytes, bytes], bytes, StringTransport]:
    transport, proto, _ = connect(root)
    proto.dataReceived(data)
    head, _, body = transport.value().partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b": ")
        headers[k.lower()] = v
    return status, headers, body, transport


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


def tree() -> WebRoot:
    root = WebRoot()
    root.mount("a", Text("A"))
    root.mount("a/b/c", Text("ABC"))
    root.mount(".well-known/x/y.xml", Text("Y"))
    root.mount("post", Echo())
    root.mount("broken", Broken())
    return root


def test_longest_mounted_prefix_wins_and_the_rest_is_404() -> None:
    root = tree()
    assert ask(root, get("/a"))[2] == b"A"
    assert ask(root, get("/a/"))[2] == b"A"
    assert ask(root, get("/a/b/c"))[2] == b"ABC"
    assert ask(root, get("/.well-known/x/y.xml?q=1"))[2] == b"Y"
    for path in ("/a/b", "/a/b/c/d", "/nothing", "/", "/.well-known/x"):
        status, headers, body, _ = ask(root, get(path))
        assert (status, body) == (404, b"not found\n"), path
        assert headers[b"content-type"] == b"text/plain; charset=utf-8"
    assert root.mounted() == ["/.well-known/x/y.xml", "/a", "/a/b/c", "/broken", "/post"]
    with pytest.raises(ValueError):
        root.mount("/a/", Text("again"))


class Anything(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return reply(request, 200, b"fallback " + b"/".join(request.postpath))


def test_a_resource_mounted_at_the_root_gets_what_nothing_else_matched() -> None:
    root = tree()
    root.mount("/", Anything())
    assert ask(root, get("/elsewhere/deep"))[2] == b"fallback elsewhere/deep"
    assert ask(root, get("/"))[2] == b"fallback "
    assert ask(root, get("/a"))[2] == b"A"


def test_wrong_method_is_405_with_allow_and_head_has_no_body() -> None:
    root = tree()
    status, headers, body, _ = ask(root, b"DELETE /a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (status, body) == (405, b"method not allowed\n")
    assert headers[b"allow"] == b"GET, HEAD"
    status, headers, body, _ = ask(root, get("/post"))
    assert status == 405 and headers[b"allow"] == b"POST"
    status, headers, body, _ = ask(root, b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (status, body, headers[b"content-length"]) == (200, b"", b"1")


def test_bodies_up_to_the_limit_are_read_and_bigger_ones_get_413_and_a_close() -> None:
    root = tree()
    fits = b"x" * MAX_BODY
    req = b"POST /post HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(fits) + fits
    assert ask(root, req)[2] == b"%d bytes" % MAX_BODY
    big = b"POST /post HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1)
    status, _headers, body, transport = ask(root, big + b"x" * 1000)
    assert (status, body) == (413, b"request body too large\n")
    assert transport.disconnecting
    chunk = b"%x\r\n" % (40 * 1024) + b"y" * 40 * 1024 + b"\r\n"
    chunked = b"POST /post HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 2
    status, _, body, transport = ask(root, chunked + b"0\r\n\r\n")
    assert (status, body) == (413, b"request body too large\n")
    assert transport.disconnecting


def test_a_request_that_does_not_arrive_in_time_is_dropped_and_so_is_an_idle_connection() -> None:
    root = tree()
    transport, proto, clock = connect(root)
    proto.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n")  # never finished
    clock.advance(RECEIVE_DEADLINE - 1)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.disconnected  # aborted
    transport, proto, clock = connect(root)
    proto.dataReceived(get("/a"))
    assert transport.value().endswith(b"A")
    clock.advance(RECEIVE_DEADLINE - 1)
    proto.dataReceived(get("/a"))  # the deadline restarted with the first answer
    assert transport.value().count(b"200 OK") == 2
    clock.advance(RECEIVE_DEADLINE + 1)
    assert transport.disconnected


def test_a_failing_resource_answers_500_and_logs_one_line_without_traceback(
    twisted_logs: Any,
) -> None:
    status, _, body, _ = ask(tree(), get("/broken"))
    events = twisted_logs.events
    assert (status, body) == (500, b"internal error\n")
    failures = [e for e in events if "log_failure" in e]
    assert failures == []
    (line,) = [e for e in events if e.get("log_namespace") == "mailsuite.web" and "error" in e]
    assert "ZeroDivisionError: a bug" in line["error"] and "test_web_site.py" in line["where"]
