"""A dedicated thread pool for the blocking half of mail authentication.

dkimpy and pyspf are synchronous: they do RSA in pure Python and call a DNS function that must
return an answer before they go on.  They run here whenever they may have to wait for DNS
(see :mod:`~mailsuite.mailauth.inbound` for the cached case run at once), and not in the
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

import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from twisted.application import service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

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
    """``threads`` worker threads; ``run(f, ...)`` calls ``f`` in one of them.

    Not twisted's ThreadPool: handing a job to it runs its team coordinator's Python on the
    caller's thread (about 0.1 ms a job, on the reactor, for every message checked).  Here a
    job is one ``SimpleQueue.put`` on the reactor and one ``callFromThread`` back; the
    threads are started with the service and wait on the queue.
    """

    def __init__(self, reactor: Any, threads: int, name: str = "mailauth") -> None:
        self.reactor = reactor
        self.size = threads
        self.thread_name = name
        self.lane = Lane()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._accepting = False

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._threads = [
            threading.Thread(
                target=self._work, name=f"PoolThread-{self.thread_name}-{i}", daemon=True
            )
            for i in range(self.size)
        ]
        for t in self._threads:
            t.start()
        self._accepting = True

    def stopService(self) -> Deferred[None]:
        """Stop taking work, let the threads finish what was handed to them, and join them.

        The join happens in a plain thread, not on the reactor: a worker may be waiting for a
        DNS answer that only the running reactor can deliver, so blocking the reactor on the
        join could wait for that worker's whole deadline.
        """
        super().stopService()  # type: ignore[no-untyped-call]
        self._accepting = False
        done: Deferred[None] = Deferred()
        workers, self._threads = self._threads, []
        for _ in workers:
            self._jobs.put(None)  # one stop mark each, behind the work already queued

        def join() -> None:
            for t in workers:
                t.join()
            self.reactor.callFromThread(done.callback, None)

        threading.Thread(target=join, name=f"{self.thread_name}-stop", daemon=True).start()
        return done

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """``f(*args, **kwargs)`` in a worker thread, holding the lane; the Deferred fires on
        the reactor."""
        if not self._accepting:
            return defer.fail(WorkersStopped("the mail-auth worker pool is not running"))
        d: Deferred[T] = Deferred()
        self._jobs.put((d, f, args, kwargs))
        return d

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            d, f, args, kwargs = job
            del job
            try:
                with self.lane.held():
                    result = f(*args, **kwargs)
            except BaseException:
                self.reactor.callFromThread(d.errback, Failure())
            else:
                self.reactor.callFromThread(d.callback, result)
            del d, f, args, kwargs  # nothing of this job kept while waiting for the next


_Job = tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]
