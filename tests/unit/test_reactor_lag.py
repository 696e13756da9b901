"""The reactor lag probe (mailsuite.reactor_lag) on a fake clock: a late tick is seen in the
gauge and the histogram, the gauge forgets it after its window, stopping stops the timer."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from mailsuite.reactor_lag import ReactorLag


def samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, s.labels.get("le", ""))] = s.value
    return out


def test_a_late_tick_shows_in_the_gauge_and_histogram_then_leaves_the_window() -> None:
    clock = Clock()
    clock.advance(1000)
    probe = ReactorLag(clock, interval=0.01, window=10)
    registry = CollectorRegistry()
    registry.register(probe)
    probe.startService()
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
