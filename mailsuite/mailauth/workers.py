"""A dedicated thread pool for the blocking half of mail authentication.

dkimpy and pyspf are synchronous: they do RSA in pure Python and call a DNS function that must
return an answer before they go on.  They run here, never on the reactor thread, and not in the
reactor's default pool either: local delivery does its fsyncs there, and a burst of messages
waiting on slow DNS must not hold up the disk writes of every other session.  The pool is a
twisted Service, started and stopped with the server.

Only one worker at a time runs Python code (the :class:`Lane`); the others wait for DNS (a
worker gives the lane up while it waits, see ``BlockingDNS``) or for the lane.  CPython runs
one thread's bytecode at a time anyway, so this costs no throughput; what it buys is the
reactor's turn: a thread asking for the GIL competes with every thread that wants it.  With
eight busy workers the reactor's longest stall while checking was 130 ms, with the lane about
50 ms on a loaded 2-core machine whose idle noise was 10-20 ms (bench/mailauth_checks.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from twisted.application import service
from twisted.internet import defer, threads
from twisted.internet.defer import Deferred
from twisted.python.threadpool import ThreadPool

__all__ = ["Lane", "WorkerPool", "WorkersStopped"]

T = TypeVar("T")


class WorkersStopped(RuntimeError):
    """Work was handed to the pool while it is not running (before start, or after stop)."""


class Lane:
    """A lock held by the worker running Python code, given up while it waits (on DNS)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()

    @contextmanager
    def held(self) -> Iterator[None]:
        self._lock.acquire()
        self._local.held = True
        try:
            yield
        finally:
            self._local.held = False
            self._lock.release()

    @contextmanager
    def released(self) -> Iterator[None]:
        """Give the lane up for the duration (a no-op in a thread that does not hold it)."""
        if not getattr(self._local, "held", False):
            yield
            return
        self._local.held = False
        self._lock.release()
        try:
            yield
        finally:
            self._lock.acquire()
            self._local.held = True


class WorkerPool(service.Service):
    """At most ``threads`` worker threads; ``run(f, ...)`` calls ``f`` in one of them."""

    def __init__(self, reactor: Any, threads: int, name: str = "mailauth") -> None:
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name=name)
        self.lane = Lane()
        self._accepting = False

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.pool.start()
        self._accepting = True

    def stopService(self) -> Deferred[None]:
        """Stop taking work and join the threads.

        The join happens in a plain thread, not on the reactor: a worker may be waiting for a
        DNS answer that only the running reactor can deliver, so blocking the reactor on the
        join could wait for that worker's whole deadline.
        """
        super().stopService()  # type: ignore[no-untyped-call]
        self._accepting = False
        done: Deferred[None] = Deferred()

        def join() -> None:
            self.pool.stop()
            self.reactor.callFromThread(done.callback, None)

        threading.Thread(target=join, name="mailauth-pool-stop", daemon=True).start()
        return done

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """``f(*args, **kwargs)`` in a worker thread, holding the lane; the Deferred fires on
        the reactor."""
        if not self._accepting:
            return defer.fail(WorkersStopped("the mail-auth worker pool is not running"))

        def in_lane() -> T:
            with self.lane.held():
                return f(*args, **kwargs)

        return threads.deferToThreadPool(self.reactor, self.pool, in_lane)
