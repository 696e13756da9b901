"""A first build whose secondary indexes come after the answer (IMAP SELECT of a folder new to
us, issue 15): the rows alone answer every query alike, writes work before the indexes exist,
:func:`finish_indexes` makes them, and a process killed before or during that leaves a file
the next open completes, with the UIDVALIDITY and UIDs it had announced."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mailsuite.store.index import INDEX_NAME, FolderIndex
from mailsuite.store.index_build import DEFER_ROWS, finish_indexes
from mailsuite.store.index_scan import _delivery_key
from mailsuite.store.mailbox import opened_index
from mailsuite.store.maildir import ensure_folder

ROOT = Path(__file__).resolve().parents[2]
#: every secondary index a first build makes
INDEXES = {"messages_base", "messages_modseq", "messages_in_new", "expunged_modseq"}


def _names(n: int) -> list[str]:
    """Names as Dovecot writes them (``,S=`` and ``,W=``), half of them seen."""
    return [
        f"{1_700_000_000 + i}.M{i}P9.h,S={20 + i % 7},W={21 + i % 7}:2,{'S' if i % 2 else ''}"
        for i in range(n)
    ]


def _write(box: Path, new: list[str], cur: list[str]) -> None:
    for sub, names in (("new", new), ("cur", cur)):
        for name in names:
            (box / sub / name).write_bytes(b"Subject: x\n\nbody\n")
    past = time.time() - 100  # mtimes old enough to be recorded
    for sub in ("new", "cur"):
        os.utime(box / sub, (past, past))


def _indexes(box: Path) -> set[str]:
    db = sqlite3.connect(box / INDEX_NAME)
    try:
        return {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    finally:
        db.close()


def _dump(box: Path) -> tuple[list[tuple[Any, ...]], dict[str, Any]]:
    db = sqlite3.connect(box / INDEX_NAME)
    try:
        rows = db.execute(
            "SELECT uid, base, name, flags, size, internaldate, modseq FROM messages ORDER BY uid"
        ).fetchall()
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    finally:
        db.close()
    for k in ("uidvalidity", "stamp_new", "stamp_cur"):
        meta[k] = k in meta  # the value differs per folder; that it is there must not
    return rows, meta


def test_deferred_build_equals_the_whole_build_and_finish_makes_the_indexes(
    tmp_path: Path,
) -> None:
    new, cur = ["2000000000.M1P1.h,S=5,W=6"], _names(DEFER_ROWS)
    whole, deferred = ensure_folder(tmp_path / "whole"), ensure_folder(tmp_path / "deferred")
    for box in (whole, deferred):
        _write(box, new, cur)
    ref = opened_index(whole)
    assert not ref.indexes_pending
    assert _indexes(whole) >= INDEXES
    idx = opened_index(deferred, defer_indexes=True)
    assert idx.indexes_pending
    assert not _indexes(deferred) & INDEXES  # answered before any index exists
    assert idx.state() == ref.state()
    assert _dump(deferred) == _dump(whole)
    assert [m.size for m in idx.messages()][:3] == [21, 22, 23]  # from ,W=
    # the table alone answers what the indexes serve, and takes changes
    (deferred / "new" / "2100000000.M2P1.h").write_bytes(b"Subject: y\n\ny\n")
    assert idx.sync(force=True).added == (DEFER_ROWS + 2,)
    done = idx.store_flags([(3, frozenset({"\\Flagged"}))])
    assert [(u, f) for u, f, _ in done] == [(3, "\\Flagged")]
    changed, _ = idx.changes_since(ref.highestmodseq)
    assert [u for u, _, _ in changed] == [3, DEFER_ROWS + 2]
    assert idx.expunge([4]) == [4]
    finish_indexes(deferred)
    assert _indexes(deferred) >= INDEXES
    assert idx.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    again = FolderIndex(deferred)
    assert again._current()  # complete: opened without the schema script
    assert again.state() == idx.state()
    for i in (idx, again, ref):
        i.close()


def test_a_small_folder_gets_its_indexes_at_once(tmp_path: Path) -> None:
    box = ensure_folder(tmp_path / "box")
    _write(box, [], _names(DEFER_ROWS - 1))
    idx = opened_index(box, defer_indexes=True)
    assert not idx.indexes_pending
    assert _indexes(box) >= INDEXES
    assert idx._current()
    idx.close()


def test_finish_of_an_index_removed_meanwhile_makes_no_file(tmp_path: Path) -> None:
    """``mailsuite reindex`` (or a deleted folder) between the answer and the indexes: the
    finish leaves the folder alone, and never creates an empty index with new UIDs."""
    box = ensure_folder(tmp_path / "box")
    _write(box, [], _names(DEFER_ROWS))
    opened_index(box, defer_indexes=True).close()
    for p in box.glob(INDEX_NAME + "*"):
        p.unlink()
    finish_indexes(box)
    assert not (box / INDEX_NAME).exists()


_CHILD = """
import os, signal, sys
from pathlib import Path
import mailsuite.store.index_build as build
from mailsuite.store.mailbox import opened_index
box, mode = Path(sys.argv[1]), sys.argv[2]
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "in-finish":
    make = build.make_indexes
    def make_then_die(db):
        steps = []
        def tick():  # SQLite calls it every 1000 VM instructions of the sorts
            steps.append(1)
            if len(steps) == 20:
                die()
            return 0
        db.set_progress_handler(tick, 1000)
        make(db)
    build.make_indexes = make_then_die
idx = opened_index(box, defer_indexes=True)
assert idx.indexes_pending
# what SELECT announces, before the indexes are made
print(idx.uidvalidity, "/".join(m.base for m in idx.messages()), flush=True)
if mode == "before-finish":
    die()
build.finish_indexes(box)
"""


@pytest.mark.parametrize("when", ["before-finish", "in-finish"])
def test_kill_9_after_the_answer_keeps_the_announced_uids(tmp_path: Path, when: str) -> None:
    """kill -9 once SELECT could have answered (the rows durable, no index yet), or while the
    indexes are sorted: the next open keeps the UIDVALIDITY and every UID announced, and makes
    the missing indexes."""
    box = ensure_folder(tmp_path / "box")
    _write(box, ["2000000000.M1P1.h"], _names(3000))
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(box), when],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == -9, child.stderr
    uidvalidity, bases = child.stdout.split()
    assert not _indexes(box) & INDEXES
    idx = FolderIndex(box)
    assert idx.uidvalidity == int(uidvalidity)
    assert [m.base for m in idx.messages()] == bases.split("/")
    assert [m.uid for m in idx.messages()] == list(range(1, 3002))
    assert sorted(bases.split("/"), key=_delivery_key) == bases.split("/")
    assert _indexes(box) >= INDEXES
    assert idx.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    idx.close()
