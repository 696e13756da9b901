"""Per-folder index: persistent UIDs, flags, sizes, modseq, cached IMAP structures.

One SQLite database (WAL) beside each Maildir folder, ``mailsuite-index.sqlite`` (a name other
Maildir tools ignore).  It is a cache of the directory except for what a directory cannot
hold: UIDs, UIDVALIDITY/UIDNEXT and modseqs.  If it is lost it is rebuilt from the directory
with a new UIDVALIDITY (RFC 3501 2.3.1.1), so clients resynchronise instead of trusting
stale UIDs.

Concurrency: every change happens under an exclusive ``flock`` on ``mailsuite-index.lock`` so
several processes (two servers, a CLI import, a delivery) can share a folder; UIDs are
assigned only under that lock and only ever grow.

Syncing with the directory is cheap when nothing changed: the mtimes of ``new/`` and ``cur/``
are kept, and a folder whose directories did not change since the last scan is not listed.
An mtime less than two seconds old is never trusted (a change in the same clock tick could
hide behind it), so that case rescans.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mailsuite.store.maildir import FLAG_LETTERS, LETTER_FLAGS, base_of, fsync_dir, info_for

INDEX_NAME = "mailsuite-index.sqlite"
LOCK_NAME = "mailsuite-index.lock"
_SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (
    uid INTEGER PRIMARY KEY,
    base TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,          -- "new/<file>" or "cur/<file>"
    flags TEXT NOT NULL,         -- space-separated IMAP flags incl. keywords, sorted
    size INTEGER NOT NULL,       -- RFC822.SIZE: size with CRLF line ends
    internaldate REAL NOT NULL,  -- seconds since the epoch
    modseq INTEGER NOT NULL,
    envelope BLOB,               -- cached IMAP ENVELOPE, filled on demand
    bodystructure BLOB           -- cached IMAP BODYSTRUCTURE, filled on demand
);
"""


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
    for part in base_of(filename).split(",")[1:]:
        key, _, value = part.partition("=")
        if value.isdigit():
            if key == "S":
                s = int(value)
            elif key == "W":
                w = int(value)
    return s, w


class FolderIndex:
    """The index of one Maildir folder.  Blocking (SQLite, directory scans): IMAP and POP3
    call it from the reactor only for small operations; large scans should be run in a
    thread by the caller."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.db = sqlite3.connect(folder / INDEX_NAME, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        with self._locked():
            self.db.executescript(_SCHEMA)
            if self._meta("uidvalidity") is None:
                self._init_meta()

    def close(self) -> None:
        self.db.close()

    # -- meta ------------------------------------------------------------------------------

    def _meta(self, key: str) -> int | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    def _set_meta(self, key: str, value: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def _init_meta(self) -> None:
        # A new or rebuilt index gets a UIDVALIDITY that no earlier index of this folder had:
        # the current time, pushed past any value recorded in the folder's marker file.
        marker = self.folder / "mailsuite-uidvalidity"
        try:
            last = int(marker.read_text().strip() or 0)
        except (OSError, ValueError):
            last = 0
        uidvalidity = max(int(time.time()), last + 1) & 0xFFFFFFFF
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(f"{uidvalidity}\n")
        os.replace(tmp, marker)
        self.db.execute("BEGIN")
        self._set_meta("version", _SCHEMA_VERSION)
        self._set_meta("uidvalidity", uidvalidity)
        self._set_meta("uidnext", 1)
        self._set_meta("highestmodseq", 1)
        self.db.execute("COMMIT")

    @property
    def uidvalidity(self) -> int:
        return int(self._meta("uidvalidity") or 0)

    @property
    def uidnext(self) -> int:
        return int(self._meta("uidnext") or 1)

    @property
    def highestmodseq(self) -> int:
        return int(self._meta("highestmodseq") or 1)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.folder / LOCK_NAME, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    # -- reading ---------------------------------------------------------------------------

    def messages(self) -> list[Message]:
        """All messages in UID order."""
        rows = self.db.execute(
            "SELECT uid, name, flags, size, internaldate, modseq FROM messages ORDER BY uid"
        ).fetchall()
        return [
            Message(uid, name, frozenset(flags.split()) if flags else frozenset(), size, idate, ms)
            for uid, name, flags, size, idate, ms in rows
        ]

    def get(self, uid: int) -> Message | None:
        row = self.db.execute(
            "SELECT uid, name, flags, size, internaldate, modseq FROM messages WHERE uid=?", (uid,)
        ).fetchone()
        if row is None:
            return None
        uid, name, flags, size, idate, ms = row
        return Message(uid, name, frozenset(flags.split()) if flags else frozenset(), size, idate, ms)

    def path(self, msg: Message) -> Path:
        return self.folder / msg.name

    def cached(self, uid: int, column: str) -> bytes | None:
        if column not in ("envelope", "bodystructure"):
            raise ValueError(column)
        row = self.db.execute(f"SELECT {column} FROM messages WHERE uid=?", (uid,)).fetchone()
        return None if row is None else row[0]

    def store_cached(self, items: Iterable[tuple[int, str, bytes]]) -> None:
        """Remember computed ENVELOPE/BODYSTRUCTURE values: (uid, column, value)."""
        self.db.execute("BEGIN")
        for uid, column, value in items:
            if column not in ("envelope", "bodystructure"):
                raise ValueError(column)
            self.db.execute(f"UPDATE messages SET {column}=? WHERE uid=?", (value, uid))
        self.db.execute("COMMIT")

    # -- syncing with the directory -------------------------------------------------------

    def _dir_stamp(self) -> tuple[int, int] | None:
        try:
            new = os.stat(self.folder / "new").st_mtime_ns
            cur = os.stat(self.folder / "cur").st_mtime_ns
        except FileNotFoundError:
            return None
        return new, cur

    def sync(self, force: bool = False) -> SyncResult:
        """Bring the index in step with the directory; cheap when nothing changed."""
        stamp = self._dir_stamp()
        if stamp is None:
            return SyncResult()
        recent_enough = time.time_ns() - max(stamp) > 2_000_000_000
        if (
            not force
            and recent_enough
            and self._meta("stamp_new") == stamp[0]
            and self._meta("stamp_cur") == stamp[1]
        ):
            return SyncResult()
        with self._locked():
            return self._scan(stamp if recent_enough else None)

    def _scan(self, stamp: tuple[int, int] | None) -> SyncResult:
        on_disk: dict[str, str] = {}  # base -> "sub/name"
        for sub in ("new", "cur"):
            with os.scandir(self.folder / sub) as it:
                for entry in it:
                    if entry.name.startswith("."):
                        continue
                    on_disk[base_of(entry.name)] = f"{sub}/{entry.name}"
        known = {
            base: (uid, name, flags)
            for uid, base, name, flags in self.db.execute("SELECT uid, base, name, flags FROM messages")
        }
        added: list[int] = []
        expunged: list[int] = []
        changed: list[int] = []
        self.db.execute("BEGIN IMMEDIATE")
        try:
            modseq = self.highestmodseq
            for base, (uid, name, flags) in known.items():
                disk = on_disk.get(base)
                if disk is None:
                    expunged.append(uid)
                    continue
                if disk != name:
                    disk_flags = _letters_to_flags(disk)
                    old = set(flags.split()) if flags else set()
                    keywords = {f for f in old if not f.startswith("\\")}
                    new_flags = disk_flags | keywords
                    if new_flags != old:
                        modseq += 1
                        changed.append(uid)
                        self.db.execute(
                            "UPDATE messages SET name=?, flags=?, modseq=? WHERE uid=?",
                            (disk, " ".join(sorted(new_flags)), modseq, uid),
                        )
                    else:
                        self.db.execute("UPDATE messages SET name=? WHERE uid=?", (disk, uid))
            if expunged:
                modseq += 1
                self.db.executemany("DELETE FROM messages WHERE uid=?", [(u,) for u in expunged])
            fresh = sorted((b for b in on_disk if b not in known), key=_delivery_order)
            uid = self.uidnext
            rows = []
            for base in fresh:
                rel = on_disk[base]
                path = self.folder / rel
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue  # renamed or removed while we looked; the next scan sees it
                _, w = _name_size(rel.split("/", 1)[1])
                size = w if w is not None else crlf_size(path)
                modseq += 1
                rows.append(
                    (uid, base, rel, " ".join(sorted(_letters_to_flags(rel))), size, st.st_mtime, modseq)
                )
                added.append(uid)
                uid += 1
            self.db.executemany(
                "INSERT INTO messages(uid, base, name, flags, size, internaldate, modseq)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            self._set_meta("uidnext", uid)
            self._set_meta("highestmodseq", modseq)
            if stamp is not None:
                self._set_meta("stamp_new", stamp[0])
                self._set_meta("stamp_cur", stamp[1])
            else:
                self.db.execute("DELETE FROM meta WHERE key IN ('stamp_new', 'stamp_cur')")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return SyncResult(tuple(added), tuple(expunged), tuple(changed))

    # -- changing --------------------------------------------------------------------------

    def set_flags(self, uid: int, flags: Iterable[str]) -> Message | None:
        """Replace a message's flags: rename its file into ``cur/`` with the new info letters
        and record a new modseq.  Returns the updated message, or None if it is gone."""
        flags = frozenset(flags)
        with self._locked():
            msg = self.get(uid)
            if msg is None:
                return None
            if msg.flags == flags and msg.name.startswith("cur/"):
                return msg
            new_name = "cur/" + msg.base + info_for(set(flags))
            if new_name != msg.name:
                try:
                    os.rename(self.folder / msg.name, self.folder / new_name)
                except FileNotFoundError:
                    return None  # removed by another program; the next sync expunges it
            modseq = self.highestmodseq + 1
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(
                "UPDATE messages SET name=?, flags=?, modseq=? WHERE uid=?",
                (new_name, " ".join(sorted(flags)), modseq, uid),
            )
            self._set_meta("highestmodseq", modseq)
            self._forget_stamp()
            self.db.execute("COMMIT")
            return self.get(uid)

    def expunge(self, uids: Iterable[int]) -> list[int]:
        """Delete the files and rows of ``uids``; returns those that were removed."""
        done: list[int] = []
        with self._locked():
            for uid in uids:
                msg = self.get(uid)
                if msg is None:
                    continue
                try:
                    os.unlink(self.folder / msg.name)
                except FileNotFoundError:
                    pass
                done.append(uid)
            if done:
                fsync_dir(self.folder / "cur")
                self.db.execute("BEGIN IMMEDIATE")
                self.db.executemany("DELETE FROM messages WHERE uid=?", [(u,) for u in done])
                self._set_meta("highestmodseq", self.highestmodseq + 1)
                self._forget_stamp()
                self.db.execute("COMMIT")
        return done

    def _forget_stamp(self) -> None:
        # Our own rename changed the directory mtime: rescan next time rather than guess.
        self.db.execute("DELETE FROM meta WHERE key IN ('stamp_new', 'stamp_cur')")


def _letters_to_flags(rel: str) -> set[str]:
    _, sep, info = rel.partition(":2,")
    return {LETTER_FLAGS[c] for c in info if c in LETTER_FLAGS} if sep else set()


def _delivery_order(base: str) -> tuple[int, str]:
    """Order new files by the delivery time in their name, so UIDs follow arrival."""
    head = base.split(".", 1)[0]
    return (int(head) if head.isdigit() else 0, base)


__all__ = ["FLAG_LETTERS", "FolderIndex", "Message", "SyncResult", "crlf_size"]
