"""Failed-login counts shared by the worker processes of one server.

With ``[server] workers`` > 1 every worker accepts connections, so counts kept in one
process's memory would give an attacker N times the guesses.  They live here in one small
SQLite file, ``<data_dir>/run/shared.sqlite`` (WAL, no fsync: it is state about the running
server, emptied at every start, never mail), behind the interface the single-process code
already uses: :class:`SharedFailureLog` has the methods of :class:`mailsuite.auth.FailureLog`
(record, blocked, delay, clear) plus the in-flight bookkeeping, so the check "this address
failed and has N more checks running" sees every worker's checks.

Each in-flight row carries the pid of the worker that made it, so the supervisor removes a
dead worker's (:func:`forget_process`) when it restarts it.  Every call is one short
transaction made in the reactor thread, once per login attempt: the same order of cost as
the argon2 check it guards.  (Connection counts, asked at every connection, are in shared
memory instead: :mod:`mailsuite.shared.connection_table`.)
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from mailsuite.config import AuthConfig

SCHEMA = """
CREATE TABLE IF NOT EXISTS failures (kind TEXT NOT NULL, key TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS failures_key ON failures (kind, key, at);
CREATE TABLE IF NOT EXISTS in_flight (
    ip TEXT NOT NULL, pid INTEGER NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (ip, pid));
"""

#: Failure rows kept at most; past it the oldest go (a spray over many addresses must not
#: grow the file without bound, like FailureLog's 100,000 keys in memory).
MAX_FAILURE_ROWS = 200_000


def state_path(data_dir: Path) -> Path:
    return data_dir / "run" / "shared.sqlite"


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating) the shared file.  Autocommit mode: transactions are explicit."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, timeout=10.0, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")  # running state, emptied at start: no fsync needed
    db.executescript(SCHEMA)
    return db


def reset(path: Path) -> None:
    """Empty the file (the supervisor, before starting workers: nothing of a previous run
    counts, no connection of it is open)."""
    db = connect(path)
    try:
        db.executescript("DELETE FROM failures; DELETE FROM in_flight;")
    finally:
        db.close()


def forget_process(path: Path, pid: int) -> None:
    """A worker died: its password checks ended with it."""
    db = connect(path)
    try:
        db.execute("DELETE FROM in_flight WHERE pid = ?", (pid,))
    finally:
        db.close()


class _immediate:  # noqa: N801 - used as a context manager, like a function
    """``BEGIN IMMEDIATE`` .. ``COMMIT`` (or ``ROLLBACK`` on error): the write lock is taken
    first, so a check and the increment it allows are one step for every process."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if kind is not None else "COMMIT")


class SharedFailureLog:
    """:class:`mailsuite.auth.FailureLog` over the shared file (same rules, same numbers)."""

    def __init__(
        self, path: Path, cfg: AuthConfig, now: Callable[[], float] = time.monotonic
    ) -> None:
        # time.monotonic is CLOCK_MONOTONIC on Linux: one clock for every process of a boot
        self.cfg = cfg
        self.now = now
        self.pid = os.getpid()
        self.path = path
        self.db = connect(path)
        self._finished = 0

    def _count(self, kind: str, key: str) -> int:
        horizon = self.now() - self.cfg.window
        row = self.db.execute(
            "SELECT count(*) FROM failures WHERE kind = ? AND key = ? AND at >= ?",
            (kind, key, horizon),
        ).fetchone()
        return int(row[0])

    def record(self, ip: str, user: str) -> None:
        with _immediate(self.db):
            self._insert_failure(ip, user)

    def _insert_failure(self, ip: str, user: str) -> None:
        """One failure from ``ip`` for ``user`` (inside the caller's transaction)."""
        t = self.now()
        db = self.db
        db.executemany(
            "INSERT INTO failures (kind, key, at) VALUES (?, ?, ?)",
            (("ip", ip, t), ("user", user, t)),
        )
        db.execute("DELETE FROM failures WHERE at < ?", (t - self.cfg.window,))
        db.execute(
            "DELETE FROM failures WHERE rowid <= (SELECT max(rowid) FROM failures) - ?",
            (MAX_FAILURE_ROWS,),
        )

    def blocked(self, ip: str, user: str, in_flight: int = 0) -> bool:
        """FailureLog.blocked, with the in-flight checks of every worker (``in_flight``, this
        process's own number, is already among them)."""
        recorded = self._count("ip", ip)
        if not recorded:
            return False
        row = self.db.execute("SELECT sum(n) FROM in_flight WHERE ip = ?", (ip,)).fetchone()
        ip_fails = recorded + int(row[0] or 0)
        if ip_fails >= self.cfg.max_failures_per_ip:
            return True
        return self._count("user", user) >= self.cfg.max_failures_per_user

    def delay(self, ip: str) -> float:
        n = self._count("ip", ip)
        return min(0.5 * 2 ** max(n - 1, 0), 8.0) if n else 0.0

    def clear(self, ip: str) -> None:
        self.db.execute("DELETE FROM failures WHERE kind = 'ip' AND key = ?", (ip,))

    def throttled_ips(self) -> int:
        """FailureLog.throttled_ips over every worker.  Called in the metrics thread: its own
        connection (the reactor thread's is not shared across threads)."""
        db = sqlite3.connect(self.path, timeout=10.0)
        try:
            row = db.execute(
                "SELECT count(*) FROM (SELECT key FROM failures WHERE kind = 'ip' AND at >= ? "
                "GROUP BY key HAVING count(*) >= ?)",
                (self.now() - self.cfg.window, self.cfg.max_failures_per_ip),
            ).fetchone()
        finally:
            db.close()
        return int(row[0])

    def check_started(self, ip: str) -> None:
        self.db.execute(
            "INSERT INTO in_flight (ip, pid, n) VALUES (?, ?, 1) "
            "ON CONFLICT (ip, pid) DO UPDATE SET n = n + 1",
            (ip, self.pid),
        )

    def check_finished(self, ip: str) -> None:
        self.db.execute("UPDATE in_flight SET n = n - 1 WHERE ip = ? AND pid = ?", (ip, self.pid))
        self._finished += 1
        if self._finished % 1000 == 0:  # rows at zero count nothing; keep the table small
            self.db.execute("DELETE FROM in_flight WHERE pid = ? AND n <= 0", (self.pid,))

    def try_start(self, ip: str, user: str, in_flight: int = 0) -> bool:
        """FailureLog.try_start in one ``BEGIN IMMEDIATE`` transaction: the count read and
        the in-flight check it allows are one step for every process (read apart, two workers
        could both pass on the same count, one guess over the limit each)."""
        with _immediate(self.db):
            if self.blocked(ip, user, in_flight):
                return False
            self.check_started(ip)
        return True

    def finish(self, ip: str, user: str, failed: bool) -> None:
        """FailureLog.finish in one transaction: another worker sees the failure recorded
        and the check no longer in flight together (apart, it could see neither)."""
        with _immediate(self.db):
            if failed:
                self._insert_failure(ip, user)
            self.check_finished(ip)
