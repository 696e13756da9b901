"""Keeping a folder's index in step with its directory (and rebuilding it).

Syncing is cheap when nothing changed: the mtimes of ``new/`` and ``cur/`` are kept, and a
directory whose mtime did not change since the last listing is not listed again.  An mtime is
trusted only once it is older than the file system's timestamp granularity, measured from the
start of the listing (a later change in the same tick could hide behind it): one second where
mtimes are whole seconds, 30 ms where they are finer (Linux stamps from a clock at most one tick
behind).  Only the directories whose mtime changed are listed: new mail in a 100,000-message
folder costs a read of ``new/`` and of the few ``new/`` rows (a partial index), a flag change by
another program one read of ``cur/``.  Listings are compared with the indexed names as sets, and
this process keeps those names in memory while no other process changed one (``names_gen``).

First sight of a big folder is cheap: sizes come from ``,W=`` in the name (or are computed on
first use, stored as -1 until then), internal dates from the file's mtime on first use, and the
rows go in with one ``executemany``.  New files get UIDs in delivery order (:func:`delivery_order`).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence

from mailsuite.store.index_schema import IndexDatabase, SyncResult, frees_space
from mailsuite.store.maildir import base_of

_SUBS = ("new", "cur")
#: A directory mtime younger than this is not trusted to cover every change (see module doc):
#: one second where the file system keeps whole seconds, a few clock ticks where it keeps
#: finer times (Linux stamps files from a clock that is at most one tick behind).
_TRUST_AFTER_NS = 1_000_000_000
_TRUST_AFTER_FINE_NS = 30_000_000
_IN_NEW = "SELECT name FROM messages WHERE name LIKE 'new/%'"


def _trusted(stamp_ns: int, now_ns: int) -> bool:
    """May a directory listing started at ``now_ns`` be trusted to cover every change that
    left the directory with mtime ``stamp_ns``?  Not if a later change could get the same
    mtime: within the file system's timestamp granularity (whole seconds on some file systems,
    one kernel clock tick on Linux ext4/xfs/tmpfs)."""
    coarse = stamp_ns % 1_000_000_000 == 0
    return now_ns - stamp_ns > (_TRUST_AFTER_NS if coarse else _TRUST_AFTER_FINE_NS)


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


#: the names this server (and most MDAs of its kind) write, ``sec.M<usec>P<pid>[Q<n>].host``,
#: whose :func:`delivery_order` key one match gives
_PLAIN_NAME = re.compile(r"([0-9]+)\.M([0-9]+)P[0-9]+(?:Q([0-9]+))?(?:\.|\Z)")


def _delivery_key(base: str) -> tuple[int, int, int, str]:
    """:func:`delivery_order`, with one regex match for the common form (a first index of
    100,000 files sorts by it; the general function costs twice as much)."""
    m = _PLAIN_NAME.match(base)
    if m is None:
        return delivery_order(base)
    sec, usec, counter = m.groups()
    return (int(sec), int(usec), int(counter) if counter else 0, base)


class IndexScan(IndexDatabase):
    """Sync with the directory (see the module docstring) and rebuild from it."""

    def _dir_stamp(self) -> tuple[int, int] | None:
        try:
            new = (self.folder / "new").stat().st_mtime_ns
            cur = (self.folder / "cur").stat().st_mtime_ns
        except FileNotFoundError:
            return None
        return new, cur

    @frees_space
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
        # no row at all (a folder new to us): nothing to look up, nothing to order but new/
        # before cur/ (``known`` holds only new/ names when only new/ was listed)
        empty = not known and subs != ("new",)
        bases = {
            n[4:].split(":", 1)[0]: n  # base_of("new/..." or "cur/..." less the prefix)
            for n in (
                [*(n for n in appeared if n[0] == "n"), *(n for n in appeared if n[0] == "c")]
                if empty
                else sorted(appeared, key=lambda n: n.startswith("cur/"))
            )
        }
        rows: dict[str, tuple[int, str, str]] = {}  # base -> (uid, name, flags)
        if not empty:
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
            fresh.sort(key=_delivery_key)
            uid = int(self._meta("uidnext") or 1)
            new_rows = []
            if fresh:
                modseq += 1
            flag_text: dict[str, str] = {}  # info suffix -> flags (a folder has few kinds)
            for base in fresh:
                rel = bases[base]
                info = rel[len(base) + 4 :]
                text = flag_text.get(info)
                if text is None:
                    text = flag_text[info] = " ".join(sorted(self._disk_flags(rel)))
                w = _name_size(rel)[1] if ",W=" in base else None
                new_rows.append((uid, base, rel, text, -1 if w is None else w, -1.0, modseq))
                added.append(uid)
                uid += 1
            names_in.extend(bases[b] for b in fresh)
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
