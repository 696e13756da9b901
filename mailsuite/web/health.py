"""``GET /healthz``: 200 ``ok`` when every listener is listening and the data folders take
writes, 503 with one line per problem otherwise (for load balancers, systemd watchdogs,
Kubernetes probes and uptime checks).

The folder check writes, fsyncs and removes a small file in each folder: that is what finds a
full disk, a read-only remount or a failing device, which a permission check would not.  It
runs in the reactor's thread pool; concurrent requests share one check, and a check that takes
longer than :data:`PROBE_TIMEOUT` (a stalled disk) is reported as a problem.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads
from twisted.web import http, server

from mailsuite.web.site import Endpoint, finish

PROBE_TIMEOUT = 5.0
PROBE_PREFIX = ".healthz-"


def probe_folders(folders: Sequence[Path]) -> list[str]:
    """Write, fsync and remove a file in each folder; one line per folder that failed.
    Blocking: run it in a thread."""
    problems = []
    for folder in folders:
        probe = folder / f"{PROBE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, b"ok\n")
                os.fsync(fd)
            finally:
                os.close(fd)
                with contextlib.suppress(FileNotFoundError):
                    probe.unlink()
        except OSError as e:
            problems.append(f"{folder} is not writable: {e.strerror or e}")
    return problems


class HealthCheck:
    """The server's health: ``listeners()`` gives one problem text per listener that is not
    listening (see :meth:`mailsuite.service._Listener.problem`)."""

    def __init__(
        self,
        listeners: Callable[[], Iterable[str | None]],
        folders: Sequence[Path],
        reactor: Any,
    ) -> None:
        self.listeners = listeners
        self.folders = tuple(folders)
        self.reactor = reactor
        self._waiting: list[defer.Deferred[list[str]]] | None = None

    def problems(self) -> defer.Deferred[list[str]]:
        """Everything wrong now (empty: healthy)."""
        listening = [p for p in self.listeners() if p]
        d = self._folder_problems()
        d.addCallback(lambda folders: listening + folders)
        return d

    def _folder_problems(self) -> defer.Deferred[list[str]]:
        mine: defer.Deferred[list[str]] = defer.Deferred()
        mine.addTimeout(
            PROBE_TIMEOUT,
            self.reactor,
            onTimeoutCancel=lambda _result, timeout: [
                f"writing to the data folder took longer than {timeout:g} s"
            ],
        )
        if self._waiting is not None:  # a check is running: share its answer
            self._waiting.append(mine)
            return mine
        waiting = self._waiting = [mine]

        def done(result: Any) -> None:
            self._waiting = None
            if not isinstance(result, list):
                result = [f"checking the data folder failed: {result.getErrorMessage()}"]
            for d in waiting:
                if not d.called:
                    d.callback(result)

        threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), probe_folders, self.folders
        ).addBoth(done)
        return mine


class HealthResource(Endpoint):
    """``GET /healthz``."""

    def __init__(self, check: HealthCheck) -> None:
        super().__init__()
        self.check = check

    def answer(self, request: Any) -> int:
        def answered(problems: list[str]) -> None:
            if problems:
                finish(request, http.SERVICE_UNAVAILABLE, "".join(p + "\n" for p in problems))
            else:
                finish(request, http.OK, "ok\n")

        self.check.problems().addCallback(answered)
        return server.NOT_DONE_YET
