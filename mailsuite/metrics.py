"""What the server counts, exported by ``GET /metrics`` in the Prometheus text format.

One :class:`Metrics` per server (``runtime.metrics``), with its own ``CollectorRegistry`` (never
prometheus-client's global one, so two servers in one test process do not share counts).
Every name starts with ``mailsuite_``.  Counting is an in-memory increment on the reactor
thread; collecting (``generate_latest``) runs in a worker thread (see
:mod:`mailsuite.web.prometheus`), so what needs the file system -- the queue directory
listing, ``/proc`` for the process metrics -- never blocks the reactor.

With ``[server] workers`` > 1 every worker counts in its own memory, so the supervisor
starts them with ``PROMETHEUS_MULTIPROC_DIR`` set (a private folder in tmpfs, else
``<data_dir>/run/live``: :func:`mailsuite.workers.live_state_dir`; emptied at start):
prometheus-client's multiprocess mode keeps each worker's values in a small mmapped
file, and ``/metrics``, served by whichever worker gets the request, adds up every worker's
(:meth:`Metrics.exported`).  A gauge must say how to add up: ``multiprocess_mode="livesum"``
(what the live workers hold now).  The process metrics are the serving worker's own.  The
twistd process itself (the queue runner's attempts and deliveries, its DSNs) counts into the
same folder: :func:`share_with_workers` switches it to multiprocess mode before anything is
counted, so its counts are added up with the workers' too.

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

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    values,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from mailsuite.imap import session as imap_session
from mailsuite.pop3 import session as pop3_session
from mailsuite.procid import pid
from mailsuite.queue.spool import valid_id
from mailsuite.reactor_lag import BUCKETS, ReactorLag

PREFIX = "mailsuite"


def _multiprocess_values() -> None:
    """Multiprocess values that know the process id without asking: prometheus-client's
    own ask ``os.getpid()`` (a system call) at every change, to notice a fork, which made
    about ten calls per SMTP message in a worker.  :func:`mailsuite.procid.pid` is taken
    again after a fork, so a forked child still writes its own file."""
    values.ValueClass = values.MultiProcessValue(pid)  # type: ignore[no-untyped-call]


if values.ValueClass is not values.MutexValue:  # a worker (PROMETHEUS_MULTIPROC_DIR is set)
    _multiprocess_values()


def share_with_workers(directory: Path) -> None:
    """Make this process count into ``directory``, where the worker processes count and
    where ``/metrics`` adds up (see the module docstring); the files of an earlier run are
    removed first.  For the twistd process of a server with worker processes, called before
    its :class:`Metrics` is made: prometheus-client picks how values are kept when each one
    is made, from ``values.ValueClass``, which it sets from the environment only at import.
    Process-wide by nature, as the environment it sets for the workers it starts."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for old in directory.glob("*.db"):  # counts of a previous run
        old.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    _multiprocess_values()


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


class GaugeFromCall(Collector):
    """One gauge whose value a function gives when collected (in the collecting thread: the
    function must only read state, never change it)."""

    def __init__(self, name: str, doc: str, value: Callable[[], float]) -> None:
        self.name = name
        self.doc = doc
        self.value = value

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self.name, self.doc)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily(self.name, self.doc)
        g.add_metric([], self.value())
        yield g


#: IMAP commands counted by name (RFC 3501, 9051 and the extensions served); any other
#: word is counted as "other", so a client cannot grow the label set.
IMAP_COMMANDS = imap_session.COMMANDS
#: POP3 commands counted by name; others are "other".
POP3_COMMANDS = pop3_session.COMMANDS


class Metrics:
    """The server's metrics (see the module docstring for adding more).  Label values come
    from fixed sets (listener names, reply classes, command tables), never from a client."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        #: label children by (counter or listener, name), see :meth:`_command`
        self._children: dict[tuple[object, object], Any] = {}
        #: Connections accepted, by listener (the [listen] service name).
        self.connections = Counter(
            f"{PREFIX}_connections", "Connections accepted.", ["listener"], registry=r
        )
        #: Connections open now, by listener.
        self.connections_open = Gauge(
            f"{PREFIX}_connections_open",
            "Connections open now.",
            ["listener"],
            registry=r,
            multiprocess_mode="livesum",
        )
        #: Server TLS handshakes (implicit TLS and STARTTLS) by result: "ok", or "failed"
        #: when a fatal alert ended one before it completed.
        self.tls_handshakes = Counter(
            f"{PREFIX}_tls_handshakes", "Server TLS handshakes by result.", ["result"], registry=r
        )
        for result in ("ok", "failed"):
            self.tls_handshakes.labels(result)  # both series exist from the start, at 0
        #: SMTP messages answered after their data (or refused at DATA), by listener
        #: profile ("mx", "submission") and reply class ("2xx", "4xx", "5xx").
        self.smtp_messages = Counter(
            f"{PREFIX}_smtp_messages",
            "SMTP messages by listener and final reply class.",
            ["listener", "class"],
            registry=r,
        )
        #: Local recipients a message was stored for (SMTP, queue retries, DSNs).
        self.local_deliveries = Counter(
            f"{PREFIX}_local_deliveries", "Messages stored for a local recipient.", registry=r
        )
        #: Bytes of message files local delivery stored (every copy counted).
        self.stored_bytes = Counter(
            f"{PREFIX}_stored_bytes",
            "Bytes of message files stored by local delivery.",
            registry=r,
        )
        #: Attempts of the outbound queue to hand a recipient to a remote server, by result
        #: ("delivered", "deferred", "failed").
        self.outbound_attempts = Counter(
            f"{PREFIX}_outbound_attempts",
            "Outbound delivery attempts per recipient by result.",
            ["result"],
            registry=r,
        )
        #: Login attempts by protocol ("smtp", "imap", "pop3", "managesieve") and result
        #: ("ok", "failed": wrong credentials, "throttled": refused for earlier failures).
        self.logins = Counter(
            f"{PREFIX}_logins",
            "Login attempts by protocol and result.",
            ["protocol", "result"],
            registry=r,
        )
        self.imap_commands = Counter(
            f"{PREFIX}_imap_commands",
            "IMAP commands received, by name.",
            ["command"],
            registry=r,
        )
        self.pop3_commands = Counter(
            f"{PREFIX}_pop3_commands",
            "POP3 commands received, by name.",
            ["command"],
            registry=r,
        )
        #: collectors that read their values when collected (not per-process counts)
        self._readers: list[Collector] = [ProcessCollector(namespace=PREFIX, registry=r)]

    def watch_queue(self, env_dir: Path) -> None:
        """Export the size and age of the outbound queue whose envelopes are in ``env_dir``."""
        collector = QueueCollector(env_dir)
        self.registry.register(collector)
        self._readers.append(collector)

    def add_reader(self, collector: Collector) -> None:
        """Register a collector that reads its values when collected (the reactor's lag, say):
        exported as it is, also when /metrics adds up the workers' counts."""
        self.registry.register(collector)
        self._readers.append(collector)

    def watch_reactor(self, lag: ReactorLag) -> None:
        """Export the reactor's lag probe: its own collector in a single process; with worker
        processes, the multiprocess gauge (largest over the live processes) and histogram
        (summed) it publishes into, so ``/metrics`` shows every process's reactor whichever
        worker answers (see :mod:`mailsuite.reactor_lag`)."""
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            self.add_reader(lag)
            return
        gauge_doc, histogram_doc, held_doc = lag.descriptions()
        gauge = Gauge(
            f"{PREFIX}_reactor_lag_seconds",
            gauge_doc,
            multiprocess_mode="livemax",
            registry=self.registry,
        )
        histogram = Histogram(
            f"{PREFIX}_reactor_tick_lag_seconds",
            histogram_doc,
            buckets=BUCKETS,
            registry=self.registry,
        )
        held = Gauge(
            f"{PREFIX}_reactor_held_seconds",
            held_doc,
            multiprocess_mode="livemax",
            registry=self.registry,
        )
        lag.publish(gauge, histogram, held)

    def exported(self) -> CollectorRegistry:
        """The registry /metrics shows: this process's, or in a worker process (multiprocess
        mode, see the module docstring) the sum over every worker plus the readers."""
        path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not path:
            return self.registry
        r = CollectorRegistry()
        MultiProcessCollector(r, path)
        for collector in self._readers:
            r.register(collector)
        return r

    def tls_handshake(self, ok: bool) -> None:
        """Observer for :meth:`mailsuite.tls.ServerTLS.observe_handshakes`."""
        self.tls_handshakes.labels("ok" if ok else "failed").inc()

    def listener(self, name: str) -> tuple[Any, Any]:
        """The (accepted, open) series of one listener, for :class:`CountingFactory`."""
        return self.connections.labels(name), self.connections_open.labels(name)

    def watch_throttling(self, throttled_ips: Callable[[], int]) -> None:
        """Export ``mailsuite_auth_throttled_ips``: client addresses refused logins now."""
        collector = GaugeFromCall(
            f"{PREFIX}_auth_throttled_ips",
            "Client addresses whose logins are refused now for too many failures.",
            throttled_ips,
        )
        self.registry.register(collector)
        self._readers.append(collector)  # with workers: the shared log's count, read once

    def login(self, protocol: str, outcome: str) -> None:
        """Observer for :attr:`mailsuite.auth.Authenticator.observe` (outcome: the
        :class:`mailsuite.login.Outcome` value)."""
        result = {"ok": "ok", "bad": "failed", "throttled": "throttled"}.get(outcome, "failed")
        self.logins.labels(protocol, result).inc()

    def smtp_message(self, listener: str, code: int) -> None:
        key = (listener, code // 100)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.smtp_messages.labels(listener, f"{key[1]}xx")
        child.inc()

    def imap_command(self, name: str) -> None:
        self._command(self.imap_commands, IMAP_COMMANDS, name)

    def pop3_command(self, name: str, count: int = 1) -> None:
        self._command(self.pop3_commands, POP3_COMMANDS, name, count)

    def _command(self, counter: Counter, known: frozenset[str], name: str, count: int = 1) -> None:
        """Count one command, through a cache of the label children: ``labels()`` takes a
        lock and builds a key per call, a measurable share of a command that is answered
        in tens of microseconds.  The cache is bounded by the known names plus "other"."""
        key = (counter, name)
        child = self._children.get(key)
        if child is None:
            child = counter.labels(name if name in known else "other")
            if name in known:
                self._children[key] = child
        child.inc(count)
