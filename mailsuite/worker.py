"""One worker process of ``[server] workers`` > 1: ``python -m mailsuite.worker``.

Started by :class:`mailsuite.workers.WorkerSupervisor` with the listening sockets on file
descriptors 10, 11, ... (``--listener service:fd:family``), a pipe on fd 3 to tell the
supervisor's queue runner of new entries, and its stdout read as the log (JSON events, which
the supervisor writes into the server log).  It serves every configured protocol on the
adopted sockets with the same factories a single-process server uses
(:func:`mailsuite.service.listener_factories`), and shares throttling and connection counts
with the other workers (:mod:`mailsuite.shared.counters`).

It dies with the supervisor (``PR_SET_PDEATHSIG``, and a check of the parent pid), so a
``kill -9`` of the server leaves no worker holding its ports.  On SIGTERM it stops accepting,
lets open sessions end for up to :data:`SHUTDOWN_GRACE` seconds, closes what is left, exits.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger, globalLogBeginner, jsonFileLogObserver

from mailsuite.config import Config, ConfigError, load_config
from mailsuite.workers import SHUTDOWN_GRACE

log = Logger(namespace="mailsuite.worker")

QUEUE_PIPE_FD = 3

_FAMILIES = {"inet": socket.AF_INET, "inet6": socket.AF_INET6, "unix": socket.AF_UNIX}


class AdoptedListener(service.Service):
    """A listening socket the supervisor bound, served here (``reactor.adoptStreamPort``)."""

    def __init__(self, reactor: Any, fd: int, family: int, factory: Any, what: str) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family
        self.factory = factory
        self.what = what
        self.port: Any = None

    def startService(self) -> None:  # noqa: N802
        service.Service.startService(self)
        self.port = self.reactor.adoptStreamPort(self.fd, self.family, self.factory)
        os.close(self.fd)  # adoptStreamPort made its own copy

    def stopService(self) -> Any:  # noqa: N802
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

    def stopService(self) -> defer.Deferred[None]:  # noqa: N802
        service.Service.stopService(self)
        done: defer.Deferred[None] = defer.Deferred()
        deadline = self.reactor.seconds() + SHUTDOWN_GRACE

        def check() -> None:
            live = self.open_connections()
            if not live:
                poll.stop()
                done.callback(None)
            elif self.reactor.seconds() >= deadline:
                log.info("closing {n} sessions still open after {s} s", n=len(live),
                         s=SHUTDOWN_GRACE)
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
    config: Config, reactor: Any, listeners: Sequence[tuple[str, int, int]], queue_fd: int
) -> service.MultiService:
    """The worker's services: TLS reload, mail authentication, the adopted listeners."""
    from mailsuite import service as server
    from mailsuite.shared import counters

    runtime = server.build_runtime(config, reactor)
    path = counters.state_path(config.data_dir)
    runtime.auth.share_failures(counters.SharedFailureLog(path, config.auth))
    top = service.MultiService()
    top.runtime = runtime  # type: ignore[attr-defined]
    for extra in server._extra_services(runtime):
        if extra.name != "queue" and type(extra).__name__ != "LeftoverSweeper":
            server.attach(extra, top)
    if runtime.queue is not None:
        runtime.queue.on_enqueue = _queue_notifier(queue_fd)
    adopted: list[Any] = []
    factories: list[Any] = []
    by_name: dict[str, list[tuple[int, int]]] = {}
    for name, fd, family in listeners:
        by_name.setdefault(name, []).append((fd, family))
    built = list(server.listener_factories(runtime, adopted))
    counts = counters.SharedConnectionCounts(path)
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
        try:
            os.write(fd, queue_id.encode("ascii") + b"\n")
        except OSError:  # the supervisor is gone; its successor's runner loads the queue
            pass

    return notify


def _die_with_parent(parent: int) -> None:
    """Ask the kernel for SIGKILL when the supervisor dies (Linux), then check it still lives
    (it may have died before the request)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mailsuite.worker")
    parser.add_argument("--config")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--listener", action="append", default=[])
    args = parser.parse_args(argv)
    _die_with_parent(args.parent)
    globalLogBeginner.beginLoggingTo(
        [jsonFileLogObserver(sys.stdout)], redirectStandardIO=False
    )
    listeners = []
    for spec in args.listener:
        name, fd, family = spec.split(":")
        listeners.append((name, int(fd), _FAMILIES[family]))
    from twisted.internet import reactor

    try:
        config = load_config(args.config)
        top = worker_service(config, reactor, listeners, QUEUE_PIPE_FD)
    except ConfigError as e:  # the supervisor checked it; the file changed since
        print(f"mailsuite worker: {e}", file=sys.stderr)
        return 1

    def orphaned() -> None:
        if os.getppid() != args.parent:
            log.warn("the supervisor is gone: stopping")
            reactor.stop()

    watch = task.LoopingCall(orphaned)
    watch.clock = reactor
    reactor.callWhenRunning(watch.start, 1.0, now=False)
    reactor.callWhenRunning(top.startService)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
