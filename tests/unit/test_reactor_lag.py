"""The reactor lag probe (mailsuite.reactor_lag) on a fake clock: a late tick is seen in the
gauge and the histogram, the gauge forgets it after its window, stopping stops the timer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from mailsuite.reactor_lag import (
    BUCKETS,
    IDLE_AFTER,
    IDLE_INTERVAL,
    ReactorLag,
    RunQueueWait,
)


def samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, s.labels.get("le", ""))] = s.value
    return out


def started_probe(reactor: Any) -> tuple[ReactorLag, CollectorRegistry]:
    """A probe ticking every 10 ms with a 10-s window, registered and started."""
    probe = ReactorLag(reactor, interval=0.01, window=10)
    registry = CollectorRegistry()
    registry.register(probe)
    probe.startService()
    return probe, registry


def test_a_late_tick_shows_in_the_gauge_and_histogram_then_leaves_the_window() -> None:
    clock = Clock()
    clock.advance(1000)
    probe, registry = started_probe(clock)
    for _ in range(50):  # on time
        clock.advance(0.01)
    quiet = samples(registry)
    assert quiet[("mailsuite_reactor_lag_seconds", "")] == 0
    assert quiet[("mailsuite_reactor_tick_lag_seconds_count", "")] == 50
    assert quiet[("mailsuite_reactor_tick_lag_seconds_bucket", "0.005")] == 50

    clock.advance(0.01 + 0.2)  # the reactor was held 200 ms past the tick's time
    late = samples(registry)
    assert abs(late[("mailsuite_reactor_lag_seconds", "")] - 0.2) < 1e-6
    assert late[("mailsuite_reactor_tick_lag_seconds_count", "")] == 51
    assert late[("mailsuite_reactor_tick_lag_seconds_bucket", "0.1")] == 50
    assert late[("mailsuite_reactor_tick_lag_seconds_bucket", "0.25")] == 51
    assert abs(late[("mailsuite_reactor_tick_lag_seconds_sum", "")] - 0.2) < 1e-6

    for _ in range(1100):  # 11 s of on-time ticks: the stall leaves the 10 s window
        clock.advance(0.01)
    assert samples(registry)[("mailsuite_reactor_lag_seconds", "")] == 0

    probe.stopService()
    assert clock.getDelayedCalls() == []


def test_published_metrics_follow_the_probe() -> None:
    """With worker processes the probe publishes into prometheus-client metrics (multiprocess
    files there; plain ones here): the histogram gets every tick, the gauge the window's
    largest lag, dropping when the stall leaves the window."""
    clock = Clock()
    clock.advance(1000)
    registry = CollectorRegistry()
    probe = ReactorLag(clock, interval=0.01, window=10)
    probe.publish(
        Gauge("mailsuite_reactor_lag_seconds", "g", registry=registry),
        Histogram("mailsuite_reactor_tick_lag_seconds", "h", buckets=BUCKETS, registry=registry),
        Gauge("mailsuite_reactor_held_seconds", "g", registry=registry),
    )
    probe.startService()
    for _ in range(50):
        clock.advance(0.01)
    clock.advance(0.01 + 0.2)
    late = samples(registry)
    assert abs(late[("mailsuite_reactor_lag_seconds", "")] - 0.2) < 1e-6
    assert abs(late[("mailsuite_reactor_held_seconds", "")] - 0.2) < 1e-6
    assert late[("mailsuite_reactor_tick_lag_seconds_count", "")] == 51
    assert late[("mailsuite_reactor_tick_lag_seconds_bucket", "0.1")] == 50
    assert late[("mailsuite_reactor_tick_lag_seconds_bucket", "0.25")] == 51
    for _ in range(1100):
        clock.advance(0.01)
    assert samples(registry)[("mailsuite_reactor_lag_seconds", "")] == 0
    assert samples(registry)[("mailsuite_reactor_held_seconds", "")] == 0
    probe.stopService()


class _FakeRunQueue:
    """The reactor thread's run-queue wait so far, as the test sets it."""

    def __init__(self) -> None:
        self.waited = 5.0
        self.closed = False

    def __call__(self) -> float:
        return self.waited

    def close(self) -> None:
        self.closed = True


def test_the_wait_for_a_cpu_is_not_counted_as_held() -> None:
    """A tick 200 ms late, 150 ms of which the thread was runnable but waiting for a CPU (a
    machine whose cores are all busy): a lag of 200 ms, held 50 ms.  A stall with no wait
    for a CPU (our code, a GC pause, a stopped process) is held whole."""
    clock = Clock()
    clock.advance(1000)
    run_queue = _FakeRunQueue()
    probe = ReactorLag(clock, interval=0.01, window=10, run_queue=lambda: run_queue)
    registry = CollectorRegistry()
    registry.register(probe)
    probe.startService()
    for _ in range(20):
        clock.advance(0.01)
    run_queue.waited += 0.15
    clock.advance(0.01 + 0.2)
    late = samples(registry)
    assert abs(late[("mailsuite_reactor_lag_seconds", "")] - 0.2) < 1e-6
    assert abs(late[("mailsuite_reactor_held_seconds", "")] - 0.05) < 1e-6
    clock.advance(0.01 + 0.08)  # held: no wait for a CPU this time
    assert abs(samples(registry)[("mailsuite_reactor_held_seconds", "")] - 0.08) < 1e-6
    run_queue.waited += 1.0  # waited longer than the tick was late: nothing held
    clock.advance(0.01 + 0.3)
    after = samples(registry)
    assert abs(after[("mailsuite_reactor_lag_seconds", "")] - 0.3) < 1e-6
    assert abs(after[("mailsuite_reactor_held_seconds", "")] - 0.08) < 1e-6
    probe.stopService()
    assert run_queue.closed


def test_no_run_queue_figure_counts_the_whole_lag_as_held() -> None:
    clock = Clock()
    clock.advance(1000)
    probe = ReactorLag(clock, interval=0.01, window=10, run_queue=lambda: lambda: None)
    registry = CollectorRegistry()
    registry.register(probe)
    probe.startService()
    clock.advance(0.01 + 0.2)
    assert abs(samples(registry)[("mailsuite_reactor_held_seconds", "")] - 0.2) < 1e-6
    probe.stopService()


_CONTENDED = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
from mailsuite.reactor_lag import RunQueueWait
cpu = min(os.sched_getaffinity(0))
os.sched_setaffinity(0, {cpu})
children = []
for _ in range(2):  # two busy processes on the same CPU
    pid = os.fork()
    if pid == 0:
        end = time.monotonic() + 5
        while time.monotonic() < end:
            pass
        os._exit(0)
    children.append(pid)
wait = RunQueueWait()
before, cpu_before = wait(), time.thread_time()
end = time.monotonic() + 0.6
while time.monotonic() < end:  # wants the CPU all the time: gets about a third of it
    pass
print(wait() - before, time.thread_time() - cpu_before)
for pid in children:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
"""


@pytest.mark.skipif(not Path(RunQueueWait.PATH).exists(), reason="no Linux scheduler statistics")
def test_run_queue_wait_reads_the_time_the_thread_waited_for_a_cpu() -> None:
    """The real figure: a thread that shares one CPU with two busy processes for 0.6 s runs
    about a third of that time and waits for the CPU the rest (its time on the CPU, the
    file's first field, would be the smaller figure)."""
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run(
        [sys.executable, "-c", _CONTENDED, root],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    waited, ran = (float(x) for x in out.stdout.split())
    assert waited >= 0.2, out.stdout
    assert waited > ran, out.stdout


class _DispatchingClock(Clock):
    """A clock with the lean dispatch's activity list (mailsuite.reactor_dispatch)."""

    def __init__(self) -> None:
        super().__init__()
        self.mailsuite_activity: list[Any] = []

    def events(self) -> None:
        """A poll that returned I/O events."""
        for f in self.mailsuite_activity:
            f()

    def next_tick_in(self) -> float:
        (call,) = self.getDelayedCalls()
        return float(call.getTime() - self.seconds())


def test_an_idle_probe_slows_down_and_the_first_event_wakes_it() -> None:
    """No I/O event for IDLE_AFTER ticks: one tick a second (100 wake-ups a second cost an
    idle server 20 ms of CPU a second per process).  The first event brings the 10 ms
    rhythm back before its work runs, so a stall that work makes is measured whole."""
    clock = _DispatchingClock()
    clock.advance(1000)
    probe, registry = started_probe(clock)
    assert clock.mailsuite_activity == [probe._on_activity]
    for _ in range(IDLE_AFTER - 1):
        clock.advance(0.01)
    assert abs(clock.next_tick_in() - 0.01) < 1e-9
    clock.advance(0.01)
    assert abs(clock.next_tick_in() - IDLE_INTERVAL) < 1e-9  # slow now
    clock.advance(IDLE_INTERVAL)  # a slow tick, on time
    assert abs(clock.next_tick_in() - IDLE_INTERVAL) < 1e-9
    assert samples(registry)[("mailsuite_reactor_lag_seconds", "")] == 0

    clock.advance(0.3)
    clock.events()  # a connection arrives
    assert abs(clock.next_tick_in() - 0.01) < 1e-9
    clock.advance(0.01 + 0.2)  # its work held the reactor 200 ms
    assert abs(samples(registry)[("mailsuite_reactor_lag_seconds", "")] - 0.2) < 1e-6

    probe.stopService()
    assert clock.mailsuite_activity == [] and clock.getDelayedCalls() == []


def test_a_busy_probe_stays_fast() -> None:
    clock = _DispatchingClock()
    clock.advance(1000)
    probe, _registry = started_probe(clock)
    for i in range(3 * IDLE_AFTER):
        if i % 50 == 0:
            clock.events()  # an event every half second
        clock.advance(0.01)
    assert abs(clock.next_tick_in() - 0.01) < 1e-9
    probe.stopService()


def test_freeze_startup_objects_takes_what_lives_out_of_full_collections() -> None:
    import gc

    from mailsuite.reactor_lag import freeze_startup_objects

    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    kept = [[i] for i in range(1000)]  # objects alive at "start"
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() >= len(kept)
        seen = {id(o) for o in gc.get_objects()}  # every generation but the frozen one
        assert not any(id(x) in seen for x in kept)
    finally:
        gc.unfreeze()


class _NotYetRunning(Clock):
    """A clock with the reactor's ``callWhenRunning``: the calls wait for ``run()``, as in
    twistd, which starts the services before it runs the reactor."""

    def __init__(self) -> None:
        super().__init__()
        self.startup: list[Any] = []

    def callWhenRunning(self, f: Any, *args: Any) -> None:  # noqa: N802 (the reactor's name)
        self.startup.append(lambda: f(*args))

    def run(self) -> None:
        for f in self.startup:
            f()


def test_the_time_before_the_reactor_runs_is_not_a_stall() -> None:
    """Started with the other services, the probe's clock starts when the reactor runs: the
    rest of the server's start (60-90 ms, the startup's full collection included) was the
    first tick's "lag", a stall in the gauge of every new server."""
    reactor = _NotYetRunning()
    reactor.advance(1000)
    probe, registry = started_probe(reactor)
    reactor.advance(0.3)  # the other services start, twistd gets ready
    assert reactor.getDelayedCalls() == []
    reactor.run()
    for _ in range(10):
        reactor.advance(0.01)
    after = samples(registry)
    assert after[("mailsuite_reactor_tick_lag_seconds_count", "")] == 10
    assert after[("mailsuite_reactor_lag_seconds", "")] == 0

    probe.stopService()  # stopped before a reactor ran: nothing is armed when it does
    late = _NotYetRunning()
    stopped = ReactorLag(late)
    stopped.startService()
    stopped.stopService()
    late.run()
    assert late.getDelayedCalls() == []


def test_make_service_freezes_what_the_start_built_before_the_reactor_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The startup's full collection (60 ms for a new server's ~70,000 objects) runs while
    the server is built, not as the running reactor's first act."""
    import tomllib

    from twisted.internet import reactor as real

    import mailsuite.service as service_mod
    from mailsuite.config import parse_config

    frozen: list[bool] = []
    monkeypatch.setattr(service_mod, "freeze_startup_objects", lambda: frozen.append(True))

    class NeverRuns:
        """The real reactor for building; whatever waits for it to run is kept here."""

        def __init__(self) -> None:
            self.waiting: list[Any] = []

        def callWhenRunning(self, f: Any, *args: Any, **kw: Any) -> None:  # noqa: N802
            self.waiting.append(f)

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    cfg = parse_config(
        tomllib.loads(
            '[server]\nhostname = "mx.example.test"\ndata_dir = "data"\n'
            '[listen]\nsmtp = ["tcp:0:interface=127.0.0.1"]\n'
        ),
        None,
        tmp_path,
    )
    built = NeverRuns()
    service_mod.makeService(cfg, reactor=built)
    assert frozen == [True]
