"""Connection counts shared by the worker processes: a hash table in one mmapped file.

Why not SQLite (the first version, issue 15): one ``BEGIN IMMEDIATE`` transaction per new
connection cost 100-240 us of CPU, and under contention SQLite's busy handler *sleeps* (1, 2,
5, 10 ms ...) in the reactor thread: p99 9-17 ms, worst 45-140 ms with three processes.  Here
a check-and-increment is a few memory reads and writes under ``fcntl.flock``: a blocked
``flock`` is woken by the kernel the moment the holder lets go (no polling), and the lock is
held for the few microseconds of the operation.

The file (made fresh by the supervisor at every start, :func:`create`; in the private tmpfs
folder of :func:`mailsuite.workers.live_state_dir`, removed at stop) holds:

* a header: magic, the number of worker columns and of slots, how many slots have ever held
  a key since the last compaction (``used``), how many times a slot fell to zero since then
  (``freed``), and a random 16-byte secret made at creation;
* ``slots`` 8-byte tags: the first 8 bytes of the keyed BLAKE2b hash of a key (keyed with the
  secret, so a client choosing addresses cannot aim them at one probe chain); 0 is "never
  used".  Two keys with one tag would count together: at 2^-64 per pair, not a concern;
* one column of ``slots`` 32-bit counts per worker slot index (the supervisor's ``--index``,
  kept by a restarted worker), column after column.  A key's count is the sum over the
  columns; a worker only ever adds to or takes from its own column, so the supervisor can
  zero a dead worker's column exactly (:func:`forget_worker`) and a restarted worker zeroes
  its own when it opens the file.

Open addressing with linear probing.  A slot whose counts fell to zero keeps its tag (a
*tombstone*): emptying it would cut the probe chain of any key stored past it.  A new key
takes the first tombstone on its chain (after making sure the key is not further along),
else the empty slot that ended the chain.  Once ``used`` reaches 3/4 of the slots and at
least 1/8 have been freed since the last compaction, the table is rebuilt in place under the
lock with only the keys that count something (a few milliseconds for the default size; at
most once per slots/8 releases that reach zero).  When even that leaves no room -- 5/8 of
the slots hold live keys -- a new key is refused: :meth:`SharedConnectionTable.acquire`
answers as if that key were at its limit (the connection is refused, never admitted past a
limit) and the server keeps running.

Size: :data:`SLOTS` = 65,536 slots, (8 + 4 x workers) bytes each: 1.5 MiB with 4 workers,
17 MiB with the maximum of 64; tmpfs gives pages only as they are written.  Room for 40,960
keys counting at once: each connection holds at most two (the service total, and its
address or user+address), and only for the limits that are set.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import secrets
import struct
from collections.abc import Sequence
from pathlib import Path

__all__ = ["SLOTS", "SharedConnectionTable", "create", "forget_worker", "table_path"]

MAGIC = b"MSCONN01"
#: magic, columns, slots, used, freed, secret
_HEADER = struct.Struct("=8sIIII16s")
HEADER_SIZE = 64
#: Slots in a table made by the server (a power of two).
SLOTS = 1 << 16
#: Tags kept per process (emptied when full): bounded, and a hit for every release.
TAG_CACHE = 4096


def table_path(directory: Path) -> Path:
    """The file in the supervisor's private run folder (not ``*.db``: prometheus-client reads
    those in the same folder)."""
    return directory / "connections.table"


def _size(columns: int, slots: int) -> int:
    return HEADER_SIZE + 8 * slots + 4 * slots * columns


def create(path: Path, columns: int, slots: int = SLOTS, secret: bytes | None = None) -> None:
    """A fresh, empty table for ``columns`` workers at ``path`` (the supervisor, before it
    starts them).  Written aside and renamed over: a worker never sees a half-made header.
    ``secret``: the hash key, random unless given (tests that need the same layout)."""
    if slots < 8 or slots & (slots - 1) or not 1 <= columns <= 1024:
        raise ValueError(f"bad table shape: {columns} columns, {slots} slots")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, _size(columns, slots))  # sparse: zero pages until written
        os.pwrite(
            fd, _HEADER.pack(MAGIC, columns, slots, 0, 0, secret or secrets.token_bytes(16)), 0
        )
    finally:
        os.close(fd)
    tmp.replace(path)


def forget_worker(path: Path, column: int) -> None:
    """The worker of slot ``column`` died: the connections it counted ended with it."""
    table = SharedConnectionTable(path, column, claim=False)
    try:
        with table.locked():
            table._zero_column(column)
    finally:
        table.close()


class TableFull(Exception):
    """No room for one more key (see the module docstring)."""


class SharedConnectionTable:
    """:class:`mailsuite.connection_limits.ConnectionCounts` for worker ``column``.
    ``claim``: zero that column first (a worker starting in the slot of one that died)."""

    def __init__(self, path: Path, column: int, claim: bool = True) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR)
        try:
            head = os.pread(self.fd, _HEADER.size, 0)
            if len(head) < _HEADER.size:
                raise ValueError(f"{path}: not a connection table")
            magic, columns, slots, _, _, secret = _HEADER.unpack(head)
            if magic != MAGIC or os.fstat(self.fd).st_size != _size(columns, slots):
                raise ValueError(f"{path}: not a connection table")
            if not 0 <= column < columns:
                raise ValueError(f"{path}: worker {column} of a table for {columns}")
            self.map = mmap.mmap(self.fd, _size(columns, slots))
        except BaseException:
            os.close(self.fd)
            raise
        self.columns = int(columns)
        self.slots = int(slots)
        self.mask = self.slots - 1
        self.column = column
        self.secret = bytes(secret)
        view = memoryview(self.map)
        self._view = view
        self.header = view[:HEADER_SIZE]
        self.tags = view[HEADER_SIZE : HEADER_SIZE + 8 * slots].cast("Q")
        self.counts = view[HEADER_SIZE + 8 * slots :].cast("i")
        self.own = column * slots  # where this worker's column starts in ``counts``
        #: key -> tag, for the keys in use here (a release hashes what its acquire did)
        self._tags: dict[str, int] = {}
        if claim:
            with self.locked():
                self._zero_column(column)

    def close(self) -> None:
        for view in (self.tags, self.counts, self.header, self._view):
            view.release()
        self.map.close()
        os.close(self.fd)

    # -- the lock ----------------------------------------------------------------------------

    def locked(self) -> _Locked:
        return _Locked(self.fd)

    # -- the header's two running numbers -------------------------------------------------------

    def _used(self) -> int:
        return int(struct.unpack_from("=I", self.header, 16)[0])

    def _set_used(self, n: int) -> None:
        struct.pack_into("=I", self.header, 16, n)

    def _freed(self) -> int:
        return int(struct.unpack_from("=I", self.header, 20)[0])

    def _set_freed(self, n: int) -> None:
        struct.pack_into("=I", self.header, 20, min(n, 0xFFFFFFFF))

    # -- the table (every method below: with the lock held) --------------------------------

    def _tag(self, key: str) -> int:
        tag = self._tags.get(key)
        if tag is None:
            h = hashlib.blake2b(
                key.encode("utf-8", "surrogateescape"), key=self.secret, digest_size=8
            ).digest()
            tag = int.from_bytes(h, "little") or 1  # 0 marks a slot never used
            if len(self._tags) >= TAG_CACHE:
                self._tags.clear()
            self._tags[key] = tag
        return tag

    def _sum(self, slot: int) -> int:
        return int(sum(self.counts[slot :: self.slots]))  # one count per column

    def _find(self, tag: int) -> int:
        """The slot holding ``tag``, or -1."""
        tags, mask = self.tags, self.mask
        i = tag & mask
        for _ in range(self.slots):
            t = tags[i]
            if t == tag:
                return i
            if t == 0:
                return -1
            i = (i + 1) & mask
        return -1

    def _place(self, tag: int, taken: list[int]) -> int:
        """The slot of ``tag``, given one if it has none (raises TableFull).  ``taken``: the
        slots placed for the other keys of this acquire -- at zero still, but no tombstones."""
        tags, mask = self.tags, self.mask
        i = tag & mask
        reuse = -1
        for _ in range(self.slots):
            t = tags[i]
            if t == tag:
                return i
            if t == 0:
                break
            if reuse < 0 and self._sum(i) == 0 and i not in taken:
                reuse = i  # a tombstone: ours if the key is not further along
            i = (i + 1) & mask
        else:
            i = -1  # no empty slot at all (cannot happen below 3/4 use; safe anyway)
        if reuse >= 0:
            tags[reuse] = tag
            return reuse
        used = self._used()
        if i < 0 or used + 1 > self.slots * 3 // 4:
            raise TableFull
        tags[i] = tag
        self._set_used(used + 1)
        return i

    def _compact(self) -> bool:
        """Rebuild the table with only the keys that count something (True), or leave it
        as it is when too few slots were freed since the last rebuild to be worth it."""
        if self._freed() < self.slots // 8:
            return False
        tags, counts, step = self.tags, self.counts, self.slots
        live: list[tuple[int, list[int]]] = []
        for i in range(self.slots):
            if tags[i]:
                column_counts = [counts[i + c * step] for c in range(self.columns)]
                if any(column_counts):
                    live.append((tags[i], column_counts))
        start = HEADER_SIZE
        self.map[start : start + 8 * step] = bytes(8 * step)
        self.map[start + 8 * step :] = bytes(4 * step * self.columns)
        mask = self.mask
        for tag, column_counts in live:
            i = tag & mask
            while tags[i]:
                i = (i + 1) & mask
            tags[i] = tag
            for c, n in enumerate(column_counts):
                counts[i + c * step] = n
        self._set_used(len(live))
        self._set_freed(0)
        return True

    def _zero_column(self, column: int) -> None:
        start = HEADER_SIZE + 8 * self.slots + 4 * self.slots * column
        self.map[start : start + 4 * self.slots] = bytes(4 * self.slots)
        self._set_freed(self.slots)  # its keys may all be tombstones now: compact when needed

    def _drop(self, tag: int) -> None:
        slot = self._find(tag)
        if slot < 0:
            return
        own = self.own + slot
        n = self.counts[own]
        if n > 0:  # never below zero (a release of what this worker does not hold: nothing)
            self.counts[own] = n - 1
            if n == 1 and self._sum(slot) == 0:
                self._set_freed(self._freed() + 1)

    # -- ConnectionCounts ----------------------------------------------------------------------

    def acquire(self, add: Sequence[tuple[str, int]], drop: Sequence[str] = ()) -> int | None:
        """If every ``add`` key's count is below its limit (0: none), drop one from each
        ``drop`` key and add one to each ``add`` key, and return None; otherwise change
        nothing and return the index in ``add`` of the first key at its limit -- or of the
        first key the table has no room for (counted as at its limit: refused, never
        admitted over a limit)."""
        tags = [self._tag(key) for key, _ in add]
        dropped = [self._tag(key) for key in drop]
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            slots = self._place_all(tags)
            counts, step = self.counts, self.slots
            for i, slot in enumerate(slots):
                limit = add[i][1]
                if limit and sum(counts[slot::step]) >= limit:
                    break
            else:
                i = len(slots)
            if i < len(tags):  # at its limit, or (past the keys placed) no room for it
                unused = sum(1 for s in slots if self._sum(s) == 0)
                self._set_freed(self._freed() + unused)  # placed now, left at zero
                return i
            for tag in dropped:
                self._drop(tag)
            own = self.own
            for slot in slots:
                counts[own + slot] += 1
            return None
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _place_all(self, tags: list[int]) -> list[int]:
        """The slots of ``tags``, in order, as far as there is room (with the lock held):
        shorter than ``tags`` when the table is full."""
        slots: list[int] = []
        try:
            for tag in tags:
                slots.append(self._place(tag, slots))
        except TableFull:
            if not self._compact():
                return slots
            slots = []  # moved: place every key again (no second compaction: freed is 0)
            try:
                for tag in tags:
                    slots.append(self._place(tag, slots))
            except TableFull:
                return slots
        return slots

    def release(self, keys: Sequence[str]) -> None:
        """One less under each key, in this worker's column."""
        tags = [self._tag(key) for key in keys]
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            for tag in tags:
                self._drop(tag)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def count(self, key: str) -> int:
        """Every worker's count under ``key`` (tests, inspection)."""
        tag = self._tag(key)
        with self.locked():
            slot = self._find(tag)
            return self._sum(slot) if slot >= 0 else 0


class _Locked:
    """``flock(LOCK_EX)`` for a ``with`` block: the kernel wakes a waiter at once."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *_: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
