"""The sandbox's JSON API under ``/api/v1/``: Mailpit's paths and field names, plus a wait
endpoint and an event stream.

=========================================  =================================================
``GET /api/v1/messages``                   Mailpit's MessagesSummary (``start``, ``limit``)
``PUT /api/v1/messages``                   ``{"IDs": [...], "Read": bool}`` (no IDs: all)
``DELETE /api/v1/messages``                ``{"IDs": [...]}`` (no body or no IDs: all)
``GET /api/v1/message/{ID}``               Mailpit's Message (marks it read); ID or latest
``GET /api/v1/message/{ID}/raw``           the source (``?dl=1``: as an .eml download)
``GET /api/v1/message/{ID}/headers``       ``{"Field-Name": ["value", ...]}``, names sorted
``GET /api/v1/message/{ID}/part/{PartID}``  one MIME part, decoded, with its Content-Type
``POST /api/v1/message/{ID}/release``      ``{"To": [...]}``: through the outbound queue
``GET /api/v1/search?query=Q``             like messages, only those matching Q
``DELETE /api/v1/search?query=Q``          delete those matching Q
``GET /api/v1/info``                       Mailpit's AppInformation (plus ``Inboxes``)
``GET /api/v1/tags``                       the tags in use (from ``X-Tags``)
``GET /api/v1/webui``                      Mailpit's web UI settings (is release on?)
``GET /api/v1/wait?query=Q&timeout=S``     the newest match, at once or when one arrives;
                                           408 after S seconds (default 30, at most 600)
``GET /api/v1/events``                     Server-Sent Events: new, deleted, read
=========================================  =================================================

``?inbox=NAME`` narrows every listing, search, bulk change, ``latest``, wait, events and info
to one inbox.  Errors are short ``text/plain`` answers, as Mailpit's: 400 for a bad request,
404 for an unknown message, 403 for a release while ``[sandbox] release`` is off and for a
change requested by another web site's page (see :func:`same_origin`).
"""

from __future__ import annotations

import email.utils
import json
import os
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from mailsuite.sandbox import views
from mailsuite.sandbox.catalog import Located
from mailsuite.sandbox.events import EventStream
from mailsuite.sandbox.inboxes import inbox_name
from mailsuite.sandbox.service import Sandbox, Waiter
from mailsuite.web.site import finish, reply

log = Logger(namespace="mailsuite.sandbox")

JSON = b"application/json"
DEFAULT_LIMIT = 50
#: Served with every message part: no script, no origin, nothing fetched.
PART_POLICY = b"sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'"
#: HTTP method -> handler of one path
Handlers = dict[str, Callable[..., Any]]
DEFAULT_WAIT = 30.0
MAX_WAIT = 600.0


class ApiError(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


def _json(request: Any, obj: object, code: int = http.OK) -> None:
    finish(request, code, json.dumps(obj, ensure_ascii=False).encode("utf-8"), JSON)


def _arg(request: Any, name: str) -> str | None:
    values = request.args.get(name.encode())
    if not values:
        return None
    return str(values[0].decode("utf-8", "replace"))


def _int_arg(request: Any, name: str, default: int) -> int:
    text = _arg(request, name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ApiError(400, f"{name} must be a whole number\n") from None
    return value if value >= 0 else default


def _inbox(request: Any) -> str | None:
    text = _arg(request, "inbox")
    if text is None or text.strip() == "":
        return None
    name = inbox_name(text)
    if name is None:
        raise ApiError(400, "inbox is not a valid inbox name\n")
    return name


def _body(request: Any, required: bool = False) -> dict[str, Any]:
    raw = request.content.read() if request.content is not None else b""
    if not raw.strip():
        if required:
            raise ApiError(400, "a JSON body is required\n")
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the body is not valid JSON\n") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object\n")
    return body


def _ids(body: dict[str, Any]) -> list[str] | None:
    ids = body.get("IDs")
    if ids is None or ids == []:
        return None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ApiError(400, "IDs must be a list of message IDs\n")
    return ids


class ApiV1(Resource):
    """Everything under ``/api/v1/`` (mounted there by :func:`mailsuite.sandbox.web.mount`)."""

    isLeaf = True

    def __init__(self, sandbox: Sandbox) -> None:
        Resource.__init__(self)  # by name: Twisted's is unannotated (setup.cfg)
        self.sandbox = sandbox
        self.events = EventStream(sandbox)

    # -- routing ---------------------------------------------------------------------------

    def render(self, request: Any) -> bytes | int:
        path = [p.decode("utf-8", "replace") for p in request.postpath]
        while path and path[-1] == "":
            path.pop()
        method = request.method.decode("latin-1")
        if method == "HEAD":
            method = "GET"
        route = self._route(path)
        if route is None:
            return reply(request, http.NOT_FOUND, "not found\n")
        handlers, args = route
        handler = handlers.get(method)
        if method not in ("GET", "HEAD") and not same_origin(request):
            return reply(request, http.FORBIDDEN, "cross-origin request refused\n")
        if handler is None:
            allowed = sorted(set(handlers) | ({"HEAD"} if "GET" in handlers else set()))
            request.setHeader(b"Allow", ", ".join(allowed).encode())
            return reply(request, http.NOT_ALLOWED, "method not allowed\n")
        try:
            result = handler(request, *args)
        except ApiError as e:
            return reply(request, e.code, e.text)
        if isinstance(result, defer.Deferred):
            result.addErrback(self._failed, request)
            return server.NOT_DONE_YET
        return result  # type: ignore[no-any-return]

    def _route(self, path: list[str]) -> tuple[Handlers, tuple[str, ...]] | None:
        n = len(path)
        if n == 1:
            table: dict[str, Handlers] = {
                "messages": {
                    "GET": self.list_messages,
                    "PUT": self.set_read,
                    "DELETE": self.delete_messages,
                },
                "search": {"GET": self.search, "DELETE": self.delete_search},
                "info": {"GET": self.info},
                "webui": {"GET": self.webui},
                "tags": {"GET": self.tags},
                "wait": {"GET": self.wait},
                "events": {"GET": self.events.render_stream},
            }
            found = table.get(path[0])
            return (found, ()) if found is not None else None
        if path[0] != "message":
            return None
        if n == 2:
            return {"GET": self.get_message}, (path[1],)
        if n == 3:
            by_name: dict[str, Handlers] = {
                "raw": {"GET": self.raw},
                "headers": {"GET": self.headers},
                "release": {"POST": self.release},
            }
            handlers = by_name.get(path[2])
            return (handlers, (path[1],)) if handlers is not None else None
        if n == 4 and path[2] == "part":
            return {"GET": self.get_part}, (path[1], path[3])
        return None

    def _failed(self, failure: Failure, request: Any) -> None:
        if failure.check(ApiError):
            error: ApiError = failure.value  # type: ignore[assignment]
            finish(request, error.code, error.text)
            return
        log.failure(
            "sandbox API: {method} {path} failed",
            failure,
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1"),
        )
        finish(request, http.INTERNAL_SERVER_ERROR, "internal error\n")

    # -- listings --------------------------------------------------------------------------

    def _listing(self, request: Any, search: str | None) -> defer.Deferred[None]:
        start = _int_arg(request, "start", 0)
        limit = _int_arg(request, "limit", DEFAULT_LIMIT) or DEFAULT_LIMIT
        d = self.sandbox.run(
            self.sandbox.catalog.listing, _inbox(request), search, start, limit, _arg(request, "tz")
        )
        return d.addCallback(lambda listing: _json(request, listing))

    def list_messages(self, request: Any) -> defer.Deferred[None]:
        return self._listing(request, None)

    def search(self, request: Any) -> defer.Deferred[None]:
        return self._listing(request, self._query(request))

    @staticmethod
    def _query(request: Any) -> str:
        text = (_arg(request, "query") or "").strip()
        if not text:
            raise ApiError(400, "Error: no search query\n")
        return text

    def tags(self, request: Any) -> defer.Deferred[None]:
        d = self.sandbox.run(self.sandbox.catalog.tags, _inbox(request))
        return d.addCallback(lambda tags: _json(request, tags))

    # -- bulk changes ----------------------------------------------------------------------

    def _changed(self, request: Any, d: defer.Deferred[None]) -> defer.Deferred[None]:
        return d.addCallback(lambda _: finish(request, http.OK, "ok"))

    def set_read(self, request: Any) -> defer.Deferred[None]:
        body = _body(request, required=True)
        read = body.get("Read", False)
        if not isinstance(read, bool):
            raise ApiError(400, "Read must be true or false\n")
        ids = _ids(body)
        d = self.sandbox.run(self.sandbox.catalog.set_read, ids, _inbox(request), read)
        return self._changed(request, d)

    def delete_messages(self, request: Any) -> defer.Deferred[None]:
        ids = _ids(_body(request))
        d = self.sandbox.run(self.sandbox.catalog.delete, ids, _inbox(request))
        return self._changed(request, d)

    def delete_search(self, request: Any) -> defer.Deferred[None]:
        search = self._query(request)
        d = self.sandbox.run(self.sandbox.catalog.delete, None, _inbox(request), search)
        return self._changed(request, d)

    # -- one message -----------------------------------------------------------------------

    def _located(
        self, request: Any, mid: str, then: Callable[[Located], Any]
    ) -> defer.Deferred[Any]:
        """Find ``mid`` and call ``then`` with it, both in the worker thread; 404 if absent."""
        catalog = self.sandbox.catalog
        inbox = _inbox(request)

        def in_thread() -> Any:
            located = catalog.locate(mid, inbox)
            if located is None:
                raise ApiError(404, "not found\n")
            return then(located)

        return self.sandbox.run(in_thread)

    def get_message(self, request: Any, mid: str) -> defer.Deferred[None]:
        catalog = self.sandbox.catalog

        def build(located: Located) -> dict[str, Any]:
            message = views.message_json(located)
            catalog.set_read([located.summary["ID"]], None, True)
            return message

        return self._located(request, mid, build).addCallback(lambda m: _json(request, m))

    def raw(self, request: Any, mid: str) -> defer.Deferred[None]:
        def answer(result: tuple[bytes, str]) -> None:
            data, real_id = result
            if _arg(request, "dl") == "1":
                request.setHeader(
                    b"Content-Disposition", f'attachment; filename="{real_id}.eml"'.encode()
                )
            finish(request, http.OK, data)

        d = self._located(request, mid, lambda loc: (views.raw_crlf(loc), loc.summary["ID"]))
        return d.addCallback(answer)

    def headers(self, request: Any, mid: str) -> defer.Deferred[None]:
        d = self._located(request, mid, views.headers_json)
        return d.addCallback(lambda fields: _json(request, fields))

    def get_part(self, request: Any, mid: str, part_id: str) -> defer.Deferred[None]:
        def answer(found: Any) -> None:
            if found is None:
                finish(request, http.NOT_FOUND, "not found\n")
                return
            name = found.filename or found.content_id or f"part-{found.part_id}"
            name = name.replace('"', "").replace("\r", "").replace("\n", "")
            request.setHeader(
                b"Content-Disposition", f'filename="{name}"'.encode("utf-8", "replace")
            )
            ctype = found.content_type
            if found.charset and ctype.startswith("text/"):
                ctype += f"; charset={found.charset}"
            # The part's type is the sender's word: an HTML or SVG "attachment" opened from
            # the page must not run its scripts in our origin (where the API is).
            request.setHeader(b"Content-Security-Policy", PART_POLICY)
            finish(request, http.OK, found.content, ctype.encode("latin-1", "replace"))

        d = self._located(request, mid, lambda loc: views.part(loc, part_id))
        return d.addCallback(answer)

    def release(self, request: Any, mid: str) -> defer.Deferred[None]:
        if not self.sandbox.config.sandbox.release:
            raise ApiError(403, "release is off: set [sandbox] release = true to allow it\n")
        body = _body(request, required=True)
        targets = body.get("To")
        if (
            not isinstance(targets, list)
            or not targets
            or not all(isinstance(t, str) for t in targets)
        ):
            raise ApiError(400, "To must be a non-empty list of addresses\n")
        rcpts = []
        for text in targets:
            _, address = email.utils.parseaddr(text)
            local, at, domain = address.rpartition("@")
            if not at or not local or "." not in domain or any(c.isspace() for c in address):
                raise ApiError(400, f"Invalid email address: {text}\n")
            rcpts.append(address)
        queue = self.sandbox.runtime.queue
        if queue is None:
            raise ApiError(503, "the outbound queue is not available\n")

        def send(located: Located) -> str:
            data, sender = views.release_copy(located)
            smtputf8 = not (sender.isascii() and all(r.isascii() for r in rcpts))
            queue_id: str = queue.enqueue_bytes(
                data, sender, rcpts, smtputf8=smtputf8, body_8bit=not data.isascii()
            )
            log.info(
                "sandbox: released {id} to {rcpts} as queue entry {queue_id}",
                id=located.summary["ID"],
                rcpts=", ".join(rcpts),
                queue_id=queue_id,
            )
            return queue_id

        d = self._located(request, mid, send)
        return d.addCallback(lambda _: finish(request, http.OK, "ok"))

    # -- information -----------------------------------------------------------------------

    def info(self, request: Any) -> defer.Deferred[None]:
        inbox = _inbox(request)
        catalog = self.sandbox.catalog
        stats = self.sandbox.stats

        def gather() -> dict[str, Any]:
            catalog.sync([inbox] if inbox is not None else None)
            total, unread = catalog.counts(inbox)
            try:
                size = catalog.path.stat().st_size
            except OSError:
                size = 0
            tag_counts: dict[str, int] = {}
            where = "WHERE inbox=?" if inbox is not None else ""
            for (value,) in catalog.db.execute(
                "SELECT value FROM messages, json_each(messages.tags_json) " + where,
                (inbox,) if inbox is not None else (),
            ):
                tag_counts[str(value)] = tag_counts.get(str(value), 0) + 1
            return {
                "Version": _version(),
                "LatestVersion": "",
                "Database": str(catalog.path),
                "DatabaseSize": size,
                "Messages": total,
                "Unread": unread,
                "Tags": dict(sorted(tag_counts.items())),
                "RuntimeStats": {
                    "Uptime": int(self.sandbox.reactor.seconds() - stats.started),
                    "Memory": _memory(),
                    "MessagesDeleted": stats.deleted,
                    "SMTPAccepted": stats.accepted,
                    "SMTPAcceptedSize": stats.accepted_size,
                    "SMTPRejected": stats.rejected,
                    "SMTPIgnored": 0,
                },
                "Inboxes": catalog.inbox_counts(),
            }

        return self.sandbox.run(gather).addCallback(lambda info: _json(request, info))

    def webui(self, request: Any) -> bytes:
        """Mailpit's web UI settings; the page reads whether release is on."""
        enabled = self.sandbox.config.sandbox.release
        body = {
            "Label": "",
            "MessageRelay": {
                "Enabled": enabled,
                "SMTPServer": "outbound queue" if enabled else "",
                "ReturnPath": "",
                "AllowedRecipients": "",
                "BlockedRecipients": "",
                "OverrideFrom": "",
            },
            "SpamAssassin": False,
            "ChaosEnabled": False,
            "DuplicatesIgnored": False,
        }
        return reply(request, http.OK, json.dumps(body).encode(), JSON)

    # -- waiting ---------------------------------------------------------------------------

    def wait(self, request: Any) -> int:
        text = _arg(request, "timeout")
        try:
            timeout = DEFAULT_WAIT if not text else float(text)
        except ValueError:
            raise ApiError(400, "timeout must be a number of seconds\n") from None
        if not 0 < timeout <= MAX_WAIT:
            raise ApiError(400, f"timeout must be more than 0 and at most {MAX_WAIT:g}\n")
        search = (_arg(request, "query") or "").strip() or None
        reactor = self.sandbox.reactor
        timer: list[Any] = []

        def answer(summary: dict[str, Any]) -> None:
            if timer and timer[0].active():
                timer[0].cancel()
            _json(request, summary)

        waiter = Waiter(_inbox(request), search, _arg(request, "tz"), answer)
        withdraw = self.sandbox.wait(waiter)

        def timed_out() -> None:
            withdraw()
            finish(request, 408, f"no matching message within {timeout:g} s\n")

        timer.append(reactor.callLater(timeout, timed_out))

        def gone(_: object) -> None:
            withdraw()
            if timer[0].active():
                timer[0].cancel()

        request.notifyFinish().addErrback(gone)
        return server.NOT_DONE_YET


def same_origin(request: Any) -> bool:
    """Whether a changing request may come from where it comes from: a browser names the page
    that sent it in ``Origin`` (RFC 6454 7), and only our own page may change anything, so a
    web site the developer visits cannot delete or release captured mail behind their back.
    Tools that send no ``Origin`` (curl, client libraries) are not browsers: allowed."""
    origin = request.getHeader(b"Origin")
    if origin is None:
        return True
    host = request.getHeader(b"Host") or b""
    scheme, _, rest = origin.partition(b"://")
    return scheme in (b"http", b"https") and rest.lower() == host.lower()


def _version() -> str:
    try:
        return metadata.version("mailsuite")
    except metadata.PackageNotFoundError:
        return "unknown"


def _memory() -> int:
    """Resident memory in bytes (Linux), 0 where it cannot be read."""
    try:
        statm = Path("/proc/self/statm").read_text()
        return int(statm.split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
