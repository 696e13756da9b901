"""Changes to an open folder made in a worker thread: EXPUNGE and APPEND always, a flag change
when the folder lock is busy.  Our own code.

An open :class:`~mailsuite.store.mailbox.Folder` answers every session of the process from
one index handle used on the event loop's thread.  Some changes must not run there: an
EXPUNGE unlinks files and ``fsync``\\ s their directories (milliseconds of disk wait, during
which no other session was served: issue 15), and any change must take the folder lock,
which a writer in a worker thread (APPEND, another EXPUNGE) or another process may hold
across its own ``fsync``.  :class:`FolderWriter` is the folder's second index handle, for
worker threads only: one change at a time (a mutex), opened on first use, closed with the
folder.  Its commits reach the event loop's handle like another process's (the meta
counters, ``names_gen``), so the caller brings the folder in step afterwards
(:meth:`~mailsuite.store.mailbox.Folder.expunged`, :meth:`~mailsuite.store.mailbox.Folder.stored`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from mailsuite.store.index import FlagDelta, FolderIndex, Message
from mailsuite.store.write import Placement, discard, place, write_tmp

T = TypeVar("T")

__all__ = ["FolderWriter"]


class FolderWriter:
    """The worker threads' handle on one folder's index (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._index: FolderIndex | None = None
        self._mutex = threading.Lock()
        self._closed = False

    def _run(self, change: Callable[[FolderIndex], T]) -> T:
        """Run ``change`` on the handle, one at a time (call from a worker thread)."""
        try:
            with self._mutex:
                if self._closed:  # the folder closed before: a handle for this change only
                    index = FolderIndex(self.path)
                    try:
                        return change(index)
                    finally:
                        index.close()
                if self._index is not None and self._index.replaced():
                    self._close_index()  # ``mailsuite reindex`` put a new file in place
                if self._index is None:
                    self._index = FolderIndex(self.path)
                return change(self._index)
        finally:
            # the folder closed while this ran (close() could not take the mutex): the
            # check comes after the release, so one of the two always closes the handle
            if self._closed and self._mutex.acquire(blocking=False):
                try:
                    self._close_index()
                finally:
                    self._mutex.release()

    def append(
        self, data: bytes, flags: frozenset[str], internaldate: float | None
    ) -> tuple[int, int]:
        """IMAP APPEND (:func:`mailsuite.store.write.append_message`) through this handle
        instead of one opened and closed per message (half a millisecond of CPU each):
        the draft is written and fsynced first, then placed under the mutex.  Returns
        (uidvalidity, uid).  Worker thread."""
        draft = write_tmp(self.path, [data])
        try:
            return self._run(
                lambda index: (
                    index.uidvalidity,
                    place(self.path, [Placement(draft, flags, internaldate)], index=index)[0],
                )
            )
        except BaseException:
            discard(draft.path)  # (place removes what it did not place; this: a failed open)
            raise

    def expunge(self, uids: Sequence[int]) -> list[int]:
        """:meth:`FolderIndex.expunge` (unlinks, directory ``fsync``, rows): worker thread."""
        return self._run(lambda index: index.expunge(uids))

    def store(
        self,
        changes: Sequence[tuple[int, frozenset[str]]],
        unchangedsince: int | None = None,
        delta: FlagDelta | None = None,
    ) -> list[tuple[int, str, int]]:
        """:meth:`FolderIndex.store_flags`, waiting for the lock: worker thread."""
        return self._run(lambda index: index.store_flags(changes, unchangedsince, delta))

    def messages(self) -> list[Message]:
        """:meth:`FolderIndex.messages` after a sync with the directory (mail delivered
        since is listed; the files whose size is unknown are read): worker thread.  The
        event loop's handle finds the sync's changes on its next refresh."""

        def listed(index: FolderIndex) -> list[Message]:
            index.sync()
            return index.messages()

        return self._run(listed)

    def close(self) -> None:
        """Close the handle (the folder closes; event loop's thread).  Never waits for a
        change under way: that change closes it when it ends."""
        self._closed = True
        if self._mutex.acquire(blocking=False):
            try:
                self._close_index()
            finally:
                self._mutex.release()

    def _close_index(self) -> None:
        index, self._index = self._index, None
        if index is not None:
            index.close()
