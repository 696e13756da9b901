"""``mailsuite reindex``: check and rebuild the index of each folder of a mailbox.

The index is a cache of the folder except for its UIDs (store/index.py), so what a rebuild
keeps decides what clients see:

* a sound index (SQLite's ``quick_check`` passes) is brought in step with the files instead:
  both ``new/`` and ``cur/`` are listed again (files added, removed or renamed by other
  programs), cached ENVELOPE/BODYSTRUCTURE values are dropped and every size is read again from
  the files.  UIDs and UIDVALIDITY stay, so clients keep their caches.
* a damaged index, or any index with ``rebuild=True``, is made again from the files under a new
  UIDVALIDITY (the only way UIDs may be given anew, RFC 3501 2.3.1.1).  A damaged file is
  replaced, which a server that has it open notices when the folder is next selected (the
  registry checks the file: sessions that have it selected are then told); a sound one is
  rebuilt in place, which open sessions notice at once.

Progress is reported through ``advance(messages, bytes)`` as sizes are read.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mailsuite.store.index import INDEX_NAME, FolderIndex
from mailsuite.store.mailbox import Account

_CHUNK = 1000


@dataclass(frozen=True)
class FolderReport:
    name: str
    messages: int
    uidvalidity: int
    action: str  # "checked" (UIDs kept), "rebuilt" (new UIDVALIDITY), "replaced" (was damaged)


def _sound(path: Path) -> bool:
    try:
        index = FolderIndex(path)
    except sqlite3.DatabaseError:
        return False
    try:
        row = index.db.execute("PRAGMA quick_check").fetchone()
        return bool(row) and row[0] == "ok"
    except sqlite3.DatabaseError:
        return False
    finally:
        index.close()


def _replace(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            (path / (INDEX_NAME + suffix)).unlink()


def count_files(path: Path) -> int:
    """Messages in a folder's ``new/`` and ``cur/`` (for progress before indexing)."""
    n = 0
    for sub in ("new", "cur"):
        with contextlib.suppress(FileNotFoundError):
            n += sum(1 for entry in (path / sub).iterdir() if not entry.name.startswith("."))
    return n


def reindex_folder(
    name: str, path: Path, rebuild: bool, advance: Callable[[int, int], None]
) -> FolderReport:
    """Check or rebuild one folder's index (see the module docstring)."""
    if not _sound(path):
        _replace(path)
        action = "replaced"
        index = FolderIndex(path)  # a new UIDVALIDITY, past the folder's recorded one
        index.sync(force=True)
    elif rebuild:
        action = "rebuilt"
        index = FolderIndex(path)
        index.rebuild()
    else:
        action = "checked"
        index = FolderIndex(path)
        index.sync(force=True)
        index.db.execute("UPDATE messages SET envelope=NULL, bodystructure=NULL, size=-1")
    try:
        uids = index.state()[0]
        for i in range(0, len(uids), _CHUNK):
            chunk = uids[i : i + _CHUNK]
            details = index.details(chunk, need_size=True, need_date=True)
            advance(len(chunk), sum(max(d[1], 0) for d in details.values()))
        return FolderReport(name, len(uids), index.uidvalidity, action)
    finally:
        index.close()


def reindex_account(
    root: Path, rebuild: bool, advance: Callable[[int, int], None]
) -> list[FolderReport]:
    """Every folder of the mailbox at ``root``, INBOX first."""
    account = Account(root)
    return [reindex_folder(name, account.path(name), rebuild, advance) for name in account.names()]
