"""``FolderIndex.messages()`` keeps the list it read while the database is unchanged: every
change, through the same handle, another handle of this process or another process, is seen
by the next call (issue 15: the list is what every POP3 login reads)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from mailsuite.store.index import FolderIndex
from mailsuite.store.index_schema import INDEX_NAME
from mailsuite.store.write import write_message
from tests.store_helpers import box

SEEN = frozenset({"\\Seen"})
REPO = Path(__file__).resolve().parents[2]


def opened(root: Path) -> FolderIndex:
    index = FolderIndex(root)
    index.sync(force=True)
    return index


def listed(index: FolderIndex) -> list[tuple[int, str, frozenset[str], int]]:
    return [(m.uid, m.name, m.flags, m.size) for m in index.messages()]


def test_an_unchanged_index_answers_from_the_kept_list_and_a_copy_of_it(tmp_path: Path) -> None:
    index = opened(box(tmp_path, 3))
    try:
        first = index.messages()
        first.clear()  # the caller's own list: the next call is whole
        second = index.messages()
        assert [m.uid for m in second] == [1, 2, 3]
        assert all(a is b for a, b in zip(second, index.messages(), strict=True))  # kept
        queries: list[str] = []
        index.db.set_trace_callback(queries.append)
        index.messages()
        index.db.set_trace_callback(None)
        assert queries == ["PRAGMA data_version"]  # no row read, no fill
    finally:
        index.close()


def test_changes_through_the_same_handle_are_seen(tmp_path: Path) -> None:
    root = box(tmp_path, 3)
    index = opened(root)
    try:
        index.messages()
        index.store_flags([(2, SEEN)])
        assert [m.flags for m in index.messages()] == [frozenset(), SEEN, frozenset()]
        index.expunge([1])
        assert [m.uid for m in index.messages()] == [2, 3]
        write_message(root, [b"Subject: new\n\nx\n"])
        index.sync(force=True)
        assert [m.uid for m in index.messages()] == [2, 3, 4]
    finally:
        index.close()


def test_changes_through_another_handle_of_this_process_are_seen(tmp_path: Path) -> None:
    root = box(tmp_path, 3)
    reader, writer = opened(root), opened(root)
    try:
        assert [m.flags for m in reader.messages()] == [frozenset()] * 3
        writer.store_flags([(3, SEEN)])
        assert [m.flags for m in reader.messages()] == [frozenset(), frozenset(), SEEN]
        writer.expunge([2])
        assert [m.uid for m in reader.messages()] == [1, 3]
    finally:
        reader.close()
        writer.close()


def test_changes_made_by_another_process_are_seen(tmp_path: Path) -> None:
    root = box(tmp_path, 2)
    index = opened(root)
    try:
        assert [m.flags for m in index.messages()] == [frozenset()] * 2
        code = (
            "import sys; from pathlib import Path\n"
            "from mailsuite.store.index import FolderIndex\n"
            "i = FolderIndex(Path(sys.argv[1])); i.sync(force=True)\n"
            "i.store_flags([(1, frozenset({'\\\\Seen'}))]); i.expunge([2]); i.close()\n"
        )
        env = dict(os.environ, PYTHONPATH=str(REPO))
        subprocess.run([sys.executable, "-c", code, str(root)], check=True, env=env, timeout=60)
        assert [(m.uid, m.flags) for m in index.messages()] == [(1, SEEN)]
    finally:
        index.close()


def test_a_size_still_unknown_is_filled_at_the_next_call(tmp_path: Path) -> None:
    """A list with a size or date not known (its file missing at the fill) is not kept: the
    next call tries the fill again, as before."""
    root = box(tmp_path, 2)
    index = opened(root)
    try:
        name = index.messages()[1].name
        index.db.execute("UPDATE messages SET size = -1 WHERE uid = 2")
        (root / name).rename(tmp_path / "away")
        assert [m.size for m in index.messages()][1] == -1  # file gone: size stays unknown
        (tmp_path / "away").rename(root / name)  # back under the same name, no row changed
        assert index.messages()[1].size == len(b"Subject: 1\r\n\r\nbody\r\n")
    finally:
        index.close()


def test_a_rolled_back_change_leaves_no_stale_list(tmp_path: Path) -> None:
    index = opened(box(tmp_path, 2))
    try:
        index.messages()
        index.db.execute("BEGIN IMMEDIATE")
        index.db.execute("UPDATE messages SET flags = '\\Seen' WHERE uid = 1")
        assert index.messages()[0].flags == SEEN  # this connection reads its own change
        index.db.execute("ROLLBACK")
        assert index.messages()[0].flags == frozenset()
    finally:
        index.close()


def test_the_list_equals_the_rows(tmp_path: Path) -> None:
    root = box(tmp_path, 5)
    index = opened(root)
    try:
        index.store_flags([(1, SEEN), (4, frozenset({"\\Flagged", "$Work"}))])
        index.messages()
        db = sqlite3.connect(root / INDEX_NAME)
        rows = db.execute("SELECT uid, name, flags, size FROM messages ORDER BY uid").fetchall()
        db.close()
        want = [(u, n, frozenset(f.split()), s) for u, n, f, s in rows]
        assert listed(index) == want
    finally:
        index.close()


def test_a_folder_above_the_limit_is_read_every_time(tmp_path: Path) -> None:
    index = opened(box(tmp_path, 3))
    index.keep_messages_max = 2
    try:
        first = index.messages()
        assert [m.uid for m in first] == [1, 2, 3]
        assert all(a is not b for a, b in zip(first, index.messages(), strict=True))
        assert index._messages is None
    finally:
        index.close()


def test_sizes_and_dates_of_files_another_program_wrote(tmp_path: Path) -> None:
    """Files with no ``,S=``/``,W=`` in their names (another program's delivery) are measured
    at the first listing: the size as sent (every line end CRLF, RFC 1939 11 / RFC 3501
    RFC822.SIZE) and the internal date from the file's mtime; a file that vanished first is
    left unknown, not an error."""
    root = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True)
    bodies = {
        "1700000001.A.host:2,": b"Subject: lf\n\nline\nline\n",
        "1700000002.B.host:2,S": b"Subject: crlf\r\n\r\nline\r\n",
        "1700000003.C.host:2,": b"Subject: mixed\r\n\nlast line without end",
        "1700000004.D.host:2,": b"",
    }
    for i, (name, data) in enumerate(bodies.items()):
        (root / "cur" / name).write_bytes(data)
        os.utime(root / "cur" / name, (1_700_000_000 + i, 1_700_000_000 + i))
    index = opened(root)
    try:
        got = {m.name.rpartition("/")[2]: (m.size, m.internaldate) for m in index.messages()}
        want = {
            name: (len(data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")), 1_700_000_000 + i)
            for i, (name, data) in enumerate(bodies.items())
        }
        assert got == want
    finally:
        index.close()


def test_get_many_equals_get_of_each(tmp_path: Path) -> None:
    """``get_many`` (a POP3 session taking back the rows whose \\Seen it stored) gives what
    ``get`` gives for each UID that exists, across query batches, and leaves out the rest."""
    index = opened(box(tmp_path, 3))
    try:
        index.store_flags([(2, SEEN)])
        uids = [1, 2, 3, 4, *range(5, 2000)]  # more than one batch of bound parameters
        got = index.get_many(uids)
        assert sorted(got) == [1, 2, 3]
        assert all(got[u] == index.get(u) for u in (1, 2, 3))
        assert got[2].flags >= SEEN and got[2].name.startswith("cur/")
    finally:
        index.close()


def test_a_date_alone_is_taken_from_the_file(tmp_path: Path) -> None:
    """A row whose size is known (a name with ``,W=``) but whose date is not gets the file's
    mtime, and keeps its size."""
    index = opened(box(tmp_path, 1))
    try:
        msg = index.messages()[0]
        os.utime(index.folder / msg.name, (1_600_000_000, 1_600_000_000))
        index.db.execute("UPDATE messages SET internaldate = -1 WHERE uid = 1")
        got = index.messages()[0]
        assert (got.size, got.internaldate) == (msg.size, 1_600_000_000)
    finally:
        index.close()
