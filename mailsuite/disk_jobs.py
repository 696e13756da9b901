"""The threads that do local delivery's file work (create, write, fsync, rename, directory fsync).

Not the reactor's thread pool: handing a job to Twisted's ``ThreadPool`` runs its team
coordinator's Python on the reactor thread, and the worker's side takes more locks and a
``Queue`` condition on the way back (measured on a 4 KiB SMTP message over a new connection:
about a tenth of the server's Python time per message was the pool's bookkeeping, and
``Condition.notify`` the single biggest line).  Here a job is one ``SimpleQueue.put`` on the
reactor and, on the way back, an append to a list of finished jobs -- the design of the
mail-authentication pool (:class:`mailsuite.mailauth.workers.WorkerPool`), without its lane:
delivery jobs spend their time in fsync, which must overlap, not queue behind one another.

Finished jobs come back in batches: the first job to finish while none is waiting for the
reactor calls ``callFromThread`` (a write to the reactor's waker, a wake-up, a read); the
ones that finish before the reactor got to that call join it.  Under load (20 sessions,
ten fsyncs in flight that end with the same journal commit) that is one wake-up for several
messages instead of one each.

The threads start with the first job and end when the reactor shuts down, at the moment
Twisted stops its own pool ("during shutdown"): every service has stopped by then, so a
session that finishes its message while the server drains still gets its fsync and its 250.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

__all__ = ["DiskJobs"]

T = TypeVar("T")

#: As many threads as Twisted's pool has by default: with 20 sessions, ten fsyncs in flight
#: keep the disk's queue full (more only wait on the same journal/flush).
DEFAULT_THREADS = 10

_Job = tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...]]
#: a finished job: its Deferred, whether it raised, its result or Failure
_Done = tuple[Deferred[Any], bool, Any]


class DiskJobs:
    """``run(f, *args)`` calls ``f`` in one of ``threads`` threads; the Deferred fires on the
    reactor thread with its result (or its exception)."""

    def __init__(self, reactor: Any, threads: int = DEFAULT_THREADS, name: str = "disk") -> None:
        self.reactor = reactor
        self.size = threads
        self.name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._stopped = False
        #: finished jobs not yet handed to the reactor thread, and whether a call to
        #: :meth:`_fire` is on its way (both under ``_lock``)
        self._done: list[_Done] = []
        self._fire_pending = False
        self._lock = threading.Lock()

    def run(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        if self._stopped:
            return defer.fail(RuntimeError("the disk threads have stopped (shutdown)"))
        if not self._threads:
            self._start()
        d: Deferred[T] = Deferred()
        self._jobs.put((d, f, args))
        return d

    def _start(self) -> None:
        self._threads = [
            threading.Thread(target=self._work, name=f"{self.name}-{i}", daemon=True)
            for i in range(self.size)
        ]
        for t in self._threads:
            t.start()
        self.reactor.addSystemEventTrigger("during", "shutdown", self.stop)

    def stop(self) -> None:
        """Finish the jobs handed over, then end the threads (blocking, like Twisted's own
        pool at shutdown: these jobs are disk writes, never waits on the network)."""
        self._stopped = True
        workers, self._threads = self._threads, []
        for _ in workers:
            self._jobs.put(None)  # one stop mark each, behind the jobs already queued
        for t in workers:
            t.join()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            d, f, args = job
            del job
            done: _Done
            try:
                done = (d, False, f(*args))
            except BaseException:
                done = (d, True, Failure())
            self._finished(done)
            del d, f, args, done  # nothing of this job kept while waiting for the next

    def _finished(self, done: _Done) -> None:
        """Queue a finished job for the reactor thread; wake it only when no wake-up is on
        its way already (see the module docstring)."""
        with self._lock:
            self._done.append(done)
            if self._fire_pending:
                return
            self._fire_pending = True
        self.reactor.callFromThread(self._fire)

    def _fire(self) -> None:
        """In the reactor thread: fire the Deferreds of every job finished so far, in the
        order they finished."""
        with self._lock:
            batch, self._done = self._done, []
            self._fire_pending = False
        for d, failed, value in batch:
            if failed:
                d.errback(value)
            else:
                d.callback(value)
