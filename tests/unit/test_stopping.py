"""``mailsuite.stopping.stop_once``: a reactor's second ``stop`` is a no-op, not a
ReactorNotRunning (which the reactor logs as a critical traceback)."""

from __future__ import annotations

import pytest
from twisted.internet.error import ReactorNotRunning

from mailsuite.stopping import stop_once


class Reactor:
    def __init__(self) -> None:
        self.stops = 0
        self.stopped = False

    def stop(self) -> None:
        if self.stopped:
            raise ReactorNotRunning("Can't stop reactor that isn't running.")
        self.stopped = True
        self.stops += 1


def test_a_second_stop_is_a_no_op() -> None:
    r = Reactor()
    r.stop()
    with pytest.raises(ReactorNotRunning):  # what it guards against
        r.stop()
    r = Reactor()
    stop_once(r)
    r.stop()
    r.stop()
    assert r.stops == 1


def test_making_it_twice_wraps_once() -> None:
    r = Reactor()
    stop_once(r)
    first = r.stop
    stop_once(r)
    assert r.stop is first
