"""Connection counts shared by the worker processes: a hash table in one mmapped file.

Why not SQLite (the first version, issue 15): one ``BEGIN IMMEDIATE`` transaction per new
connection cost 100-240 us of CPU, and under contention SQLite's busy handler *sleeps* (1, 2,
5, 10 ms ...) in the reactor thread: p99 9-17 ms, worst 45-140 ms with three processes.  Here
a check-and-increment is a few memory reads and writes under ``fcntl.flock``: a blocked
``flock`` is woken by the kernel the moment the holder lets go (no polling), and the lock is
held for the few microseconds of the operation.

The file (made fresh by the supervisor at every start, :func:`create`; in the private tmpfs
folder of :func:`mailsuite.workers.live_state_dir`, removed at stop) holds:

* a header: magic, the number of worker columns and of slots, how many slots hold a key
  (``used``), and a random 16-byte secret made at creation;
* ``slots`` 8-byte tags: the first 8 bytes of the keyed BLAKE2b hash of a key (keyed with the
  secret, so a client choosing addresses cannot aim them at one probe chain); 0 is "empty".
  Two keys with one tag would count together: at 2^-64 per pair, not a concern;
* one column of ``slots`` 32-bit counts per worker slot index (the supervisor's ``--index``,
  kept by a restarted worker), column after column.  A key's count is the sum over the
  columns; a worker only ever adds to or takes from its own column, so the supervisor can
  zero a dead worker's column exactly (:func:`forget_worker`) and a restarted worker zeroes
  its own when it opens the file.

Open addressing with linear probing.  Deletion is the delicate part: a slot emptied in the
middle of a probe chain would hide every key stored past it.  Tombstones (a key kept at zero,
reused later) avoid that but fill the table until a rebuild, and a rebuild of 65,536 slots in
Python held the lock for 280 ms (measured; every worker waits on it).  So a key whose count
falls to zero is deleted at once by *backward shift* (Knuth, TAOCP vol. 3, 6.4, Algorithm R):
the entries after it in its cluster that may move back to the hole do, so no chain is ever
cut and no tombstone is left -- a few slots touched, under the lock, at the release that
emptied the key.  When a dead worker's column is zeroed, the keys it held that fall to zero
are deleted the same way, one by one (in the supervisor, once per worker death).

The table never holds more than 3/4 of its slots (probe chains stay short).  A new key that
would pass that is refused: :meth:`SharedConnectionTable.acquire` answers as if that key were
at its limit (the connection is refused, never admitted past a limit) and the server keeps
running; keys already in the table go on counting.

Size: :data:`SLOTS` = 65,536 slots, (8 + 4 x workers) bytes each: 1.5 MiB with 4 workers,
17 MiB with the maximum of 64; tmpfs gives pages only as they are written.  Room for 49,152
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
#: magic, columns, slots, used, (reserved), secret
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

    def _place(self, tag: int) -> int:
        """The slot of ``tag``, given one if it has none (raises TableFull)."""
        tags, mask = self.tags, self.mask
        i = tag & mask
        while True:  # ends: the table is never more than 3/4 full
            t = tags[i]
            if t == tag:
                return i
            if t == 0:
                break
            i = (i + 1) & mask
        used = self._used()
        if used + 1 > self.slots * 3 // 4:
            raise TableFull
        tags[i] = tag
        self._set_used(used + 1)
        return i

    def _delete(self, hole: int) -> None:
        """Empty slot ``hole`` (every count of it zero) without cutting a probe chain: each
        later entry of the cluster whose home is not in (hole, its slot] moves back into
        the hole, which moves on to where it was (Algorithm R, linear probing)."""
        tags, counts, step, mask = self.tags, self.counts, self.slots, self.mask
        columns = range(0, step * self.columns, step)
        j = hole
        while True:
            j = (j + 1) & mask
            t = tags[j]
            if t == 0:
                break
            home = t & mask
            if (home <= hole or home > j) if hole < j else (home <= hole and home > j):
                tags[hole] = t
                for c in columns:
                    counts[c + hole] = counts[c + j]
                hole = j
        tags[hole] = 0
        for c in columns:
            counts[c + hole] = 0
        self._set_used(self._used() - 1)

    def _zero_column(self, column: int) -> None:
        """Zero the counts of worker ``column``, deleting the keys that fall to zero."""
        n = self.slots
        start = HEADER_SIZE + 8 * n + 4 * n * column
        if self.map[start : start + 4 * n].count(0) == 4 * n:
            return  # the usual case: the supervisor zeroed it when the worker died
        counted = self.counts[column * n : (column + 1) * n]
        held = [i for i, v in enumerate(counted.tolist()) if v]
        tags = [self.tags[i] for i in held]
        self.map[start : start + 4 * n] = bytes(4 * n)
        for tag in tags:
            slot = self._find(tag)  # (a deletion may have moved it)
            if slot >= 0 and self._sum(slot) == 0:
                self._delete(slot)

    def _drop(self, tag: int) -> None:
        slot = self._find(tag)
        if slot < 0:
            return
        own = self.own + slot
        n = self.counts[own]
        if n > 0:  # never below zero (a release of what this worker does not hold: nothing)
            self.counts[own] = n - 1
            if n == 1 and self._sum(slot) == 0:
                self._delete(slot)

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
            slots: list[int] = []
            refused: int | None = None
            counts, step = self.counts, self.slots
            for i, ((_, limit), tag) in enumerate(zip(add, tags, strict=True)):
                try:
                    slot = self._place(tag)
                except TableFull:
                    refused = i
                    break
                slots.append(slot)
                if limit and sum(counts[slot::step]) >= limit:
                    refused = i
                    break
            if refused is not None:
                for tag in tags[: len(slots)]:  # keys placed just now, still at zero
                    slot = self._find(tag)  # (a deletion may have moved it)
                    if slot >= 0 and self._sum(slot) == 0:
                        self._delete(slot)
                return refused
            own = self.own
            for slot in slots:  # before the drops: a deletion moves entries
                counts[own + slot] += 1
            for tag in dropped:
                self._drop(tag)
            return None
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

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
