"""The real server sweeps tmp/ leftovers of interrupted writes when it starts (issue 10):
files older than 36 hours go, in every folder of every user and in the queue; younger ones
and delivered mail stay.  (The daily repeat runs on a task.Clock in tests/unit/test_leftovers.)"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.harness import Server, wait_until

HOURS = 3600.0


def aged(path: Path, hours: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"Subject: half written\n\npart")
    then = time.time() - hours * HOURS
    os.utime(path, (then, then))
    return path


def test_start_removes_stale_tmp_files_only(tmp_path: Path) -> None:
    srv = Server(tmp_path, services=("smtp",))
    srv.add_user("ann@example.test")
    srv.add_user("bob@example.test")
    ann, bob = srv.maildir("ann@example.test"), srv.maildir("bob@example.test")
    stale = [
        aged(ann / "tmp" / "1.M1P9Q1.old", 37),
        aged(bob / ".Sent" / "tmp" / "2.M1P9Q1.old", 200),
        aged(srv.data / "spool" / "incoming" / "3.M1P9Q1.old", 48),
    ]
    kept = [
        aged(ann / "tmp" / "4.M1P9Q1.new", 2),
        aged(bob / "cur" / "5.M1P9Q1.old,S=27,W=29:2,S", 1000),
    ]
    with srv:
        wait_until(lambda: not any(p.exists() for p in stale), 20, "the stale files to go")
        assert all(p.exists() for p in kept)
        log = srv.log.read_text(errors="replace")
        assert "Removed 3 leftover temporary files older than 36 hours" in log
