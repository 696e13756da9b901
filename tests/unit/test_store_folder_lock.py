"""An open folder on the event loop's thread never waits for the folder lock, and finds the
changes of others without reading every row (issue 15).

The lock is held here by a second index handle, as a worker thread's APPEND or EXPUNGE or
another process holds it across an ``fsync``: ``flock`` locks belong to the open file, so two
handles exclude each other as two processes do.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

from mailsuite.store.index import FolderIndex
from mailsuite.store.mailbox import FolderRegistry
from mailsuite.store.maildir import ensure_folder
from mailsuite.store.write import write_message


def _box(tmp_path: Path, n: int) -> Path:
    box = ensure_folder(tmp_path / "u")
    for i in range(n):
        write_message(box, [b"Subject: %d\n\nbody\n" % i])
    return box


def _finishes(fn: object, timeout: float = 10.0) -> bool:
    """Run ``fn`` in a thread: did it return within ``timeout``?  (A call that waits for a
    lock held by this thread's other handle would never return: the test must not hang.)"""
    t = threading.Thread(target=fn, daemon=True)  # type: ignore[arg-type]
    t.start()
    t.join(timeout)
    return not t.is_alive()


def test_refresh_and_recent_claim_do_not_wait_for_a_held_lock(tmp_path: Path) -> None:
    box = _box(tmp_path, 3)
    folder = FolderRegistry().get(box)
    view = folder.view(readonly=False)
    other = FolderIndex(box)
    write_message(box, [b"Subject: new\n\nbody\n"])  # the next sync must list new/
    with other._locked():
        assert _finishes(folder.refresh)
        assert folder.uids == [1, 2, 3]  # the listing waits until the lock is free
        claimed: list[tuple[int, int]] = []
        assert _finishes(lambda: claimed.append(folder.index.claim_recent(wait=False)))
        assert claimed[0][0] == claimed[0][1]  # nothing claimed, nothing lost
        assert folder.try_store(view, [(1, frozenset({"\\Seen"}))]) is None
        assert folder.flags[1] == ""
    assert folder.refresh()
    assert folder.uids == [1, 2, 3, 4]
    assert folder.index.claim_recent(wait=False) == (1, 5)
    other.close()
    view.close()


def test_a_refresh_that_found_the_lock_taken_is_tried_again(tmp_path: Path) -> None:
    """An IDLE watcher's tick (inotify: another process renamed a file into new/) that finds
    the writer still holding the lock must not lose the change: there is no further event
    once the writer commits, so the folder tries again shortly."""
    box = _box(tmp_path, 2)
    timers: list[tuple[float, Callable[[], None]]] = []
    registry = FolderRegistry(call_later=lambda delay, f: timers.append((delay, f)))
    folder = registry.get(box)
    view = folder.view(readonly=False)
    heard: list[int] = []
    view.on_change = lambda: heard.append(1)
    other = FolderIndex(box)
    with other._locked():
        write_message(box, [b"Subject: new\n\nbody\n"])
        folder.refresh(verify=True)
        folder.refresh(verify=True)
        assert len(timers) == 1 and 0 < timers[0][0] < 0.1  # one retry, soon
        assert heard == []
    _, retry = timers.pop()
    retry()
    assert heard and view.take_added() == 3 and timers == []
    other.close()
    view.close()


def test_writer_changes_reach_the_folder_and_its_views(tmp_path: Path) -> None:
    box = _box(tmp_path, 3)
    registry = FolderRegistry()
    folder = registry.get(box)
    mine, theirs = folder.view(readonly=False), folder.view(readonly=False)
    done = folder.writer.store([(2, frozenset({"\\Deleted"}))])
    folder.stored(mine, done)
    assert folder.flags[2] == "\\Deleted" and theirs.take_flags() == [2]
    assert mine.take_flags() == []  # the session that stored answers for itself
    gone = folder.writer.expunge([2])
    folder.expunged(gone)
    assert gone == [2] and folder.uids == [1, 3]
    assert mine.take_expunges() == [2] and theirs.take_expunges() == [2]
    assert len(list((box / "cur").iterdir()) + list((box / "new").iterdir())) == 2
    mine.close()
    theirs.close()
    folder._close()
    # a change the writer is asked for after the folder closed still happens, on its own
    # handle, which it closes again
    assert folder.writer.store([(1, frozenset({"\\Seen"}))])[0][1] == "\\Seen"
    assert folder.writer._index is None


def test_changes_since_reads_only_the_changed_rows(tmp_path: Path) -> None:
    """Every open folder asks this whenever another session changed something; SQLite chose
    to scan the whole table in UID order (sparing a sort) over the modseq index, and the
    expunged table, which keeps every expunge the folder ever had, had no index at all."""
    box = _box(tmp_path, 50)
    index = FolderIndex(box)
    index.sync()
    index.expunge([1, 2, 3])
    index.store_flags([(10, frozenset({"\\Seen"}))])
    queries: list[str] = []
    index.db.set_trace_callback(queries.append)
    rows, gone = index.changes_since(index.highestmodseq - 2)
    assert index.expunged_since(0) == [1, 2, 3]
    index.db.set_trace_callback(None)
    assert [r[0] for r in rows] == [10] and gone == [1, 2, 3]
    assert queries
    for q in queries:
        plan = " ".join(row[3] for row in index.db.execute("EXPLAIN QUERY PLAN " + q))
        assert "USING" in plan and not plan.startswith("SCAN"), (q, plan)
    index.close()


def test_an_index_without_the_expunged_modseq_index_gets_it(tmp_path: Path) -> None:
    box = _box(tmp_path, 2)
    FolderIndex(box).close()
    db = sqlite3.connect(box / "mailsuite-index.sqlite")
    db.execute("DROP INDEX expunged_modseq")  # as made by the code before it
    db.commit()
    db.close()
    index = FolderIndex(box)
    names = {n for (n,) in index.db.execute("SELECT name FROM sqlite_master")}
    assert "expunged_modseq" in names
    index.close()


def test_append_through_the_open_folders_writer(tmp_path: Path) -> None:
    """APPEND into an open folder uses its worker-thread handle (no index opened and closed
    per message); a handle whose index file was replaced meanwhile is opened anew."""
    from mailsuite.store.folder_copy import append_blocking

    box = _box(tmp_path, 1)
    folder = FolderRegistry().get(box)
    view = folder.view(readonly=False)
    uv, uid = append_blocking(box, b"Subject: a\n\nx\n", frozenset({"\\Seen"}), None, folder.writer)
    handle = folder.writer._index
    assert (uv, uid) == (folder.uidvalidity, 2) and handle is not None
    assert append_blocking(box, b"Subject: b\n\nx\n", frozenset(), None, folder.writer)[1] == 3
    assert folder.writer._index is handle  # the same handle
    assert folder.refresh() and view.take_added() == 3
    assert folder.flags[2] == "\\Seen" and not list((box / "tmp").iterdir())
    # the index file replaced under the handle (as `mailsuite reindex` does): a new handle
    handle._file = (0, 0)
    append_blocking(box, b"Subject: c\n\nx\n", frozenset(), None, folder.writer)
    assert folder.writer._index is not handle
    view.close()
    folder._close()
