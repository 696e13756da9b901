"""The reactor of a server process stops once, however many ask.

Twisted's SIGTERM and SIGINT handlers each call ``reactor.stop()`` (from the reactor's
thread), and a second call raises ReactorNotRunning, which the reactor logs as a critical
traceback.  A second signal before the server has stopped is ordinary: ``systemctl stop``
and an impatient ``kill``, ``timeout`` passing its own SIGTERM on, Ctrl-C reaching every
process of the group while the supervisor passes SIGTERM on to its workers.  So a server
process (twistd's, and each worker) makes its reactor's ``stop`` idempotent here, once, at
start; the handlers stay Twisted's (their log line, and twistd ending by the signal it got).
"""

from __future__ import annotations

import contextlib
from typing import Any

from twisted.internet.error import ReactorNotRunning

__all__ = ["stop_once"]


def stop_once(reactor: Any) -> None:
    """Make ``reactor.stop`` a no-op once the reactor is stopping (idempotent itself)."""
    stop = reactor.stop
    if getattr(stop, "mailsuite_once", False):
        return

    def once() -> None:
        with contextlib.suppress(ReactorNotRunning):
            stop()

    once.mailsuite_once = True  # type: ignore[attr-defined]
    reactor.stop = once
