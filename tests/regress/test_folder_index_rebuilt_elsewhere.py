"""A folder whose index another process rebuilt (new UIDVALIDITY, UIDs given anew) must not
keep being served from this process's memory.

The registry keeps folders warm after their last session; before the fix it handed the warm
folder, with the old UIDVALIDITY and the old UID list, to the next SELECT and STATUS, so clients
were told nothing changed while UIDs now named other messages.  Found with ``mailsuite reindex
--rebuild`` against a running server; the old tests never changed UIDVALIDITY under a live
process (a lost index file is not noticed by a process that has it open).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from mailsuite.store.folder_copy import append_blocking
from mailsuite.store.index import INDEX_NAME
from mailsuite.store.mailbox import FolderRegistry
from mailsuite.store.maildir import ensure_folder


def _rebuilt_elsewhere(path: Path, uidvalidity: int) -> None:
    """What another process's rebuild leaves in the index: a new UIDVALIDITY."""
    db = sqlite3.connect(path / INDEX_NAME)
    with db:
        db.execute("UPDATE meta SET value=? WHERE key='uidvalidity'", (uidvalidity,))
    db.close()


def test_a_warm_folder_is_replaced_after_its_index_was_rebuilt(tmp_path: Path) -> None:
    path = ensure_folder(tmp_path / "box")
    append_blocking(path, b"Subject: x\n\nbody\n", frozenset(), None)
    registry = FolderRegistry()
    folder = registry.get(path)
    old = folder.uidvalidity
    view = folder.view(readonly=True)
    view.close()  # the session went away: the folder stays warm
    _rebuilt_elsewhere(path, old + 10)
    assert registry.peek(path) is None  # STATUS must not use the old counters
    again = registry.get(path)
    assert again is not folder and again.uidvalidity == old + 10


def test_sessions_of_a_rebuilt_folder_are_told_and_new_ones_get_a_fresh_folder(
    tmp_path: Path,
) -> None:
    path = ensure_folder(tmp_path / "box")
    append_blocking(path, b"Subject: x\n\nbody\n", frozenset(), None)
    registry = FolderRegistry()
    folder = registry.get(path)
    view = folder.view(readonly=False)
    _rebuilt_elsewhere(path, folder.uidvalidity + 10)
    fresh = registry.get(path)
    assert view.invalid == "Mailbox index was rebuilt (UIDVALIDITY changed)"
    assert fresh is not folder and fresh.uidvalidity == folder.uidvalidity + 10
    view.close()  # the old session ends: the stale folder is closed, not kept warm
    assert registry.peek(path) is fresh
