"""A dedicated thread pool for the blocking half of mail authentication.

dkimpy and pyspf are synchronous: they do RSA in pure Python and call a DNS function that must
return an answer before they go on.  They run here, never on the reactor thread, and not in the
reactor's default pool either: local delivery does its fsyncs there, and a burst of messages
waiting on slow DNS must not hold up the disk writes of every other session.  The pool is a
twisted Service, started and stopped with the server.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.application import service
from twisted.internet import defer, threads
from twisted.internet.defer import Deferred
from twisted.python.threadpool import ThreadPool

__all__ = ["WorkerPool", "WorkersStopped"]

T = TypeVar("T")


class WorkersStopped(RuntimeError):
    """Work was handed to the pool while it is not running (before start, or after stop)."""


class WorkerPool(service.Service):
    """At most ``threads`` worker threads; ``run(f, ...)`` calls ``f`` in one of them."""

    def __init__(self, reactor: Any, threads: int, name: str = "mailauth") -> None:
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name=name)
        self._accepting = False

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self.pool.start()
        self._accepting = True

    def stopService(self) -> Deferred[None]:  # noqa: N802
        """Stop taking work and join the threads.

        The join happens in a plain thread, not on the reactor: a worker may be waiting for a
        DNS answer that only the running reactor can deliver, so blocking the reactor on the
        join could wait for that worker's whole deadline.
        """
        super().stopService()
        self._accepting = False
        done: Deferred[None] = Deferred()

        def join() -> None:
            self.pool.stop()
            self.reactor.callFromThread(done.callback, None)

        threading.Thread(target=join, name="mailauth-pool-stop", daemon=True).start()
        return done

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """``f(*args, **kwargs)`` in a worker thread; the Deferred fires on the reactor."""
        if not self._accepting:
            return defer.fail(WorkersStopped("the mail-auth worker pool is not running"))
        return threads.deferToThreadPool(self.reactor, self.pool, f, *args, **kwargs)
