"""The global Twisted reactor running in a daemon thread, for tests that drive Twisted code
(the SMTP client, the DNS resolver, TLS) from ordinary blocking test functions.

Started once per pytest process and never stopped: a reactor cannot be restarted, and
several test modules share it.  The servers under test in integration tests run as child
processes instead, so this never competes with them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import blockingCallFromThread

_lock = threading.Lock()


def running_reactor() -> Any:
    """The global reactor, started in a daemon thread if it is not running yet."""
    from twisted.internet import reactor

    with _lock:
        if not reactor.running:
            threading.Thread(
                target=reactor.run,
                kwargs={"installSignalHandlers": False},
                name="twisted-reactor",
                daemon=True,
            ).start()
            ready = threading.Event()
            reactor.callFromThread(ready.set)
            if not ready.wait(10):
                raise RuntimeError("the reactor did not start")
    return reactor


def in_reactor(reactor: Any, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``f`` in the reactor thread and wait for its (possibly Deferred) result."""
    return blockingCallFromThread(reactor, lambda: defer.maybeDeferred(f, *args, **kwargs))


class StallProbe:
    """Measures how late the reactor gets: a 5 ms LoopingCall records the time between its
    ticks, so the longest gap is the longest time the reactor was busy with something else
    (a check run at once, a callback holding the GIL).  ``start``/``stop`` run in the
    reactor's thread; ``reset`` forgets what was seen so far."""

    def __init__(self, interval: float = 0.005) -> None:
        import time

        from twisted.internet import task

        self._now = time.monotonic
        self.interval = interval
        self.gaps: list[float] = []
        self._last = self._now()
        self._loop = task.LoopingCall(self._tick)

    def _tick(self) -> None:
        now = self._now()
        self.gaps.append(now - self._last)
        self._last = now

    def start(self) -> None:
        """Start ticking (call in the reactor's thread)."""
        self.reset()
        self._loop.start(self.interval, now=True)

    def stop(self) -> None:
        """Stop ticking (call in the reactor's thread)."""
        self._loop.stop()

    def reset(self) -> None:
        """Forget the gaps seen so far; the next tick measures from now."""
        self.gaps.clear()
        self._last = self._now()

    def longest(self) -> float:
        """The longest gap after the first tick (the first one only measures the start)."""
        return max(self.gaps[1:], default=0.0)
