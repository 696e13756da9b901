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

Our own changes (flag renames, expunges, new files, all made under the index lock) change the
mtimes too, and under load they come every few milliseconds, so the mtime is never old enough
to trust: listing ``cur/`` again after each of them made every IMAP command of a busy folder
pay for a directory read.  Instead, a change of ours that finds the directory as the index last
saw it (the recorded mtime) records the mtime it leaves as *provisional* (``since_<sub>``: when
it became so): the index holds everything we did, and only a change by another program in the
same clock tick as one of ours could hide behind it.  A provisional mtime is taken as it is for
at most :data:`_RECHECK_NS`, then the directory is listed once more; a watcher's tick (IDLE:
the kernel said the directory changed) lists it at once (``sync(verify=True)``).  A listing
whose mtime is too young to trust records it as due for listing again at the next sync
(``since`` 0), as before.

First sight of a big folder is cheap: sizes come from ``,W=`` in the name (or are computed on
first use, stored as -1 until then), internal dates from the file's mtime on first use, and the
rows go in with one ``executemany``.  New files get UIDs in delivery order (:func:`delivery_order`).
A folder with no index file at all gets it built whole at open
(:mod:`~mailsuite.store.index_build`); its first :meth:`IndexScan.sync` reports what that build
added.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from mailsuite.store.index_build import (
    Built,
    _w_size,
    columns,
    finish,
    insert_rows,
    listing,
    order_listing,
    prepare,
    told,
)
from mailsuite.store.index_schema import (
    _MAX_PARAMS,
    Early,
    IndexDatabase,
    SyncResult,
    _counters,
    frees_space,
)
from mailsuite.store.maildir import base_of

_SUBS = ("new", "cur")
#: the fewest files a sync adds to a non-empty index with the build's bulk insert
_BULK_FRESH = 200
#: A directory mtime younger than this is not trusted to cover every change (see module doc):
#: one second where the file system keeps whole seconds, a few clock ticks where it keeps
#: finer times (Linux stamps files from a clock that is at most one tick behind).
_TRUST_AFTER_NS = 1_000_000_000
_TRUST_AFTER_FINE_NS = 30_000_000
_IN_NEW = "SELECT name FROM messages WHERE name LIKE 'new/%'"
#: how long a provisional mtime (left by our own changes, see the module doc) stands in for a
#: listing: another program's change in the same clock tick as ours is seen this much later
_RECHECK_NS = 100_000_000


def _covered(m: dict[str, int], sub: str, st: int, now: int, verify: bool = False) -> bool:
    """Does the index cover directory ``sub`` as it is at mtime ``st``, without listing it?
    Yes when ``st`` is the recorded mtime and trusted, or provisional for less than
    :data:`_RECHECK_NS` (never with ``verify``)."""
    if m.get("stamp_" + sub) != st:
        return False
    since = m.get("since_" + sub)
    return since is None or (not verify and since > 0 and now - since < _RECHECK_NS)


def _trusted(stamp_ns: int, now_ns: int) -> bool:
    """May a directory listing started at ``now_ns`` be trusted to cover every change that
    left the directory with mtime ``stamp_ns``?  Not if a later change could get the same
    mtime: within the file system's timestamp granularity (whole seconds on some file systems,
    one kernel clock tick on Linux ext4/xfs/tmpfs)."""
    coarse = stamp_ns % 1_000_000_000 == 0
    return now_ns - stamp_ns > (_TRUST_AFTER_NS if coarse else _TRUST_AFTER_FINE_NS)


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


@dataclass
class _Found:
    """What one sync found and did, gathered as its steps run (one transaction's worth).

    ``modseq`` is the highest MODSEQ given so far; ``fresh`` the bases new to the index;
    ``names_out``/``names_in`` the names that left/joined the index, for the name cache.
    """

    modseq: int
    added: list[int] = field(default_factory=list)
    expunged: list[int] = field(default_factory=list)
    changed: list[int] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    names_out: list[str] = field(default_factory=list)
    names_in: list[str] = field(default_factory=list)


def _bases_of(appeared: set[str], empty: bool) -> dict[str, str]:
    """base -> "sub/name" for every appeared file; a base under both new/ and cur/ counts
    as its cur/ copy (the later in the listing wins), which is where a reader moves it.

    On a first sight (``empty``) the files are only split by directory, not sorted: sorting
    100,000 names costs more than the rest of the scan.
    """
    return {
        n[4:].split(":", 1)[0]: n  # base_of("new/..." or "cur/..." less the prefix)
        for n in (
            [*(n for n in appeared if n[0] == "n"), *(n for n in appeared if n[0] == "c")]
            if empty
            else sorted(appeared, key=lambda n: n.startswith("cur/"))
        )
    }


def _match_vanished(
    found: _Found, vanished: set[str], rows: dict[str, tuple[int, str, str]]
) -> None:
    """Count as expunged the vanished names whose message is not under another name now.

    A name that left because its file moved (already in ``names_out``) is no expunge; nor is
    one the index no longer holds under that name (another process moved it first).
    """
    moved = set(found.names_out)
    for name in vanished:
        if name in moved:
            continue
        row = rows.get(base_of(name.split("/", 1)[1]))
        if row is not None and row[1] == name:
            found.expunged.append(row[0])
            found.names_out.append(name)


class IndexScan(IndexDatabase):
    """Sync with the directory (see the module docstring) and rebuild from it."""

    #: what the build of a missing index at open found (:mod:`~mailsuite.store.index_build`):
    #: the first :meth:`sync` reports it, the first ``state()`` may answer from it
    _built: Built | None = None
    _built_result: SyncResult | None = None
    #: the last sync that did not wait found the lock taken and left the listing undone
    lock_busy = False

    def _flag_text(self, info: str) -> str:
        """The index's flag text for an info suffix (``":2,S"``)."""
        return " ".join(sorted(self._disk_flags(info)))

    def _build_missing(self) -> None:
        """Build the missing index (lock held): :func:`~mailsuite.store.index_build.prepare`
        and :func:`~mailsuite.store.index_build.finish`; in between, when the UIDs were made
        durable in a uidlist and the opener answers early (:class:`EarlyAnswer`: an IMAP
        SELECT), it is told the folder's state, and answers while the index is built."""
        early, self._early = self._early, None  # (once: the handle outlives the answer)
        prep = prepare(self.folder, _delivery_key, uidlist=early is not None)
        if prep is None:
            return
        claimed = False
        if early is not None and prep.durable and not prep.recovered:
            unseen, keywords = told(prep.ordered, self._flag_text)
            n = len(prep.ordered.names)
            early.report(Early(prep.uidvalidity, n, prep.modseq, unseen, keywords))
            claimed = early.claim
        self._built = finish(self.folder, prep, self._flag_text, _trusted, claimed)
        self._built_result = self._built.result

    def _dir_stamp(self) -> tuple[int, int] | None:
        new_dir, cur_dir = self._sub_paths
        try:
            new = os.stat(new_dir).st_mtime_ns  # noqa: PTH116 (see _sub_paths)
            cur = os.stat(cur_dir).st_mtime_ns  # noqa: PTH116
        except FileNotFoundError:
            return None
        return new, cur

    def sync_counters(self, verify: bool = False, wait: bool = True) -> tuple[int, int, int] | None:
        """:meth:`sync`, then :meth:`counters`: what an open folder asks before each IMAP
        command, in one query of the meta table when nothing changed.  None when ``new/`` or
        ``cur/`` is gone.  ``wait`` False: see :meth:`sync`."""
        stamp = self._dir_stamp()
        if stamp is None:
            return None
        m = self._metas()
        now = time.time_ns()
        if (
            self._built_result is not None  # the build at open is reported by a sync
            or not _covered(m, "new", stamp[0], now, verify)
            or not _covered(m, "cur", stamp[1], now, verify)
        ):
            self.sync(verify=verify, wait=wait)
            m = self._metas()
        return _counters(m)

    @frees_space
    def sync(self, force: bool = False, verify: bool = False, wait: bool = True) -> SyncResult:
        """Bring the index in step with the directory; cheap when nothing changed.

        Only the subdirectories whose mtime differs from the recorded (trusted) one are
        listed: a delivery lists ``new/``, a flag change by another program lists ``cur/``.
        ``verify`` also lists those whose mtime is only provisional (see the module doc):
        for a watcher that was told the directory changed.

        ``wait`` False (the event loop's thread): when another handle holds the folder lock,
        do nothing now instead of waiting for it.  The holder is a writer of ours (APPEND,
        EXPUNGE, a flag change, another process's sync) whose change is not committed yet, so
        the index as it stands is a state the folder was in an instant ago; its mtimes stay
        unrecorded, so the next sync lists the directory.
        """
        self.lock_busy = False
        built, self._built_result = self._built_result, None
        result = self._sync(force, verify, wait)
        if built is None:
            return result
        # the build at open (index_build) was the first sync's work: report it too
        if result.expunged:
            gone = set(result.expunged)
            return SyncResult(
                tuple(u for u in built.added if u not in gone) + result.added,
                tuple(u for u in result.expunged if u not in set(built.added)),
                result.flag_changes,
            )
        return SyncResult(built.added + result.added, (), result.flag_changes)

    def _sync(self, force: bool, verify: bool = False, wait: bool = True) -> SyncResult:
        stamp = self._dir_stamp()
        if stamp is None:
            return SyncResult()
        if not force:
            m = self._metas()
            now = time.time_ns()
            if _covered(m, "new", stamp[0], now, verify) and _covered(
                m, "cur", stamp[1], now, verify
            ):
                return SyncResult()
        with self._try_locked(wait) as held:
            if not held:
                self.lock_busy = True  # a writer holds the lock: see sync()
                return SyncResult()
            now = time.time_ns()  # before the listing: see _trusted()
            stamp = self._dir_stamp()
            if stamp is None:
                return SyncResult()
            m = self._metas()
            subs = tuple(
                sub
                for sub, st in zip(_SUBS, stamp, strict=True)
                if force or not _covered(m, sub, st, now, verify)
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
        """List ``subs``, compare with the index and write the difference in one transaction.

        The steps are apart so each can be read on its own; the work stays in one transaction
        so another process never sees a half-applied sync (a moved file both gone and new).
        An index without a message (a folder new to us, or emptied) is filled in bulk, from
        a listing of both directories, whichever of them changed.
        """
        if self.db.execute("SELECT 1 FROM messages LIMIT 1").fetchone() is None:
            return self._fill_empty(subs)
        return self._scan_rows(stamp, now, subs)

    def _scan_rows(self, stamp: tuple[int, int], now: int, subs: tuple[str, ...]) -> SyncResult:
        """:meth:`_scan` row by row: the names compared as sets, each difference a row."""
        on_disk = self._list_subs(subs)
        gen_before = int(self._meta("names_gen") or 0)
        known = self._db_names(subs)
        cache_valid = self._names is not None and self._names_gen == gen_before
        appeared = on_disk - known
        vanished = known - on_disk
        if len(subs) == 1:
            prefix = subs[0] + "/"
            vanished = {n for n in vanished if n.startswith(prefix)}
        if not appeared and not vanished:
            with self._transaction():
                self._record_stamps(stamp, now, subs)
            return SyncResult()
        # no row at all (a folder new to us): nothing to look up, nothing to order but new/
        # before cur/ (``known`` holds only new/ names when only new/ was listed)
        empty = not known and subs != ("new",)
        bases = _bases_of(appeared, empty)
        rows = {} if empty else self._rows_for(vanished, bases)
        with self._transaction():
            found = _Found(modseq=int(self._meta("highestmodseq") or 1))
            updates, renames = self._match_moved(found, bases, rows, on_disk)
            _match_vanished(found, vanished, rows)
            self._write_moved(found, updates, renames)
            uid = self._insert_fresh(found, bases)
            self._set_meta("uidnext", uid)
            self._set_meta("highestmodseq", found.modseq)
            if found.names_in or found.names_out:
                self._names_changed(found.names_out, found.names_in, cache_valid)
            self._record_stamps(stamp, now, subs)
        return SyncResult(tuple(found.added), tuple(found.expunged), tuple(found.changed))

    def _fill_empty(self, subs: tuple[str, ...]) -> SyncResult:
        """Index every file of a folder whose index holds no message (lock held): what
        :meth:`_scan_rows` does for it, with the build's bulk insert (a plain sort, columns
        made in C, one ``INSERT ... SELECT``: :mod:`~mailsuite.store.index_build`) instead of
        a Python row per file.  A folder created empty by us (an IMAP CREATE, a first
        delivery's ``new/``) that another program then filled is a first sight like a missing
        index.  UIDs follow on from ``uidnext`` under the folder's UIDVALIDITY, as a sync
        gives them.  Both directories are listed; only the mtimes of ``subs`` (those that
        were due) are recorded, as a sync of them records them."""
        found = listing(self.folder)
        if found is None:
            return SyncResult()
        now, stamp, new, cur = found
        cols = columns(order_listing(new, cur, _delivery_key), self._flag_text)
        n = len(cols.flags)
        with self._transaction():
            m = self._metas()
            uid = int(m.get("uidnext") or 1)
            modseq = int(m.get("highestmodseq") or 1)
            gen = int(m.get("names_gen") or 0)
            if n:
                modseq += 1
                if insert_rows(self.db, uid, modseq, cols) != n:  # never seen
                    raise RuntimeError(f"index of {self.folder}: not every file inserted")
                self._set_meta("uidnext", uid + n)
                self._set_meta("highestmodseq", modseq)
                self._names_changed((), (), valid=False)  # 100,000 names: read when needed
                gen += 1
            self._record_stamps(stamp, now, subs)
        uids = list(range(uid, uid + n))
        added = SyncResult(tuple(uids))
        self._built = Built(added, uids, cols.flags, modseq, uid + n, gen)
        return added

    def _list_subs(self, subs: Sequence[str]) -> set[str]:
        """Every visible file under ``subs``, as "sub/name".

        Dot files are skipped: Maildir writers and tools keep their own state there, and it
        is never a message.
        """
        on_disk: set[str] = set()
        for sub in subs:
            prefix = sub + "/"
            # listdir, not scandir: no DirEntry per file (a third of the cost in a busy
            # folder, where cur/ is listed again every _RECHECK_NS)
            names = os.listdir(self.folder / sub)  # noqa: PTH208
            if on_disk:
                on_disk.update({prefix + n for n in names if n[0] != "."})
            else:
                on_disk = {prefix + n for n in names if n[0] != "."}
        return on_disk

    def _rows_for(
        self, vanished: set[str], bases: dict[str, str]
    ) -> dict[str, tuple[int, str, str]]:
        """base -> (uid, name, flags) for every base that changed on either side.

        Looked up by base, not name, because a file moved from new/ to cur/ (or renamed for a
        flag change) keeps its base: that is how a move is told from an expunge plus a new mail.
        """
        rows: dict[str, tuple[int, str, str]] = {}
        wanted = {base_of(n.split("/", 1)[1]) for n in vanished} | set(bases)
        indexed = self._names  # every row's name (loaded by _db_names before this)
        if indexed is not None and len(wanted) > _MAX_PARAMS and len(wanted) >= len(indexed):
            # more bases to look up than rows (many files added to a small index): one read
            # of the table, not a query per 900 bases
            for uid, base, name, flags in self.db.execute(
                "SELECT uid, base, name, flags FROM messages"
            ):
                if base in wanted:
                    rows[base] = (uid, name, flags)
            return rows
        for uid, base, name, flags in self._where_in(
            "SELECT uid, base, name, flags FROM messages WHERE", "base", list(wanted)
        ):
            rows[base] = (uid, name, flags)
        return rows

    def _match_moved(
        self,
        found: _Found,
        bases: dict[str, str],
        rows: dict[str, tuple[int, str, str]],
        on_disk: set[str],
    ) -> tuple[list[tuple[str, str, int, int]], list[tuple[str, int]]]:
        """Sort the appeared files into known messages under a new name and fresh ones.

        A known base under a new name keeps its UID (RFC 3501 2.3.1.1: a UID never changes
        for a message); its flags are re-read from the name, and a flag change gets a new
        MODSEQ (RFC 7162 3.1) so CONDSTORE clients see it.  Returns the (name, flags, modseq,
        uid) updates and the (name, uid) plain renames to write.
        """
        updates: list[tuple[str, str, int, int]] = []
        renames: list[tuple[str, int]] = []
        for base, disk in bases.items():
            row = rows.get(base)
            if row is None:
                found.fresh.append(base)
                continue
            uid, name, flags = row
            if name in on_disk:
                continue  # a second copy of a file we know (a tool mid-move): ignore
            found.names_out.append(name)
            found.names_in.append(disk)
            disk_flags = self._disk_flags(disk)
            old = set(flags.split()) if flags else set()
            letters = self._keyword_letters()
            # keywords with no letter live only in the index; keep them
            kept = {f for f in old if not f.startswith("\\") and f not in letters.values()}
            new_flags = disk_flags | kept
            if new_flags != old:
                found.modseq += 1
                found.changed.append(uid)
                updates.append((disk, " ".join(sorted(new_flags)), found.modseq, uid))
            else:
                renames.append((disk, uid))
        return updates, renames

    def _write_moved(
        self,
        found: _Found,
        updates: list[tuple[str, str, int, int]],
        renames: list[tuple[str, int]],
    ) -> None:
        """Write the renames, flag changes and expunges found so far.

        Expunged UIDs are remembered with their MODSEQ so QRESYNC clients (RFC 7162 3.2.10)
        can be told what vanished since their last look.
        """
        if updates:
            self.db.executemany(
                "UPDATE messages SET name=?, flags=?, modseq=? WHERE uid=?", updates
            )
        if renames:
            self.db.executemany("UPDATE messages SET name=? WHERE uid=?", renames)
        expunged = found.expunged
        if expunged:
            expunged.sort()
            found.modseq += 1
            self.db.executemany("DELETE FROM messages WHERE uid=?", [(u,) for u in expunged])
            self.db.executemany(
                "INSERT OR REPLACE INTO expunged(uid, modseq) VALUES (?, ?)",
                [(u, found.modseq) for u in expunged],
            )

    def _insert_fresh(self, found: _Found, bases: dict[str, str]) -> int:
        """Give the new files UIDs in delivery order and insert them with one executemany
        (at least :data:`_BULK_FRESH` of them: with :func:`insert_rows`).

        Delivery order (:func:`delivery_order`) so UIDs follow arrival; sizes from ``,W=``
        and internal dates are left for first use (-1) so first sight of a big folder stays
        cheap.  Returns the next free UID.
        """
        fresh = found.fresh
        uid = int(self._meta("uidnext") or 1)
        new_rows = []
        if fresh:
            found.modseq += 1
        if len(fresh) >= _BULK_FRESH:
            # many files another program added (an import into a folder we know): ordered
            # and inserted as a first build does (a plain sort where the names allow it,
            # SQLite cutting each row), not a key and a Python tuple per file
            rels = [bases[b] for b in fresh]
            ordered = order_listing(
                [r[4:] for r in rels if r[0] == "n"],
                [r[4:] for r in rels if r[0] == "c"],
                _delivery_key,
            )
            n = insert_rows(self.db, uid, found.modseq, columns(ordered, self._flag_text))
            if n != len(rels):  # never seen
                raise RuntimeError(f"index of {self.folder}: not every file inserted")
            found.added.extend(range(uid, uid + n))
            found.names_in.extend(ordered.rels())
            return uid + n
        fresh.sort(key=_delivery_key)
        flag_text: dict[str, str] = {}  # info suffix -> flags (a folder has few kinds)
        for base in fresh:
            rel = bases[base]
            info = rel[len(base) + 4 :]
            text = flag_text.get(info)
            if text is None:
                text = flag_text[info] = " ".join(sorted(self._disk_flags(rel)))
            w = _w_size(base) if ",W=" in base else -1
            new_rows.append((uid, base, rel, text, w, -1.0, found.modseq))
            found.added.append(uid)
            uid += 1
        found.names_in.extend(bases[b] for b in fresh)
        self.db.executemany(
            "INSERT INTO messages(uid, base, name, flags, size, internaldate, modseq)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            new_rows,
        )
        return uid

    def _record_stamps(self, stamp: tuple[int, int], now: int, subs: Sequence[str]) -> None:
        """Remember the mtimes of the directories just listed: trusted, or, when too young to
        trust, as due for another listing at the next sync (``since`` 0: see the module doc)."""
        for sub, st in zip(_SUBS, stamp, strict=True):
            if sub not in subs:
                continue  # not listed: its recorded stamp (if any) stays
            self._set_meta("stamp_" + sub, st)
            if _trusted(st, now):
                self.db.execute("DELETE FROM meta WHERE key=?", ("since_" + sub,))
            else:
                self._set_meta("since_" + sub, 0)

    def _own_changes(
        self, subs: Iterable[str], before: tuple[int, int] | None, m: dict[str, int]
    ) -> None:
        """Our renames, links or unlinks (lock held, inside their transaction) changed the
        mtimes of ``subs``, which were ``before`` when we began (``m``: the meta then).  Where
        the index covered the directory as it was, the index now holds everything that
        changed: record the new mtime as provisional (see the module doc).  Elsewhere (another
        program changed it meanwhile) forget the mtime: the next sync lists the directory."""
        after = self._dir_stamp()
        now = time.time_ns()
        for sub in subs:
            i = _SUBS.index(sub)
            old = m.get("stamp_" + sub)
            if before is None or after is None or old != before[i]:
                self._forget_stamp((sub,))
                continue
            since = m.get("since_" + sub)
            self._set_meta("stamp_" + sub, after[i])
            # the first provisional mtime of a run of our changes sets the deadline
            self._set_meta("since_" + sub, since if since else now)

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
