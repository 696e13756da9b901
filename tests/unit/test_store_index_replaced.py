"""An index file replaced while another process still has the old one open.

``mailsuite reindex`` replaces a damaged index (removes ``mailsuite-index.sqlite`` and its
``-wal``/``-shm``; the next open builds a new file and renames it into place) while a server
may still hold a connection to the old file.  The last connection to a WAL database normally
checkpoints and then deletes ``<name>-wal`` and ``<name>-shm`` *by name* when it closes: here
those names are the new index's, whose WAL may hold commits no checkpoint has copied yet.

SQLite guards against exactly this: ``sqlite3PagerClose`` checkpoints and deletes the WAL only
when the database path still names the file the connection has open (``databaseIsUnmoved``,
``SQLITE_FCNTL_HAS_MOVED``: a ``stat`` of the path compared by inode); otherwise it closes its
own descriptors and removes nothing.  The store relies on that, so these tests pin it down with
the real sequence across processes: an SQLite without the guard fails them (checked by removing
the WAL by hand in place of the close: the assertions catch it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mailsuite.store.folder_copy import append_blocking
from mailsuite.store.index import INDEX_NAME, FolderIndex
from mailsuite.store.maildir import ensure_folder
from mailsuite.store.reindex import _replace

ROOT = Path(__file__).resolve().parents[2]

#: another process (a second worker, a delivery) using the new index: one change committed
#: into its WAL, then the index held open until told
_CHILD = r"""
import sys
from pathlib import Path
from mailsuite.store.index import FolderIndex
idx = FolderIndex(Path(sys.argv[1]))
idx.db.execute("PRAGMA wal_autocheckpoint=0")  # the change stays in the WAL
idx.store_flags([(1, frozenset({"\\Flagged"}))])
print("stored", flush=True)
sys.stdin.readline()
idx.close()
"""


def _folder(tmp_path: Path) -> Path:
    path = ensure_folder(tmp_path / "box")
    for i in range(3):
        append_blocking(path, b"Subject: %d\n\nbody\n" % i, frozenset(), None)
    return path


def _flags(path: Path, uid: int) -> frozenset[str]:
    idx = FolderIndex(path)
    try:
        msg = idx.get(uid)
        assert msg is not None
        assert idx.db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        return msg.flags
    finally:
        idx.close()


def test_closing_the_old_index_leaves_the_new_ones_wal_alone(tmp_path: Path) -> None:
    path = _folder(tmp_path)
    old = FolderIndex(path)  # the server's connection to the index as it was
    old.sync()
    old.store_flags([(2, frozenset({"\\Seen"}))])  # the old file has a WAL of its own
    _replace(path)  # mailsuite reindex: the damaged index removed ...
    FolderIndex(path).close()  # ... and built anew
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline() == "stored\n"
        wal = path / (INDEX_NAME + "-wal")
        shm = path / (INDEX_NAME + "-shm")
        files = (wal.stat().st_ino, shm.stat().st_ino)
        assert wal.stat().st_size > 0  # the change is in the new index's WAL only
        old.close()  # the server lets go of the old file
        assert (wal.stat().st_ino, shm.stat().st_ino) == files
        assert _flags(path, 1) == {"\\Flagged"}  # a third process sees the change
    finally:
        child.stdin.write("\n")
        child.stdin.close()
        assert child.wait(timeout=60) == 0
    assert _flags(path, 1) == {"\\Flagged"}  # and after the last close checkpointed it


def test_a_removed_index_closed_late_removes_nothing_of_the_next(tmp_path: Path) -> None:
    """The same with the index removed by hand (an administrator) and the new one built by
    the next open in this process, while the old connection is still open here."""
    path = _folder(tmp_path)
    old = FolderIndex(path)
    old.sync()
    for suffix in ("", "-wal", "-shm"):
        (path / (INDEX_NAME + suffix)).unlink(missing_ok=True)
    new = FolderIndex(path)
    new.db.execute("PRAGMA wal_autocheckpoint=0")
    new.store_flags([(3, frozenset({"\\Answered"}))])
    old.close()
    assert (path / (INDEX_NAME + "-wal")).stat().st_size > 0
    assert _flags(path, 3) == {"\\Answered"}
    new.close()
    assert _flags(path, 3) == {"\\Answered"}
