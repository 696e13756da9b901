"""Per-folder index: persistent UIDs, flags, sizes, modseq, cached IMAP structures.

One SQLite database (WAL) beside each Maildir folder, ``mailsuite-index.sqlite`` (a name other
Maildir tools ignore).  It is a cache of the directory except for what a directory cannot
hold: UIDs, UIDVALIDITY/UIDNEXT, modseqs and the \\Recent watermark.  If it is lost it is
rebuilt from the directory with a new UIDVALIDITY (RFC 3501 2.3.1.1), so clients
resynchronise instead of trusting stale UIDs.

Concurrency: every change happens under an exclusive ``flock`` on ``mailsuite-index.lock`` so
several processes (two servers, a CLI import, a delivery) can share a folder; UIDs are
assigned only under that lock and only ever grow.  Readers use SQLite's WAL snapshots.

Flag changes and expunges are recorded with a modseq (RFC 7162); expunged UIDs are kept with
theirs so QRESYNC can report VANISHED and other sessions can catch up with one query.

The index is four modules, by job: :mod:`~mailsuite.store.index_schema` (the database: schema,
migrations, meta counters, the lock, keyword letters), :mod:`~mailsuite.store.index_scan`
(keeping it in step with the directory, cheaply; rebuilding it), :mod:`~mailsuite.store.index_build`
(a missing index built whole from the directory before anyone connects; a first IMAP SELECT
answered in between, its UIDs made durable first by :mod:`~mailsuite.store.uidlist`) and this
one (what callers ask and change).  :class:`FolderIndex` is the one class callers use.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mailsuite.store.index_scan import IndexScan, delivery_order
from mailsuite.store.index_schema import (
    _MAX_PARAMS,
    INDEX_NAME,
    LOCK_NAME,
    Message,
    NewFile,
    SyncResult,
    _split_flags,
    crlf_size,
    frees_space,
    measure,
)
from mailsuite.store.maildir import FLAG_LETTERS, base_of, fsync_dir, info_for
from mailsuite.store.quota import charge
from mailsuite.store.space import is_disk_full

_S_SIZE = re.compile(r",S=(\d+)")


#: STORE +FLAGS (True) or -FLAGS (False) and the flags: see :meth:`FolderIndex._store`
FlagDelta = tuple[bool, frozenset[str]]

#: Changes after a MODSEQ, asked by every open folder whenever another session changed
#: something: ``+uid`` keeps SQLite from scanning the whole table in UID order to spare a
#: sort, so it reads the few rows through the modseq index and sorts those (issue 15).
_CHANGED_SINCE = "SELECT uid, flags, modseq FROM messages WHERE modseq > ? ORDER BY +uid"
_EXPUNGED_SINCE = "SELECT uid FROM expunged WHERE modseq > ? ORDER BY +uid"


class FolderIndex(IndexScan):
    """The index of one Maildir folder.  Blocking (SQLite, directory scans): IMAP and POP3
    call it from the reactor for bounded operations; a thread may open its own instance."""

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

    # -- reading ---------------------------------------------------------------------------

    #: what :meth:`messages` read last, and the database's state it read it in (see there)
    _messages: list[Message] | None = None
    _messages_at: tuple[int, int] = (-1, -1)
    #: the most messages whose list is kept: ~400 bytes a message stay in memory as long as
    #: the folder is open or warm, and a bigger folder's read costs little beside a session
    #: that downloads it (10,000: ~4 MB)
    keep_messages_max = 10_000

    def messages(self) -> list[Message]:
        """All messages in UID order (sizes and dates filled in where not yet known).

        Every POP3 login asks for the whole list: reading and making 1,000 messages was most
        of a login's CPU (issue 15).  The list is kept, with the database's state it was
        read in: ``PRAGMA data_version`` (changes when any other connection, in this process
        or another, commits to the file) and this connection's ``total_changes`` (every row
        it inserted, updated or deleted, rolled back or not).  While both are unchanged no
        row can differ, and the kept list is returned (a copy; :class:`Message` is frozen).
        Only a list with every size and date known, read outside a transaction, is kept: the
        fill is never skipped where it would have had work to do, and no rolled-back row is
        ever answered; and only up to :attr:`keep_messages_max` messages."""
        db = self.db
        at = (db.execute("PRAGMA data_version").fetchone()[0], db.total_changes)
        if self._messages is not None and at == self._messages_at:
            return list(self._messages)
        self._fill_unknown()
        at = (db.execute("PRAGMA data_version").fetchone()[0], db.total_changes)
        rows = db.execute(
            "SELECT uid, name, flags, size, internaldate, modseq FROM messages ORDER BY uid"
        ).fetchall()
        # one frozenset per distinct flag text (a folder has few)
        sets = {f: _split_flags(f) for f in {row[2] for row in rows}}
        msgs = [
            Message(uid, name, sets[flags], size, idate, ms)
            for uid, name, flags, size, idate, ms in rows
        ]
        # (read after ``at``: a commit in between makes the next call read again, never
        # keeps an older list under a newer state)
        # (not inside a transaction: a rollback would undo rows without counting a change)
        kept = (
            len(msgs) <= self.keep_messages_max
            and not db.in_transaction
            and all(m.size >= 0 and m.internaldate >= 0 for m in msgs)
        )
        self._messages, self._messages_at = (msgs, at) if kept else (None, (-1, -1))
        return list(msgs)

    def get(self, uid: int) -> Message | None:
        self._fill_unknown((uid,))
        row = self.db.execute(
            "SELECT uid, name, flags, size, internaldate, modseq FROM messages WHERE uid=?", (uid,)
        ).fetchone()
        if row is None:
            return None
        uid, name, flags, size, idate, ms = row
        return Message(uid, name, _split_flags(flags), size, idate, ms)

    def get_many(self, uids: Sequence[int]) -> dict[int, Message]:
        """:meth:`get` of several messages in one query per batch (those that exist): a POP3
        session takes back the rows of the hundreds of messages whose \\Seen it stored."""
        self._fill_unknown(uids)
        return {
            uid: Message(uid, name, _split_flags(flags), size, idate, ms)
            for uid, name, flags, size, idate, ms in self._where_in(
                "SELECT uid, name, flags, size, internaldate, modseq FROM messages WHERE",
                "uid",
                uids,
            )
        }

    def path(self, msg: Message) -> Path:
        return self.folder / msg.name

    def state(self) -> tuple[list[int], list[str], list[int]]:
        """UIDs, flag strings and modseqs of every message, in UID order (one query; right
        after a build at open or a bulk fill of an empty index, their own lists while the
        index has not changed since)."""
        built, self._built = self._built, None
        if built is not None:
            m = self._metas()
            if (
                m.get("uidnext") == built.uidnext
                and m.get("highestmodseq") == built.modseq
                and int(m.get("names_gen") or 0) == built.names_gen
            ):
                return built.uids, built.flags, [built.modseq] * len(built.uids)
        rows = self.db.execute("SELECT uid, flags, modseq FROM messages ORDER BY uid").fetchall()
        if not rows:
            return [], [], []
        uids, flags, modseqs = zip(*rows, strict=True)
        return list(uids), list(flags), list(modseqs)

    def changes_since(self, modseq: int) -> tuple[list[tuple[int, str, int]], list[int]]:
        """Rows (uid, flags, modseq) changed or added after ``modseq``, and UIDs expunged
        after it (RFC 7162 3.2.5 / QRESYNC VANISHED)."""
        rows = self.db.execute(_CHANGED_SINCE, (modseq,)).fetchall()
        gone = [u for (u,) in self.db.execute(_EXPUNGED_SINCE, (modseq,))]
        return rows, gone

    def expunged_since(self, modseq: int, uids: Sequence[int] | None = None) -> list[int]:
        gone = [u for (u,) in self.db.execute(_EXPUNGED_SINCE, (modseq,))]
        if uids is not None:
            keep = set(uids)
            gone = [u for u in gone if u in keep]
        return gone

    def details(
        self, uids: Sequence[int], need_size: bool = False, need_date: bool = False
    ) -> dict[int, tuple[Any, ...]]:
        """uid -> (name, size, internaldate, envelope, bodystructure) for ``uids``."""
        if need_size or need_date:
            self._fill_unknown(uids)
        out: dict[int, tuple[Any, ...]] = {}
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

    @frees_space
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
        dir_fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for uid, name, size, idate in rows:
                try:
                    size, idate = measure(dir_fd, name, size, idate)
                except FileNotFoundError:
                    continue
                updates.append((size, idate, uid))
        finally:
            os.close(dir_fd)
        with self._transaction():
            self.db.executemany("UPDATE messages SET size=?, internaldate=? WHERE uid=?", updates)

    def store_cached(self, items: Iterable[tuple[int, str, bytes]]) -> None:
        """Remember computed ENVELOPE/BODYSTRUCTURE values: (uid, column, value).  A cache:
        on a full disk they are computed again next time."""
        by_column: dict[str, list[tuple[bytes, int]]] = {"envelope": [], "bodystructure": []}
        for uid, column, value in items:
            if column not in by_column:
                raise ValueError(column)
            by_column[column].append((value, uid))
        try:
            with self._transaction():
                for column, rows in by_column.items():
                    if rows:  # one statement per column for the whole batch
                        self.db.executemany(f"UPDATE messages SET {column}=? WHERE uid=?", rows)
        except (OSError, sqlite3.Error) as e:
            if not is_disk_full(e, self.folder):
                raise

    # -- \Recent ---------------------------------------------------------------------------

    @frees_space
    def claim_recent(self, wait: bool = True) -> tuple[int, int]:
        """Claim every message not yet seen by any session as \\Recent for the caller;
        returns the claimed UID range [first, end) (RFC 3501 2.3.2: one session gets each
        message).  ``wait`` False: when a writer holds the folder lock, claim nothing now
        (an empty range; the messages stay unclaimed for the next claim) rather than wait."""
        with self._try_locked(wait) as held:
            first = int(self._meta("recent") or 1)
            if not held:
                return first, first
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

    # -- changing --------------------------------------------------------------------------

    def set_flags(self, uid: int, flags: Iterable[str]) -> Message | None:
        """Replace a message's flags: rename its file into ``cur/`` with the new info letters
        and record a new modseq.  Returns the updated message, or None if it is gone."""
        done = self.store_flags([(uid, frozenset(flags))])
        if not done:
            return None
        return self.get(uid)

    def store_flags(
        self,
        changes: Sequence[tuple[int, frozenset[str]]],
        unchangedsince: int | None = None,
        delta: FlagDelta | None = None,
    ) -> list[tuple[int, str, int]]:
        """Set the flags of several messages (see :meth:`_store`), waiting for the lock."""
        done = self._store(changes, unchangedsince, True, delta)
        assert done is not None  # (only a store that does not wait gives up)
        return done

    def try_store_flags(
        self,
        changes: Sequence[tuple[int, frozenset[str]]],
        unchangedsince: int | None = None,
        delta: FlagDelta | None = None,
    ) -> list[tuple[int, str, int]] | None:
        """:meth:`store_flags` if the folder lock is free now, else None (nothing done)."""
        return self._store(changes, unchangedsince, False, delta)

    @frees_space
    def _store(
        self,
        changes: Sequence[tuple[int, frozenset[str]]],
        unchangedsince: int | None,
        wait: bool,
        delta: FlagDelta | None = None,
    ) -> list[tuple[int, str, int]] | None:
        """Set the flags of several messages in one locked transaction.

        Returns (uid, flags, modseq) for every message that still exists and was not refused
        by ``unchangedsince`` (RFC 7162 3.1.3); messages whose flags did not change keep
        their modseq.  Files move into ``cur/`` with the new info letters.  ``wait`` False:
        None, having done nothing, when another handle holds the folder lock (the caller
        then does it in a worker thread, see :mod:`mailsuite.store.folder_writer`).

        ``delta`` (STORE +FLAGS / -FLAGS): the flags to add (True) or remove (False), applied
        to each message's flags as the index holds them under the lock; ``changes`` then
        only names the messages.  A new set computed by the caller from what it saw earlier
        would undo a change another session or process made in between (a lost update).
        """
        out: list[tuple[int, str, int]] = []
        if not changes:
            return out
        with self._try_locked(wait) as held:
            if not held:
                return None
            dirs0, m0 = self._dir_stamp(), self._metas()  # see IndexScan._own_changes
            uids = [u for u, _ in changes]
            current: dict[int, tuple[str, str, int]] = {}
            for uid, name, flags, ms in self._where_in(
                "SELECT uid, name, flags, modseq FROM messages WHERE", "uid", uids
            ):
                current[uid] = (name, flags, ms)
            if delta is not None:
                add, given = delta
                changes = [
                    (
                        u,
                        (frozenset(row[1].split()) | given)
                        if add
                        else (frozenset(row[1].split()) - given),
                    )
                    for u in uids
                    if (row := current.get(u)) is not None
                ]
            all_flags: set[str] = set()
            for _, f in changes:
                all_flags |= f
            letters = self._letters_for(all_flags)
            modseq = int(m0.get("highestmodseq") or 1)  # the lock is held since m0
            first_modseq = modseq + 1
            updates = []
            touched: set[str] = set()  # subdirectories whose mtime our renames changed
            gen = int(m0.get("names_gen") or 0)
            names_out: list[str] = []
            names_in: list[str] = []
            folder = str(self.folder)
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
                    name == new_name or (not name.startswith("new/") and name.endswith(info))
                ):
                    out.append((uid, old, ms))
                    continue
                if new_name != name:
                    try:  # (strings, not Path objects: a POP3 first download renames 1000s)
                        os.rename(f"{folder}/{name}", f"{folder}/{new_name}")  # noqa: PTH104
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
                try:
                    with self._transaction():
                        self.db.executemany(
                            "UPDATE messages SET name=?, flags=?, modseq=? WHERE uid=?", updates
                        )
                        self._set_meta("highestmodseq", max(modseq, first_modseq - 1))
                        if touched:
                            self._own_changes(touched, dirs0, m0)
                            self._names_changed(names_out, names_in, self._names_gen == gen)
                except BaseException:
                    # not recorded (a full disk): put the names back, so the files say what
                    # the index says and a failed STORE changed nothing
                    for before, after in zip(reversed(names_out), reversed(names_in), strict=True):
                        with contextlib.suppress(OSError):
                            (self.folder / after).rename(self.folder / before)
                    raise
        return out

    @frees_space
    def expunge(self, uids: Iterable[int]) -> list[int]:
        """Delete the files and rows of ``uids``; returns those that were removed."""
        done: list[int] = []
        wanted = list(uids)
        freed = removed = 0
        with self._locked():
            dirs0, m0 = self._dir_stamp(), self._metas()  # see IndexScan._own_changes
            names: dict[int, str] = {}
            for uid, name in self._where_in("SELECT uid, name FROM messages WHERE", "uid", wanted):
                names[uid] = name
            for uid in wanted:
                name = names.get(uid)
                if name is None:
                    continue
                try:
                    size = _size_of(self.folder / name)
                    (self.folder / name).unlink()
                except FileNotFoundError:
                    pass  # gone already (another program, or the first try of a retry)
                else:
                    freed += size
                    removed += 1
                done.append(uid)
            # the files removed are gone whatever happens to the rows: counted even when the
            # transaction fails on a full disk (the retry of frees_space finds them gone)
            try:
                if done:
                    self._record_expunged(done, names, dirs0, m0)
            finally:
                charge(self.folder, -freed, -removed)
        return done

    def _record_expunged(
        self,
        done: list[int],
        names: dict[int, str],
        dirs0: tuple[int, int] | None,
        m0: dict[str, int],
    ) -> None:
        """Fsync the directories the files left and drop their rows, in one transaction."""
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
            self._own_changes(touched, dirs0, m0)
            self._names_changed([names[u] for u in done], (), self._names_gen == gen)

    def add_files(self, items: Sequence[NewFile]) -> list[int]:
        """Put written (fsynced) files into this folder and index them; returns their new
        UIDs in order.  A draft (a file in a ``tmp/``: this folder's, or another folder's of
        the same user, see :mod:`mailsuite.store.write`) is renamed; any other path (a message
        of another folder, for COPY) is hard-linked, or copied across devices.  One lock, one
        transaction, one fsync per directory: the caller may answer OK."""
        if not items:
            return []
        with self._locked():
            dirs0, m0 = self._dir_stamp(), self._metas()  # see IndexScan._own_changes
            all_flags: set[str] = set()
            for it in items:
                all_flags |= it.flags
            letters = self._letters_for(all_flags)
            placed: list[tuple[str, str, NewFile, float]] = []
            subs: set[str] = set()
            try:
                self._place(items, letters, placed, subs)
                out = self._record_new(placed, subs, dirs0, m0)
            except BaseException:
                # nothing half-done (a full disk): files placed but not indexed would turn up
                # as new messages at the next sync, after the client was told NO / 4xx
                for _, rel, _, _ in placed:
                    with contextlib.suppress(OSError):
                        (self.folder / rel).unlink()
                for sub in subs:
                    with contextlib.suppress(OSError):
                        fsync_dir(self.folder / sub)
                raise
            charge(self.folder, sum(p[2].size for p in placed), len(placed))
            return out

    def _place(
        self,
        items: Sequence[NewFile],
        letters: dict[str, str],
        placed: list[tuple[str, str, NewFile, float]],
        subs: set[str],
    ) -> None:
        """Rename (a draft) or link (another folder's message) each file into place,
        recording each in ``placed`` as it lands, then fsync the directories."""
        try:
            for it in items:
                sub = "cur" if it.flags else "new"
                base = f"{it.unique},S={it.size},W={it.wsize}"
                final = base + (info_for(it.flags, letters) if it.flags else "")
                dest = self.folder / sub / final
                moved = it.source.parent.name == "tmp"
                if moved:
                    it.source.rename(dest)
                else:
                    try:
                        os.link(it.source, dest)
                    except OSError:
                        import shutil

                        shutil.copyfile(it.source, dest)
                subs.add(sub)
                placed.append((base, f"{sub}/{final}", it, 0.0))
                if it.internaldate is not None and moved:
                    os.utime(dest, (it.internaldate, it.internaldate))
                idate = it.internaldate if it.internaldate is not None else dest.stat().st_mtime
                placed[-1] = (base, f"{sub}/{final}", it, idate)
        finally:
            for sub in subs:
                fsync_dir(self.folder / sub)

    def _record_new(
        self,
        placed: list[tuple[str, str, NewFile, float]],
        subs: set[str],
        dirs0: tuple[int, int] | None,
        m0: dict[str, int],
    ) -> list[int]:
        """Index the placed files in one transaction; returns their UIDs."""
        with self._transaction():
            uid = int(self._meta("uidnext") or 1)
            first = uid
            modseq = int(self._meta("highestmodseq") or 1) + 1
            rows = []
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
                uid += 1
            self.db.executemany(
                "INSERT INTO messages(uid, base, name, flags, size, internaldate, modseq,"
                " envelope, bodystructure) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            self._set_meta("uidnext", uid)
            self._set_meta("highestmodseq", modseq)
            self._own_changes(subs, dirs0, m0)
            gen = int(self._meta("names_gen") or 0)
            self._names_changed((), [p[1] for p in placed], self._names_gen == gen)
        return list(range(first, uid))


def _size_of(path: Path) -> int:
    """A message file's size on disk: the ``,S=`` of its name, else a ``stat``."""
    m = _S_SIZE.search(path.name)
    return int(m.group(1)) if m else path.stat().st_size


def _sub_of(name: str) -> str:
    """``"cur/123.host:2,S"`` -> ``"cur"``."""
    return name.split("/", 1)[0]


__all__ = [
    "FLAG_LETTERS",
    "INDEX_NAME",
    "LOCK_NAME",
    "FolderIndex",
    "Message",
    "NewFile",
    "SyncResult",
    "crlf_size",
    "delivery_order",
]
