"""Disk space: telling a full disk from other failures, the free-space check SMTP makes before
it accepts a transaction, and the space kept back so a user can always delete mail.

A full disk used to be noticed late and answered badly (issue 10): SMTP took the whole DATA
and then said 451; APPEND said ``NO [SERVERBUG]`` and left its file in ``tmp/``; and at 0
bytes free nobody could delete mail, because deleting needs the index and SQLite needs a
little space to change it (its WAL and shared-memory files), so STORE \\Deleted failed and
the folder would not even open.

* :func:`is_disk_full` recognises ENOSPC / EDQUOT, SQLite's "database or disk is full", and
  an SQLite I/O error on a file system with (almost) nothing left;
* :class:`FreeSpace` is Postfix's ``queue_minfree``: SMTP refuses at MAIL FROM (452 4.3.1)
  while less than the threshold is free, so a full disk costs a client one round trip, not a
  whole message;
* the reserve (:func:`ensure_reserve`, :func:`release_reserve`) is a file of
  ``RESERVE_SIZE`` bytes in the mail folder that the server keeps in place: an index change
  that deletes or opens mail and finds the disk full removes it and tries once more.  Mail
  delivery and APPEND never use it (they would eat it); it is made again once there is room.

Blocking functions (statvfs, file writes): cheap, but the periodic reserve check runs in a
thread.  Nothing here imports protocol code.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mailsuite.corelog import Log

T = TypeVar("T")

RESERVE_NAME = "mailsuite-space-reserve"
RESERVE_SIZE = 1024 * 1024
#: how many folders up from a mail folder the reserve is looked for (user root, domain, mail)
_RESERVE_LEVELS = 4
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_SQLITE_FULL = 13
_SQLITE_IOERR = 10


class DiskFull(Exception):
    """The file system is full (IMAP answers ``NO [OVERQUOTA]``, SMTP 452 4.3.1)."""

    def __init__(self, text: str = "Not enough disk space") -> None:
        super().__init__(text)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged process may still write on ``path``'s file system."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def is_disk_full(exc: BaseException | None, path: Path | None = None) -> bool:
    """Is ``exc`` (or an exception it was raised from) a full disk?  SQLite reports a shared
    memory file it cannot grow as a plain I/O error: that counts when ``path``'s file
    system has less than the reserve left."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, DiskFull):
            return True
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        if isinstance(exc, sqlite3.Error):
            code = getattr(exc, "sqlite_errorcode", None)
            if code is not None and code & 0xFF == _SQLITE_FULL:
                return True
            if "database or disk is full" in str(exc):
                return True
            if path is not None and code is not None and code & 0xFF == _SQLITE_IOERR:
                try:
                    return free_bytes(path) < RESERVE_SIZE
                except OSError:
                    return False
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def log_failure(log: Log, exc: BaseException, text: str, **fields: Any) -> None:
    """In an ``except`` block for ``exc``: ``log.failure(text)`` with the traceback (of the
    exception being handled), unless ``exc`` is a full disk: that is no bug, it gets one line
    (a full disk must not also fill the log)."""
    if is_disk_full(exc):
        log.warn(text + ": the disk is full", **fields)
    else:
        log.failure(text, **fields)


class FreeSpace:
    """Free space on the data folder's file system (one ``statvfs``), and the SMTP rule
    built on it.

    Every MAIL looks (one ``statvfs``, a cheap system call on a local file system), as
    Postfix's smtpd does: a look trusted for a while let a burst of big messages on a small
    file system pass the check and meet the full disk at DATA instead.

    ``min_free`` None is the default threshold: the larger of twice the biggest message and
    1% of the file system (a message being received, one being delivered, and room for the
    logs and indexes); 0 turns the check off."""

    def __init__(self, path: Path, min_free: int | None, max_message_size: int) -> None:
        self.path = path
        self.min_free = min_free
        self.max_message_size = max_message_size

    def _look(self) -> tuple[int, int]:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def threshold(self, total: int) -> int:
        if self.min_free is not None:
            return self.min_free
        return max(2 * self.max_message_size, total // 100)

    def too_low(self, declared_size: int = 0) -> bool:
        """Refuse a transaction?  When less than the threshold is free, or less than the
        threshold plus the size the client declared (RFC 1870 SIZE), as Postfix does."""
        if self.min_free == 0:
            return False
        try:
            free, total = self._look()
        except OSError:
            return False  # cannot tell: the writes will say
        return free < self.threshold(total) + declared_size


# -- the reserve --------------------------------------------------------------------------


def ensure_reserve(mail_dir: Path, size: int = RESERVE_SIZE) -> bool:
    """Put the reserve in place if it is missing and there is room for it (twice its size
    free, so it never takes the last bytes).  Blocking; returns whether it is in place."""
    path = mail_dir / RESERVE_NAME
    try:
        if path.stat().st_size >= size:
            return True
    except FileNotFoundError:
        pass
    except OSError:
        return False
    tmp = mail_dir / (RESERVE_NAME + ".tmp")
    try:
        if free_bytes(mail_dir) < 2 * size:
            return False
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)  # blocks really taken, not a sparse file
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False


def release_reserve(folder: Path) -> bool:
    """Remove the reserve found in ``folder`` or one of the folders above it (the mail
    folder a user's folders live in); returns whether one was removed."""
    candidates = [folder, *folder.parents][: _RESERVE_LEVELS + 1]
    for parent in candidates:
        try:
            (parent / RESERVE_NAME).unlink()
            return True
        except FileNotFoundError:
            continue
        except OSError:
            return False
    return False


def retry_on_full(folder: Path, run: Callable[[], T]) -> T:
    """Run ``run``; if the disk is full, release the reserve (or notice that space was freed
    meanwhile, by the operation itself: an expunge unlinks first) and run it once more.  A
    disk still full raises :class:`DiskFull` (from the original error)."""
    try:
        return run()
    except (OSError, sqlite3.Error) as e:
        if not is_disk_full(e, folder):
            raise
        first = e
    released = release_reserve(folder)
    if not released:
        try:
            if free_bytes(folder) < RESERVE_SIZE:
                raise DiskFull() from first
        except OSError:
            raise DiskFull() from first
    try:
        return run()
    except (OSError, sqlite3.Error) as e:
        if is_disk_full(e, folder):
            raise DiskFull() from e
        raise
