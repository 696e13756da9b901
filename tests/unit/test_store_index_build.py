"""The build of a missing index (index_build): the same index an empty index and one sync
give, for any listing; survives kill -9 at any point; several processes opening a folder at
once agree on one build."""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailsuite.store import index_scan
from mailsuite.store.index import INDEX_NAME, FolderIndex
from mailsuite.store.index_build import _w_size, delivery_sorted, sizes_in_sql
from mailsuite.store.index_scan import IndexScan, _bases_of, _delivery_key
from mailsuite.store.index_schema import SyncResult
from mailsuite.store.maildir import ensure_folder, write_keywords

ROOT = Path(__file__).resolve().parents[2]

_secs = st.sampled_from([999_999_999, 1_000_000_000, 1_700_000_000, 1_700_000_001])
_usec = st.integers(0, 1_200_000)
_info = st.sampled_from(["", ":2,", ":2,S", ":2,FS", ":2,a", ":2,RSa", ":2,T", ":2,S,W=5"])


@st.composite
def _name(draw: st.DrawFn) -> str:
    """A base in the forms programs write: ours, a generator's (zero-padded microseconds),
    Dovecot's sizes, Postfix's, odd ones."""
    form = draw(st.integers(0, 9))
    sec, usec = draw(_secs), draw(_usec)
    if form <= 3:
        base = f"{sec}.M{usec}P{draw(st.integers(1, 99))}Q{draw(st.integers(0, 12))}.h"
    elif form <= 6:
        base = f"{sec}.M{usec:06d}P4242.gen"
    elif form == 7:
        base = f"{sec}.M{usec}P8V801I{usec:x}_0.mx"
    elif form == 8:
        base = f"{sec}.V801I{usec:x}M{usec}.mx"
    else:
        base = f"odd{usec}"
    sizes = draw(
        st.sampled_from(
            [
                *["", ",S=30", ",S=30,W=31", ",W=44", ",W=x"],
                # odd sizes SQLite's CAST would read otherwise than Python: not read by SQLite
                *[",W=0031", ",W=31,W=32", ",W=31x", ",W=1234567890123456789", ",W=\u0663"],
            ]
        )
    )
    return base + sizes


@st.composite
def _listing(draw: st.DrawFn) -> tuple[list[str], list[str]]:
    """(new/ names, cur/ names); some bases in both (a reader mid-move)."""
    bases = draw(st.lists(_name(), max_size=25, unique=True))
    new: list[str] = []
    cur: list[str] = []
    for b in bases:
        where = draw(st.sampled_from(["new", "cur", "cur", "both"]))
        if where in ("new", "both"):
            new.append(b)
        if where in ("cur", "both"):
            cur.append(b + draw(_info))
    return new, cur


def _reference(new: list[str], cur: list[str]) -> list[str]:
    """The order the general path gives (index_scan: _bases_of, then _delivery_key)."""
    appeared = {"new/" + n for n in new} | {"cur/" + n for n in cur}
    bases = _bases_of(appeared, True)
    return [bases[b] for b in sorted(bases, key=_delivery_key)]


@settings(max_examples=200, deadline=None)
@given(_listing())
def test_delivery_sorted_equals_the_general_order(listing: tuple[list[str], list[str]]) -> None:
    new, cur = listing
    assert delivery_sorted(list(new), list(cur), _delivery_key) == _reference(new, cur)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(0, 999_999), min_size=1, max_size=40, unique=True),
    st.booleans(),
    st.booleans(),
)
def test_plain_names_take_the_plain_sort_and_equal_the_general_order(
    usecs: list[int], pad: bool, some_new: bool
) -> None:
    """The plain sort (seconds and microseconds of one width, none alike) and its refusals
    (unpadded microseconds of several widths) both give the general order."""
    names = [f"1700000000.M{u:06d}P{u % 7}.gen" if pad else f"1700000000.M{u}P1.h" for u in usecs]
    new = names[::3] if some_new else []
    cur = [n + ":2,S" for n in names if n not in new]
    assert delivery_sorted(list(new), list(cur), _delivery_key) == _reference(new, cur)


@pytest.mark.parametrize("some_new", [False, True])
def test_names_sharing_a_head_refuse_the_plain_sort(some_new: bool) -> None:
    """Two names alike in seconds and microseconds are ordered by their counter (``Q``),
    which the text of the names does not follow: the plain sort must not be taken."""
    first, second = "1700000000.M000001P2Q1.h", "1700000000.M000001P1Q3.h"  # by Q
    names = ["1699999999.M000009P1.h:2,", second + ":2,", first + ":2,S"]
    new = [names.pop()[:-4]] if some_new else []
    got = delivery_sorted(new, list(names), _delivery_key)
    assert got == _reference(new, names)
    assert [r[4:].split(":")[0] for r in got][1:] == [first, second]


def _write(box: Path, new: list[str], cur: list[str]) -> None:
    for sub, names in (("new", new), ("cur", cur)):
        for i, n in enumerate(names):
            (box / sub / n).write_bytes(b"Subject: %d\n\nline\n" % i)
    (box / "cur" / ".hidden").write_bytes(b"not a message")
    write_keywords(box, {"a": "$Label1"})
    past = time.time() - 10
    for sub in ("new", "cur"):
        os.utime(box / sub, (past, past))


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


def _rows_only(idx: IndexScan, subs: tuple[str, ...]) -> SyncResult:
    """The row-by-row sync of an index without a message (what it was before the bulk fill)."""
    stamp = idx._dir_stamp()
    assert stamp is not None
    return idx._scan_rows(stamp, time.time_ns(), subs)


def _filled(box: Path, new: list[str], cur: list[str], bulk: bool) -> tuple[Any, ...]:
    """An empty index, then the files (another program) and a sync: bulk or row by row."""
    idx = FolderIndex(box)
    _write(box, new, cur)
    if bulk:
        return _synced(idx, box)
    with mock.patch.object(IndexScan, "_fill_empty", _rows_only):
        return _synced(idx, box)


def _synced(idx: FolderIndex, box: Path) -> Any:
    """``idx`` synced with the folder, then closed: the sync's result, the index's state and
    the folder's files."""
    res = idx.sync(force=True)
    state = idx.state()
    idx.close()
    return res, state, _dump(box)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_listing())
def test_build_and_bulk_fill_equal_an_empty_index_and_a_sync_row_by_row(
    listing: tuple[list[str], list[str]],
) -> None:
    """The three ways a folder is first seen give one index: its index missing (built at
    open), its index empty (filled in bulk), and the general sync row by row (the reference)."""
    new, cur = listing
    with tempfile.TemporaryDirectory() as tmp:
        built = ensure_folder(Path(tmp) / "built")
        _write(built, new, cur)
        idx = FolderIndex(built)  # index missing: built at open
        res = idx.sync()
        state = idx.state()
        idx.close()
        reference = _filled(ensure_folder(Path(tmp) / "rows"), new, cur, bulk=False)
        assert (res, state, _dump(built)) == reference
        assert not [p for p in built.iterdir() if ".build-" in p.name]
        assert _filled(ensure_folder(Path(tmp) / "bulk"), new, cur, bulk=True) == reference


def test_an_empty_index_another_program_filled_takes_the_bulk_fill(tmp_path: Path) -> None:
    """A folder whose index exists but holds nothing, whose ``cur/`` alone another program
    then filled, is indexed by the bulk fill (not row by row), with UIDs after the folder's
    earlier ones, under its UIDVALIDITY; a later delivery as ever."""
    box = ensure_folder(tmp_path / "box")
    past = time.time() - 100
    (box / "cur" / "1.M1P1.h:2,").write_bytes(b"Subject: x\n\nx\n")
    for sub in ("new", "cur"):
        os.utime(box / sub, (past, past))
    idx = FolderIndex(box)  # built at open, both directories' mtimes recorded
    idx.expunge([1])
    uidvalidity = idx.uidvalidity
    idx.close()
    names = _names(300)
    for i, n in enumerate(names):
        (box / "cur" / n).write_bytes(b"Subject: %d\n\nline\n" % i)
    os.utime(box / "cur", (past + 50, past + 50))  # new/ as the index last saw it
    idx = FolderIndex(box)
    with mock.patch.object(IndexScan, "_scan_rows", side_effect=AssertionError("row by row")):
        res = idx.sync()
    assert res.added == tuple(range(2, 302))
    assert idx.uidvalidity == uidvalidity
    assert [m.base for m in idx.messages()] == _expected(box)
    assert idx.state()[1] == ["\\Seen" if i % 2 else "" for i in range(300)]  # as _names
    (box / "new" / "3000000000.M1P1.h").write_bytes(b"Subject: y\n\ny\n")
    assert idx.sync().added == (302,)
    idx.close()


def test_build_answers_state_from_its_lists_only_while_nothing_changed(tmp_path: Path) -> None:
    box = ensure_folder(tmp_path / "box")
    _write(box, [], ["1.M1P1.h:2,S", "2.M2P1.h:2,"])
    idx = FolderIndex(box)
    other = FolderIndex(box)
    other.store_flags([(2, frozenset({"\\Flagged"}))])  # another process, after the build
    uids, flags, modseqs = idx.state()
    assert (uids, flags) == ([1, 2], ["\\Seen", "\\Flagged"])
    assert modseqs[1] > modseqs[0]


def test_a_rename_by_another_program_after_the_build_keeps_the_uid(tmp_path: Path) -> None:
    box = ensure_folder(tmp_path / "box")
    _write(box, ["3.M3P1.h"], ["1.M1P1.h:2,S", "2.M2P1.h:2,"])
    idx = FolderIndex(box)
    assert idx.sync().added == (1, 2, 3)
    (box / "cur" / "2.M2P1.h:2,").rename(box / "cur" / "2.M2P1.h:2,FS")
    (box / "new" / "3.M3P1.h").rename(box / "cur" / "3.M3P1.h:2,")
    res = idx.sync()
    assert res.flag_changes == (2,) and not res.added and not res.expunged
    assert {m.uid: (m.name, m.flags) for m in idx.messages()} == {
        1: ("cur/1.M1P1.h:2,S", {"\\Seen"}),
        2: ("cur/2.M2P1.h:2,FS", {"\\Flagged", "\\Seen"}),
        3: ("cur/3.M3P1.h:2,", frozenset()),
    }


_CHILD = """
import os, signal, sys, time
from pathlib import Path
import mailsuite.store.index_build as build
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if sys.argv[2] == "before-rename":
    real = Path.rename
    def rename(self, target):
        if ".build-" in self.name:
            die()
        return real(self, target)
    Path.rename = rename
elif sys.argv[2] == "mid-insert":
    insert = build.insert_rows
    def insert_then_die(db, first_uid, modseq, cols):
        steps = []
        def tick():  # SQLite calls it every 1000 VM instructions of the insert
            steps.append(1)
            if len(steps) == 50:
                die()
            return 0
        db.set_progress_handler(tick, 1000)
        insert(db, first_uid, modseq, cols)
    build.insert_rows = insert_then_die
from mailsuite.store.index import FolderIndex
print("ready", flush=True)
t0 = time.monotonic()
idx = FolderIndex(Path(sys.argv[1]))
took = time.monotonic() - t0
print(idx.uidvalidity, "/".join(m.base for m in idx.messages()), took, flush=True)
"""


def _child(box: Path, mode: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(box), mode],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )


def _names(n: int) -> list[str]:
    return [f"{1_700_000_000 + i}.M{i}P9.h,S=20:2,{'S' if i % 2 else ''}" for i in range(n)]


def _expected(box: Path) -> list[str]:
    return sorted(
        (
            p.name.split(":", 1)[0]
            for sub in ("new", "cur")
            for p in (box / sub).iterdir()
            if not p.name.startswith(".")
        ),
        key=_delivery_key,
    )


@pytest.mark.parametrize("when", ["mid-insert", "before-rename"])
def test_a_killed_build_leaves_no_index_and_the_next_open_builds_it(
    tmp_path: Path, when: str
) -> None:
    box = ensure_folder(tmp_path / "box")
    _write(box, [], _names(3000))
    child = _child(box, when)
    assert child.wait(timeout=60) == -9
    assert child.stdout is not None
    child.stdout.close()
    assert not (box / INDEX_NAME).exists()
    assert [p for p in box.iterdir() if ".build-" in p.name]  # the killed build's file
    idx = FolderIndex(box)
    assert [m.base for m in idx.messages()] == _expected(box)
    assert [m.uid for m in idx.messages()] == list(range(1, 3001))
    assert not [p for p in box.iterdir() if ".build-" in p.name]
    assert idx.db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    assert idx.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_kill_9_at_any_moment_of_a_build_then_open_works(tmp_path: Path) -> None:
    box = ensure_folder(tmp_path / "box")
    _write(box, ["2000000000.M1P1.h"], _names(5000))
    want = _expected(box)
    full = _child(box, "run")
    out, _ = full.communicate(timeout=120)
    _, _, bases, took = out.split()
    assert bases.split("/") == want
    rnd = random.Random(15)
    for _ in range(6):
        for p in box.glob(INDEX_NAME + "*"):
            p.unlink()
        child = _child(box, "run")
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        time.sleep(rnd.uniform(0, float(took) * 1.2))  # somewhere in the build
        child.kill()
        child.wait(timeout=60)
        child.stdout.close()
        idx = FolderIndex(box)  # whatever the kill left: a built index, or none yet
        assert [m.base for m in idx.messages()] == want
        assert idx.db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        idx.close()
        assert not [p for p in box.iterdir() if ".build-" in p.name]


def test_processes_opening_a_folder_at_once_share_one_build(tmp_path: Path) -> None:
    box = ensure_folder(tmp_path / "box")
    _write(box, [], _names(2000))
    children = [_child(box, "run") for _ in range(3)]
    outs = {tuple(c.communicate(timeout=120)[0].split()[1:3]) for c in children}
    assert len(outs) == 1  # one UIDVALIDITY, one numbering
    uidvalidity, bases = outs.pop()
    assert bases.split("/") == _expected(box)
    idx = FolderIndex(box)
    assert idx.uidvalidity == int(uidvalidity)


@pytest.mark.parametrize(
    ("names", "in_sql"),
    [
        (["1.M1P1.h,S=30,W=31:2,S", "2.M2P1.h,W=0044:2,", "3.M3P1.h:2,"], True),
        (["1.M1P1.h,S=30,W=31,X=1", "2.M2P1.h,W=7"], True),
        (["1.M1P1.h,W=31:2,S", "2.M2P1.h,W=31x:2,"], False),  # Python: no size
        (["1.M1P1.h,W=31,W=32:2,S"], False),  # two: Python takes the last
        (["1.M1P1.h:2,S,W=5"], False),  # in the info suffix, not the base
        (["1.M1P1.h,W=1234567890123456789"], False),  # beyond an int64
        (["1.M1P1.h,W=\u0663"], False),  # a digit to Python's isdigit, not to SQLite
    ],
)
def test_sizes_from_w_are_read_by_sqlite_only_where_it_reads_them_as_python(
    tmp_path: Path, names: list[str], in_sql: bool
) -> None:
    """Dovecot writes ``,W=`` in every name: the build reads those sizes in SQLite (no Python
    call per name); any ``,W=`` SQLite's CAST could read otherwise goes through Python."""
    joined = "\n".join(names)
    assert sizes_in_sql(joined, joined.count(",W=")) is in_sql
    box = ensure_folder(tmp_path / "box")
    _write(box, [], names)
    FolderIndex(box).close()
    rows, _ = _dump(box)
    assert {base: size for _, base, _, _, size, _, _ in rows} == {
        n.split(":")[0]: _w_size(n.split(":")[0]) for n in names
    }


def _added_to_a_known_folder(box: Path, new: list[str], cur: list[str], bulk: int) -> Any:
    """A folder with one indexed message, then another program adds files; the sync, with
    ``bulk`` the fewest new files that take the bulk insert."""
    (box / "cur" / "1.M0P0.h:2,S").write_bytes(b"Subject: first\n\nx\n")
    FolderIndex(box).close()
    _write(box, new, cur)
    with mock.patch.object(index_scan, "_BULK_FRESH", bulk):
        return _synced(FolderIndex(box), box)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_listing())
def test_many_files_added_to_a_known_folder_go_in_bulk_as_row_by_row(
    listing: tuple[list[str], list[str]],
) -> None:
    """Files another program adds to a folder whose index holds messages: the bulk insert
    (many files) gives what the insert of a row per file gives."""
    new, cur = listing
    with tempfile.TemporaryDirectory() as tmp:
        bulk = _added_to_a_known_folder(ensure_folder(Path(tmp) / "a"), new, cur, 1)
        rows = _added_to_a_known_folder(ensure_folder(Path(tmp) / "b"), new, cur, 10**9)
        assert bulk == rows


def test_a_big_import_into_a_known_folder_keeps_moves_apart_from_new_mail(
    tmp_path: Path,
) -> None:
    """Another program moves a known message (new/ to cur/, flagged) and adds 1,000 files:
    the move keeps its UID (the rows are read in one pass, as there are more files than
    rows), the files get the next UIDs in delivery order, nothing is expunged."""
    box = ensure_folder(tmp_path / "box")
    (box / "cur" / "1.M1P1.h:2,S").write_bytes(b"Subject: a\n\na\n")
    (box / "new" / "2.M2P1.h,W=15").write_bytes(b"Subject: b\n\nb\n")
    idx = FolderIndex(box)
    assert idx.sync().added == (1, 2)
    (box / "new" / "2.M2P1.h,W=15").rename(box / "cur" / "2.M2P1.h,W=15:2,F")
    _write(box, ["1800000000.M1P1.h"], _names(999))
    res = idx.sync(force=True)
    assert res.added == tuple(range(3, 1003)) and res.flag_changes == (2,)
    assert not res.expunged
    msgs = idx.messages()
    assert [m.base for m in msgs] == ["1.M1P1.h", "2.M2P1.h,W=15", *_expected(box)[2:]]
    assert (msgs[1].name, msgs[1].flags, msgs[1].size) == (
        "cur/2.M2P1.h,W=15:2,F",
        {"\\Flagged"},
        15,
    )
    assert msgs[-1].name == "new/1800000000.M1P1.h"
    idx.close()
