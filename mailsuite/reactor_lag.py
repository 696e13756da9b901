"""How long the reactor thread was kept from its timers: a probe, exported on ``/metrics``.

Every protocol of the server runs on the one reactor thread, so anything that holds it (a
blocking call, a long computation, a thread that keeps the GIL) delays every session at once.
The probe is a timer that re-arms itself every :data:`INTERVAL` seconds and records how late
it fired (its *lag*).  A stall of S seconds shows as a lag between S - INTERVAL and S, so the
resolution is INTERVAL (10 ms, the resolution of Node's ``monitorEventLoopDelay``); the cost is
a few microseconds of Python per tick (about 0.1% of a core).

Exported, collected off the reactor thread like every other metric:

- ``mailsuite_reactor_lag_seconds`` (gauge): the largest lag in the last :data:`WINDOW`
  seconds -- what a dashboard alerts on ("the reactor stalled for more than 50 ms");
- ``mailsuite_reactor_tick_lag_seconds`` (histogram): every tick's lag, so the stalls
  between two scrapes can be counted from the bucket deltas (the benchmarks do this).

With worker processes every process has its own reactor and its own probe, and ``/metrics``
is answered by whichever worker takes the request, so a collector reading one process's
memory would show that worker's figures: a stall of the other worker missed, the histogram's
counts going backwards from one scrape to the next.  There the probe publishes into
prometheus-client's multiprocess files instead (:meth:`ReactorLag.publish`): the gauge as the
largest over the live processes (``livemax``), the histogram summed over all of them.
"""

from __future__ import annotations

import gc
import math
from collections import deque
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from twisted.application import service

__all__ = ["BUCKETS", "INTERVAL", "WINDOW", "ReactorLag", "freeze_startup_objects"]

#: seconds between the probe's ticks: its resolution
INTERVAL = 0.01
#: seconds the gauge looks back
WINDOW = 10
#: histogram bucket bounds (seconds); the last, +Inf, is implicit
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def freeze_startup_objects() -> None:
    """Collect the garbage of the start, then move every object alive (modules, Twisted, the
    Public Suffix List, compiled scripts...) out of the garbage collector's sight
    (``gc.freeze``).

    The one stall the probe found that was not our code: CPython's full collection walks every
    tracked object, about 60,000 in a started server, which took 80-150 ms on the reactor
    thread (or on a worker holding the GIL) whenever enough new objects had survived -- under
    load, every few seconds.  What lives from the start lives until the end, so scanning it
    again finds nothing; after the freeze a full collection scans only what came after.
    Called by ``makeService`` once the server is built, before the reactor runs (the full
    collection of a new server's ~70,000 objects took 60 ms; as the reactor's first act it
    was a stall of every start), and again after anything big is loaded later (the Public
    Suffix List, by the mail-auth workers)."""
    gc.collect()
    gc.freeze()


class ReactorLag(service.Service, Collector):
    """The probe (a Service: it ticks while the server runs) and its collector (register it
    with the server's registry).  ``reactor`` needs ``callLater`` and ``seconds``."""

    def __init__(self, reactor: Any, interval: float = INTERVAL, window: int = WINDOW) -> None:
        self.reactor = reactor
        self.interval = interval
        self.window = window
        self._call: Any = None
        self._due = 0.0
        #: (whole second, largest lag in it), the last ``window`` seconds that had a tick
        self._maxima: deque[tuple[int, float]] = deque(maxlen=window + 1)
        self._counts = [0] * (len(BUCKETS) + 1)  # per bucket, not cumulative; last is +Inf
        self._sum = 0.0
        #: with worker processes (see :meth:`publish`): where every tick goes as well
        self._gauge: Any = None
        self._histogram: Any = None
        self._published = (-1, 0.0)  # (second, value) last set on the gauge

    def publish(self, gauge: Any, histogram: Any) -> None:
        """Also count every tick into ``histogram`` and keep ``gauge`` at :meth:`largest`:
        prometheus-client metrics in multiprocess mode, which ``/metrics`` adds up over every
        process of the server (see the module docstring).  The gauge is set when a tick beats
        its value or a new second starts (an old stall leaves the window then): a few
        microseconds a tick, nothing when nothing changed."""
        self._gauge, self._histogram = gauge, histogram

    def descriptions(self) -> tuple[str, str]:
        """The help texts of the gauge and the histogram (one wording for both ways of
        exporting them)."""
        ms = f"{self.interval * 1000:g} ms"
        return (
            f"Largest delay of the reactor's {ms} probe timer in the last {self.window} s "
            "(how long the reactor thread was held).",
            f"Delay of each tick of the reactor's {ms} probe timer.",
        )

    # -- the probe (reactor thread) ----------------------------------------------------------

    def startService(self) -> None:
        """Arm the first tick once the reactor runs (at once if it does already).

        twistd starts the services before it runs the reactor; a tick armed then would count
        the rest of the start (other services, the reactor's own start-up) as the reactor's
        lag: one 60-90 ms "stall" in the gauge of every new server, on a reactor that was
        not running yet.  A reactor without ``callWhenRunning`` (a test clock) runs."""
        service.Service.startService(self)
        when_running = getattr(self.reactor, "callWhenRunning", None)
        if when_running is None:
            self._begin()
        else:
            when_running(self._begin)

    def _begin(self) -> None:
        if self.running and self._call is None:
            self._arm(self.reactor.seconds())

    def stopService(self) -> None:
        service.Service.stopService(self)
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _arm(self, now: float) -> None:
        self._due = now + self.interval
        self._call = self.reactor.callLater(self.interval, self._tick)

    def _tick(self) -> None:
        now = self.reactor.seconds()
        self.record(max(0.0, now - self._due))
        self._arm(now)

    def record(self, lag: float) -> None:
        """Count one tick that came ``lag`` seconds late."""
        second = int(self.reactor.seconds())
        maxima = self._maxima
        if maxima and maxima[-1][0] == second:
            if lag > maxima[-1][1]:
                maxima[-1] = (second, lag)
        else:
            maxima.append((second, lag))
        i = 0
        while i < len(BUCKETS) and lag > BUCKETS[i]:
            i += 1
        self._counts[i] += 1
        self._sum += lag
        if self._histogram is not None:
            self._histogram.observe(lag)
            at, value = self._published
            if at != second or lag > value:
                value = self.largest()
                self._published = (second, value)
                self._gauge.set(value)

    # -- the collector (any thread: reads copies) --------------------------------------------

    def largest(self) -> float:
        """The largest lag of the last ``window`` seconds (0 before the first tick)."""
        since = int(self.reactor.seconds()) - self.window
        return max((lag for second, lag in list(self._maxima) if second > since), default=0.0)

    def describe(self) -> Iterator[Any]:
        yield GaugeMetricFamily("mailsuite_reactor_lag_seconds", "")
        yield HistogramMetricFamily("mailsuite_reactor_tick_lag_seconds", "")

    def collect(self) -> Iterator[Any]:
        gauge_doc, histogram_doc = self.descriptions()
        gauge = GaugeMetricFamily("mailsuite_reactor_lag_seconds", gauge_doc)
        gauge.add_metric([], self.largest())
        yield gauge
        counts = list(self._counts)
        total = self._sum
        cumulative: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*BUCKETS, math.inf), counts, strict=True):
            running += n
            cumulative.append(("+Inf" if bound == math.inf else repr(bound), running))
        histogram = HistogramMetricFamily("mailsuite_reactor_tick_lag_seconds", histogram_doc)
        histogram.add_metric([], cumulative, sum_value=total)
        yield histogram
