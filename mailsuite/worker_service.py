"""What a worker process of ``[server] workers`` > 1 runs (started by
:mod:`mailsuite.worker`): the listening sockets the supervisor bound, adopted
(``reactor.adoptStreamPort``) and served with the same factories a single-process server
uses (:func:`mailsuite.service.listener_factories`); the certificate reload and mail
authentication services; throttling and connection counts shared with the other workers
(:mod:`mailsuite.shared.counters`); new queue entries told to the supervisor's runner down a
pipe.  On stop it lets open sessions end for up to ``SHUTDOWN_GRACE`` seconds."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from mailsuite.config import Config
from mailsuite.workers import SHUTDOWN_GRACE

log = Logger(namespace="mailsuite.worker")

#: The pipe to the supervisor: one line per new queue entry (its id), and READY once.
QUEUE_PIPE_FD = 3
READY = b"ready\n"

FAMILIES = {"inet": socket.AF_INET, "inet6": socket.AF_INET6, "unix": socket.AF_UNIX}


class AdoptedListener(service.Service):
    """A listening socket the supervisor bound, served here (``reactor.adoptStreamPort``)."""

    def __init__(self, reactor: Any, fd: int, family: int, factory: Any, what: str) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family
        self.factory = factory
        self.what = what
        self.port: Any = None

    def startService(self) -> None:
        service.Service.startService(self)
        self.port = self.reactor.adoptStreamPort(self.fd, self.family, self.factory)
        os.close(self.fd)  # adoptStreamPort made its own copy

    def stopService(self) -> Any:
        service.Service.stopService(self)
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None

    def problem(self) -> str | None:
        """For /healthz, like mailsuite.service._Listener.problem."""
        return None if self.port is not None else f"{self.what}: not listening"


class Drain(service.Service):
    """Stopped first (added last): waits for open connections to end, up to the grace."""

    def __init__(self, reactor: Any, factories: list[Any]) -> None:
        self.reactor = reactor
        self.factories = factories

    def open_connections(self) -> list[Any]:
        return [p for f in self.factories for p in f.live]

    def stopService(self) -> defer.Deferred[None]:
        service.Service.stopService(self)
        done: defer.Deferred[None] = defer.Deferred()
        deadline = self.reactor.seconds() + SHUTDOWN_GRACE

        def check() -> None:
            live = self.open_connections()
            if not live:
                poll.stop()
                done.callback(None)
            elif self.reactor.seconds() >= deadline:
                log.info(
                    "closing {n} sessions still open after {s} s", n=len(live), s=SHUTDOWN_GRACE
                )
                for p in live:
                    transport = getattr(p, "transport", None)
                    if transport is not None:
                        transport.abortConnection()
                poll.stop()
                done.callback(None)

        poll = task.LoopingCall(check)
        poll.clock = self.reactor
        poll.start(0.05, now=True)
        return done


def worker_service(
    config: Config,
    reactor: Any,
    listeners: Sequence[tuple[str, int, int]],
    queue_fd: int,
    index: int,
    connections: Path,
) -> service.MultiService:
    """The worker's services: TLS reload, mail authentication, the adopted listeners.
    ``index``: this worker's slot (kept across restarts), its column in the supervisor's
    connection table at ``connections``."""
    from mailsuite import service as server
    from mailsuite.shared import counters
    from mailsuite.shared.connection_table import SharedConnectionTable

    runtime = server.build_runtime(config, reactor)
    path = counters.state_path(config.data_dir)
    runtime.auth.share_failures(counters.SharedFailureLog(path, config.auth))
    top = service.MultiService()
    top.runtime = runtime  # type: ignore[attr-defined]
    for extra in server._extra_services(runtime, worker=True):
        server.attach(extra, top)
    if runtime.queue is not None:
        runtime.queue.on_enqueue = _queue_notifier(queue_fd)
    adopted: list[Any] = []
    factories: list[Any] = []
    by_name: dict[str, list[tuple[int, int]]] = {}
    for name, fd, family in listeners:
        by_name.setdefault(name, []).append((fd, family))
    built = list(server.listener_factories(runtime, adopted))
    counts = SharedConnectionTable(connections, index)  # zeroes its column: a new start
    for name, limits in runtime.connection_limits.items():
        limits.share(counts, name)
    for name, desc, factory in built:
        slots = by_name.get(name) or []
        if not slots:
            continue
        fd, family = slots.pop(0)
        svc = AdoptedListener(reactor, fd, family, factory, f"[listen] {name} {desc!r}")
        server.attach(svc, top, f"{name} {desc}")
        adopted.append(svc)
        if factory not in factories:
            factories.append(factory)
    server.attach(Drain(reactor, factories), top, "drain")
    return top


def _queue_notifier(fd: int) -> Any:
    """Spool.on_enqueue for a worker: the queue id down the pipe to the supervisor's runner
    (one short line: written whole, PIPE_BUF)."""

    def notify(queue_id: str) -> None:
        # OSError: the supervisor is gone; its successor's runner loads the queue
        with contextlib.suppress(OSError):
            os.write(fd, queue_id.encode("ascii") + b"\n")

    return notify
