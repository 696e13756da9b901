"""The IMAP commands that work on the messages of the selected mailbox: FETCH, STORE,
SEARCH (with ESEARCH, RFC 4731), COPY, MOVE and EXPUNGE.

They are a mixin of ``session.Session``, kept apart from the session's state machine because
they share their own helpers (message-set resolution, the read-write check, the message view
SEARCH predicates read) and nothing else uses them.  FETCH awaits room in the output buffer
between batches, SEARCH a turn of the event loop between chunks, COPY and MOVE the copies
made in a worker thread (``mailsuite.imap.interface``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from mailsuite.imap import header_cache
from mailsuite.imap.fetch_response import FetchPlan, fetch_pieces, flags_bytes
from mailsuite.imap.parser import (
    Atom,
    Command,
    atom,
    flag_list,
    number,
    parse_fetch,
    sequence_set,
)
from mailsuite.imap.search import Needs, header_of, parse_search
from mailsuite.imap.sequence import compress
from mailsuite.imap.session_base import SessionBase, _bad, _no, vanished_earlier
from mailsuite.store.folder_copy import CopyItem, copy_blocking
from mailsuite.store.mailbox import Folder, FolderView
from mailsuite.store.space import DiskFull

BATCH = 1000  # messages per index query (their answers go out as the client reads them)
_ESEARCH_OPTIONS = ("MIN", "MAX", "ALL", "COUNT")


class MessageCommands(SessionBase):
    """FETCH, STORE, SEARCH, COPY, MOVE and EXPUNGE on the selected mailbox."""

    async def do_EXPUNGE(self, cmd: Command) -> None:
        v = self._rw()
        fl = v.folder.flags
        if cmd.uid:
            if len(cmd.args) != 1:
                raise _bad("UID EXPUNGE expects a UID set")
            wanted = set(sequence_set(cmd.args[0]).select_sorted(v.uids))
        else:
            if cmd.args:
                raise _bad("EXPUNGE takes no arguments")
            wanted = None
        doomed = [
            u for u in v.uids if "\\Deleted" in fl.get(u, "") and (wanted is None or u in wanted)
        ]
        if doomed:
            await self.expunge_off_loop(v.folder, doomed)
        self.ok(cmd, "EXPUNGE completed")

    def _rw(self) -> FolderView:
        v = self.view
        assert v is not None
        if v.readonly:
            raise _no("Mailbox is read-only", "READ-ONLY")
        return v

    # -- message sets ---------------------------------------------------------------------------

    def _targets(self, cmd: Command, tok: object) -> list[tuple[int, int]]:
        """(seq, uid) pairs of a sequence set or UID set, in ascending order."""
        v = self.view
        assert v is not None
        seqset = sequence_set(tok)
        uids = v.uids
        if cmd.uid:
            idx = seqset.select_indices(uids)
            return [(i + 1, uids[i]) for i in idx]
        n = len(uids)
        if seqset.exceeds(n):
            raise _bad("Invalid message sequence number")
        out = []
        for a, b in seqset.resolve(n):
            for s in range(a, b + 1):
                out.append((s, uids[s - 1]))
        return out

    # -- FETCH ----------------------------------------------------------------------------------

    async def do_FETCH(self, cmd: Command) -> None:
        if len(cmd.args) < 2:
            raise _bad("FETCH expects a message set and items")
        v = self.view
        assert v is not None
        targets = self._targets(cmd, cmd.args[0])
        req = parse_fetch(list(cmd.args[1:]))
        if req.needs_modseq:
            self.enable_condstore()
        if req.vanished and (not cmd.uid or not self.qresync):
            raise _bad("VANISHED needs UID FETCH with QRESYNC enabled")
        plan = FetchPlan(req, cmd.uid, self.condstore)
        folder = v.folder
        if req.vanished and req.changedsince is not None:
            self.send(vanished_earlier(folder, req.changedsince, sequence_set(cmd.args[0])))
        if req.changedsince is not None:
            cs = req.changedsince
            ms = folder.modseqs
            targets = [(s, u) for s, u in targets if ms.get(u, 0) > cs]
        seen_now: set[int] = set()
        for start in range(0, len(targets), BATCH):
            batch = targets[start : start + BATCH]
            if plan.sets_seen and not v.readonly:
                fl = folder.flags
                changes = [
                    (u, frozenset(fl[u].split()) | {"\\Seen"})
                    for _, u in batch
                    if u in fl and "\\Seen" not in fl[u]
                ]
                if changes:
                    try:
                        folder.store(v, changes)
                        seen_now.update(u for u, _ in changes)
                    except DiskFull:  # mail can be read on a full disk, just not marked
                        self.log.warn(
                            "FETCH for {user}: \\Seen not set (disk full)", user=self.user
                        )
            details = None
            if plan.need_details:
                details = folder.index.details(
                    [u for _, u in batch], plan.need_size, plan.need_date
                )
            cache: list[tuple[int, str, bytes]] = []
            pieces = fetch_pieces(
                plan,
                folder.path,
                batch,
                folder.flags,
                folder.modseqs,
                v.is_recent,
                details,
                cache,
                seen_now,
            )
            try:
                await self.send_paced(pieces)
            except Exception:  # a reply may be cut mid-literal: hang up
                self.log.failure("FETCH failed while sending for {user}", user=self.user)
                self.proto.close()
                return
            finally:
                pieces.close()
            if cache:
                try:
                    folder.index.store_cached(cache)
                except Exception:  # a busy database only costs a recompute
                    self.log.failure("caching FETCH data failed")
            if self.proto.gone():
                return
            if start + BATCH < len(targets):
                await self.proto.writable()  # the client reads, other connections run
        # a \Seen we set is not news to this session
        v.pending_flags -= seen_now
        self.ok(cmd, "FETCH completed" if not cmd.uid else "UID FETCH completed")

    # -- STORE ----------------------------------------------------------------------------------

    async def do_STORE(self, cmd: Command) -> None:
        args = list(cmd.args)
        if len(args) < 3:
            raise _bad("STORE expects a message set, an action and flags")
        v = self._rw()
        targets = self._targets(cmd, args.pop(0))
        unchangedsince: int | None = None
        mods = args[0]
        if isinstance(mods, list):
            args.pop(0)
            if len(mods) != 2 or atom(mods[0]).upper() != "UNCHANGEDSINCE":
                raise _bad("Unknown STORE modifier")
            unchangedsince = number(mods[1])
            self.enable_condstore()
        if len(args) < 2:
            raise _bad("STORE expects an action and flags")
        action = atom(args[0]).upper()
        silent = action.endswith(".SILENT")
        if silent:
            action = action[: -len(".SILENT")]
        if action not in ("FLAGS", "+FLAGS", "-FLAGS"):
            raise _bad(f"Unknown STORE action {action}")
        flags = set(flag_list(args[1] if len(args) == 2 else list(args[1:])))
        folder = v.folder
        fl = folder.flags
        changes = []
        for _, u in targets:
            if u not in fl:
                continue
            old = folder.flag_set(u)
            if action == "FLAGS":
                new = frozenset(flags)
            elif action == "+FLAGS":
                new = old | flags
            else:
                new = old - flags
            changes.append((u, new))
        # +FLAGS / -FLAGS are applied to the flags as the index holds them under the lock
        # (another session or process may have changed them since we looked)
        delta = None if action == "FLAGS" else (action == "+FLAGS", frozenset(flags))
        done = folder.try_store(v, changes, unchangedsince, delta)
        if done is None:  # the folder lock is busy: wait for it in a worker thread
            done = await self.shared.run_blocking(
                folder.writer.store, changes, unchangedsince, delta
            )
            folder.stored(v, done)
        done_uids = {u for u, _, _ in done}
        modified = (
            [u for u, _ in changes if u not in done_uids] if unchangedsince is not None else []
        )

        def fetch_lines() -> Iterator[bytes]:
            """The untagged FETCH of each changed message, made as the client reads them
            (STORE 1:* in a big mailbox answers a line per message)."""
            # a keyword new to the mailbox is announced before the FETCH that shows it
            # (RFC 3501 7.2.6, 7.1 PERMANENTFLAGS)
            yield self.keyword_news()
            if silent and not (self.condstore and unchangedsince):
                return
            for seq, u in targets:
                if u not in done_uids or u not in fl:
                    continue
                # RFC 7162 3.1: once CONDSTORE is on, STORE's FETCH responses carry UID too
                items = [b"UID %d" % u] if cmd.uid or self.condstore else []
                if not silent:
                    items.append(flags_bytes(fl[u], v.is_recent(u)))
                if self.condstore:
                    items.append(b"MODSEQ (%d)" % folder.modseqs.get(u, 1))
                yield b"* %d FETCH (%s)\r\n" % (seq, b" ".join(items))

        await self.send_paced(fetch_lines())
        if self.proto.gone():
            return
        if modified:
            mset = compress(modified) if cmd.uid else compress(v.seq_of(u) for u in modified)
            self.ok(cmd, "Conditional STORE failed for some messages", f"MODIFIED {mset}")
        else:
            self.ok(cmd, "STORE completed")

    # -- SEARCH ---------------------------------------------------------------------------------

    async def do_SEARCH(self, cmd: Command) -> None:
        v = self.view
        assert v is not None
        args = list(cmd.args)
        returns: set[str] | None = None  # RFC 4731 result options; None: plain SEARCH
        if args and isinstance(args[0], Atom) and args[0].upper() == "RETURN":
            if len(args) < 2 or not isinstance(args[1], list):
                raise _bad("RETURN expects a list of result options")
            returns = set()
            for tok in args[1]:
                opt = atom(tok).upper()
                if opt not in _ESEARCH_OPTIONS:
                    raise _bad(f"Unknown SEARCH result option {opt}")
                returns.add(opt)
            if not returns:  # RFC 4731 3.1: RETURN () means RETURN (ALL)
                returns = {"ALL"}
            args = args[2:]
        prog = parse_search(args)
        if prog.uses_modseq:
            self.enable_condstore()
        folder = v.folder
        uids = v.uids
        fl = folder.flags
        key = prog.key
        result: list[tuple[int, int]] = []
        fast = None
        if key.op == "ALL":
            fast = lambda f: True  # noqa: E731
        elif key.op == "FLAG" and key.args[0].startswith("\\"):
            flag, present = key.args
            fast = (lambda f: flag in f) if present else (lambda f: flag not in f)
        if fast is not None:
            for i, u in enumerate(uids):
                f = fl.get(u)
                if f is not None and fast(f):
                    result.append((i + 1, u))
        elif prog.flags_only:
            # UNSEEN, SEEN NOT FLAGGED ...: one evaluation per distinct flag string (the
            # folder shares one string object per value), not one per message
            pred = prog.bind(len(uids), uids[-1] if uids else 0)
            memo: dict[str, bool] = {}
            for i, u in enumerate(uids):
                f = fl.get(u)
                if f is None:
                    continue
                hit = memo.get(f)
                if hit is None:
                    hit = memo[f] = pred(_SearchMsg(i + 1, u, folder, v, None))
                if hit:
                    result.append((i + 1, u))
        else:
            pred = prog.bind(len(uids), uids[-1] if uids else 0, header_cache.for_folder(folder))
            needs = prog.needs
            step = 500 if needs != Needs.NONE else 5000
            need_details = needs != Needs.NONE or _uses_details(key)
            for start in range(0, len(uids), step):
                chunk = uids[start : start + step]
                details = folder.index.details(chunk, True, True) if need_details else {}
                for j, u in enumerate(chunk):
                    if u not in fl:
                        continue
                    m = _SearchMsg(start + j + 1, u, folder, v, details.get(u))
                    if pred(m):
                        result.append((start + j + 1, u))
                if start + step < len(uids):
                    await self.shared.next_turn()  # other connections run between chunks
        nums = [u if cmd.uid else s for s, u in result]
        if returns is not None:
            self.send(_esearch(cmd, returns, nums, prog.uses_modseq, folder.modseqs, result))
        else:
            tail = b"\r\n"
            if prog.uses_modseq and result:
                tail = b" (MODSEQ %d)\r\n" % max(folder.modseqs.get(u, 1) for _, u in result)
            await self.send_paced(_search_pieces(nums, tail))
        self.ok(cmd, "SEARCH completed" if not cmd.uid else "UID SEARCH completed")

    # -- COPY / MOVE ------------------------------------------------------------------------------

    async def do_COPY(self, cmd: Command) -> None:
        await self._copy(cmd, move=False)

    async def do_MOVE(self, cmd: Command) -> None:
        await self._copy(cmd, move=True)

    async def _copy(self, cmd: Command, move: bool) -> None:
        if len(cmd.args) != 2:
            raise _bad(f"{cmd.command} expects a message set and a mailbox")
        v = self.view
        assert v is not None
        if move and v.readonly:
            raise _no("Mailbox is read-only", "READ-ONLY")
        targets = self._targets(cmd, cmd.args[0])
        name = self._mailbox_arg(cmd.args[1])
        acct = self._acct()
        if not acct.exists(name):
            raise _no("No such mailbox", "TRYCREATE")
        dest = acct.path(name)
        folder = v.folder
        uids = [u for _, u in targets if u in folder.flags]
        if not uids:
            self.ok(cmd, f"{cmd.command} completed (nothing to do)")
            return
        details = folder.index.details(uids)
        items: list[CopyItem] = []
        src_uids = []
        for u in uids:
            row = details.get(u)
            if row is None:
                continue
            items.append(
                (
                    row[0],
                    folder.flag_set(u),
                    row[1],
                    row[2] if row[2] >= 0 else None,
                    row[3],
                    row[4],
                )
            )
            src_uids.append(u)
        uidvalidity, new_uids = await self.shared.run_blocking(
            copy_blocking, folder.path, dest, items
        )
        # both lists ascend (targets are sorted, new UIDs are assigned in order), so the
        # compressed sets still pair up one to one (RFC 4315 3)
        assert _ascending(src_uids) and _ascending(new_uids)
        copyuid = f"COPYUID {uidvalidity} {compress(src_uids)} {compress(new_uids)}"
        other = self.shared.registry.peek(dest)
        if other is not None and other is not folder:
            other.refresh()
        elif other is folder:
            folder.refresh()
        self.shared.changes.notify(dest, other._hub_changed if other else None)
        if move:
            self.untagged(f"OK [{copyuid}] Moved")
            await self.expunge_off_loop(folder, src_uids)
            self.ok(cmd, "MOVE completed")
        else:
            self.ok(cmd, "COPY completed", copyuid)


def _esearch(
    cmd: Command,
    returns: set[str],
    nums: Sequence[int],
    uses_modseq: bool,
    modseqs: dict[int, int],
    result: Sequence[tuple[int, int]],
) -> bytes:
    """The ``* ESEARCH`` response of RFC 4731 3.1 (``nums`` ascend, ``result`` holds the
    matching (seq, uid) pairs in the same order).  MIN, MAX and ALL are left out when nothing
    matched; COUNT is always given.  With a MODSEQ search key the mod-sequence follows
    (RFC 7162 3.1.5, RFC 4731 3.2): of the message MIN or MAX returns when they are all that
    was asked for (the higher of the two for MIN MAX), else the highest of all matches."""
    tag = cmd.tag.replace("\\", "\\\\").replace('"', '\\"')
    out = [b'* ESEARCH (TAG "' + tag.encode() + b'")']
    if cmd.uid:
        out.append(b"UID")
    if nums:
        if "MIN" in returns:
            out.append(b"MIN %d" % nums[0])
        if "MAX" in returns:
            out.append(b"MAX %d" % nums[-1])
    if "COUNT" in returns:
        out.append(b"COUNT %d" % len(nums))
    if nums and "ALL" in returns:
        out.append(b"ALL " + compress(nums).encode())
    if uses_modseq and nums:
        reported = list(result)
        if returns <= {"MIN", "MAX"}:
            reported = ([result[0]] if "MIN" in returns else []) + (
                [result[-1]] if "MAX" in returns else []
            )
        out.append(b"MODSEQ %d" % max(modseqs.get(u, 1) for _, u in reported))
    return b" ".join(out) + b"\r\n"


def _search_pieces(nums: Sequence[int], tail: bytes) -> Iterator[bytes]:
    """``* SEARCH n n ...`` in pieces made as they are sent (a million matches are 7 MB)."""
    yield b"* SEARCH"
    for i in range(0, len(nums), 8192):
        yield b"".join(b" %d" % n for n in nums[i : i + 8192])
    yield tail


def _ascending(values: Sequence[int]) -> bool:
    return all(values[i] < values[i + 1] for i in range(len(values) - 1))


def _uses_details(key: Any) -> bool:
    if key.op in ("AND", "OR", "NOT"):
        return any(_uses_details(k) for k in key.args)
    return key.op in ("LARGER", "SMALLER", "BEFORE", "ON", "SINCE")


class _SearchMsg:
    """The view of one message that ``mailsuite.imap.search`` predicates read."""

    __slots__ = ("_folder", "_raw", "_row", "_view", "seq", "uid")

    def __init__(
        self, seq: int, uid: int, folder: Folder, view: FolderView, row: tuple[Any, ...] | None
    ) -> None:
        self.seq = seq
        self.uid = uid
        self._folder = folder
        self._view = view
        self._row = row
        self._raw: bytes | None = None

    @property
    def flags(self) -> frozenset[str]:
        return self._folder.flag_set(self.uid)

    @property
    def recent(self) -> bool:
        return self._view.is_recent(self.uid)

    @property
    def modseq(self) -> int:
        return int(self._folder.modseqs.get(self.uid, 1))

    @property
    def size(self) -> int:
        return int(self._row[1]) if self._row else 0

    @property
    def internaldate(self) -> Any:
        ts = self._row[2] if self._row else 0
        return datetime.fromtimestamp(ts, UTC)

    def raw(self) -> bytes:
        if self._raw is None:
            self._raw = b""
            if self._row:
                with contextlib.suppress(FileNotFoundError):
                    self._raw = (self._folder.path / self._row[0]).read_bytes()
        return self._raw

    def header_bytes(self) -> bytes:
        return header_of(self.raw())
