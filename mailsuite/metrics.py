"""What the server counts, exported by ``GET /metrics`` in the Prometheus text format.

One :class:`Metrics` per server (``runtime.metrics``), with its own ``CollectorRegistry`` (never
prometheus-client's global one, so two servers in one test process do not share counts).
Every name starts with ``mailsuite_``.  Counting is an in-memory increment on the reactor
thread; collecting (``generate_latest``) runs in a worker thread (see
:mod:`mailsuite.web.prometheus`), so what needs the file system -- the queue directory
listing, ``/proc`` for the process metrics -- never blocks the reactor.

Adding a counter for protocol code is two steps: declare it in :meth:`Metrics.__init__`
(``self.smtp_replies = Counter("mailsuite_smtp_replies", "...", ["listener", "class"],
registry=r)``) and increment it where the event happens
(``runtime.metrics.smtp_replies.labels(listener, "5xx").inc()``).  Only declare what something
increments: a series that never moves misleads whoever builds a dashboard on it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from mailsuite.queue.spool import valid_id

PREFIX = "mailsuite"


class QueueCollector(Collector):
    """``mailsuite_queue_messages`` and ``mailsuite_queue_oldest_age_seconds``, read from the
    queue directory when collected (a listing of ``env/``; no envelope is opened: queue ids
    start with their creation time in microseconds, see :func:`mailsuite.queue.spool.new_id`).
    Blocking: collect only off the reactor thread."""

    def __init__(self, env_dir: Path, now: Callable[[], float] = time.time) -> None:
        self.env_dir = env_dir
        self.now = now

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Names for the registry without listing the directory (register() would collect).
        yield GaugeMetricFamily(f"{PREFIX}_queue_messages", "Messages in the outbound queue.")
        yield GaugeMetricFamily(
            f"{PREFIX}_queue_oldest_age_seconds", "Age of the oldest queued message (0: none)."
        )

    def collect(self) -> Iterator[GaugeMetricFamily]:
        ids: list[str] = []
        try:
            with os.scandir(self.env_dir) as it:
                for entry in it:
                    name = entry.name
                    if name.endswith(".json") and valid_id(name[:-5]):
                        ids.append(name[:-5])
        except FileNotFoundError:
            pass
        age = 0.0
        if ids:
            created = int(min(ids)[:11], 16) / 1_000_000
            age = max(0.0, self.now() - created)
        size, oldest = self.describe()
        size.add_metric([], len(ids))
        oldest.add_metric([], age)
        yield size
        yield oldest


class Metrics:
    """The server's metrics (see the module docstring for adding more)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        #: Connections accepted, by listener (the [listen] service name).
        self.connections = Counter(
            f"{PREFIX}_connections", "Connections accepted.", ["listener"], registry=r
        )
        #: Connections open now, by listener.
        self.connections_open = Gauge(
            f"{PREFIX}_connections_open", "Connections open now.", ["listener"], registry=r
        )
        #: Server TLS handshakes (implicit TLS and STARTTLS) by result: "ok", or "failed"
        #: when a fatal alert ended one before it completed.
        self.tls_handshakes = Counter(
            f"{PREFIX}_tls_handshakes", "Server TLS handshakes by result.", ["result"], registry=r
        )
        for result in ("ok", "failed"):
            self.tls_handshakes.labels(result)  # both series exist from the start, at 0
        ProcessCollector(namespace=PREFIX, registry=r)

    def watch_queue(self, env_dir: Path) -> None:
        """Export the size and age of the outbound queue whose envelopes are in ``env_dir``."""
        self.registry.register(QueueCollector(env_dir))

    def tls_handshake(self, ok: bool) -> None:
        """Observer for :meth:`mailsuite.tls.ServerTLS.observe_handshakes`."""
        self.tls_handshakes.labels("ok" if ok else "failed").inc()

    def listener(self, name: str) -> tuple[Any, Any]:
        """The (accepted, open) series of one listener, for :class:`CountingFactory`."""
        return self.connections.labels(name), self.connections_open.labels(name)
