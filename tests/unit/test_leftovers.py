"""Leftover temporary files (issue 10): tmp/ files of interrupted writes older than 36 hours
are removed at start and daily, in every folder of every user and in the spool and queue;
nothing else is touched.  File ages are set with os.utime; the day passes on a task.Clock."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, task

from mailsuite.config import parse_config
from mailsuite.leftovers import STALE_AFTER, SWEEP_EVERY, LeftoverSweeper, sweep
from mailsuite.runtime import Runtime
from mailsuite.service import build_runtime
from mailsuite.store.maildir import ensure_folder

HOUR = 3600.0


def aged(path: Path, hours: float, data: bytes = b"partial message\n") -> Path:
    """A file whose access and modification times are ``hours`` in the past."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    then = time.time() - hours * HOUR
    os.utime(path, (then, then))
    return path


def sync(f: Any, *args: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(f, *args)


@pytest.fixture
def runtime(tmp_path: Path) -> Runtime:
    data = {"server": {"data_dir": "data"}, "domains": {"local": ["example.test"]}}
    config = parse_config(data, None, tmp_path)
    rt = build_runtime(config, task.Clock())
    for user in ("ann@example.test", "bob@example.test"):
        rt.directory.add_user(user, "not-a-real-hash")
    return rt


def test_stale_tmp_files_go_everywhere_and_nothing_else(runtime: Runtime) -> None:
    ann = runtime.directory.mailbox_root("ann@example.test")
    bob = runtime.directory.mailbox_root("bob@example.test")
    ensure_folder(bob / ".Projects.2024")  # a user-made folder, nested
    spool_in = runtime.config.data_dir / "spool" / "incoming"
    queue_tmp = runtime.queue.tmp_dir
    stale = [
        aged(ann / "tmp" / "1.M1P1Q1.host", 37),
        aged(ann / ".Sent" / "tmp" / "2.M1P1Q1.host", 100),
        aged(bob / ".Projects.2024" / "tmp" / "3.M1P1Q1.host", 24 * 30),
        aged(spool_in / "4.M1P1Q1.host", 40),
        aged(queue_tmp / "0123456789ABCDEF.msg", 48),
    ]
    kept = [
        aged(ann / "tmp" / "5.M1P1Q1.host", 35),  # younger than 36 hours: maybe still written
        aged(bob / "tmp" / "6.M1P1Q1.host", 0),
        aged(ann / "new" / "7.M1P1Q1.host,S=16,W=17", 1000),  # delivered mail: never
        aged(ann / "cur" / "8.M1P1Q1.host,S=16,W=17:2,S", 1000),
        aged(ann / ".Sent" / "cur" / "9.M1P1Q1.host,S=16,W=17:2,S", 1000),
        aged(queue_tmp / "FEDCBA9876543210.msg", 1),
        aged(ann / "dovecot-keywords", 1000),
    ]
    recently_read = aged(ann / "tmp" / "10.M1P1Q1.host", 100)
    os.utime(recently_read, (time.time(), time.time() - 100 * HOUR))  # read an hour ago
    kept.append(recently_read)

    sweeper = LeftoverSweeper(runtime, clock=task.Clock(), blocking=sync)
    sweeper.startService()
    try:
        assert [p for p in stale if p.exists()] == []
        assert [p for p in kept if not p.exists()] == []
        assert (ann / "tmp").is_dir() and (bob / ".Projects.2024" / "tmp").is_dir()
    finally:
        sweeper.stopService()


def test_sweeps_again_every_day_and_stops_with_the_service(runtime: Runtime) -> None:
    clock = task.Clock()
    ann = runtime.directory.mailbox_root("ann@example.test")
    sweeper = LeftoverSweeper(runtime, clock=clock, blocking=sync)
    sweeper.startService()
    later = aged(ann / ".Trash" / "tmp" / "11.M1P1Q1.host", 37)  # appears after the start
    clock.advance(SWEEP_EVERY - 1)
    assert later.exists()
    clock.advance(1)
    assert not later.exists()
    sweeper.stopService()
    assert clock.getDelayedCalls() == []


def test_missing_folders_and_users_without_a_mailbox_are_fine(tmp_path: Path) -> None:
    gone = tmp_path / "no-such-user"
    removed, problems = sweep([gone], [tmp_path / "no-such-dir"], time.time())
    assert removed == [] and problems == []


def test_the_cutoff_is_36_hours() -> None:
    assert STALE_AFTER == 36 * HOUR
