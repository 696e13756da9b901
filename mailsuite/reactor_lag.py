"""How long the reactor thread was kept from its timers: a probe, exported on ``/metrics``.

Every protocol of the server runs on the one reactor thread, so anything that holds it (a
blocking call, a long computation, a thread that keeps the GIL) delays every session at once.
The probe is a timer that re-arms itself every :data:`INTERVAL` seconds and records how late
it fired (its *lag*).  A stall of S seconds shows as a lag between S - INTERVAL and S, so the
resolution is INTERVAL (10 ms, the resolution of Node's ``monitorEventLoopDelay``); the cost is
a few microseconds of Python per tick (about 0.1% of a core).

An idle server does not need 100 wake-ups a second to learn that nothing held it: on this
machine each cost ~170 us of CPU, 17-21 ms a second per process, 60 ms a second for a server
with two workers doing nothing (2 ms without the probe) -- what a laptop running the sandbox
pays in battery.  So the probe slows down to one tick a second (:data:`IDLE_INTERVAL`) after
:data:`IDLE_AFTER` ticks in a row in which the reactor handled no I/O event (only timers:
its own and the server's periodic ones), and is back to every 10 ms at the first event (the
event dispatch tells it, :func:`mailsuite.reactor_dispatch.lean_dispatch`), before that
event's work runs: a stall that I/O causes is measured as before.  What a slow probe can miss
is a stall of a timer's callback on an otherwise idle server that ends before its next tick;
a reactor without that dispatch (a test's clock) keeps the fast probe.

Exported, collected off the reactor thread like every other metric:

- ``mailsuite_reactor_lag_seconds`` (gauge): the largest lag in the last :data:`WINDOW`
  seconds -- what a dashboard alerts on ("the reactor stalled for more than 50 ms");
- ``mailsuite_reactor_tick_lag_seconds`` (histogram): every tick's lag, so the stalls
  between two scrapes can be counted from the bucket deltas (the benchmarks do this);
- ``mailsuite_reactor_held_seconds`` (gauge): the largest held part of a lag in the last
  :data:`WINDOW` seconds (the lag less the run-queue wait): the stall our code made.

A late tick has two causes that call for different fixes: the reactor thread was busy or
blocked (our code, a GC pause, a thread holding the GIL) or it was ready to run and waited for
a CPU (a machine whose cores are all busy: the benchmark's load generator and the peer
server share the two cores of the test machine, and a waking process waited 20-60 ms for one
in every run, the same with mail authentication on or off).  The probe tells them apart with
the thread's run-queue wait from Linux (``/proc/thread-self/schedstat``, its second field:
nanoseconds spent runnable but not running), read at every tick: the tick's lag minus what
the thread waited in the run queue since the previous tick is the time the reactor was
*held*, what the server's own work cost its sessions.  Where that file is missing (another
system, a kernel without scheduler statistics) the held figure is the whole lag.

With worker processes every process has its own reactor and its own probe, and ``/metrics``
is answered by whichever worker takes the request, so a collector reading one process's
memory would show that worker's figures: a stall of the other worker missed, the histogram's
counts going backwards from one scrape to the next.  There the probe publishes into
prometheus-client's multiprocess files instead (:meth:`ReactorLag.publish`): the gauge as the
largest over the live processes (``livemax``), the histogram summed over all of them.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from twisted.application import service

__all__ = [
    "BUCKETS",
    "IDLE_AFTER",
    "IDLE_INTERVAL",
    "INTERVAL",
    "WINDOW",
    "ReactorLag",
    "RunQueueWait",
    "freeze_startup_objects",
]

#: seconds between the probe's ticks: its resolution
INTERVAL = 0.01
#: seconds the gauge looks back
WINDOW = 10
#: ticks in a row without an I/O event after which the probe slows down (1 s), and its
#: interval then (see the module docstring)
IDLE_AFTER = 100
IDLE_INTERVAL = 1.0
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


class RunQueueWait:
    """Seconds the calling thread has waited for a CPU so far (Linux scheduler statistics),
    read from a file opened once: ``/proc/thread-self`` names the thread that opens it, so
    the probe opens it on the reactor thread.  About 3 us a read.  ``None`` when the system
    does not give the figure."""

    PATH = "/proc/thread-self/schedstat"

    def __init__(self) -> None:
        self._fd: int | None = None
        try:
            self._fd = os.open(self.PATH, os.O_RDONLY | os.O_CLOEXEC)
            self()
        except (OSError, ValueError, IndexError):
            self.close()

    def __call__(self) -> float | None:
        if self._fd is None:
            return None
        # "<ns on a CPU> <ns runnable, waiting for one> <time slices>\n"
        return int(os.pread(self._fd, 128, 0).split()[1]) / 1e9

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class ReactorLag(service.Service, Collector):
    """The probe (a Service: it ticks while the server runs) and its collector (register it
    with the server's registry).  ``reactor`` needs ``callLater`` and ``seconds``;
    ``run_queue`` gives the reactor thread's run-queue wait so far in seconds (or None), made
    on the reactor thread when the probe begins (default :class:`RunQueueWait`; tests pass
    their own)."""

    def __init__(
        self,
        reactor: Any,
        interval: float = INTERVAL,
        window: int = WINDOW,
        run_queue: Callable[[], Callable[[], float | None]] = RunQueueWait,
    ) -> None:
        self.reactor = reactor
        self.interval = interval
        self.window = window
        self._call: Any = None
        self._due = 0.0
        self._make_run_queue = run_queue
        #: the dispatcher's list of activity callbacks we are in (None: no idle mode)
        self._activity: list[Callable[[], None]] | None = None
        self._event_seen = False  # an I/O event since the last tick
        self._quiet = 0  # ticks in a row without one
        self._slow = False
        self._run_queue: Callable[[], float | None] | None = None
        self._waited: float | None = None  # the run-queue wait at the previous tick
        #: (whole second, largest lag in it), the last ``window`` seconds that had a tick
        self._maxima: deque[tuple[int, float]] = deque(maxlen=window + 1)
        #: the same for the held part of each lag
        self._held: deque[tuple[int, float]] = deque(maxlen=window + 1)
        self._counts = [0] * (len(BUCKETS) + 1)  # per bucket, not cumulative; last is +Inf
        self._sum = 0.0
        #: with worker processes (see :meth:`publish`): where every tick goes as well
        self._gauge: Any = None
        self._histogram: Any = None
        self._held_gauge: Any = None
        self._published = (-1, 0.0, 0.0)  # (second, lag, held) last set on the gauges

    def publish(self, gauge: Any, histogram: Any, held_gauge: Any) -> None:
        """Also count every tick into ``histogram`` and keep ``gauge`` at :meth:`largest`
        and ``held_gauge`` at :meth:`largest_held`: prometheus-client metrics in multiprocess
        mode, which ``/metrics`` adds up over every process of the server (see the module
        docstring).  A gauge is set when a tick beats its value or a new second starts (an
        old stall leaves the window then): a few microseconds a tick, nothing when nothing
        changed."""
        self._gauge, self._histogram, self._held_gauge = gauge, histogram, held_gauge

    def descriptions(self) -> tuple[str, str, str]:
        """The help texts of the lag gauge, the histogram and the held gauge (one wording
        for both ways of exporting them)."""
        ms = f"{self.interval * 1000:g} ms"
        return (
            f"Largest delay of the reactor's {ms} probe timer in the last {self.window} s "
            "(how long the reactor thread was held or waited for a CPU).",
            f"Delay of each tick of the reactor's {ms} probe timer.",
            f"Largest delay of the reactor's {ms} probe timer in the last {self.window} s "
            "less the time its thread waited for a CPU (how long the server's own work held "
            "the reactor thread).",
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
            if self._run_queue is None:
                self._run_queue = self._make_run_queue()  # on the reactor thread: see there
                self._waited = self._run_queue()
            activity = getattr(self.reactor, "mailsuite_activity", None)
            if isinstance(activity, list) and self._activity is None:
                activity.append(self._on_activity)
                self._activity = activity
            self._arm(self.reactor.seconds())

    def _on_activity(self) -> None:
        """The dispatcher got I/O events (reactor thread, before handling them): a slow
        probe goes back to its fast rhythm at once."""
        if not self._slow:
            self._event_seen = True
            return
        self._slow = False
        self._quiet = 0
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._arm(self.reactor.seconds())

    def stopService(self) -> None:
        service.Service.stopService(self)
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._activity is not None:
            with contextlib.suppress(ValueError):
                self._activity.remove(self._on_activity)
            self._activity = None
        self._slow, self._quiet, self._event_seen = False, 0, False
        close = getattr(self._run_queue, "close", None)
        if close is not None:
            close()
        self._run_queue = self._waited = None

    def _arm(self, now: float, interval: float | None = None) -> None:
        interval = self.interval if interval is None else interval
        self._due = now + interval
        self._call = self.reactor.callLater(interval, self._tick)

    def _tick(self) -> None:
        now = self.reactor.seconds()
        lag = max(0.0, now - self._due)
        held = lag
        if self._run_queue is not None:
            waited = self._run_queue()
            if waited is not None and self._waited is not None:
                held = max(0.0, lag - (waited - self._waited))
            self._waited = waited
        self.record(lag, held)
        if self._activity is not None:
            if self._event_seen:
                self._event_seen, self._quiet = False, 0
            else:
                self._quiet += 1
                if self._quiet >= IDLE_AFTER:
                    self._slow = True
                    self._arm(now, IDLE_INTERVAL)
                    return
        self._arm(now)

    def record(self, lag: float, held: float | None = None) -> None:
        """Count one tick that came ``lag`` seconds late, ``held`` of them not waiting for a
        CPU (all of them when not given)."""
        held = lag if held is None else held
        second = int(self.reactor.seconds())
        _keep_largest(self._maxima, second, lag)
        _keep_largest(self._held, second, held)
        i = 0
        while i < len(BUCKETS) and lag > BUCKETS[i]:
            i += 1
        self._counts[i] += 1
        self._sum += lag
        if self._histogram is not None:
            self._histogram.observe(lag)
            at, value, held_value = self._published
            if at != second or lag > value or held > held_value:
                value, held_value = self.largest(), self.largest_held()
                self._published = (second, value, held_value)
                self._gauge.set(value)
                self._held_gauge.set(held_value)

    # -- the collector (any thread: reads copies) --------------------------------------------

    def largest(self) -> float:
        """The largest lag of the last ``window`` seconds (0 before the first tick)."""
        return self._largest_of(self._maxima)

    def largest_held(self) -> float:
        """The largest held part of a lag in the last ``window`` seconds."""
        return self._largest_of(self._held)

    def _largest_of(self, maxima: deque[tuple[int, float]]) -> float:
        since = int(self.reactor.seconds()) - self.window
        return max((lag for second, lag in list(maxima) if second > since), default=0.0)

    def describe(self) -> Iterator[Any]:
        yield GaugeMetricFamily("mailsuite_reactor_lag_seconds", "")
        yield GaugeMetricFamily("mailsuite_reactor_held_seconds", "")
        yield HistogramMetricFamily("mailsuite_reactor_tick_lag_seconds", "")

    def collect(self) -> Iterator[Any]:
        gauge_doc, histogram_doc, held_doc = self.descriptions()
        gauge = GaugeMetricFamily("mailsuite_reactor_lag_seconds", gauge_doc)
        gauge.add_metric([], self.largest())
        yield gauge
        held = GaugeMetricFamily("mailsuite_reactor_held_seconds", held_doc)
        held.add_metric([], self.largest_held())
        yield held
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


def _keep_largest(maxima: deque[tuple[int, float]], second: int, value: float) -> None:
    """Note ``value`` in ``second``'s entry of a per-second maximum (appended when new)."""
    if maxima and maxima[-1][0] == second:
        if value > maxima[-1][1]:
            maxima[-1] = (second, value)
    else:
        maxima.append((second, value))
