"""ReadDeadline on a task.Clock: bytes trickling in never extend a deadline; lines, data
blocks and logins do what the module says."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from mailsuite.deadline import COMMAND, DATA, DATA_BLOCK, LOGIN, SESSION, ReadDeadline


def make(**caps: float) -> tuple[Clock, ReadDeadline, list[tuple[float, str]]]:
    clock = Clock()
    fired: list[tuple[float, str]] = []
    deadline = ReadDeadline(clock, lambda why: fired.append((clock.seconds(), why)), **caps)
    return clock, deadline, fired


def test_a_line_must_arrive_within_the_timeout_of_the_wait_starting() -> None:
    clock, d, fired = make()
    d.wait(5)
    clock.advance(4.9)
    assert fired == []
    clock.advance(0.1)
    assert fired == [(5.0, COMMAND)]


def test_a_trickle_of_data_below_a_block_does_not_move_the_deadline() -> None:
    clock, d, fired = make()
    d.wait(2, DATA)
    for _ in range(10):  # one byte every 0.5 s, as a slowloris client sends
        clock.advance(0.5)
        d.data(1)
    assert fired == [(2.0, DATA)]


def test_each_full_data_block_moves_the_deadline() -> None:
    clock, d, fired = make()
    d.wait(2, DATA)
    for _ in range(20):  # 64 KiB every 1.5 s: slow but moving
        clock.advance(1.5)
        d.data(DATA_BLOCK // 2)
        d.data(DATA_BLOCK - DATA_BLOCK // 2)
    assert fired == []
    clock.advance(2)
    assert fired == [(32.0, DATA)]


def test_every_complete_line_restarts_the_wait() -> None:
    clock, d, fired = make()
    for _ in range(10):
        d.wait(5)
        clock.advance(4)
    assert fired == []


def test_the_login_cap_does_not_move_until_login() -> None:
    clock, d, fired = make(login=10)
    for _ in range(3):  # a line every 3 s: each meets its own deadline
        d.wait(5)
        clock.advance(3)
    assert fired == []
    d.wait(5)
    clock.advance(0.9)
    assert fired == []
    clock.advance(0.1)
    assert fired == [(10.0, LOGIN)]


def test_logging_in_lifts_the_login_cap() -> None:
    clock, d, fired = make(login=10)
    d.wait(300)
    clock.advance(9)
    d.logged_in()
    clock.advance(290)
    assert fired == []
    clock.advance(1)
    assert fired == [(300.0, COMMAND)]


def test_the_session_cap_ends_even_a_busy_session() -> None:
    clock, d, fired = make(session=60)
    for _ in range(100):
        d.wait(5)
        clock.advance(1)
    assert fired == [(60.0, SESSION)]


def test_hold_stops_the_clock_but_not_the_caps() -> None:
    clock, d, fired = make(session=100)
    d.wait(5)
    d.hold()
    clock.advance(50)
    assert fired == []
    d.wait(5)
    clock.advance(5)
    assert fired == [(55.0, COMMAND)]
    clock2, d2, fired2 = make(session=100)
    d2.hold()
    clock2.advance(100)
    assert fired2 == [(100.0, SESSION)]


def test_cancel_is_final_and_fires_nothing() -> None:
    clock, d, fired = make(login=1, session=2)
    d.wait(1)
    d.cancel()
    d.wait(1)
    d.data(DATA_BLOCK)
    d.logged_in()
    clock.advance(10)
    assert fired == [] and clock.getDelayedCalls() == []


def test_fires_once() -> None:
    clock, d, fired = make(session=3)
    d.wait(1)
    clock.advance(1)
    d.wait(1)
    clock.advance(5)
    assert fired == [(1.0, COMMAND)]
    assert clock.getDelayedCalls() == []


def test_lines_move_the_deadline_without_a_new_timer_each() -> None:
    """The timer is lazy: a deadline moving later keeps the pending timer (one DelayedCall
    for a thousand lines), and expiry is still exactly ``timeout`` after the last line."""
    clock, d, fired = make()
    d.wait(10)
    first = clock.getDelayedCalls()
    for _ in range(1000):
        clock.advance(0.01)
        d.wait(10)
    assert clock.getDelayedCalls() == first
    last_line = clock.seconds()
    clock.advance(10 - 0.001)
    assert fired == []
    clock.advance(0.001)
    assert len(fired) == 1 and fired[0][1] == COMMAND
    assert fired[0][0] == pytest.approx(last_line + 10)


def test_a_deadline_moved_sooner_fires_sooner() -> None:
    clock, d, fired = make()
    d.wait(100)
    clock.advance(1)
    d.wait(2)
    clock.advance(2)
    assert fired == [(3.0, COMMAND)]


def test_hold_then_wait_counts_from_the_wait() -> None:
    clock, d, fired = make()
    d.wait(5)
    d.hold()
    clock.advance(50)  # the server's own work: no expiry, however long
    assert fired == []
    d.wait(5)
    clock.advance(4.9)
    assert fired == []
    clock.advance(0.1)
    assert fired == [(55.0, COMMAND)]
