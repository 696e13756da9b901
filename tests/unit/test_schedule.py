"""The retry schedule: doubling delays, a ceiling, expiry and the delay warning."""

from __future__ import annotations

from mailsuite.config import RelayConfig
from mailsuite.queue.schedule import RetrySchedule


def test_delays_double_up_to_the_maximum() -> None:
    s = RetrySchedule(initial=300, maximum=4 * 3600)
    assert [s.delay(n) for n in range(1, 9)] == [300, 600, 1200, 2400, 4800, 9600, 14400, 14400]
    assert s.delay(0) == 0
    assert s.delay(10_000) == 14400  # no overflow for absurd attempt counts


def test_next_attempt_never_after_expiry() -> None:
    s = RetrySchedule(initial=300, maximum=3600, lifetime=1000)
    assert s.next_attempt(now=100, failed_attempts=1, created=0) == 400
    assert s.next_attempt(now=900, failed_attempts=3, created=0) == 1000  # the last chance
    assert not s.expired(999.9, 0) and s.expired(1000, 0)


def test_delay_warning() -> None:
    s = RetrySchedule(delay_warning=3600)
    assert not s.warning_due(3599, 0) and s.warning_due(3600, 0)
    assert not RetrySchedule(delay_warning=0).warning_due(10**9, 0)


def test_from_config_keeps_maximum_at_least_initial() -> None:
    s = RetrySchedule.from_config(RelayConfig(retry_initial=600, retry_max=60, lifetime=7))
    assert s.initial == 600 and s.maximum == 600 and s.lifetime == 7
