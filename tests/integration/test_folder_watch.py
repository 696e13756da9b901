"""Folder change notifications through inotify (mailsuite.shared.folder_watch) on the real
reactor and the real file system: a file renamed into ``new/`` by another writer (here the
test, standing for another worker or mutt) is announced at once; flags (a rename in
``cur/``) and expunges (an unlink) too; nothing after the watch stops."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from mailsuite.shared.folder_watch import InotifyWatcher, PollingWatcher
from tests.harness import wait_until
from tests.reactor_thread import in_reactor


def maildir(root: Path) -> Path:
    for sub in ("new", "cur", "tmp"):
        (root / sub).mkdir(parents=True)
    return root


def test_inotify_announces_deliveries_flag_changes_and_expunges(
    tmp_path: Path, reactor: Any
) -> None:
    box = maildir(tmp_path / "box")
    calls: list[float] = []
    seen = threading.Event()

    def changed() -> None:
        calls.append(time.monotonic())
        seen.set()

    watcher = in_reactor(reactor, InotifyWatcher, reactor, PollingWatcher(reactor))
    stop = in_reactor(reactor, watcher.watch, box, changed)
    other = maildir(tmp_path / "other")
    other_calls: list[int] = []
    stop_other = in_reactor(reactor, watcher.watch, other, lambda: other_calls.append(1))
    try:
        (box / "tmp" / "1.x").write_bytes(b"Subject: a\r\n\r\nb\r\n")
        start = time.monotonic()
        (box / "tmp" / "1.x").rename(box / "new" / "1.x")  # a delivery
        assert seen.wait(5)
        print(f"\ninotify: rename into new/ -> changed() in {(calls[0] - start) * 1000:.1f} ms")
        assert calls[0] - start < 1.0
        n = len(calls)
        (box / "new" / "1.x").rename(box / "cur" / "1.x:2,S")  # \\Seen set elsewhere
        wait_until(lambda: len(calls) > n, 5, "the flag change")
        n = len(calls)
        (box / "cur" / "1.x:2,S").unlink()  # an expunge elsewhere
        wait_until(lambda: len(calls) > n, 5, "the expunge")
    finally:
        in_reactor(reactor, stop)
    n = len(calls)
    (box / "tmp" / "2.x").write_bytes(b"x")
    (box / "tmp" / "2.x").rename(box / "new" / "2.x")
    # the kernel queues events in order on one descriptor: once the other folder's later
    # event has arrived, one for the unwatched folder would have arrived before it
    (other / "tmp" / "3.x").write_bytes(b"x")
    (other / "tmp" / "3.x").rename(other / "new" / "3.x")
    wait_until(lambda: other_calls, 5, "the other folder's change")
    assert len(calls) == n, "told of a change after the watch stopped"
    in_reactor(reactor, stop_other)
    in_reactor(reactor, watcher.close)


def test_a_folder_that_cannot_be_watched_is_polled(tmp_path: Path, reactor: Any) -> None:
    """inotify refuses a folder without new/ and cur/ (here: not made yet): the watcher
    falls back to polling it rather than failing the IDLE."""
    calls: list[int] = []
    watcher = in_reactor(reactor, InotifyWatcher, reactor, PollingWatcher(reactor, 0.05))
    stop = in_reactor(reactor, watcher.watch, tmp_path / "missing", lambda: calls.append(1))
    try:
        wait_until(lambda: len(calls) >= 2, 5, "polling")
    finally:
        in_reactor(reactor, stop)
        in_reactor(reactor, watcher.close)
