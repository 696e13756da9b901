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
