"""``GET /api/v1/events``: the sandbox's changes as Server-Sent Events (the HTML standard's
``text/event-stream``), for the web page and for tools.

Each change is one event: ``new`` (data: the message summary, as in the listing), ``deleted``
(``{"ID": ...}``) and ``read`` (``{"ID": ..., "Read": true|false}``).  ``?inbox=NAME`` keeps
only that inbox's events.  A comment line is sent every :data:`KEEPALIVE` seconds so proxies
and clients see the stream is alive, and a client that stops reading is dropped once
:data:`MAX_BUFFERED` bytes wait for it (a browser tab in the background must not make the
server hold events without bound).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.logger import Logger
from twisted.web import http, server

from mailsuite.sandbox.inboxes import inbox_name
from mailsuite.sandbox.service import Event, Sandbox
from mailsuite.web.site import reply

log = Logger(namespace="mailsuite.sandbox")

KEEPALIVE = 15.0
MAX_BUFFERED = 4 * 1024 * 1024
#: How long a client waits before reconnecting after the stream ended (milliseconds).
RETRY_MS = 2000


def encode(event: Event) -> bytes:
    kind, data, _inbox = event
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


class EventStream:
    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    def render_stream(self, request: Any) -> bytes | int:
        values = request.args.get(b"inbox")
        inbox = None
        if values and values[0].strip():
            inbox = inbox_name(values[0].decode("utf-8", "replace"))
            if inbox is None:
                return reply(request, http.BAD_REQUEST, "inbox is not a valid inbox name\n")
        if request.method == b"HEAD":
            return reply(request, http.OK, b"", b"text/event-stream")
        request.setResponseCode(http.OK)
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Accel-Buffering", b"no")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.write(f"retry: {RETRY_MS}\n: connected\n\n".encode())
        _Subscription(self.sandbox, request, inbox)
        return server.NOT_DONE_YET


class _Subscription:
    """One open stream: forwards events until the client goes away."""

    def __init__(self, sandbox: Sandbox, request: Any, inbox: str | None) -> None:
        self.request = request
        self.inbox = inbox
        self.reactor = sandbox.reactor
        self.unsubscribe = sandbox.subscribe(self.send)
        self.timer = self.reactor.callLater(KEEPALIVE, self.keepalive)
        request.notifyFinish().addBoth(self.closed)

    def _write(self, data: bytes) -> None:
        transport = self.request.channel.transport if self.request.channel else None
        if transport is None:
            return
        buffered = len(getattr(transport, "dataBuffer", b"")) + getattr(
            transport, "_tempDataLen", 0
        )
        if buffered > MAX_BUFFERED:
            log.info("sandbox: event stream client is not reading; closing it")
            self.closed(None)
            transport.abortConnection()
            return
        self.request.write(data)

    def send(self, event: Event) -> None:
        if self.inbox is not None and event[2] != self.inbox:
            return
        self._write(encode(event))

    def keepalive(self) -> None:
        self._write(b": keepalive\n\n")
        if self.unsubscribe is not None:
            self.timer = self.reactor.callLater(KEEPALIVE, self.keepalive)

    def closed(self, _: object) -> None:
        if self.unsubscribe is not None:
            self.unsubscribe()
            self.unsubscribe = None  # type: ignore[assignment]
        if self.timer.active():
            self.timer.cancel()
