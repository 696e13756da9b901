"""The connection counts worker processes share (mailsuite.shared.connection_table): a hash
table in one mmapped file, one column of counts per worker slot.  Two tables on one file
with different columns stand for two workers; the race tests use real processes."""

from __future__ import annotations

import multiprocessing
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mailsuite.connection_limits import ConnectionLimits, Refusal
from mailsuite.shared import connection_table
from mailsuite.shared.connection_table import SharedConnectionTable, create, forget_worker

KEYS = ["imap total", "imap ip 192.0.2.1", "imap ip 192.0.2.2", "imap user a 192.0.2.1"]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = connection_table.table_path(tmp_path)
    create(p, 2)
    return p


@pytest.fixture
def pair(path: Path) -> Iterator[tuple[SharedConnectionTable, SharedConnectionTable]]:
    a, b = SharedConnectionTable(path, 0), SharedConnectionTable(path, 1)
    yield a, b
    a.close()
    b.close()


def shared_pair(path: Path, **limits: int) -> tuple[ConnectionLimits, ConnectionLimits]:
    one, two = ConnectionLimits(**limits), ConnectionLimits(**limits)
    one.share(SharedConnectionTable(path, 0), "imap")
    two.share(SharedConnectionTable(path, 1), "imap")
    return one, two


def counts(path: Path, keys: list[str] = KEYS) -> dict[str, int]:
    """Every worker's count of each of ``keys`` that counts something."""
    table = SharedConnectionTable(path, 0, claim=False)
    try:
        found = {key: table.count(key) for key in keys}
    finally:
        table.close()
    return {k: n for k, n in found.items() if n}


def test_acquire_counts_every_worker_and_refuses_at_the_limit(
    pair: tuple[SharedConnectionTable, ...],
) -> None:
    a, b = pair
    assert a.acquire([("k", 2), ("t", 0)]) is None
    assert b.acquire([("k", 2), ("t", 0)]) is None
    assert a.acquire([("t", 0), ("k", 2)]) == 1  # the index of the key at its limit
    assert (a.count("k"), a.count("t")) == (2, 2)  # nothing changed by the refusal
    b.release(["k"])
    assert a.acquire([("k", 2)], drop=["t"]) is None
    assert (b.count("k"), b.count("t")) == (2, 1)
    a.release(["t"])  # a holds no "t" any more (dropped): nothing, never below zero
    assert b.count("t") == 1


def test_connection_limits_count_every_worker(path: Path) -> None:
    one, two = shared_pair(
        path, max_connections=3, max_connections_per_ip=2, max_userip_connections=1
    )
    a = one.admit("192.0.2.1")
    b = two.admit("192.0.2.1")
    assert a.refused is None and b.refused is None
    assert two.admit("192.0.2.1").refused is Refusal.PER_IP  # 2 from this address already
    c = one.admit("192.0.2.2")
    assert two.admit("192.0.2.3").refused is Refusal.TOTAL
    assert a.login("alice@example.test") is None  # leaves the per-IP count
    assert two.admit("192.0.2.3").refused is Refusal.TOTAL  # still 3 open in all
    c.release()
    d = two.admit("192.0.2.1")
    assert d.refused is None
    assert b.login("Alice@example.test") is Refusal.USER_IP  # one per user+IP, over workers
    for x in (a, b, d):
        x.release()
    assert [one.admit("192.0.2.1").refused, two.admit("192.0.2.1").refused] == [None, None]


def test_only_keys_with_a_limit_are_counted_across_workers(path: Path) -> None:
    """No limit set: a connection, its login and its close make no shared write; with
    limits, the keys that have one are kept exact."""
    one, two = shared_pair(path)
    sessions = [w.admit("192.0.2.1") for w in (one, two) for _ in range(3)]
    assert [s.refused for s in sessions] == [None] * 6
    assert sessions[0].login("alice@example.test") is None
    assert counts(path, [*KEYS, "imap user alice@example.test 192.0.2.1"]) == {}
    for s in sessions:
        s.release()
    assert (one.total, one.per_ip, one.per_userip) == (0, {}, {})

    exempt = ConnectionLimits(max_connections=3, max_connections_per_ip=1, exempt=lambda ip: True)
    exempt.share(SharedConnectionTable(path, 1), "smtp")
    a, b = exempt.admit("127.0.0.1"), exempt.admit("127.0.0.1")  # trusted: no per-IP key
    assert (a.refused, b.refused) == (None, None)
    assert counts(path, ["smtp total", "smtp ip 127.0.0.1"]) == {"smtp total": 2}
    a.release()
    b.release()
    assert counts(path, ["smtp total"]) == {}


def test_login_moves_only_the_keys_that_have_limits(path: Path) -> None:
    one, two = shared_pair(path, max_connections_per_ip=1)
    a = one.admit("192.0.2.1")
    assert two.admit("192.0.2.1").refused is Refusal.PER_IP
    assert a.login("alice@example.test") is None
    assert counts(path) == {}
    b = two.admit("192.0.2.1")
    assert b.refused is None
    assert one.admit("192.0.2.1").refused is Refusal.PER_IP
    a.release()  # logged in: holds nothing shared any more
    assert counts(path) == {"imap ip 192.0.2.1": 1}
    b.release()
    assert counts(path) == {}


def test_a_dead_workers_connections_leave_the_counts(path: Path) -> None:
    """The supervisor zeroes the dead worker's column (its slot index, which the worker
    started again in its place keeps and zeroes too): the others' counts stay exact."""
    one, two = shared_pair(path, max_connections_per_ip=2)
    assert one.admit("192.0.2.1").refused is None
    kept = two.admit("192.0.2.1")
    assert two.admit("192.0.2.1").refused is Refusal.PER_IP
    forget_worker(path, 0)  # worker 0 died
    assert counts(path) == {"imap ip 192.0.2.1": 1}
    assert two.admit("192.0.2.1").refused is None
    assert two.admit("192.0.2.1").refused is Refusal.PER_IP
    kept.release()
    assert counts(path) == {"imap ip 192.0.2.1": 1}
    # a worker in slot 1 started again: whatever its predecessor held leaves with it
    SharedConnectionTable(path, 1).close()
    assert counts(path) == {}


def test_a_fresh_table_for_a_new_start(path: Path) -> None:
    one, _ = shared_pair(path, max_connections_per_ip=1)
    assert one.admit("192.0.2.1").refused is None
    create(path, 2)
    _, two = shared_pair(path, max_connections_per_ip=1)
    assert two.admit("192.0.2.1").refused is None


def test_a_file_that_is_not_a_table_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "t"
    bad.write_bytes(b"x" * 200)
    with pytest.raises(ValueError, match="not a connection table"):
        SharedConnectionTable(bad, 0)
    create(bad, 2)
    with pytest.raises(ValueError, match="worker 2 of a table for 2"):
        SharedConnectionTable(bad, 2)


def test_a_full_table_refuses_new_keys_and_keeps_counting_the_others(tmp_path: Path) -> None:
    """No room for a key (3/4 of the slots hold keys): the connection is refused as at that
    key's limit (never admitted over a limit, never an exception); keys already in the table
    go on counting; a key that falls to zero frees its slot at once."""
    path = tmp_path / "t"
    create(path, 1, slots=16)
    t = SharedConnectionTable(path, 0)
    held = [f"ip {i}" for i in range(11)]  # with "total": 3/4 of 16 slots
    for key in held:
        assert t.acquire([("total", 0), (key, 5)]) is None
    assert t.acquire([("total", 0), ("ip new", 5)]) == 1  # no room: refused
    assert t.count("ip new") == 0
    assert t.acquire([("total", 0), (held[0], 5)]) is None  # a known key: counted
    assert t.count("total") == 12
    t.release([held[1]])
    assert t.acquire([("total", 0), ("ip new", 5)]) is None
    assert t.count("ip new") == 1
    assert [t.count(k) for k in held] == [2, 0] + [1] * 9
    assert t.count("total") == 13
    t.close()


def test_deleting_a_key_keeps_every_later_key_of_its_cluster_findable(tmp_path: Path) -> None:
    """Keys that collide on a small table form one probe chain; emptying any of them
    (backward shift) must leave the others found with their counts, in any order."""
    path = tmp_path / "t"
    create(path, 2, slots=8, secret=bytes(16))
    a, b = SharedConnectionTable(path, 0), SharedConnectionTable(path, 1)
    keys = [f"k{i}" for i in range(6)]
    for n, key in enumerate(keys):
        for _ in range(n + 1):
            (a if n % 2 else b).acquire([(key, 0)])
    for gone in [3, 0, 5, 1, 4, 2]:
        while a.count(keys[gone]):
            (a if gone % 2 else b).release([keys[gone]])
        keys_left = [k for k in keys if a.count(k)]
        assert all(a.count(k) == int(k[1:]) + 1 for k in keys_left)
    assert [a.count(k) for k in keys] == [0] * 6
    assert a._used() == 0
    a.close()
    b.close()


class TableModel(RuleBasedStateMachine):
    """The table against a dict: the same answers, the same counts, through deletions
    (backward shift), dead workers' columns zeroed (rebuild) and a full table (16 slots, 3
    workers, 20 keys, so chains collide).  Where the dict admits and the table refuses, the
    table must be full: the keys that count something and the new ones of the call reach
    3/4 of the slots."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.path = Path(self.tmp.name) / "t"
        create(self.path, 3, slots=16, secret=bytes(16))  # the same table in every run
        self.tables = [SharedConnectionTable(self.path, c) for c in range(3)]
        self.model: dict[tuple[str, int], int] = {}  # (key, worker) -> count

    def total(self, key: str) -> int:
        return sum(n for (k, _), n in self.model.items() if k == key)

    def live(self) -> int:
        return len({k for (k, _), n in self.model.items() if n})

    @rule(
        worker=st.integers(0, 2),
        add=st.lists(
            st.tuples(st.integers(0, 19), st.integers(0, 3)), max_size=3, unique_by=lambda x: x[0]
        ),
        drop=st.lists(st.integers(0, 19), max_size=1),
    )
    def acquire(self, worker: int, add: list[tuple[int, int]], drop: list[int]) -> None:
        keys = [(f"key {k}", limit) for k, limit in add]
        dropped = [f"key {k}" for k in drop if f"key {k}" not in {k for k, _ in keys}]
        expected = next(
            (i for i, (k, limit) in enumerate(keys) if limit and self.total(k) >= limit), None
        )
        got = self.tables[worker].acquire(keys, dropped)
        if expected is not None:
            # the dict refuses: the table refuses too (at this key, or at a key before it
            # for which it had no room)
            assert got is not None and got <= expected, (got, expected)
        if got is not None and got != expected:
            assert self.live() + len(keys) > 16 * 3 // 4  # no room: only when full
        if got is None:
            for k in dropped:
                if self.model.get((k, worker), 0) > 0:
                    self.model[(k, worker)] -= 1
            for k, _ in keys:
                self.model[(k, worker)] = self.model.get((k, worker), 0) + 1

    @precondition(lambda self: any(self.model.values()))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        held = sorted(kw for kw, n in self.model.items() if n)
        key, worker = data.draw(st.sampled_from(held))
        self.tables[worker].release([key])
        self.model[(key, worker)] -= 1

    @rule(worker=st.integers(0, 2), key=st.integers(0, 19))
    def release_unheld(self, worker: int, key: int) -> None:
        """A release of what this worker does not hold changes nothing."""
        if self.model.get((f"key {key}", worker), 0) == 0:
            self.tables[worker].release([f"key {key}"])

    @rule(worker=st.integers(0, 2))
    def worker_died(self, worker: int) -> None:
        forget_worker(self.path, worker)
        for kw in self.model:
            if kw[1] == worker:
                self.model[kw] = 0

    @invariant()
    def same_counts(self) -> None:
        for k in range(20):
            assert self.tables[0].count(f"key {k}") == self.total(f"key {k}")
        assert self.tables[0]._used() == self.live()  # no slot kept for a key at zero

    def teardown(self) -> None:
        for t in self.tables:
            t.close()
        self.tmp.cleanup()


TestTableModel = TableModel.TestCase
TestTableModel.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


def _contend(path: str, column: int, barrier: object, rounds: int, results: object) -> None:
    """One worker process: at each round, wait at the barrier and try to take a place
    under a limit of 3, report whether it got one, and let it go at the next barrier."""
    table = SharedConnectionTable(Path(path), column)
    for n in range(rounds):
        barrier.wait()  # type: ignore[attr-defined]
        got = table.acquire([("smtp total", 0), ("smtp ip 192.0.2.7", 3)]) is None
        results.put((n, got))  # type: ignore[attr-defined]
        barrier.wait()  # type: ignore[attr-defined]
        if got:
            table.release(["smtp total", "smtp ip 192.0.2.7"])
        barrier.wait()  # type: ignore[attr-defined]
    table.close()


def test_processes_racing_at_a_barrier_never_pass_the_limit(tmp_path: Path) -> None:
    """Six worker processes ask at once, 25 times: exactly 3 (the limit) get a place each
    time -- never more (the check and the increment are one step under the lock) and never
    fewer (no update lost) -- and every count is back to zero at the end."""
    path = connection_table.table_path(tmp_path)
    create(path, 6)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(6, timeout=30)
    results = ctx.Queue()
    rounds = 25
    procs = [
        ctx.Process(target=_contend, args=(str(path), c, barrier, rounds, results))
        for c in range(6)
    ]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in range(6 * rounds)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    per_round = [sum(ok for n, ok in got if n == r) for r in range(rounds)]
    assert per_round == [3] * rounds
    assert counts(path, ["smtp total", "smtp ip 192.0.2.7"]) == {}
