"""Remove what interrupted writes left behind, at start and once a day.

A delivery, an APPEND or a queue write that is cut short (kill -9, power loss, a full disk)
leaves a file in a ``tmp/`` folder that nothing will ever rename.  The Maildir convention
(maildir(5): "a program should delete any file in tmp that has not been accessed in 36
hours") says when such a file is certainly dead: no writer keeps a file open that long, and
this server caps an SMTP session at ``[smtp] session_timeout``.  Swept here:

* ``tmp/`` of every folder (INBOX and each ``.Folder``) of every user in the directory;
* ``<data_dir>/spool/incoming`` (messages for remote recipients only, while they arrive);
* the queue's ``tmp/`` (its start-up cleanup empties it; this catches what a long-running
  server's failed writes leave).

The file system work runs in the reactor's thread pool, never on the reactor thread (a big
tree takes a while to scan).  Our own code; Twisted has nothing like it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsuite.runtime import Runtime
from mailsuite.store.maildir import maildir_folders, remove_stale

log = Logger(namespace="mailsuite.leftovers")

#: maildir(5): files in tmp/ not accessed for 36 hours are garbage.
STALE_AFTER = 36 * 3600
#: how often the sweep runs after the one at start.
SWEEP_EVERY = 24 * 3600


def sweep(
    user_roots: Iterable[Path], other_dirs: Iterable[Path], cutoff: float
) -> tuple[list[Path], list[str]]:
    """Remove files not touched since ``cutoff`` from the ``tmp/`` of every folder under each
    user root and from each of ``other_dirs``.  Returns (removed, problems): a folder that
    cannot be read is reported and skipped, the others are still swept.  Blocking."""
    removed: list[Path] = []
    problems: list[str] = []
    directories: list[Path] = []
    for root in user_roots:
        try:
            directories.extend(folder / "tmp" for folder in maildir_folders(root))
        except OSError as e:
            problems.append(f"{root}: {e.strerror or e}")
    directories.extend(other_dirs)
    for directory in directories:
        try:
            removed.extend(remove_stale(directory, cutoff))
        except OSError as e:
            problems.append(f"{directory}: {e.strerror or e}")
    return removed, problems


class LeftoverSweeper(service.Service):
    """Runs :func:`sweep` over the server's data at start and every :data:`SWEEP_EVERY`."""

    def __init__(
        self,
        runtime: Runtime,
        clock: Any = None,
        blocking: Callable[..., defer.Deferred[Any]] | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.runtime = runtime
        self.clock = clock if clock is not None else runtime.reactor
        if blocking is None:
            reactor = runtime.reactor

            def blocking(f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
                return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

        self._blocking = blocking
        self._now = now  # wall clock: file times are wall-clock times
        self._loop: task.LoopingCall | None = None

    def startService(self) -> None:
        service.Service.startService(self)
        self._loop = task.LoopingCall(self.sweep_now)
        self._loop.clock = self.clock
        self._loop.start(SWEEP_EVERY, now=True)

    def stopService(self) -> Any:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return service.Service.stopService(self)

    def sweep_now(self) -> defer.Deferred[None]:
        """One sweep; never fails (a problem is logged and the next sweep tries again)."""
        runtime = self.runtime
        roots = []
        for user in runtime.directory.users():
            try:
                roots.append(runtime.directory.mailbox_root(user))
            except ValueError:
                continue  # not a name a mailbox can have: it has no folder to sweep
        others = [runtime.config.data_dir / "spool" / "incoming"]
        if runtime.queue is not None:
            others.append(runtime.queue.tmp_dir)
        cutoff = self._now() - STALE_AFTER
        d = self._blocking(sweep, roots, others, cutoff)

        def done(result: tuple[list[Path], list[str]]) -> None:
            removed, problems = result
            if removed:
                log.info(
                    "Removed {n} leftover temporary files older than 36 hours: {names}",
                    n=len(removed),
                    names=", ".join(str(p) for p in removed[:10]),
                )
            for problem in problems:
                log.warn("Cannot sweep leftover temporary files in {problem}", problem=problem)

        def failed(f: Failure) -> None:
            log.failure("Sweeping leftover temporary files failed", f)

        return d.addCallbacks(done, failed)
