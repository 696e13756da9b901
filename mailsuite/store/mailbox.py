"""The mailbox model IMAP uses (and POP3 may): a user's folders, and open folders shared by
every session of this process.  Our own code.

* :class:`Account` -- one user's Maildir++ tree: list, create, delete, rename, subscriptions
  (the ``subscriptions`` file Courier and Dovecot use), folder names in modified UTF-7 with
  hierarchy ``.``.
* :class:`Folder` -- one open folder, shared by reference count among the sessions of this
  process that selected it: one SQLite handle, one in-memory copy of UIDs, flags and modseqs,
  kept in step with the index by :meth:`Folder.refresh` (cheap when nothing changed).  Changes
  are pushed to every :class:`FolderView` (one per session), which queues them until its
  session may announce them (RFC 3501 5.2, 7.4.1).
* Changes from this process travel through the runtime's :class:`ChangeHub`; changes from other
  processes are found by polling directory mtimes while a session is in IDLE.
"""

from __future__ import annotations

import bisect
import os
import shutil
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from mailsuite.corelog import Log
from mailsuite.store import mailbox_names
from mailsuite.store.events import ChangeHub, FolderWatcher
from mailsuite.store.folder_writer import FolderWriter
from mailsuite.store.index import FlagDelta, FolderIndex
from mailsuite.store.index_schema import Early, EarlyAnswer, keywords_in
from mailsuite.store.maildir import (
    FolderNameError,
    ensure_folder,
    folder_path,
    fsync_dir,
    unique_name,
)
from mailsuite.store.quota import charge, folder_usage
from mailsuite.store.space import log_failure

SUBSCRIPTIONS = "subscriptions"
#: seconds until a refresh that found the folder lock taken is tried again (a writer holds it
#: for an fsync and a transaction: milliseconds)
BUSY_RETRY = 0.005
SEPARATOR = "."


class MailboxError(Exception):
    """A refused mailbox operation; ``code`` is an RFC 5530 response code (or None)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


def _check_name(name: str) -> None:
    """Names are the wire form (modified UTF-7, hierarchy "."): refuse what could escape or
    that is not canonical modified UTF-7."""
    if "/" in name or "\\" in name or name.startswith("~") or "\x00" in name:
        raise MailboxError("Invalid mailbox name", "CANNOT")
    try:
        mailbox_names.decode(name)
    except ValueError as exc:
        raise MailboxError(f"Invalid mailbox name: {exc}", "CANNOT") from None
    if name.startswith(SEPARATOR) or name.endswith(SEPARATOR) or ".." in name:
        raise MailboxError("Invalid mailbox name: empty hierarchy level", "CANNOT")


class Account:
    """One user's folders (blocking file-system calls; all small)."""

    def __init__(self, root: Path, special: dict[str, str] | None = None) -> None:
        self.root = root
        self.special = special or {}

    # -- names and paths -------------------------------------------------------------------

    def path(self, name: str) -> Path:
        if name.upper() == "INBOX":
            return self.root
        _check_name(name)
        try:
            path = folder_path(self.root, name)
        except FolderNameError as exc:
            raise MailboxError(str(exc), "CANNOT") from None
        return path

    def exists(self, name: str) -> bool:
        try:
            return (self.path(name) / "cur").is_dir()
        except MailboxError:
            return False

    def names(self) -> list[str]:
        """Every existing folder name (wire form), INBOX first."""
        out = ["INBOX"]
        try:
            with os.scandir(self.root) as it:
                for entry in it:
                    n = entry.name
                    if (
                        len(n) > 1
                        and n[0] == "."
                        and n != ".."
                        and entry.is_dir()
                        and Path(entry.path, "cur").is_dir()
                    ):
                        out.append(n[1:])
        except FileNotFoundError:
            pass
        out[1:] = sorted(out[1:])
        return out

    def special_use(self, name: str) -> str | None:
        return self.special.get(name)

    # -- create / delete / rename ---------------------------------------------------------

    def create(self, name: str) -> None:
        """Create ``name`` and every superior name it needs (RFC 3501 6.3.3: CREATE a.b
        "SHOULD create any superior hierarchical names"), so ``a`` is a real, selectable
        mailbox and not only implied by its child."""
        if name.endswith(SEPARATOR):  # RFC 3501 6.3.3: a trailing separator is a hint only
            name = name[:-1]
        if name.upper() == "INBOX" or self.exists(name):
            raise MailboxError("Mailbox exists already", "ALREADYEXISTS")
        self.path(name)  # refuse a bad name before making any of its superiors
        self._create_superiors(name)
        self._create_one(name)

    def _create_superiors(self, name: str) -> None:
        for parent in _superiors(name):
            if parent.upper() == "INBOX" or self.exists(parent):
                continue
            try:
                self._create_one(parent)
            except MailboxError as exc:  # made meanwhile by another session: fine
                if exc.code != "ALREADYEXISTS":
                    raise

    def _create_one(self, name: str) -> None:
        path = self.path(name)
        tmp = self.root / f".tmp-create-{unique_name()}"
        ensure_folder(tmp)
        try:
            tmp.rename(path)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if self.exists(name):
                raise MailboxError("Mailbox exists already", "ALREADYEXISTS") from None
            raise
        fsync_dir(self.root)

    def has_children(self, name: str) -> bool:
        prefix = (name + SEPARATOR).upper() if name.upper() == "INBOX" else name + SEPARATOR
        return any(
            (n.upper().startswith(prefix) if name.upper() == "INBOX" else n.startswith(prefix))
            for n in self.names()[1:]
        )

    def delete(self, name: str) -> Path:
        if name.upper() == "INBOX":
            raise MailboxError("INBOX cannot be deleted", "CANNOT")
        if not self.exists(name):
            raise MailboxError("No such mailbox", "NONEXISTENT")
        if self.has_children(name):
            raise MailboxError("Mailbox has children; delete them first", "INUSE")
        path = self.path(name)
        trash = self.root / f".tmp-delete-{unique_name()}"
        path.rename(trash)  # atomic for other readers
        freed, messages = folder_usage(trash)  # one folder's listing, for the quota count
        shutil.rmtree(trash, ignore_errors=True)
        fsync_dir(self.root)
        charge(path, -freed, -messages)
        # The subscription stays: RFC 3501 6.3.6, the server "MUST NOT unilaterally remove
        # an existing mailbox name from the subscription list even if a mailbox by that name
        # no longer exists"; LIST (SUBSCRIBED) shows it \NonExistent (RFC 5258 3).
        return path

    def rename(self, old: str, new: str) -> list[tuple[Path, Path]]:
        """Rename ``old`` and all its inferior names (RFC 3501 6.3.5); returns the moved
        (from, to) directories.  ``old`` may be a name only its children imply (Maildir++
        ``.a.b`` without ``.a``, made by another tool): its children move all the same.
        Superior names ``new`` needs are created (6.3.5 SHOULD).  Renaming INBOX only checks
        and prepares here: the caller moves its messages into the new mailbox and leaves INBOX
        empty, and INBOX's inferior names stay where they are, as RFC 3501 requires."""
        is_inbox = old.upper() == "INBOX"
        exists = self.exists(old)
        if not exists and (is_inbox or not self.has_children(old)):
            raise MailboxError("No such mailbox", "NONEXISTENT")
        if new.upper() == "INBOX" or self.exists(new):
            raise MailboxError("Target mailbox exists already", "ALREADYEXISTS")
        dest = self.path(new)
        if is_inbox:
            self._create_superiors(new)
            return []  # done by the caller (message move), see move_inbox_blocking
        if (new + SEPARATOR).startswith(old + SEPARATOR):
            raise MailboxError("Cannot rename a mailbox into itself", "CANNOT")
        moves: list[tuple[Path, Path]] = [(self.path(old), dest)] if exists else []
        for child in self.names()[1:]:
            if child.startswith(old + SEPARATOR):
                target = new + child[len(old) :]
                if self.exists(target):
                    raise MailboxError(f"Target mailbox {target} exists already", "ALREADYEXISTS")
                moves.append((self.path(child), self.path(target)))
        for src, dst in moves:
            src.rename(dst)
        fsync_dir(self.root)
        self._create_superiors(new)
        subs = self.subscriptions()
        changed = False
        for i, s in enumerate(subs):
            if s == old or s.startswith(old + SEPARATOR):
                subs[i] = new + s[len(old) :]
                changed = True
        if changed:
            self._write_subscriptions(subs)
        return moves

    # -- subscriptions ---------------------------------------------------------------------

    def subscriptions(self) -> list[str]:
        try:
            text = (self.root / SUBSCRIPTIONS).read_text("utf-8", "replace")
        except OSError:
            return []
        seen: list[str] = []
        for line in text.splitlines():
            line = line.strip()
            if line and line not in seen:
                seen.append(line)
        return seen

    def _write_subscriptions(self, names: Iterable[str]) -> None:
        tmp = self.root / (SUBSCRIPTIONS + ".tmp")
        tmp.write_text("".join(n + "\n" for n in names), "utf-8")
        tmp.replace(self.root / SUBSCRIPTIONS)

    def subscribe(self, name: str) -> None:
        if name.upper() == "INBOX":
            name = "INBOX"
        else:
            _check_name(name)
        subs = self.subscriptions()
        if name not in subs:
            subs.append(name)
            self._write_subscriptions(subs)

    def unsubscribe(self, name: str, missing_ok: bool = False) -> None:
        subs = self.subscriptions()
        if name.upper() == "INBOX":
            name = "INBOX"
        if name not in subs:
            if missing_ok:
                return
            raise MailboxError("Not subscribed", "NONEXISTENT")
        self._write_subscriptions(s for s in subs if s != name)


def _superiors(name: str) -> list[str]:
    """``a.b.c`` -> ``["a", "a.b"]``: the superior hierarchical names, outermost first."""
    parts = name.split(SEPARATOR)
    return [SEPARATOR.join(parts[:i]) for i in range(1, len(parts))]


# -- open folders ---------------------------------------------------------------------------


class FolderView:
    """One session's view of an open folder: its own sequence numbers and the changes it has
    not announced yet."""

    __slots__ = (
        "folder",
        "invalid",
        "keywords",
        "on_change",
        "pending_added",
        "pending_expunged",
        "pending_flags",
        "readonly",
        "recent",
        "synced_modseq",
        "uids",
    )

    def __init__(self, folder: Folder, readonly: bool) -> None:
        self.folder = folder
        #: the keywords this session was told of in its last FLAGS response (RFC 3501 7.2.6)
        self.keywords: frozenset[str] = frozenset(folder.keywords)
        #: the folder's HIGHESTMODSEQ when this view last had no change left to announce
        self.synced_modseq = folder.highestmodseq
        self.uids: list[int] = list(folder.uids)
        self.readonly = readonly
        self.recent: list[tuple[int, int]] = []  # [first, end) UID ranges that are \Recent here
        self.pending_added = False
        self.pending_expunged: set[int] = set()
        self.pending_flags: set[int] = set()
        self.on_change: Callable[[], None] | None = None
        self.invalid: str | None = None  # reason when the folder was deleted or renamed

    def is_recent(self, uid: int) -> bool:
        return any(a <= uid < b for a, b in self.recent)

    def recent_count(self) -> int:
        n = 0
        for a, b in self.recent:
            n += bisect.bisect_left(self.uids, b) - bisect.bisect_left(self.uids, a)
        return n

    def seq_of(self, uid: int) -> int:
        """1-based sequence number of ``uid`` in this view, 0 if absent."""
        i = bisect.bisect_left(self.uids, uid)
        return i + 1 if i < len(self.uids) and self.uids[i] == uid else 0

    def _changed(self, added: bool, expunged: Sequence[int], flags: Iterable[int]) -> None:
        if added:
            self.pending_added = True
        if expunged:
            self.pending_expunged.update(expunged)
        self.pending_flags.update(flags)
        if self.on_change is not None:
            self.on_change()

    def take_expunges(self) -> list[int]:
        """Apply pending expunges to the sequence map; returns the sequence numbers to
        announce, in the order ``* n EXPUNGE`` must be sent (each relative to the previous)."""
        if not self.pending_expunged:
            return []
        gone = self.pending_expunged
        self.pending_expunged = set()
        seqs = []
        keep = []
        for i, u in enumerate(self.uids):
            if u in gone:
                seqs.append(i + 1)
            else:
                keep.append(u)
        self.uids = keep
        self.pending_flags -= gone
        # announce from the highest down so each number is still valid when read
        return sorted(seqs, reverse=True)

    def take_added(self) -> int | None:
        """Extend the sequence map with new messages; returns the new EXISTS count or None.
        Messages that are both new and already expunged are skipped."""
        if not self.pending_added:
            return None
        self.pending_added = False
        last = self.uids[-1] if self.uids else 0
        fuids = self.folder.uids
        i = bisect.bisect_right(fuids, last)
        new = fuids[i:]
        if not new:
            return None
        self.uids.extend(new)
        self.pending_flags.difference_update(new)
        return len(self.uids)

    def take_flags(self) -> list[int]:
        if not self.pending_flags:
            return []
        uids = sorted(u for u in self.pending_flags if u in self.folder.flags)
        self.pending_flags = set()
        return uids

    def close(self) -> None:
        self.folder.release(self)


class Folder:
    """An open folder shared by this process's sessions (see the module docstring)."""

    def __init__(
        self, registry: FolderRegistry, path: Path, index: FolderIndex | None = None
    ) -> None:
        self.registry = registry
        self.path = path
        self.index = index if index is not None else FolderIndex(path)
        #: the handle for changes made in worker threads (EXPUNGE; STORE when the lock is busy)
        self.writer = FolderWriter(path)
        #: the index handles are closed (the folder left the registry for good)
        self.closed = False
        self.views: list[FolderView] = []
        # an index handed over was synced in its worker thread just now: not waiting for the
        # folder lock here (the event loop's thread) if a writer took it since (see refresh)
        self.index.sync(wait=index is None)
        self.uidvalidity, self.uidnext, self.highestmodseq = self.index.counters()
        uids, flags, modseqs = self.index.state()
        # one string per distinct flag text (a folder has few), mapped in C: a first open
        # of 100,000 messages pays no Python call per message here
        canon: dict[str, str] = {f: f for f in set(flags)}
        self.uids: list[int] = uids
        self.flags: dict[int, str] = dict(zip(uids, map(canon.__getitem__, flags), strict=True))
        self.modseqs: dict[int, int] = dict(zip(uids, modseqs, strict=True))
        self._canon = canon
        self._flag_sets: dict[str, frozenset[str]] = {}
        #: every keyword a message of the folder has had while it was open: what FLAGS lists
        self.keywords: set[str] = set()
        for f in canon:
            self._note_keywords(f)
        self._unsubscribe = (
            registry.hub.subscribe(path, self._hub_changed) if registry.hub else None
        )
        self._refresh_pending = False
        self._busy_retry = False  # a refresh is due after BUSY_RETRY (see _retry_busy)
        #: the index was rebuilt under this object (new UIDVALIDITY): its UIDs mean nothing
        #: now, so the registry replaces it and closes it once its sessions have let go
        self.stale = False

    # -- life cycle ------------------------------------------------------------------------

    def view(self, readonly: bool) -> FolderView:
        v = FolderView(self, readonly)
        self.views.append(v)
        return v

    def release(self, view: FolderView) -> None:
        if view in self.views:
            self.views.remove(view)
        if not self.views:
            self.registry._closed(self)

    def _close(self) -> None:
        if self._unsubscribe:
            self._unsubscribe()
        self.closed = True
        self.writer.close()
        self.index.close()

    def invalidate(self, reason: str) -> None:
        for v in list(self.views):
            v.invalid = reason
            if v.on_change:
                v.on_change()

    def _note_keywords(self, flags: str) -> None:
        self.keywords.update(keywords_in(flags))

    def view_as_told(self, readonly: bool, told: Early) -> FolderView:
        """A view for a session told ``told`` by a SELECT answered before the folder's index
        was built (:mod:`~mailsuite.store.index_build`): its sequence numbers are UIDs 1 to
        n, \\Recent to it, with the keywords told; what changed between the answer and now
        (another session or process, once the build let go of the folder lock) is pending,
        announced as any other change is (RFC 3501 5.2, 7.4.1): every message had the MODSEQ
        told, so one with a higher one changed."""
        v = self.view(readonly)
        n = told.exists
        v.keywords = told.keywords
        v.synced_modseq = told.modseq
        if n:
            v.recent.append((1, n + 1))
        # UIDs are unique and ascending: n of them ending at n are 1 to n
        same = len(self.uids) == n and (not n or self.uids[-1] == n)
        if same and self.highestmodseq == told.modseq:
            return v
        v.uids = list(range(1, n + 1))
        flags = self.flags
        v.pending_expunged = {u for u in v.uids if u not in flags}
        v.pending_added = bool(self.uids) and self.uids[-1] > n
        modseqs = self.modseqs
        v.pending_flags = {u for u in v.uids if modseqs.get(u, 0) > told.modseq}
        return v

    # -- keeping in step -------------------------------------------------------------------

    def _hub_changed(self, _folder: Path) -> None:
        if self._refresh_pending:
            return
        self._refresh_pending = True
        self.registry.call_soon(self._deferred_refresh)

    def _deferred_refresh(self) -> None:
        self._refresh_pending = False
        try:
            self.refresh()
        except Exception as e:  # the folder may have gone away; sessions find out on next use
            log_failure(self.registry.log, e, "refresh of {path} failed", path=str(self.path))

    def _retry_busy(self) -> None:
        """A watcher's sync (IDLE: the kernel said another process changed the directory)
        found the folder lock taken by that writer, still mid-change, and listed nothing: no
        further event comes when it commits, so try again shortly.  (Any other refresh
        is followed by the next command's, or by the in-process notice of the writer.)"""
        if self._busy_retry or self.registry.call_later is None:
            return
        self._busy_retry = True

        def retry() -> None:
            self._busy_retry = False
            if self.closed:
                return
            try:
                self.refresh(verify=True)
            except Exception as e:  # the folder may have gone away meanwhile
                log_failure(self.registry.log, e, "refresh of {path} failed", path=str(self.path))

        self.registry.call_later(BUSY_RETRY, retry)

    def refresh(self, verify: bool = False) -> bool:
        """Bring the shared state in step with the index (and the index with the directory);
        push what changed to every view.  Returns True if something changed.  ``verify``:
        a watcher was told the directory changed, so list it even where our own recent
        changes left an mtime the index takes as covered (see FolderIndex.sync)."""
        # never waiting for the folder lock: this runs on the event loop's thread, and a
        # writer holding it may be in an fsync (see IndexScan.sync)
        counters = self.index.sync_counters(verify=verify, wait=False)
        if self.index.lock_busy and verify:
            self._retry_busy()
        if counters is None:
            if not (self.path / "cur").is_dir():
                self.invalidate("Mailbox was deleted or renamed")
            return False
        uv, nxt, hms = counters
        if uv != self.uidvalidity:
            self.stale = True
            self.invalidate("Mailbox index was rebuilt (UIDVALIDITY changed)")
            return False
        if hms == self.highestmodseq and nxt == self.uidnext:
            return False
        rows, gone = self.index.changes_since(self.highestmodseq)
        self._apply(rows, gone, None)
        self.uidnext = max(self.uidnext, nxt)
        self.highestmodseq = max(self.highestmodseq, hms)
        return True

    def _apply(
        self, rows: Sequence[tuple[int, str, int]], gone: Sequence[int], origin: FolderView | None
    ) -> None:
        added: list[int] = []
        changed: list[int] = []
        flags = self.flags
        for uid, f, ms in rows:
            old = flags.get(uid)
            if f not in self._canon:
                self._note_keywords(f)
            if old is None:
                if uid >= self.uidnext or not self.uids or uid > self.uids[-1]:
                    added.append(uid)
                else:  # not seen before and lower than known UIDs: ignore unless truly new
                    added.append(uid)
                flags[uid] = self._canon.setdefault(f, f)
                self.modseqs[uid] = ms
            else:
                self.modseqs[uid] = ms
                if old != f:
                    flags[uid] = self._canon.setdefault(f, f)
                    changed.append(uid)
        if added:
            added.sort()
            if not self.uids or added[0] > self.uids[-1]:
                self.uids.extend(added)
            else:
                self.uids = sorted(set(self.uids).union(added))
            self.uidnext = max(self.uidnext, added[-1] + 1)
        real_gone = [u for u in gone if u in flags]
        if real_gone:
            gs = set(real_gone)
            self.uids = [u for u in self.uids if u not in gs]
            for u in real_gone:
                del flags[u]
                self.modseqs.pop(u, None)
        if added or real_gone or changed:
            for v in list(self.views):
                v._changed(bool(added), real_gone, [] if v is origin else changed)

    # -- changes made here ------------------------------------------------------------------

    def store(
        self,
        origin: FolderView | None,
        changes: Sequence[tuple[int, frozenset[str]]],
        unchangedsince: int | None = None,
        delta: FlagDelta | None = None,
    ) -> list[tuple[int, str, int]]:
        """Set flags (see :meth:`FolderIndex.store_flags`); other views hear about it."""
        done = self.index.store_flags(changes, unchangedsince, delta)
        self.stored(origin, done)
        return done

    def try_store(
        self,
        origin: FolderView | None,
        changes: Sequence[tuple[int, frozenset[str]]],
        unchangedsince: int | None = None,
        delta: FlagDelta | None = None,
    ) -> list[tuple[int, str, int]] | None:
        """:meth:`store` when the folder lock is free now; else None, nothing done (the
        caller runs ``writer.store`` in a worker thread, then :meth:`stored`)."""
        done = self.index.try_store_flags(changes, unchangedsince, delta)
        if done is not None:
            self.stored(origin, done)
        return done

    def stored(self, origin: FolderView | None, done: Sequence[tuple[int, str, int]]) -> None:
        """Flags were set (here or by :attr:`writer`): other views hear about it."""
        self._apply(done, (), origin)
        if done and self.registry.hub:
            self.registry.hub.notify(self.path, self._hub_changed)

    def expunge(self, uids: Sequence[int]) -> list[int]:
        """Expunge here, on the caller's thread (POP3's QUIT); IMAP runs ``writer.expunge``
        in a worker thread, then :meth:`expunged`."""
        done = self.index.expunge(uids)
        self.expunged(done)
        return done

    def expunged(self, done: Sequence[int]) -> None:
        """Messages were expunged (here or by :attr:`writer`): every view hears of it."""
        if self.closed:
            return
        self.refresh()
        if done and self.registry.hub:
            self.registry.hub.notify(self.path, self._hub_changed)

    def flag_set(self, uid: int) -> frozenset[str]:
        """The flags of ``uid`` as a set (one set per distinct flag string: a folder has few,
        and SEARCH asks for every message's)."""
        f = self.flags.get(uid)
        if not f:
            return frozenset()
        got = self._flag_sets.get(f)
        if got is None:
            if len(self._flag_sets) >= 4096:  # keywords can make many: stay bounded
                self._flag_sets.clear()
            got = self._flag_sets[f] = frozenset(f.split())
        return got


def opened_index(path: Path, early: EarlyAnswer | None = None) -> FolderIndex:
    """Open a folder's index and bring it in step with the directory: what opening a
    :class:`Folder` costs beyond a few queries, run in a worker thread by IMAP SELECT for a
    folder that is not open, so the build of a missing index or the bulk fill of an empty
    one (100,000 files: half a second of CPU, most of it in SQLite, which lets go of the GIL)
    does not hold the event loop; the index is then handed to :meth:`FolderRegistry.get`.
    ``early``: who answers from the listing of a missing index before it is built (see
    :mod:`~mailsuite.store.index_build`)."""
    index = FolderIndex(path, early)
    try:
        index.sync()
    except BaseException:
        index.close()
        raise
    return index


class FolderRegistry:
    """Open folders of this process, by path, with reference counting (one per process)."""

    def __init__(
        self,
        hub: ChangeHub | None = None,
        call_soon: Callable[[Callable[[], None]], object] | None = None,
        log: Log | None = None,
        watcher: FolderWatcher | None = None,
        call_later: Callable[[float, Callable[[], None]], object] | None = None,
    ) -> None:
        self.hub = hub
        #: a timer (the reactor's ``callLater``): a refresh that found the folder lock taken
        #: is tried again after :data:`BUSY_RETRY`; None: at the next refresh only
        self.call_later = call_later
        #: where failed refreshes and polls are logged: the hub's log unless given (the
        #: store imports no Twisted; the runtime's hub carries a Twisted logger)
        self.log: Log = log if log is not None else (hub or ChangeHub()).log
        #: how other processes' changes are noticed (inotify, see mailsuite.shared.folder_watch);
        #: None: the caller of :meth:`watch` polls
        self.watcher = watcher
        self.call_soon = call_soon or (lambda f: f())
        self.open: dict[Path, Folder] = {}
        self.idle: OrderedDict[Path, Folder] = OrderedDict()  # closed but kept warm
        self.keep_idle = 4
        #: folders polled for other processes' changes: folder -> [stop, number of watchers]
        self._watched: dict[Folder, list[Any]] = {}

    def has(self, path: Path) -> bool:
        """Is the folder at ``path`` open or warm here (no index to open or build)?"""
        return path in self.open or path in self.idle

    def get(self, path: Path, index: FolderIndex | None = None) -> Folder:
        """The folder at ``path``, opened when it is not open or warm; ``index`` is its index
        already opened and synced (:func:`opened_index`, in a worker thread), closed here when
        the folder was opened meanwhile."""
        folder = self._open_or_warm(path)
        if folder is None:
            folder = Folder(self, path, index)
            self.open[path] = folder
        elif index is not None:
            index.close()
        return folder

    def _open_or_warm(self, path: Path) -> Folder | None:
        folder = self.peek(path)
        if folder is not None and self.open.get(path) is not folder:  # warm, from idle
            del self.idle[path]
            self.open[path] = folder
            if not (folder.path / "cur").is_dir() or any(v.invalid for v in folder.views):
                folder = None
                self.open.pop(path, None)
        return folder

    def find(self, path: Path) -> Folder | None:
        """The open or warm folder at ``path`` as it is (no refresh), if any."""
        return self.open.get(path) or self.idle.get(path)

    def peek(self, path: Path) -> Folder | None:
        """The open or warm folder at ``path``, brought up to date; None when there is none,
        or when its index was rebuilt or its file replaced meanwhile (it is dropped: a new one
        must be made)."""
        folder = self.open.get(path) or self.idle.get(path)
        if folder is None:
            return None
        if folder.index.replaced():
            # removed or replaced under us (``mailsuite reindex`` replacing a damaged index,
            # an administrator removing it): our connection still reads the old file, whose
            # UIDs the processes opening the new one do not share
            folder.stale = True
            folder.invalidate("Mailbox index was replaced (UIDVALIDITY changed)")
        else:
            folder.refresh()
        if folder.stale:
            self._drop(folder)
            return None
        return folder

    def _drop(self, folder: Folder) -> None:
        if self.open.get(folder.path) is folder:
            del self.open[folder.path]
        if self.idle.get(folder.path) is folder:
            del self.idle[folder.path]
        if not folder.views:
            folder._close()

    def _closed(self, folder: Folder) -> None:
        """The last view went away: keep the folder warm for a while (a client that logs in
        again, or a benchmark's next trial, then SELECTs without reloading the index)."""
        if folder.stale:
            self._drop(folder)
            return
        if self.open.get(folder.path) is folder:
            del self.open[folder.path]
        old = self.idle.pop(folder.path, None)
        if old is not None and old is not folder:
            old._close()
        self.idle[folder.path] = folder
        while len(self.idle) > self.keep_idle:
            _, oldest = self.idle.popitem(last=False)
            oldest._close()

    def watch(
        self,
        folder: Folder,
        start_poll: Callable[[Callable[[], None]], Callable[[], None]],
    ) -> Callable[[], None]:
        """Keep ``folder`` watched for other processes' changes while anyone waits on it (IMAP
        IDLE): one watch per folder however many sessions wait on it, so a thousand idle
        clients do not mean a thousand directory checks.  With a :attr:`watcher` (inotify)
        the kernel says when; without one ``start_poll(tick)`` starts calling ``tick``
        periodically and returns the function that stops it.  Returns the caller's
        (idempotent) unwatch function."""
        entry = self._watched.get(folder)
        if entry is None:

            def tick() -> None:
                try:
                    # views hear of changes through their on_change
                    folder.refresh(verify=True)
                except Exception as e:  # a bad poll must not stop the others
                    log_failure(self.log, e, "polling {path} failed", path=str(folder.path))

            if self.watcher is not None:
                stop = self.watcher.watch(folder.path, tick)
            else:
                stop = start_poll(tick)
            entry = self._watched[folder] = [stop, 0]
        entry[1] += 1
        done = False

        def unwatch() -> None:
            nonlocal done
            if done:
                return
            done = True
            entry[1] -= 1
            if entry[1] == 0 and self._watched.get(folder) is entry:
                del self._watched[folder]
                entry[0]()

        return unwatch

    def invalidate_under(self, paths: Iterable[Path], reason: str) -> None:
        for p in paths:
            f = self.open.pop(p, None) or self.idle.pop(p, None)
            if f is not None:
                f.invalidate(reason)
                f._close()
