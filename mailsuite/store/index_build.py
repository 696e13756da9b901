"""The first index of a folder: built whole into a fresh file, then renamed into place.

A folder without ``mailsuite-index.sqlite`` (written by another program, or its index removed
by ``mailsuite reindex``) gets its index in one step before anything connects to it, under the
folder lock:

* the two directories are listed with ``os.listdir`` and put in delivery order (UIDs follow
  arrival, :func:`~mailsuite.store.index_scan.delivery_order`) with column work done on whole
  lists (for the names most programs write, a plain sort of the names is that order: see
  :func:`delivery_sorted`);
* the rows go into a new file, ``mailsuite-index.sqlite.build-<pid>``, with one
  ``executemany`` into a table whose secondary indexes are made afterwards (one sort each,
  not 100,000 B-tree insertions), no journal, no ``fsync`` and a large page cache: nobody can
  see this file, so none of that protects anything;
* the file is switched to WAL, fsynced and renamed to ``mailsuite-index.sqlite``, and the
  folder directory fsynced.  Only then does anyone connect, so UIDs are durable before any
  is reported; a build killed half way leaves only a ``.build-`` file, which the next build
  removes (the index is still missing, so it is built again, under a new UIDVALIDITY).

The result equals what an empty index and one :meth:`~mailsuite.store.index_scan.IndexScan.sync`
give (same UIDs, flags, sizes, modseqs, meta counters); tests compare the two.  Processes
never connect to a missing index without taking the lock and building it first
(:meth:`~mailsuite.store.index_schema.IndexDatabase._open`), so no process can hold an
earlier file that the rename replaces.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import contains, itemgetter
from pathlib import Path

from mailsuite.store.index_schema import (
    _CACHE_VERSION,
    _INDEXES,
    _SCHEMA_VERSION,
    _TABLES,
    INDEX_NAME,
    SyncResult,
)
from mailsuite.store.maildir import fsync_dir
from mailsuite.store.uidvalidity import next_uidvalidity

BUILD_SUFFIX = ".build-"
#: a built index's uniqueness of ``messages.base`` (an index made by the general schema's
#: ``UNIQUE`` column otherwise: the same constraint, queries use either alike)
_BASE_INDEX = "CREATE UNIQUE INDEX messages_base ON messages(base)"
#: page cache while building: the whole table and its indexes of a 100,000-message folder
_BUILD_CACHE_KIB = 65536
#: the head of the names most programs write, ``sec.M<usec>P``: see :func:`delivery_sorted`
_PLAIN_HEAD = re.compile(r"[0-9]+\.M[0-9]+P")


@dataclass(frozen=True)
class Built:
    """What a build gave: the sync it stands for, and the folder's state (UIDs, flag texts,
    their one modseq) with the meta values it is valid for (uidnext, highestmodseq)."""

    result: SyncResult
    uids: list[int]
    flags: list[str]
    modseq: int
    uidnext: int


def delivery_sorted(
    new: list[str], cur: list[str], key: Callable[[str], tuple[int, int, int, str]]
) -> list[str]:
    """Every listed file as "sub/name", in delivery order of its base (``key``); a base both
    in ``new/`` and ``cur/`` counts once, as its ``cur/`` copy (where a reader moves it).

    For names of the form ``sec.M<usec>P...`` whose seconds all have one width and whose
    microseconds all have one width, with no two alike in both, comparing the names as text
    decides at a digit of the seconds or microseconds, exactly as comparing ``key`` does: a
    plain sort (in C) gives the order.  Any other listing is sorted by ``key``.
    """
    names = cur + new
    if not names:
        return []
    joined = "\n".join(names)
    head = _PLAIN_HEAD.match(names[0])
    if head is not None and joined.count("\n") == len(names) - 1:  # one line per name
        h = head.group()
        dot = h.index(".")
        fixed = re.compile(rf"^[0-9]{{{dot}}}\.M[0-9]{{{len(h) - dot - 3}}}P", re.M)
        heads = fixed.findall(joined)
        if len(heads) == len(names) and len(set(heads)) == len(names):
            if not new:
                cur.sort()
                return ["cur/" + n for n in cur]
            rels = ["cur/" + n for n in cur]
            rels += ["new/" + n for n in new]
            rels.sort(key=itemgetter(slice(4, None)))
            return rels
    by_base = {n[4:].split(":", 1)[0]: n for n in ["new/" + n for n in new]}
    by_base.update((n[4:].split(":", 1)[0], n) for n in ["cur/" + n for n in cur])
    return [by_base[b] for b in sorted(by_base, key=key)]


def _w_size(base: str) -> int:
    """``,W=`` of a base (RFC822.SIZE), -1 when absent: as ``index_scan._name_size``."""
    found = -1
    for part in base.split(",")[1:]:
        k, _, value = part.partition("=")
        if k == "W" and value.isdigit():
            found = int(value)
    return found


def _listing(folder: Path) -> tuple[int, tuple[int, int], list[str], list[str]] | None:
    """(time before the listing, (mtime of new/, of cur/), new/ names, cur/ names); dot files
    left out (never messages); None when the folder has no ``new/`` or ``cur/``."""
    try:
        now = time.time_ns()  # before the listing: see index_scan._trusted
        stamp = ((folder / "new").stat().st_mtime_ns, (folder / "cur").stat().st_mtime_ns)
        # lists of str made in C: Path.iterdir would make a Path object per message
        new = os.listdir(folder / "new")  # noqa: PTH208
        cur = os.listdir(folder / "cur")  # noqa: PTH208
    except FileNotFoundError:
        return None
    return now, stamp, _visible(new), _visible(cur)


def _visible(names: list[str]) -> list[str]:
    """``names`` without dot files (Maildir tools keep their state there, never a message);
    checked with one ``min`` (in C) first, as dot files are rare."""
    if names and min(names) < "/":  # any name starting with "." is below "/"
        return [n for n in names if n[0] != "."]
    return names


def remove_leftovers(folder: Path) -> None:
    """Remove what a killed build left (lock held, index missing): its ``.build-`` files, and
    a WAL or shared-memory file of a removed index, which must not be applied to the new one."""
    stale = (INDEX_NAME + "-wal", INDEX_NAME + "-shm")
    for path in folder.iterdir():
        if path.name.startswith(INDEX_NAME + BUILD_SUFFIX) or path.name in stale:
            path.unlink(missing_ok=True)


def build_index(
    folder: Path,
    key: Callable[[str], tuple[int, int, int, str]],
    flag_text: Callable[[str], str],
    trusted: Callable[[int, int], bool],
) -> Built | None:
    """Build the missing index of ``folder`` (lock held; see the module docstring).

    ``key`` orders bases (delivery order), ``flag_text`` gives the flag text of an info
    suffix (``":2,S"``: keyword letters included), ``trusted`` says whether a directory mtime
    may be recorded (``index_scan._trusted``).  None when the folder has no ``new/`` or
    ``cur/`` (nothing built: the caller opens an empty index as before)."""
    found = _listing(folder)
    if found is None:
        return None
    now, stamp, new, cur = found
    rels = delivery_sorted(new, cur, key)
    remove_leftovers(folder)
    uidvalidity = next_uidvalidity(folder)
    n = len(rels)
    modseq = 2 if n else 1
    # the columns, each made by one pass in C where it can be (map, zip) and no Python call
    # per message: sizes only where a name has ``,W=``
    parts = list(map(str.partition, rels, repeat(":")))
    heads = list(map(itemgetter(0), parts))  # "sub/base": SQLite cuts the base out
    infos = list(map(itemgetter(2), parts))
    texts = {info: flag_text(":" + info) for info in set(infos)}
    flags = list(map(texts.__getitem__, infos))
    sized = any(map(contains, heads, repeat(",W=")))
    sizes = [_w_size(h[4:]) if ",W=" in h else -1 for h in heads] if sized else None
    uids = list(range(1, n + 1))
    meta: list[tuple[str, int]] = [
        ("version", _SCHEMA_VERSION),
        ("uidvalidity", uidvalidity),
        ("uidnext", n + 1),
        ("highestmodseq", modseq),
        ("recent", 1),
        ("cache_version", _CACHE_VERSION),
    ]
    if n:
        meta.append(("names_gen", 1))  # as the first sync of an empty index leaves it
    for sub, st in zip(("new", "cur"), stamp, strict=True):
        if trusted(st, now):
            meta.append(("stamp_" + sub, st))
    tmp = folder / f"{INDEX_NAME}{BUILD_SUFFIX}{os.getpid()}"
    _write(tmp, meta, modseq, n, heads, rels, flags, sizes)
    tmp.rename(folder / INDEX_NAME)
    fsync_dir(folder)
    return Built(SyncResult(tuple(uids)), uids, flags, modseq, n + 1)


def _write(
    tmp: Path,
    meta: list[tuple[str, int]],
    modseq: int,
    n: int,
    heads: Sequence[str],
    rels: Sequence[str],
    flags: Sequence[str],
    sizes: Sequence[int] | None,
) -> None:
    """Write the index file ``tmp``: tables, meta, the ``n`` rows (UIDs 1 to n, given by
    SQLite as rowids in insertion order: the table is new), then the secondary indexes; switch
    it to WAL and fsync it.  What every row shares is in the statement, not bound per row; the
    base is cut from ``heads`` ("sub/base") by SQLite."""
    db = sqlite3.connect(tmp, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        db.execute(f"PRAGMA cache_size=-{_BUILD_CACHE_KIB}")
        db.execute("BEGIN")
        for statement in _statements(_TABLES):
            # the base's UNIQUE as an index made after the rows (one sort), not kept up to
            # date row by row: the same constraint (see _BASE_INDEX)
            db.execute(statement.replace("base TEXT NOT NULL UNIQUE", "base TEXT NOT NULL"))
        db.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", meta)
        insert = "INSERT INTO messages(base, name, flags, size, internaldate, modseq) VALUES"
        if sizes is None:
            db.executemany(
                f"{insert} (substr(?, 5), ?, ?, -1, -1.0, {modseq:d})",
                zip(heads, rels, flags, strict=True),
            )
        else:
            db.executemany(
                f"{insert} (substr(?, 5), ?, ?, ?, -1.0, {modseq:d})",
                zip(heads, rels, flags, sizes, strict=True),
            )
        (last,) = db.execute("SELECT coalesce(max(uid), 0) FROM messages").fetchone()
        if last != n:  # rowids of a new table are 1, 2, ...: never seen otherwise
            raise RuntimeError(f"index build of {tmp}: {last} as the last UID of {n}")
        for statement in [_BASE_INDEX, *_statements(_INDEXES)]:  # one sort each
            db.execute(statement)
        db.execute("COMMIT")
        db.execute("PRAGMA journal_mode=WAL")
    finally:
        db.close()
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _statements(script: str) -> list[str]:
    """The statements of a schema script (no ``;`` inside them), comments dropped."""
    lines = [ln for ln in script.splitlines() if not ln.lstrip().startswith("--")]
    return [s for s in "\n".join(lines).split(";") if s.strip()]
