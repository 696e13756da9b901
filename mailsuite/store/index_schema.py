"""The index database of one folder: schema, migrations, counters, locking, keyword letters.

``mailsuite-index.sqlite`` (WAL) beside each Maildir folder; :mod:`mailsuite.store.index` says
what it holds and why.  This module is the layer every index operation stands on:

* the schema, its migrations (``cache_version`` drops cached IMAP structures computed by older
  code) and the shapes its rows take (:class:`Message`, :class:`NewFile`, :class:`SyncResult`);
* the ``meta`` table: UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ, the \\Recent watermark, directory
  stamps and ``names_gen`` (bumped whenever a file name changes, so other processes drop their
  cached name lists);
* the exclusive ``flock`` every change is made under, and write transactions;
* ``dovecot-keywords`` letters.

:class:`IndexDatabase` is the base of :class:`~mailsuite.store.index_scan.IndexScan` (keeping the
index in step with the directory), itself the base of :class:`~mailsuite.store.index.FolderIndex`
(queries and changes), the one class callers use.
"""

from __future__ import annotations

import fcntl
import functools
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from mailsuite.store.maildir import (
    KEYWORD_LETTERS,
    LETTER_FLAGS,
    base_of,
    read_keywords,
    write_keywords,
)
from mailsuite.store.space import retry_on_full
from mailsuite.store.uidlist import UIDLIST_NAME, remove_uidlist
from mailsuite.store.uidvalidity import next_uidvalidity

INDEX_NAME = "mailsuite-index.sqlite"
LOCK_NAME = "mailsuite-index.lock"
_SCHEMA_VERSION = 1
#: Bumped when the IMAP structures cached in the index would now be computed differently, so
#: rows cached by older code are recomputed (2: ENVELOPE names in comment form, issue 9).
_CACHE_VERSION = 2
#: bound parameters per query, below SQLite's default limit (999 in older builds)
_MAX_PARAMS = 900

_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (
    uid INTEGER PRIMARY KEY,
    base TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,          -- "new/<file>" or "cur/<file>"
    flags TEXT NOT NULL,         -- space-separated IMAP flags incl. keywords, sorted
    size INTEGER NOT NULL,       -- RFC822.SIZE: size with CRLF line ends (-1: not yet known)
    internaldate REAL NOT NULL,  -- seconds since the epoch (-1: not yet known, use mtime)
    modseq INTEGER NOT NULL,
    envelope BLOB,               -- cached IMAP ENVELOPE, filled on demand
    bodystructure BLOB           -- cached IMAP BODYSTRUCTURE, filled on demand
);
CREATE TABLE IF NOT EXISTS expunged (uid INTEGER PRIMARY KEY, modseq INTEGER NOT NULL);
"""
#: the secondary indexes (a first build makes them after its rows: see index_build)
_INDEXES = """
CREATE INDEX IF NOT EXISTS messages_modseq ON messages(modseq);
-- the few messages still in new/: listing them must not read every row
CREATE INDEX IF NOT EXISTS messages_in_new ON messages(name) WHERE name LIKE 'new/%';
-- what was expunged after a MODSEQ: asked at every change another session made (an open
-- folder's refresh, QRESYNC), while the table keeps every expunge the folder ever had
CREATE INDEX IF NOT EXISTS expunged_modseq ON expunged(modseq);
"""
_SCHEMA = _TABLES + _INDEXES


@dataclass(frozen=True)
class Message:
    """One indexed message, as IMAP and POP3 see it."""

    uid: int
    name: str  # path relative to the folder: "new/..." or "cur/..."
    flags: frozenset[str]
    size: int
    internaldate: float
    modseq: int

    @property
    def base(self) -> str:
        return base_of(self.name.split("/", 1)[1])


@dataclass(frozen=True)
class SyncResult:
    """What a sync found: UIDs that appeared, vanished, or whose flags changed."""

    added: tuple[int, ...] = ()
    expunged: tuple[int, ...] = ()
    flag_changes: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.expunged or self.flag_changes)


def crlf_size(path: Path) -> int:
    """Size of a stored (LF) message once every line end is CRLF."""
    with path.open("rb") as f:
        data = f.read()
    return crlf_size_of(data)


def crlf_size_of(data: bytes) -> int:
    """:func:`crlf_size` of a message's stored bytes."""
    return len(data) + data.count(b"\n") - data.count(b"\r\n")


def measure(dir_fd: int, name: str, size: int, idate: float) -> tuple[int, float]:
    """The CRLF size and internal date (mtime) of the file ``name`` of the folder open as
    ``dir_fd``, for those not known yet (negative); raises FileNotFoundError.

    For a folder another program wrote (no ``,W=`` in the names), the first POP3 login
    measures every message: one ``openat`` relative to the folder, one ``fstat`` for the date
    and one ``read`` of the whole file, with no path built or looked up per file (building
    ``Path`` objects and walking the whole path per message took over half of that login's
    time on a 100,000-message folder)."""
    if size >= 0:  # the date alone (a name with ,W=): one stat, no open
        return size, idate if idate >= 0 else os.stat(name, dir_fd=dir_fd).st_mtime
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if idate < 0:
            idate = st.st_mtime
        data = os.read(fd, st.st_size + 1)
        if len(data) > st.st_size:  # it grew since the fstat: read to the end
            chunks = [data]
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            data = b"".join(chunks)
        size = crlf_size_of(data)
    finally:
        os.close(fd)
    return size, idate


@dataclass(frozen=True)
class NewFile:
    """A message file to add to a folder (see :meth:`FolderIndex.add_files`)."""

    source: Path  # a draft in a tmp/ (moved), or a message of another folder (COPY: linked)
    unique: str  # the Maildir unique name to use
    flags: frozenset[str]
    size: int  # file size (,S=)
    wsize: int  # CRLF size (,W=, RFC822.SIZE)
    internaldate: float | None = None
    envelope: bytes | None = None
    bodystructure: bytes | None = None


def keywords_in(flags: str) -> Iterator[str]:
    """The keywords of a flag text (RFC 3501 2.3.2: the flags without a backslash)."""
    return (f for f in flags.split() if not f.startswith("\\"))


@dataclass(frozen=True)
class Early:
    """A folder whose missing index is about to be built, as an IMAP SELECT tells it: UIDs
    1 to ``exists`` (their order is durable: :mod:`~mailsuite.store.uidlist`), the
    UIDVALIDITY, the one MODSEQ of every message (the HIGHESTMODSEQ), the sequence number of
    the first message without \\Seen (0: none) and the folder's keywords."""

    uidvalidity: int
    exists: int
    modseq: int
    first_unseen: int
    keywords: frozenset[str]

    @property
    def uidnext(self) -> int:
        return self.exists + 1


@dataclass(frozen=True)
class EarlyAnswer:
    """Who answers from a missing index's listing before the index is built: ``report`` is
    called with the folder's :class:`Early` state (in the opening thread, lock held), then
    the build runs; ``claim``: the answer claims every message as \\Recent (SELECT, not
    EXAMINE)."""

    report: Callable[[Early], None]
    claim: bool


def _split_flags(flags: str) -> frozenset[str]:
    return frozenset(flags.split()) if flags else frozenset()


_P = ParamSpec("_P")
_R = TypeVar("_R")
_DB = TypeVar("_DB", bound="IndexDatabase")


def frees_space(
    method: Callable[Concatenate[_DB, _P], _R],
) -> Callable[Concatenate[_DB, _P], _R]:
    """For what a user needs to read and delete mail on a full disk (open, sync, claim
    \\Recent, set flags, expunge): when the disk is full, release the space reserve and run
    once more (:func:`mailsuite.store.space.retry_on_full`).  Each is safe to repeat: a failed
    transaction leaves nothing done, and :meth:`FolderIndex.store_flags
    <mailsuite.store.index.FolderIndex.store_flags>` renames its files back."""

    def run(db: _DB, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        return retry_on_full(db.folder, lambda: method(db, *args, **kwargs))

    functools.update_wrapper(run, method)
    return run


def _counters(m: dict[str, int]) -> tuple[int, int, int]:
    """(uidvalidity, uidnext, highestmodseq) from the meta table's rows."""
    return (
        int(m.get("uidvalidity") or 0),
        int(m.get("uidnext") or 1),
        int(m.get("highestmodseq") or 1),
    )


class IndexDatabase:
    """One folder's index database: the connection, the meta counters, the lock, keyword
    letters and the cached names (see the module docstring).  Opening it creates or migrates
    the schema (under the lock)."""

    def __init__(self, folder: Path, early: EarlyAnswer | None = None) -> None:
        self.folder = folder
        #: who answers before a missing index is built (see :class:`EarlyAnswer`)
        self._early = early
        #: new/ and cur/, stat'ed before every IMAP command (made once, not per call; as
        #: strings: ``os.stat`` of a ``Path`` converts it every time)
        self._sub_paths = (os.fspath(folder / "new"), os.fspath(folder / "cur"))
        self._kw_stamp: int | None = None
        self._kw_letters: dict[str, str] = {}  # letter -> keyword
        # every row's name, while meta names_gen still equals _names_gen (see _db_names)
        self._names: set[str] | None = None
        self._names_gen = -1
        # the lock file, opened once (see _locked); nesting depth of the lock held
        self._lock_fd = -1
        self._lock_depth = 0
        # on a full disk the folder must still open, so mail can be read and deleted
        # (mailsuite.store.space: the reserve is released and the open tried once more)
        try:
            self.db: sqlite3.Connection = retry_on_full(folder, self._open)
        except BaseException:
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
            raise
        self._file = self._file_id()

    def _open(self) -> sqlite3.Connection:
        """Connect and create or migrate the schema (WAL: SQLite creates its -wal and -shm
        files, which needs some space).  A missing index is first built whole
        (:meth:`_build_missing`): nobody connects to a missing index, so a build renamed into
        place never replaces a file another process holds open."""
        if not (self.folder / INDEX_NAME).exists() and self.folder.is_dir():
            with self._locked():
                if not (self.folder / INDEX_NAME).exists():
                    self._build_missing()
        elif (self.folder / UIDLIST_NAME).exists():
            # a build killed between renaming the index into place and removing its uidlist
            # (mailsuite.store.uidlist): the index holds those UIDs and more now
            with self._locked():
                if (self.folder / INDEX_NAME).exists():
                    remove_uidlist(self.folder)
        db = sqlite3.connect(
            self.folder / INDEX_NAME, isolation_level=None, check_same_thread=False
        )
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA cache_size=-512")  # 512 KiB page cache per open folder
            self.db = db
            if self._current():
                return db
            with self._locked():
                db.executescript(_SCHEMA)
                if self._meta("uidvalidity") is None:
                    self._init_meta()
                if self._meta("cache_version") != _CACHE_VERSION:
                    with self._transaction():
                        db.execute("UPDATE messages SET envelope = NULL, bodystructure = NULL")
                        self._set_meta("cache_version", _CACHE_VERSION)
        except BaseException:
            db.close()
            raise
        return db

    def _current(self) -> bool:
        """Is the database already what ``_open`` would make of it (every table and index of
        ``_SCHEMA``, the meta counters, this cache version)?  Then it is opened without the
        lock and the schema script: an IMAP APPEND opens the index in its worker thread, and
        those were a quarter of its CPU time (issue 15)."""
        try:
            (objects,) = self.db.execute(
                "SELECT count(*) FROM sqlite_master WHERE name IN"
                " ('meta', 'messages', 'expunged', 'messages_modseq', 'messages_in_new',"
                " 'expunged_modseq')"
            ).fetchone()
            m = self._metas()
        except sqlite3.Error:
            return False
        return (
            objects == 6
            and m.get("version") == _SCHEMA_VERSION
            and m.get("uidvalidity") is not None
            and m.get("cache_version") == _CACHE_VERSION
        )

    def _file_id(self) -> tuple[int, int] | None:
        try:
            st = (self.folder / INDEX_NAME).stat()
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def replaced(self) -> bool:
        """Is the index file gone or another file since we connected?  (One ``stat``.)  Our
        connection then still reads the old file, which no process opening the folder uses."""
        return self._file_id() != self._file

    def _build_missing(self) -> None:
        """Build the missing index file (lock held); here: nothing, SQLite creates an empty
        one.  :class:`~mailsuite.store.index_scan.IndexScan` builds it from the directory."""

    def close(self) -> None:
        self.db.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- meta ------------------------------------------------------------------------------

    def _meta(self, key: str) -> int | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    def _metas(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT key, value FROM meta").fetchall())

    def _set_meta(self, key: str, value: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def _init_meta(self) -> None:
        # A new or rebuilt index gets a UIDVALIDITY that no earlier index of any folder of
        # this user had (RFC 3501 2.3.1.1), from the user's counter.
        uidvalidity = next_uidvalidity(self.folder)
        with self._transaction():
            self._set_meta("version", _SCHEMA_VERSION)
            self._set_meta("uidvalidity", uidvalidity)
            self._set_meta("uidnext", 1)
            self._set_meta("highestmodseq", 1)
            self._set_meta("recent", 1)

    @property
    def uidvalidity(self) -> int:
        return int(self._meta("uidvalidity") or 0)

    @property
    def uidnext(self) -> int:
        return int(self._meta("uidnext") or 1)

    @property
    def highestmodseq(self) -> int:
        return int(self._meta("highestmodseq") or 1)

    def counters(self) -> tuple[int, int, int]:
        """(uidvalidity, uidnext, highestmodseq) in one query."""
        return _counters(self._metas())

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One SQLite write transaction (``BEGIN IMMEDIATE``: take the write lock at once,
        so two processes never both read-then-write).  On any error it is rolled back and
        the in-memory name cache, which may already hold the change, is dropped."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back already (a full disk): a second ROLLBACK would
            # hide the error that matters
            if self.db.in_transaction:
                with suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
            self._names = None
            raise

    def _lock_file(self) -> int:
        """The lock file's descriptor, opened once per handle: opening it for every change
        (a ``Path``, an ``open`` and a text wrapper, then a ``close``) was a tenth of a STORE's
        CPU (issue 15).  ``flock`` locks belong to the open file, so two handles of one
        process exclude each other as two processes do; one handle is used by one thread
        at a time."""
        if self._lock_fd < 0:
            self._lock_fd = os.open(
                self.folder / LOCK_NAME,
                os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                0o666,
            )
        return self._lock_fd

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the folder's exclusive lock (re-entrant within this handle)."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        fd = self._lock_file()
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._lock_depth = 1
        try:
            yield
        finally:
            self._lock_depth = 0
            fcntl.flock(fd, fcntl.LOCK_UN)

    @contextmanager
    def _try_locked(self, wait: bool = False) -> Iterator[bool]:
        """The lock if it is free now (yields True, held until the block ends), else yields
        False at once (``wait``: waits for it, as :meth:`_locked`).  For the event loop's
        thread: a writer holding the lock may be in an ``fsync`` for milliseconds (an APPEND
        or EXPUNGE in a worker thread, another process), and waiting for it there stalled
        every session of the process (issue 15)."""
        if self._lock_depth or wait:
            with self._locked():
                yield True
            return
        fd = self._lock_file()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        self._lock_depth = 1
        try:
            yield True
        finally:
            self._lock_depth = 0
            fcntl.flock(fd, fcntl.LOCK_UN)

    # -- keywords (dovecot-keywords letters) ------------------------------------------------

    def _keyword_letters(self) -> dict[str, str]:
        """letter -> keyword, re-read when the file changes."""
        try:
            stamp = (self.folder / "dovecot-keywords").stat().st_mtime_ns
        except FileNotFoundError:
            stamp = 0
        if stamp != self._kw_stamp:
            self._kw_letters = read_keywords(self.folder) if stamp else {}
            self._kw_stamp = stamp
        return self._kw_letters

    def _letters_for(self, flags: Iterable[str]) -> dict[str, str]:
        """keyword -> letter for the keywords among ``flags``, assigning free letters (lock
        held).  Keywords beyond 26 stay in the index only."""
        letters = self._keyword_letters()
        by_name = {v: k for k, v in letters.items()}
        wanted = [f for f in flags if not f.startswith("\\") and f not in by_name]
        if wanted:
            free = [c for c in KEYWORD_LETTERS if c not in letters]
            changed = False
            for kw in sorted(wanted):
                if not free:
                    break
                ch = free.pop(0)
                letters[ch] = kw
                by_name[kw] = ch
                changed = True
            if changed:
                write_keywords(self.folder, letters)
                self._kw_stamp = None
        return by_name

    def _disk_flags(self, rel: str) -> set[str]:
        _, sep, info = rel.partition(":2,")
        if not sep:
            return set()
        out = {LETTER_FLAGS[c] for c in info if c in LETTER_FLAGS}
        if any("a" <= c <= "z" for c in info):
            letters = self._keyword_letters()
            out.update(letters[c] for c in info if c in letters)
        return out

    # -- helpers for the layers above --------------------------------------------------------

    def _where_in(
        self, select: str, column: str, values: Sequence[Any]
    ) -> Iterator[tuple[Any, ...]]:
        """Rows of ``select`` + ``column IN (values)`` for any number of values, queried in
        batches below SQLite's limit on bound parameters.  ``select`` ends with ``WHERE`` (or
        with a condition and ``AND``)."""
        values = list(values)
        for i in range(0, len(values), _MAX_PARAMS):
            chunk = values[i : i + _MAX_PARAMS]
            yield from self.db.execute(
                f"{select} {column} IN ({','.join('?' * len(chunk))})", chunk
            )

    def _names_changed(self, removed: Iterable[str], added: Iterable[str], valid: bool) -> None:
        """Record that names changed (lock held, inside the transaction): bump
        ``names_gen`` so other processes reload, and keep our copy if it was current."""
        gen = int(self._meta("names_gen") or 0)
        self._set_meta("names_gen", gen + 1)
        if valid and self._names is not None and self._names_gen == gen:
            self._names.difference_update(removed)
            self._names.update(added)
            self._names_gen = gen + 1
        else:
            self._names = None

    def _forget_stamp(self, subs: Iterable[str]) -> None:
        # Our own renames changed these directories' mtimes: list them again next time
        # rather than guess what else changed meanwhile (programs that do not take our lock).
        for sub in subs:
            self.db.execute(
                "DELETE FROM meta WHERE key IN (?, ?)", ("stamp_" + sub, "since_" + sub)
            )
