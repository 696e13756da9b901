"""``GET /metrics``: the server's :class:`~mailsuite.metrics.Metrics` in the Prometheus text
exposition format (version 0.0.4), made by prometheus-client's ``generate_latest``.

Collecting lists the queue directory and reads ``/proc``, so it runs in the reactor's thread
pool; requests that arrive while a collection runs share its result, so a burst of scrapers
costs one collection and one thread.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import generate_latest
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.web import http, server

from mailsuite.web.site import Endpoint, finish

log = Logger(namespace="mailsuite.web")

#: The classic text format every Prometheus version reads (what ``generate_latest`` writes
#: by default); prometheus-client >= 0.22 would announce its 1.0.0 variant instead.
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class MetricsResource(Endpoint):
    """``GET /metrics``."""

    def __init__(self, registry: Any, reactor: Any) -> None:
        super().__init__()
        self.registry = registry
        self.reactor = reactor
        self._waiting: list[Any] | None = None

    def answer(self, request: Any) -> int:
        if self._waiting is not None:
            self._waiting.append(request)
            return server.NOT_DONE_YET
        waiting = self._waiting = [request]

        def done(result: Any) -> None:
            self._waiting = None
            if isinstance(result, bytes):
                for r in waiting:
                    finish(r, http.OK, result, CONTENT_TYPE)
                return
            log.error("collecting metrics failed: {error}", error=result.getErrorMessage())
            for r in waiting:
                finish(r, http.INTERNAL_SERVER_ERROR, "collecting metrics failed\n")

        d: defer.Deferred[bytes] = threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), generate_latest, self.registry
        )
        d.addBoth(done)
        return server.NOT_DONE_YET
