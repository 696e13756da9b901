"""The state worker processes share (mailsuite.shared.counters): failed logins in one
SQLite file, seen alike by every process.  Two objects on one file with different pids stand
for two workers.  (Connection counts: tests/unit/test_connection_table.py.)"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock

from mailsuite.auth import FailureLog
from mailsuite.config import AuthConfig
from mailsuite.shared import counters
from mailsuite.shared.folder_watch import PollingWatcher

CFG = AuthConfig(max_failures_per_ip=3, max_failures_per_user=5, window=60)


def two_logs(tmp_path: Path, clock: Clock) -> tuple[counters.SharedFailureLog, ...]:
    path = counters.state_path(tmp_path)
    a = counters.SharedFailureLog(path, CFG, clock.seconds)
    b = counters.SharedFailureLog(path, CFG, clock.seconds)
    b.pid = a.pid + 1
    return a, b


def test_failures_recorded_by_one_worker_block_the_address_in_the_other(tmp_path: Path) -> None:
    clock = Clock()
    a, b = two_logs(tmp_path, clock)
    for _ in range(2):
        a.record("192.0.2.1", "bob@example.test")
    assert not b.blocked("192.0.2.1", "bob@example.test")
    b.record("192.0.2.1", "bob@example.test")
    assert a.blocked("192.0.2.1", "bob@example.test")
    assert b.blocked("192.0.2.1", "bob@example.test")
    assert not a.blocked("192.0.2.2", "bob@example.test")  # another address: no failures
    assert b.delay("192.0.2.1") == 2.0  # 0.5, 1, 2: the same as FailureLog
    clock.advance(61)  # the window passed
    assert not b.blocked("192.0.2.1", "bob@example.test")


def test_the_shared_log_decides_like_the_local_one(tmp_path: Path) -> None:
    clock = Clock()
    shared, _ = two_logs(tmp_path, clock)
    local = FailureLog(CFG, clock.seconds)
    steps = [
        ("192.0.2.1", "u1"),
        ("192.0.2.2", "u1"),
        ("192.0.2.1", "u2"),
        ("192.0.2.3", "u1"),
        ("192.0.2.1", "u1"),
        ("192.0.2.4", "u1"),
        ("192.0.2.2", "u1"),
    ]
    for ip, user in steps:
        clock.advance(1)
        for log in (shared, local):
            log.record(ip, user)
        for probe_ip in ("192.0.2.1", "192.0.2.2", "192.0.2.5"):
            for probe_user in ("u1", "u2"):
                assert shared.blocked(probe_ip, probe_user) == local.blocked(probe_ip, probe_user)
            assert shared.delay(probe_ip) == local.delay(probe_ip)


def test_checks_in_flight_in_any_worker_count_once_the_address_failed(tmp_path: Path) -> None:
    clock = Clock()
    a, b = two_logs(tmp_path, clock)
    a.record("192.0.2.1", "bob@example.test")
    a.check_started("192.0.2.1")
    assert not b.blocked("192.0.2.1", "bob@example.test")  # 1 failure + 1 running
    b.check_started("192.0.2.1")
    assert a.blocked("192.0.2.1", "bob@example.test")  # 1 + 2 running = the limit
    b.check_finished("192.0.2.1")
    assert not a.blocked("192.0.2.1", "bob@example.test")
    counters.forget_process(counters.state_path(tmp_path), a.pid)  # worker a died
    a.record("192.0.2.1", "bob@example.test")
    assert not b.blocked("192.0.2.1", "bob@example.test")


def test_workers_guessing_at_once_never_pass_on_the_same_count(tmp_path: Path) -> None:
    """The count read and the in-flight mark it allows are one step across processes.  Read
    apart (``blocked`` then ``check_started``), two workers could both see 1 failure + 1
    running and both start a check: a guess over ``max_failures_per_ip`` each (CI saw 4
    answered guesses with a limit of 3 and two worker processes).  Eight "workers" (own
    connection, own pid) race at a barrier, 30 times: never more than limit - 1 in flight
    next to the one failure."""
    import threading

    path = counters.state_path(tmp_path)
    logs = [counters.SharedFailureLog(path, CFG) for _ in range(8)]
    for i, log in enumerate(logs):
        log.pid = 1000 + i
    logs[0].record("192.0.2.9", "bob@example.test")
    for _ in range(30):
        barrier = threading.Barrier(len(logs))
        admitted: list[counters.SharedFailureLog] = []

        def guess(
            log: counters.SharedFailureLog,
            barrier: threading.Barrier,
            admitted: list[counters.SharedFailureLog],
        ) -> None:
            barrier.wait()
            if log.try_start("192.0.2.9", "bob@example.test"):
                admitted.append(log)

        threads = [threading.Thread(target=guess, args=(log, barrier, admitted)) for log in logs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert 1 <= len(admitted) <= CFG.max_failures_per_ip - 1, len(admitted)
        for log in admitted:
            log.finish("192.0.2.9", "bob@example.test", failed=False)


def test_a_finished_failure_is_counted_as_it_stops_running(tmp_path: Path) -> None:
    """``finish``: the failure recorded and the check no longer in flight, together, and the
    same from the local log."""
    clock = Clock()
    a, b = two_logs(tmp_path, clock)
    local = FailureLog(CFG, clock.seconds)
    for log in (a, local):
        log.record("192.0.2.1", "bob@example.test")
        assert log.try_start("192.0.2.1", "bob@example.test", 1)
    assert not b.blocked("192.0.2.1", "bob@example.test")  # 1 failure + 1 running
    assert b.try_start("192.0.2.1", "bob@example.test")  # 1 + 1 (+ its own) = the limit
    assert not a.try_start("192.0.2.1", "bob@example.test")
    a.finish("192.0.2.1", "bob@example.test", failed=True)  # 2 failures + b's running
    assert a.blocked("192.0.2.1", "bob@example.test")
    b.finish("192.0.2.1", "bob@example.test", failed=False)
    assert not a.blocked("192.0.2.1", "bob@example.test")  # 2 failures, none running
    local.finish("192.0.2.1", "bob@example.test", failed=True)
    assert local.delay("192.0.2.1") == 1.0  # 2 failures: 0.5, 1


def test_polling_watcher_calls_until_stopped(tmp_path: Path) -> None:
    clock = Clock()
    calls: list[int] = []
    stop = PollingWatcher(clock, 0.5).watch(tmp_path, lambda: calls.append(1))
    clock.advance(0.5)
    clock.advance(0.5)
    assert len(calls) == 2
    stop()
    stop()  # twice is harmless
    clock.advance(5)
    assert len(calls) == 2


def test_the_local_implementations_have_the_shared_interfaces(tmp_path: Path) -> None:
    """Each piece of shared state has its interface (mailsuite.shared.interfaces) and
    today's implementation fits it, so a PostgreSQL one can replace it (docs/scale-out.md)."""
    from mailsuite.directory import Directory
    from mailsuite.queue.spool import Spool
    from mailsuite.shared import interfaces
    from mailsuite.store.index import FolderIndex

    directory = Directory(tmp_path / "d.json", tmp_path / "mail", ("example.test",))
    assert isinstance(directory, interfaces.AccountDirectory)
    assert isinstance(FailureLog(CFG), interfaces.LoginThrottle)
    path = counters.state_path(tmp_path)
    assert isinstance(counters.SharedFailureLog(path, CFG), interfaces.LoginThrottle)
    assert isinstance(Spool(tmp_path / "queue"), interfaces.QueueClaim)
    for name in ("sync", "counters", "state", "changes_since", "store_flags", "expunge", "close"):
        assert callable(getattr(FolderIndex, name)), name
