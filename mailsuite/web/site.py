"""The web listener's plumbing: a root that parts mount into, bounded requests, short answers.

Built on twisted.web (``Site``, ``Resource``, ``HTTPChannel``).  Its defaults suit a general
web server, not a side door of a mail server: a request body of any size is spooled to a
temporary file, a client may take hours to send its request, errors are HTML pages and a
failing resource logs a traceback.  Here a request must arrive whole within
:data:`RECEIVE_DEADLINE` seconds (also the limit for an idle keep-alive connection), its body
is at most :data:`MAX_BODY` bytes (413 beyond), its header block at most :data:`MAX_HEADERS`
lines and 16 KiB (twisted's limit; 400 beyond), and every answer this module makes is a short
``text/plain`` one with the right status: 400, 404, 405 (with ``Allow``), 413, 500.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import IResource, Resource

log = Logger(namespace="mailsuite.web")

#: Largest request body accepted (the biggest legitimate one, an Outlook autodiscover
#: request, is well under 1 KiB).
MAX_BODY = 64 * 1024
#: Header lines per request (twisted's default is 500).
MAX_HEADERS = 64
#: Seconds a client has to send a whole request, counted from the connection or from the end
#: of the previous response; also how long an idle keep-alive connection is kept.
RECEIVE_DEADLINE = 30.0
#: Paths whose successful requests are not logged (scraped every few seconds).
QUIET_PATHS = (b"/healthz", b"/metrics")

TEXT = b"text/plain; charset=utf-8"


def reply(request: Any, code: int, body: str | bytes, content_type: bytes = TEXT) -> bytes:
    """Set the status and headers of a response and return the body to send (nothing for a
    HEAD request, whose Content-Length is still that of the GET answer, RFC 9110 9.3.2)."""
    data = body.encode("utf-8") if isinstance(body, str) else body
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", content_type)
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    if request.method == b"HEAD":
        request.setHeader(b"Content-Length", b"%d" % len(data))
        return b""
    return data


def finish(request: Any, code: int, body: str | bytes, content_type: bytes = TEXT) -> None:
    """Answer a request that was left open (``NOT_DONE_YET``), unless its client went away."""
    if getattr(request, "gone", False) or request.finished:
        return
    data = reply(request, code, body, content_type)
    if request.method != b"HEAD":
        request.setHeader(b"Content-Length", b"%d" % len(data))
    request.write(data)
    request.finish()


class Endpoint(Resource):
    """A resource at one path that answers only :attr:`methods` (405 with ``Allow``
    otherwise) and nothing below it (404).  Subclasses implement :meth:`answer`."""

    isLeaf = True
    methods: tuple[bytes, ...] = (b"GET", b"HEAD")

    def __init__(self) -> None:
        Resource.__init__(self)  # by name: Twisted's is unannotated (setup.cfg)

    def render(self, request: Any) -> bytes | int:
        if request.postpath not in ([], [b""]):
            return reply(request, http.NOT_FOUND, "not found\n")
        if request.method not in self.methods:
            request.setHeader(b"Allow", b", ".join(self.methods))
            return reply(request, http.NOT_ALLOWED, "method not allowed\n")
        return self.answer(request)

    def answer(self, request: Any) -> bytes | int:
        """The response body (see :func:`reply`) or ``server.NOT_DONE_YET``."""
        raise NotImplementedError


class _NotFound(Resource):
    isLeaf = True

    def __init__(self) -> None:
        Resource.__init__(self)

    def render(self, request: Any) -> bytes:
        return reply(request, http.NOT_FOUND, "not found\n")


class WebRoot(Resource):
    """The root of the tree.  ``mount(path, resource)`` puts a resource at a path of one or
    more segments (``"healthz"``, ``"mail/config-v1.1.xml"``); a request goes to the longest
    mounted prefix of its path, which gets the rest of the path as usual in twisted.web.  A
    resource mounted at ``"/"`` gets every request nothing else matched."""

    def __init__(self) -> None:
        Resource.__init__(self)  # by name: Twisted's is unannotated (setup.cfg)
        self._mounts: dict[tuple[bytes, ...], IResource | Resource] = {}

    def mount(self, path: str, resource: IResource | Resource) -> None:
        stripped = path.strip("/")
        key = tuple(s.encode("utf-8") for s in stripped.split("/")) if stripped else ()
        if key in self._mounts:
            raise ValueError(f"{path!r} is mounted already")
        self._mounts[key] = resource

    def mounted(self) -> list[str]:
        return sorted("/" + "/".join(s.decode() for s in key) for key in self._mounts)

    def getChildWithDefault(self, name: bytes, request: Any) -> Any:
        path = [name, *request.postpath]
        for n in range(len(path), 0, -1):
            found = self._mounts.get(tuple(path[:n]))
            if found is not None:
                for _ in range(n - 1):
                    request.prepath.append(request.postpath.pop(0))
                return found
        fallback = self._mounts.get(())
        if fallback is not None:
            request.postpath.insert(0, request.prepath.pop())
            return fallback
        return _NotFound()

    def render(self, request: Any) -> bytes:
        return reply(request, http.NOT_FOUND, "not found\n")


class BoundedRequest(server.Request):
    """A request whose body is bounded and whose failures are answered without a traceback."""

    gone = False  # the client disconnected before the answer was finished
    refused = False  # answered 413 while the body arrived; nothing more is done with it
    _body_size = 0

    def gotLength(self, length: int | None) -> None:  # noqa: N802
        if length is not None and length > MAX_BODY:
            self._refuse()
            return
        server.Request.gotLength(self, length)

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802
        if self.refused:
            return
        self._body_size += len(data)
        if self._body_size > MAX_BODY:  # chunked bodies announce no length
            self._refuse()
            return
        server.Request.handleContentChunk(self, data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:  # noqa: N802
        if self.refused:
            return
        server.Request.requestReceived(self, command, path, version)

    def _refuse(self) -> None:
        """413, then close: reading on would only waste time (RFC 9110 15.5.14)."""
        self.refused = True
        self.content: Any = io.BytesIO()
        body = b"request body too large\n"
        transport: Any = self.channel.transport
        transport.write(
            b"HTTP/1.1 413 Content Too Large\r\nContent-Type: " + TEXT + b"\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
        )
        transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        self.gone = True
        server.Request.connectionLost(self, reason)

    def processingFailed(self, reason: Failure) -> None:  # noqa: N802
        """A resource raised: log one line naming the error and where, answer 500."""
        frames = reason.frames
        where = f"{frames[-1][1]}:{frames[-1][2]}" if frames else "?"
        log.error(
            "web: {method} {path} failed: {error} (at {where})",
            method=self.method.decode("latin-1"),
            path=self.path.decode("latin-1"),
            error=f"{getattr(reason.type, '__name__', reason.type)}: {reason.getErrorMessage()}",
            where=where,
        )
        if self.gone or self.finished:
            return
        if self.startedWriting:
            self.channel.loseConnection()
            return
        body = reply(self, http.INTERNAL_SERVER_ERROR, "internal error\n")
        server.Request.setHeader(self, b"Content-Length", b"%d" % len(body))
        server.Request.write(self, body)
        server.Request.finish(self)


class BoundedChannel(http.HTTPChannel):
    """An HTTP/1.1 connection that must deliver each request within RECEIVE_DEADLINE."""

    maxHeaders = MAX_HEADERS
    _deadline: Any = None

    def connectionMade(self) -> None:
        http.HTTPChannel.connectionMade(self)
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        # the site's reactor.callLater, set on each channel it builds (the class's own,
        # unannotated, would use the global reactor)
        call_later: Callable[..., IDelayedCall] = self.callLater
        self._deadline = call_later(RECEIVE_DEADLINE, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        transport: Any = self.transport
        transport.abortConnection()

    def allContentReceived(self) -> None:  # noqa: N802
        self._disarm()  # the request is in: producing the answer may take its time
        http.HTTPChannel.allContentReceived(self)

    def requestDone(self, request: Any) -> None:  # noqa: N802
        http.HTTPChannel.requestDone(self, request)
        transport: Any = self.transport
        if self.persistent and transport is not None and not transport.disconnecting:
            self._arm()

    def _send100Continue(self) -> None:  # noqa: N802
        if self.requests and getattr(self.requests[-1], "refused", False):
            return  # already answered 413
        http.HTTPChannel._send100Continue(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._disarm()
        http.HTTPChannel.connectionLost(self, reason)


class WebSite(server.Site):
    """The site on ``[listen] web``: bounded channels and requests, a short access log."""

    requestFactory = BoundedRequest
    protocol = BoundedChannel  # type: ignore[assignment]
    displayTracebacks = False
    noisy = False

    def __init__(self, root: IResource, reactor: Any) -> None:
        server.Site.__init__(self, root, timeout=RECEIVE_DEADLINE, reactor=reactor)

    def log(self, request: Any) -> None:
        if request.code < 400 and request.path in QUIET_PATHS:
            return
        peer = request.getClientAddress()
        log.info(
            "web: {peer} {method} {uri} {code}",
            peer=getattr(peer, "host", str(peer)),
            method=request.method.decode("latin-1"),
            uri=request.uri.decode("latin-1")[:200],
            code=request.code,
        )


def web_factory(runtime: Any, implicit_tls: bool) -> WebSite:
    """The ``[listen] web`` factory (see :data:`mailsuite.service.FACTORIES`): the tree that
    :func:`mailsuite.service.makeService` built in ``runtime.web``."""
    return WebSite(runtime.web, runtime.reactor)
