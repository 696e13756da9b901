"""Per-folder index: persistent UIDs, flags, sizes, modseq, cached IMAP structures.

One SQLite database (WAL) beside each Maildir folder, ``mailsuite-index.sqlite`` (a name other
Maildir tools ignore).  It is a cache of the directory except for what a directory cannot
hold: UIDs, UIDVALIDITY/UIDNEXT, modseqs and the \\Recent watermark.  If it is lost it is
rebuilt from the directory with a new UIDVALIDITY (RFC 3501 2.3.1.1), so clients
resynchronise instead of trusting stale UIDs.

Concurrency: every change happens under an exclusive ``flock`` on ``mailsuite-index.lock`` so
several processes (two servers, a CLI import, a delivery) can share a folder; UIDs are
assigned only under that lock and only ever grow.  Readers use SQLite's WAL snapshots.

Syncing with the directory is cheap when nothing changed: the mtimes of ``new/`` and ``cur/``
are kept, and a directory whose mtime did not change since the last listing is not listed
again.  An mtime is trusted only once it is older than the file system's timestamp
granularity, measured from the start of the listing (a later change in the same tick could
hide behind it): one second where mtimes are whole seconds, 30 ms where they are finer
(Linux stamps from a clock at most one tick behind).  Only the directories whose mtime
changed are listed: new mail in a 100,000-message folder costs a read of ``new/`` and of
the few ``new/`` rows (a partial index), a flag change by another program one read of
``cur/``.  Listings are compared with the indexed names as sets, and this process keeps
those names in memory while no other process changed one (``names_gen`` in meta).

First open of a big folder is cheap: sizes come from ``,W=`` in the name (or are computed on
first use, stored as -1 until then), internal dates from the file's mtime on first use, and
the rows go in with one ``executemany``.  Flag changes and expunges are recorded with a
modseq (RFC 7162); expunged UIDs are kept with theirs so QRESYNC can report VANISHED and
other sessions can catch up with one query.
"""

from __future__ import annotations

import fcntl
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailsuite.store.maildir import (
    FLAG_LETTERS,
    KEYWORD_LETTERS,
    LETTER_FLAGS,
    base_of,
    fsync_dir,
    info_for,
    read_keywords,
    write_keywords,
)
from mailsuite.store.uidvalidity import next_uidvalidity

INDEX_NAME = "mailsuite-index.sqlite"
LOCK_NAME = "mailsuite-index.lock"
_SCHEMA_VERSION = 1
#: Bumped when the IMAP structures cached in the index would now be computed differently, so
#: rows cached by older code are recomputed (2: ENVELOPE names in comment form, issue 9).
_CACHE_VERSION = 2
#: bound parameters per query, below SQLite's default limit (999 in older builds)
_MAX_PARAMS = 900
_SUBS = ("new", "cur")
#: A directory mtime younger than this is not trusted to cover every change (see module doc):
#: one second where the file system keeps whole seconds, a few clock ticks where it keeps
#: finer times (Linux stamps files from a clock that is at most one tick behind).
_TRUST_AFTER_NS = 1_000_000_000
_TRUST_AFTER_FINE_NS = 30_000_000
_IN_NEW = "SELECT name FROM messages WHERE name LIKE 'new/%'"

_SCHEMA = """
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
CREATE INDEX IF NOT EXISTS messages_modseq ON messages(modseq);
-- the few messages still in new/: listing them must not read every row
CREATE INDEX IF NOT EXISTS messages_in_new ON messages(name) WHERE name LIKE 'new/%';
"""


def _trusted(stamp_ns: int, now_ns: int) -> bool:
    """May a directory listing started at ``now_ns`` be trusted to cover every change that
    left the directory with mtime ``stamp_ns``?  Not if a later change could get the same
    mtime: within the file system's timestamp granularity (whole seconds on some file systems,
    one kernel clock tick on Linux ext4/xfs/tmpfs)."""
    coarse = stamp_ns % 1_000_000_000 == 0
    return now_ns - stamp_ns > (_TRUST_AFTER_NS if coarse else _TRUST_AFTER_FINE_NS)


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
    with open(path, "rb") as f:
        data = f.read()
    return len(data) + data.count(b"\n") - data.count(b"\r\n")


def _name_size(filename: str) -> tuple[int | None, int | None]:
    """``,S=`` (file size) and ``,W=`` (CRLF size) from a Maildir name, where present."""
    s = w = None
    base = base_of(filename)
    if "," not in base:
        return s, w
    for part in base.split(",")[1:]:
        key, _, value = part.partition("=")
        if value.isdigit():
            if key == "S":
                s = int(value)
            elif key == "W":
                w = int(value)
    return s, w


@dataclass(frozen=True)
class NewFile:
    """A message file to add to a folder (see :meth:`FolderIndex.add_files`)."""

    source: Path  # in the folder's tmp/ (APPEND) or another folder (COPY)
    unique: str  # the Maildir unique name to use
    flags: frozenset[str]
    size: int  # file size (,S=)
    wsize: int  # CRLF size (,W=, RFC822.SIZE)
    internaldate: float | None = None
    envelope: bytes | None = None
    bodystructure: bytes | None = None


def _split_flags(flags: str) -> frozenset[str]:
    return frozenset(flags.split()) if flags else frozenset()


class FolderIndex:
    """The index of one Maildir folder.  Blocking (SQLite, directory scans): IMAP and POP3
    call it from the reactor for bounded operations; a thread may open its own instance."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.db = sqlite3.connect(
            folder / INDEX_NAME, isolation_level=None, check_same_thread=False
        )
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA cache_size=-512")  # 512 KiB page cache per open folder
        self._kw_stamp: int | None = None
        self._kw_letters: dict[str, str] = {}  # letter -> keyword
        # every row's name, while meta names_gen still equals _names_gen (see _db_names)
        self._names: set[str] | None = None
        self._names_gen = -1
        with self._locked():
            self.db.executescript(_SCHEMA)
            if self._meta("uidvalidity") is None:
                self._init_meta()
            if self._meta("cache_version") != _CACHE_VERSION:
                with self._transaction():
                    self.db.execute("UPDATE messages SET envelope = NULL, bodystructure = NULL")
                    self._set_meta("cache_version", _CACHE_VERSION)

    def close(self) -> None:
        self.db.close()

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
        m = self._metas()
        return (
            int(m.get("uidvalidity") or 0),
            int(m.get("uidnext") or 1),
            int(m.get("highestmodseq") or 1),
        )

    def status_counts(self) -> tuple[int, int]:
        """(messages, unseen) for STATUS without loading the folder."""
        total, unseen = self.db.execute(
            "SELECT count(*), coalesce(sum(instr(flags, '\\Seen') = 0), 0) FROM messages"
        ).fetchone()
        return int(total), int(unseen)

    def recent_count(self) -> int:
        """Messages no session has claimed as \\Recent yet (RFC 3501 2.3.2)."""
        first = int(self._meta("recent") or 1)
        (n,) = self.db.execute("SELECT count(*) FROM messages WHERE uid >= ?", (first,)).fetchone()
        return int(n)

    def total_size(self) -> int:
        """Sum of RFC822.SIZE over the folder (RFC 8438 STATUS SIZE)."""
        self._fill_unknown()
        (n,) = self.db.execute("SELECT coalesce(sum(size), 0) FROM messages").fetchone()
        return int(n)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One SQLite write transaction (``BEGIN IMMEDIATE``: take the write lock at once,
        so two processes never both read-then-write).  On any error it is rolled back and
        the in-memory name cache, which may already hold the change, is dropped."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            self._names = None
            raise
        self.db.execute("COMMIT")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.folder / LOCK_NAME, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    # -- keywords (dovecot-keywords letters) ------------------------------------------------

    def _keyword_letters(self) -> dict[str, str]:
        """letter -> keyword, re-read when the file changes."""
        try:
            stamp = os.stat(self.folder / "dovecot-keywords").st_mtime_ns
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

    # -- reading ---------------------------------------------------------------------------

    def messages(self) -> list[Message]:
        """All messages in UID order (sizes and dates filled in where not yet known)."""
        self._fill_unknown()
        rows = self.db.execute(
            "SELECT uid, name, flags, size, internaldate, modseq FROM messages ORDER BY uid"
        ).fetchall()
        return [
            Message(uid, name, _split_flags(flags), size, idate, ms)
            for uid, name, flags, size, idate, ms in rows
        ]

    def get(self, uid: int) -> Message | None:
        self._fill_unknown((uid,))
        row = self.db.execute(
            "SELECT uid, name, flags, size, internaldate, modseq FROM messages WHERE uid=?", (uid,)
        ).fetchone()
        if row is None:
            return None
        uid, name, flags, size, idate, ms = row
        return Message(uid, name, _split_flags(flags), size, idate, ms)

    def path(self, msg: Message) -> Path:
        return self.folder / msg.name

    def state(self) -> tuple[list[int], list[str], list[int]]:
        """UIDs, flag strings and modseqs of every message, in UID order (one query)."""
        rows = self.db.execute("SELECT uid, flags, modseq FROM messages ORDER BY uid").fetchall()
        if not rows:
            return [], [], []
        uids, flags, modseqs = zip(*rows, strict=True)
        return list(uids), list(flags), list(modseqs)

    def changes_since(self, modseq: int) -> tuple[list[tuple[int, str, int]], list[int]]:
        """Rows (uid, flags, modseq) changed or added after ``modseq``, and UIDs expunged
        after it (RFC 7162 3.2.5 / QRESYNC VANISHED)."""
        rows = self.db.execute(
            "SELECT uid, flags, modseq FROM messages WHERE modseq > ? ORDER BY uid", (modseq,)
        ).fetchall()
        gone = [
            u
            for (u,) in self.db.execute(
                "SELECT uid FROM expunged WHERE modseq > ? ORDER BY uid", (modseq,)
            )
        ]
        return rows, gone

    def expunged_since(self, modseq: int, uids: Sequence[int] | None = None) -> list[int]:
        gone = [
            u
            for (u,) in self.db.execute(
                "SELECT uid FROM expunged WHERE modseq > ? ORDER BY uid", (modseq,)
            )
        ]
        if uids is not None:
            keep = set(uids)
            gone = [u for u in gone if u in keep]
        return gone

    def _where_in(self, select: str, column: str, values: Sequence[Any]) -> Iterator[tuple]:
        """Rows of ``select`` + ``column IN (values)`` for any number of values, queried in
        batches below SQLite's limit on bound parameters.  ``select`` ends with ``WHERE`` (or
        with a condition and ``AND``)."""
        values = list(values)
        for i in range(0, len(values), _MAX_PARAMS):
            chunk = values[i : i + _MAX_PARAMS]
            yield from self.db.execute(
                f"{select} {column} IN ({','.join('?' * len(chunk))})", chunk
            )

    def details(
        self, uids: Sequence[int], need_size: bool = False, need_date: bool = False
    ) -> dict[int, tuple]:
        """uid -> (name, size, internaldate, envelope, bodystructure) for ``uids``."""
        if need_size or need_date:
            self._fill_unknown(uids)
        out: dict[int, tuple] = {}
        for i in range(0, len(uids), _MAX_PARAMS):
            chunk = uids[i : i + _MAX_PARAMS]
            if len(chunk) > 1 and chunk[-1] - chunk[0] + 1 == len(chunk):
                q = self.db.execute(
                    "SELECT uid, name, size, internaldate, envelope, bodystructure FROM messages"
                    " WHERE uid BETWEEN ? AND ?",
                    (chunk[0], chunk[-1]),
                )
            else:
                q = self.db.execute(
                    "SELECT uid, name, size, internaldate, envelope, bodystructure FROM messages"
                    f" WHERE uid IN ({','.join('?' * len(chunk))})",
                    list(chunk),
                )
            for row in q:
                out[row[0]] = row[1:]
        return out

    def _fill_unknown(self, uids: Sequence[int] | None = None) -> None:
        """Compute sizes (-1) and internal dates (-1) not known yet, for ``uids`` or all."""
        if uids is None:
            rows = self.db.execute(
                "SELECT uid, name, size, internaldate FROM messages"
                " WHERE size < 0 OR internaldate < 0"
            ).fetchall()
        else:
            rows = list(
                self._where_in(
                    "SELECT uid, name, size, internaldate FROM messages"
                    " WHERE (size < 0 OR internaldate < 0) AND",
                    "uid",
                    uids,
                )
            )
        if not rows:
            return
        updates = []
        for uid, name, size, idate in rows:
            path = self.folder / name
            try:
                if size < 0:
                    size = crlf_size(path)
                if idate < 0:
                    idate = os.stat(path).st_mtime
            except FileNotFoundError:
                continue
            updates.append((size, idate, uid))
        with self._transaction():
            self.db.executemany("UPDATE messages SET size=?, internaldate=? WHERE uid=?", updates)

    def store_cached(self, items: Iterable[tuple[int, str, bytes]]) -> None:
        """Remember computed ENVELOPE/BODYSTRUCTURE values: (uid, column, value)."""
        with self._transaction():
            for uid, column, value in items:
                if column not in ("envelope", "bodystructure"):
                    raise ValueError(column)
                self.db.execute(f"UPDATE messages SET {column}=? WHERE uid=?", (value, uid))

    # -- \Recent ---------------------------------------------------------------------------

    def claim_recent(self) -> tuple[int, int]:
        """Claim every message not yet seen by any session as \\Recent for the caller;
        returns the claimed UID range [first, end) (RFC 3501 2.3.2: one session gets each
        message)."""
        with self._locked():
            first = int(self._meta("recent") or 1)
            nxt = self.uidnext
            if nxt > first:
                with self._transaction():
                    self._set_meta("recent", nxt)
            return first, max(first, nxt)

    def recent_range(self) -> tuple[int, int]:
        """The UID range [first, end) no session has claimed as \\Recent yet, left unclaimed:
        what a read-only session shows as \\Recent (RFC 3501 6.3.2, EXAMINE "MUST NOT cause
        messages to lose the \\Recent flag"), and what STATUS (RECENT) counts."""
        m = self._metas()
        first = int(m.get("recent") or 1)
        return first, max(first, int(m.get("uidnext") or 1))

    # -- syncing with the directory -------------------------------------------------------

    def _dir_stamp(self) -> tuple[int, int] | None:
        try:
            new = os.stat(self.folder / "new").st_mtime_ns
            cur = os.stat(self.folder / "cur").st_mtime_ns
        except FileNotFoundError:
            return None
        return new, cur

    def sync(self, force: bool = False) -> SyncResult:
        """Bring the index in step with the directory; cheap when nothing changed.

        Only the subdirectories whose mtime differs from the recorded (trusted) one are
        listed: a delivery lists ``new/``, a flag change by another program lists ``cur/``.
        """
        stamp = self._dir_stamp()
        if stamp is None:
            return SyncResult()
        if not force:
            m = self._metas()
            if m.get("stamp_new") == stamp[0] and m.get("stamp_cur") == stamp[1]:
                return SyncResult()
        with self._locked():
            now = time.time_ns()  # before the listing: see _trusted()
            stamp = self._dir_stamp()
            if stamp is None:
                return SyncResult()
            m = self._metas()
            subs = tuple(
                sub
                for sub, st in zip(_SUBS, stamp, strict=True)
                if force or m.get("stamp_" + sub) != st
            )
            if not subs:  # another process synced meanwhile
                return SyncResult()
            return self._scan(stamp, now, subs)

    def _db_names(self, subs: Sequence[str]) -> set[str]:
        """The ``name`` of every indexed message under ``subs`` (from memory when no
        process changed a name since we last looked: see ``names_gen``)."""
        gen = self._meta("names_gen") or 0
        if self._names is None or self._names_gen != gen:
            self._names = {n for (n,) in self.db.execute("SELECT name FROM messages")}
            self._names_gen = gen
        if subs == ("new",):
            # the partial index messages_in_new makes this cheap however big cur/ is
            return {n for (n,) in self.db.execute(_IN_NEW)}
        return self._names  # read only; _scan drops names of directories it did not list

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

    def _scan(self, stamp: tuple[int, int], now: int, subs: tuple[str, ...]) -> SyncResult:
        on_disk: set[str] = set()  # "sub/name"
        for sub in subs:
            prefix = sub + "/"
            with os.scandir(self.folder / sub) as it:
                on_disk.update(prefix + e.name for e in it if e.name[0] != ".")
        gen_before = int(self._meta("names_gen") or 0)
        known = self._db_names(subs)
        cache_valid = self._names is not None and self._names_gen == gen_before
        appeared = on_disk - known
        vanished = known - on_disk
        if len(subs) == 1:
            prefix = subs[0] + "/"
            vanished = {n for n in vanished if n.startswith(prefix)}
        added: list[int] = []
        expunged: list[int] = []
        changed: list[int] = []
        if not appeared and not vanished:
            with self._transaction():
                self._record_stamps(stamp, now, subs)
            return SyncResult()
        # rows by base for every name that changed on either side
        # (a base seen under both new/ and cur/ counts as its cur/ copy)
        bases = {
            base_of(n.split("/", 1)[1]): n
            for n in sorted(appeared, key=lambda n: n.startswith("cur/"))
        }
        rows: dict[str, tuple[int, str, str]] = {}  # base -> (uid, name, flags)
        wanted = list({base_of(n.split("/", 1)[1]) for n in vanished} | set(bases))
        for uid, base, name, flags in self._where_in(
            "SELECT uid, base, name, flags FROM messages WHERE", "base", wanted
        ):
            rows[base] = (uid, name, flags)
        with self._transaction():
            modseq = int(self._meta("highestmodseq") or 1)
            updates = []
            renames = []
            fresh: list[str] = []
            names_out: list[str] = []
            names_in: list[str] = []
            for base, disk in bases.items():
                row = rows.get(base)
                if row is None:
                    fresh.append(base)
                    continue
                uid, name, flags = row
                if name in on_disk:
                    continue  # a second copy of a file we know (a tool mid-move): ignore
                names_out.append(name)
                names_in.append(disk)
                disk_flags = self._disk_flags(disk)
                old = set(flags.split()) if flags else set()
                letters = self._keyword_letters()
                # keywords with no letter live only in the index; keep them
                kept = {f for f in old if not f.startswith("\\") and f not in letters.values()}
                new_flags = disk_flags | kept
                if new_flags != old:
                    modseq += 1
                    changed.append(uid)
                    updates.append((disk, " ".join(sorted(new_flags)), modseq, uid))
                else:
                    renames.append((disk, uid))
            moved = set(names_out)
            for name in vanished:
                if name in moved:
                    continue
                row = rows.get(base_of(name.split("/", 1)[1]))
                if row is not None and row[1] == name:
                    expunged.append(row[0])
                    names_out.append(name)
            if updates:
                self.db.executemany(
                    "UPDATE messages SET name=?, flags=?, modseq=? WHERE uid=?", updates
                )
            if renames:
                self.db.executemany("UPDATE messages SET name=? WHERE uid=?", renames)
            if expunged:
                expunged.sort()
                modseq += 1
                self.db.executemany("DELETE FROM messages WHERE uid=?", [(u,) for u in expunged])
                self.db.executemany(
                    "INSERT OR REPLACE INTO expunged(uid, modseq) VALUES (?, ?)",
                    [(u, modseq) for u in expunged],
                )
            fresh.sort(key=delivery_order)
            uid = int(self._meta("uidnext") or 1)
            new_rows = []
            if fresh:
                modseq += 1
            for base in fresh:
                rel = bases[base]
                _, w = _name_size(rel)
                size = w if w is not None else -1
                new_rows.append(
                    (uid, base, rel, " ".join(sorted(self._disk_flags(rel))), size, -1.0, modseq)
                )
                names_in.append(rel)
                added.append(uid)
                uid += 1
            self.db.executemany(
                "INSERT INTO messages(uid, base, name, flags, size, internaldate, modseq)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                new_rows,
            )
            self._set_meta("uidnext", uid)
            self._set_meta("highestmodseq", modseq)
            if names_in or names_out:
                self._names_changed(names_out, names_in, cache_valid)
            self._record_stamps(stamp, now, subs)
        return SyncResult(tuple(added), tuple(expunged), tuple(changed))

    def _record_stamps(self, stamp: tuple[int, int], now: int, subs: Sequence[str]) -> None:
        """Remember the mtimes of the directories just listed, when they can be trusted."""
        for sub, st in zip(_SUBS, stamp, strict=True):
            if sub not in subs:
                continue  # not listed: its recorded stamp (if any) stays
            if _trusted(st, now):
                self._set_meta("stamp_" + sub, st)
            else:
                self.db.execute("DELETE FROM meta WHERE key=?", ("stamp_" + sub,))

    # -- repair (mailsuite reindex) ---------------------------------------------------------

    def rebuild(self) -> SyncResult:
        """Index the folder's files again from nothing, under a new UIDVALIDITY (UIDs are
        given anew, which RFC 3501 2.3.1.1 allows only with a new UIDVALIDITY).  Done in place
        (not by deleting the file) so other processes with the index open see the new
        UIDVALIDITY on their next sync and tell their clients to resynchronise."""
        with self._locked():
            gen = int(self._meta("names_gen") or 0)
            with self._transaction():
                self.db.execute("DELETE FROM messages")
                self.db.execute("DELETE FROM expunged")
                self.db.execute("DELETE FROM meta")
                # other processes must not trust their cached name lists
                self._set_meta("names_gen", gen + 1)
            self._names = None
            self._init_meta()
            stamp = self._dir_stamp()
            if stamp is None:
                return SyncResult()
            return self._scan(stamp, time.time_ns(), _SUBS)

    # -- changing --------------------------------------------------------------------------

    def set_flags(self, uid: int, flags: Iterable[str]) -> Message | None:
        """Replace a message's flags: rename its file into ``cur/`` with the new info letters
        and record a new modseq.  Returns the updated message, or None if it is gone."""
        done = self.store_flags([(uid, frozenset(flags))])
        if not done:
            return None
        return self.get(uid)

    def store_flags(
        self, changes: Sequence[tuple[int, frozenset[str]]], unchangedsince: int | None = None
    ) -> list[tuple[int, str, int]]:
        """Set the flags of several messages in one locked transaction.

        Returns (uid, flags, modseq) for every message that still exists and was not refused
        by ``unchangedsince`` (RFC 7162 3.1.3); messages whose flags did not change keep
        their modseq.  Files move into ``cur/`` with the new info letters.
        """
        out: list[tuple[int, str, int]] = []
        if not changes:
            return out
        with self._locked():
            uids = [u for u, _ in changes]
            current: dict[int, tuple[str, str, int]] = {}
            for uid, name, flags, ms in self._where_in(
                "SELECT uid, name, flags, modseq FROM messages WHERE", "uid", uids
            ):
                current[uid] = (name, flags, ms)
            all_flags: set[str] = set()
            for _, f in changes:
                all_flags |= f
            letters = self._letters_for(all_flags)
            modseq = int(self._meta("highestmodseq") or 1)
            first_modseq = modseq + 1
            updates = []
            touched: set[str] = set()  # subdirectories whose mtime our renames changed
            gen = int(self._meta("names_gen") or 0)
            names_out: list[str] = []
            names_in: list[str] = []
            for uid, flags in changes:
                row = current.get(uid)
                if row is None:
                    continue
                name, old, ms = row
                if unchangedsince is not None and ms > unchangedsince:
                    continue
                text = " ".join(sorted(flags))
                info = info_for(flags, letters)
                base = base_of(name.split("/", 1)[1])
                new_name = "cur/" + base + info
                if text == old and (
                    name == new_name or not name.startswith("new/") and name.endswith(info)
                ):
                    out.append((uid, old, ms))
                    continue
                if new_name != name:
                    try:
                        os.rename(self.folder / name, self.folder / new_name)
                    except FileNotFoundError:
                        continue  # removed by another program; the next sync expunges it
                    touched.update((_sub_of(name), "cur"))
                    names_out.append(name)
                    names_in.append(new_name)
                if text != old:
                    modseq += 1
                    updates.append((new_name, text, modseq, uid))
                    out.append((uid, text, modseq))
                else:
                    updates.append((new_name, text, ms, uid))
                    out.append((uid, text, ms))
            if updates:
                with self._transaction():
                    self.db.executemany(
                        "UPDATE messages SET name=?, flags=?, modseq=? WHERE uid=?", updates
                    )
                    self._set_meta("highestmodseq", max(modseq, first_modseq - 1))
                    if touched:
                        self._forget_stamp(touched)
                        self._names_changed(names_out, names_in, self._names_gen == gen)
        return out

    def expunge(self, uids: Iterable[int]) -> list[int]:
        """Delete the files and rows of ``uids``; returns those that were removed."""
        done: list[int] = []
        wanted = list(uids)
        with self._locked():
            names: dict[int, str] = {}
            for uid, name in self._where_in("SELECT uid, name FROM messages WHERE", "uid", wanted):
                names[uid] = name
            for uid in wanted:
                name = names.get(uid)
                if name is None:
                    continue
                try:
                    os.unlink(self.folder / name)
                except FileNotFoundError:
                    pass
                done.append(uid)
            if done:
                touched = {_sub_of(names[u]) for u in done}
                for sub in sorted(touched):
                    fsync_dir(self.folder / sub)
                with self._transaction():
                    gen = int(self._meta("names_gen") or 0)
                    modseq = int(self._meta("highestmodseq") or 1) + 1
                    self.db.executemany("DELETE FROM messages WHERE uid=?", [(u,) for u in done])
                    self.db.executemany(
                        "INSERT OR REPLACE INTO expunged(uid, modseq) VALUES (?, ?)",
                        [(u, modseq) for u in done],
                    )
                    self._set_meta("highestmodseq", modseq)
                    self._forget_stamp(touched)
                    self._names_changed([names[u] for u in done], (), self._names_gen == gen)
        return done

    def add_files(self, items: Sequence[NewFile]) -> list[int]:
        """Put written (fsynced) files into this folder and index them; returns their new
        UIDs in order.  A file already in this folder's ``tmp/`` is renamed; any other path
        (a message of another folder, for COPY) is hard-linked, or copied across devices.
        One lock, one transaction, one fsync per directory: the caller may answer OK."""
        if not items:
            return []
        with self._locked():
            all_flags: set[str] = set()
            for it in items:
                all_flags |= it.flags
            letters = self._letters_for(all_flags)
            placed: list[tuple[str, str, NewFile, float]] = []
            subs: set[str] = set()
            try:
                for it in items:
                    sub = "cur" if it.flags else "new"
                    base = f"{it.unique},S={it.size},W={it.wsize}"
                    final = base + (info_for(it.flags, letters) if it.flags else "")
                    dest = self.folder / sub / final
                    if it.source.parent == self.folder / "tmp":
                        os.rename(it.source, dest)
                    else:
                        try:
                            os.link(it.source, dest)
                        except OSError:
                            import shutil

                            shutil.copyfile(it.source, dest)
                    if it.internaldate is not None and it.source.parent == self.folder / "tmp":
                        os.utime(dest, (it.internaldate, it.internaldate))
                    idate = (
                        it.internaldate if it.internaldate is not None else os.stat(dest).st_mtime
                    )
                    placed.append((base, f"{sub}/{final}", it, idate))
                    subs.add(sub)
            finally:
                for sub in subs:
                    fsync_dir(self.folder / sub)
            with self._transaction():
                uid = int(self._meta("uidnext") or 1)
                modseq = int(self._meta("highestmodseq") or 1) + 1
                rows = []
                out = []
                for base, rel, it, idate in placed:
                    rows.append(
                        (
                            uid,
                            base,
                            rel,
                            " ".join(sorted(it.flags)),
                            it.wsize,
                            idate,
                            modseq,
                            it.envelope,
                            it.bodystructure,
                        )
                    )
                    out.append(uid)
                    uid += 1
                self.db.executemany(
                    "INSERT INTO messages(uid, base, name, flags, size, internaldate, modseq,"
                    " envelope, bodystructure) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                self._set_meta("uidnext", uid)
                self._set_meta("highestmodseq", modseq)
                self._forget_stamp(subs)
                gen = int(self._meta("names_gen") or 0)
                self._names_changed((), [p[1] for p in placed], self._names_gen == gen)
            return out

    def _forget_stamp(self, subs: Iterable[str]) -> None:
        # Our own renames changed these directories' mtimes: list them again next time
        # rather than guess what else changed meanwhile (programs that do not take our lock).
        for sub in subs:
            self.db.execute("DELETE FROM meta WHERE key=?", ("stamp_" + sub,))


def _sub_of(name: str) -> str:
    """``"cur/123.host:2,S"`` -> ``"cur"``."""
    return name.split("/", 1)[0]


_USEC = re.compile(r"M(\d+)")
_COUNTER = re.compile(r"Q(\d+)")


def delivery_order(base: str) -> tuple[int, int, int, str]:
    """Order new files by the delivery time in their name, so UIDs follow arrival.

    ``sec.M<usec>P<pid>Q<n>.host``: seconds, then microseconds and the per-process counter
    compared as numbers (as text, "M99999" would sort after "M100234" and a rebuilt index
    would number messages of the same second out of order)."""
    head, _, rest = base.partition(".")
    middle = rest.split(".", 1)[0]
    usec = _USEC.search(middle)
    counter = _COUNTER.search(middle)
    return (
        int(head) if head.isdigit() else 0,
        int(usec.group(1)) if usec else 0,
        int(counter.group(1)) if counter else 0,
        base,
    )


__all__ = [
    "FLAG_LETTERS",
    "FolderIndex",
    "Message",
    "NewFile",
    "SyncResult",
    "crlf_size",
    "delivery_order",
]
