"""The sandbox's web page and the message views it frames.

* ``/`` and ``/static/...``: the page, plain files from ``mailsuite/sandbox/static`` (no build
  step, nothing from a CDN: it works offline), with a Content-Security-Policy that lets it load
  only its own script and style and talk only to its own origin.
* ``/view/{ID}.html`` (``?remote=1`` to allow remote content) and ``/view/{ID}.txt``: one
  message's HTML or text part, as Mailpit serves them.  The HTML comes with the restrictive
  policy of :func:`mailsuite.sandbox.views.html_policy` and the page shows it in an iframe
  with the ``sandbox`` attribute: its scripts never run and it cannot reach the API.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.resource import Resource

from mailsuite.sandbox import views
from mailsuite.sandbox.api import ApiError, _inbox
from mailsuite.sandbox.catalog import Located
from mailsuite.sandbox.service import Sandbox
from mailsuite.web.site import finish, reply

log = Logger(namespace="mailsuite.sandbox")

#: The page's own policy: its files only, requests to its own origin only, frames of its own
#: message views only.
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)

_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
}


def _static(name: str) -> bytes | None:
    if "/" in name or "\\" in name or name.startswith(".") or not name:
        return None
    try:
        return resources.files("mailsuite.sandbox").joinpath("static", name).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


class Page(Resource):
    """``/`` (the page) and ``/static/<file>``; mounted as the fallback of the web root."""

    isLeaf = True

    def __init__(self) -> None:  # typed: Resource's own __init__ is not annotated
        Resource.__init__(self)  # by name: Twisted's is unannotated (setup.cfg)

    def render(self, request: Any) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", b"GET, HEAD")
            return reply(request, http.NOT_ALLOWED, "method not allowed\n")
        path = [p.decode("utf-8", "replace") for p in request.postpath]
        if path in ([], [""]):
            name = "index.html"
        elif len(path) == 2 and path[0] == "static":
            name = path[1]
        else:
            return reply(request, http.NOT_FOUND, "not found\n")
        data = _static(name)
        ext = name[name.rfind(".") :] if "." in name else ""
        if data is None or ext not in _TYPES:
            return reply(request, http.NOT_FOUND, "not found\n")
        request.setHeader(b"Content-Security-Policy", PAGE_POLICY.encode())
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        request.setHeader(b"X-Frame-Options", b"DENY")
        return reply(request, http.OK, data, _TYPES[ext])


class MessageView(Resource):
    """``/view/{ID}.html`` and ``/view/{ID}.txt``."""

    isLeaf = True

    def __init__(self, sandbox: Sandbox) -> None:
        Resource.__init__(self)  # by name: Twisted's is unannotated (setup.cfg)
        self.sandbox = sandbox

    def render(self, request: Any) -> bytes | int:
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", b"GET, HEAD")
            return reply(request, http.NOT_ALLOWED, "method not allowed\n")
        if len(request.postpath) != 1:
            return reply(request, http.NOT_FOUND, "not found\n")
        name = request.postpath[0].decode("utf-8", "replace")
        mid, dot, kind = name.rpartition(".")
        if not dot or kind not in ("html", "txt") or not mid:
            return reply(request, http.NOT_FOUND, "not found\n")
        remote = request.args.get(b"remote", [b"0"])[0] == b"1"
        try:
            inbox = _inbox(request)
        except ApiError as e:
            return reply(request, e.code, e.text)

        def build() -> str | None:
            located: Located | None = self.sandbox.catalog.locate(mid, inbox)
            if located is None:
                return None
            return views.html_view(located) if kind == "html" else views.text_view(located)

        def answer(content: str | None) -> None:
            if content is None:
                finish(request, http.NOT_FOUND, "not found\n")
                return
            if kind == "html":
                request.setHeader(b"Content-Security-Policy", views.html_policy(remote).encode())
                request.setHeader(b"Referrer-Policy", b"no-referrer")
                finish(request, http.OK, content.encode("utf-8"), b"text/html; charset=utf-8")
            else:
                finish(request, http.OK, content.encode("utf-8"))

        def failed(f: Any) -> None:
            log.failure("sandbox: view of {id} failed", f, id=mid)
            finish(request, http.INTERNAL_SERVER_ERROR, "internal error\n")

        self.sandbox.run(build).addCallbacks(answer, failed)
        return server.NOT_DONE_YET
