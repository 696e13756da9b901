"""One worker process of ``[server] workers`` > 1: ``python -m mailsuite.worker``.

Started by :class:`mailsuite.workers.WorkerSupervisor` with the listening sockets on file
descriptors 10, 11, ... (``--listener service:fd:family``), a pipe on fd 3 to tell the
supervisor's queue runner of new entries, and with ``--log-lines FORMAT`` a pipe on fd 4 for
its log lines, formatted here as the server log has them (:mod:`mailsuite.loglines`; without
it, JSON events on stdout, which the supervisor publishes).  It serves every configured
protocol on the adopted sockets with the same factories a single-process server uses
(:func:`mailsuite.service.listener_factories`), and shares throttling and connection counts
with the other workers (:mod:`mailsuite.shared.counters`).

It dies with the supervisor (``PR_SET_PDEATHSIG``, and a check of the parent pid), so a
``kill -9`` of the server leaves no worker holding its ports.  On SIGTERM it stops accepting,
lets open sessions end for up to :data:`SHUTDOWN_GRACE` seconds, closes what is left, exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

# Nothing heavier than the standard library is imported before _die_with_parent: until the
# kernel is asked to end this process with its supervisor, a supervisor killed meanwhile
# would leave it holding the listening sockets while it imports Twisted (seconds, on a
# loaded machine), and the next start could not bind them.


def _parent_from(argv: Sequence[str]) -> int:
    """The ``--parent PID`` argument, read before argparse is imported (0 when missing)."""
    for i, arg in enumerate(argv[:-1]):
        if arg == "--parent" and argv[i + 1].isdigit():
            return int(argv[i + 1])
    return 0


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
    parent = _parent_from(sys.argv if argv is None else ["", *argv])
    _die_with_parent(parent)
    import argparse
    from pathlib import Path

    from twisted.internet import task
    from twisted.logger import Logger, globalLogBeginner, jsonFileLogObserver

    from mailsuite.config import ConfigError, load_config
    from mailsuite.stopping import stop_once
    from mailsuite.worker_service import FAMILIES, QUEUE_PIPE_FD, READY, worker_service

    log = Logger(namespace="mailsuite.worker")
    parser = argparse.ArgumentParser(prog="mailsuite.worker")
    parser.add_argument("--config")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--listener", action="append", default=[])
    parser.add_argument("--connections", required=True)
    parser.add_argument("--log-lines", choices=("text", "json"))
    args = parser.parse_args(argv)
    if args.log_lines:
        from mailsuite.loglines import WorkerLines, formatter
        from mailsuite.workers import LOG_LINES_FD

        observer: Any = WorkerLines(LOG_LINES_FD, args.index, formatter(args.log_lines))
    else:
        observer = jsonFileLogObserver(sys.stdout)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    listeners = []
    for spec in args.listener:
        name, fd, family = spec.split(":")
        listeners.append((name, int(fd), FAMILIES[family]))
    from twisted.internet import reactor

    try:
        config = load_config(args.config)
        top = worker_service(
            config, reactor, listeners, QUEUE_PIPE_FD, args.index, Path(args.connections)
        )
    except ConfigError as e:  # the supervisor checked it; the file changed since
        print(f"mailsuite worker: {e}", file=sys.stderr)
        return 1
    from mailsuite.reactor_lag import freeze_startup_objects

    freeze_startup_objects()  # as makeService does: no full collection of all this later

    # Ctrl-C in a terminal sends SIGINT to every process of the group, so a worker gets it
    # from the terminal and SIGTERM from the supervisor passing it on: stop once.
    stop_once(reactor)

    def on_signal(number: int, frame: object) -> None:
        log.info("received {signal}, shutting down", signal=signal.Signals(number).name)
        reactor.callFromThread(reactor.stop)  # type: ignore[attr-defined]  # (it has it)

    def own_signals() -> None:  # after Twisted installed its handlers ("during startup")
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, on_signal)

    reactor.addSystemEventTrigger("after", "startup", own_signals)

    def orphaned() -> None:
        if os.getppid() != args.parent:
            log.warn("the supervisor is gone: stopping")
            reactor.stop()

    watch = task.LoopingCall(orphaned)
    watch.clock = reactor
    reactor.callWhenRunning(watch.start, 1.0, now=False)

    def start() -> None:
        top.startService()
        with contextlib.suppress(OSError):  # tell the supervisor this worker accepts now
            os.write(QUEUE_PIPE_FD, READY)

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
