"""The first index of a folder: built whole into a fresh file, then renamed into place.

A folder without ``mailsuite-index.sqlite`` (written by another program, or its index removed
by ``mailsuite reindex``) gets its index in one step before anything connects to it, under the
folder lock:

* the two directories are listed once each with ``os.listdir`` (no ``stat`` or ``open`` of a
  message: sizes come from ``,W=`` in the name or on first use, flags from the ``:2,`` info)
  and put in delivery order (UIDs follow arrival,
  :func:`~mailsuite.store.index_scan.delivery_order`): for the names most programs write a
  plain sort of the names is that order, checked by one regex match (:func:`order_listing`);
* the rows go into a new file, ``mailsuite-index.sqlite.build-<pid>``, with one
  ``INSERT ... SELECT`` from ``json_each`` of the names (:func:`insert_rows`: SQLite cuts the
  base and picks the flag text, no Python object or call per row) into a table whose
  secondary indexes are made afterwards (one sort each, not 100,000 B-tree insertions), no
  journal, no ``fsync`` and a large page cache: nobody can see this file, so none of that
  protects anything;
* the file is switched to WAL, fsynced and renamed to ``mailsuite-index.sqlite``, and the
  folder directory fsynced.  Only then does anyone connect; a build killed half way leaves a
  ``.build-`` file, which the next build removes (the index is still missing, so it is built
  again).

Two steps, :func:`prepare` (the listing in UID order) and :func:`finish` (the file): an IMAP
SELECT of a folder of :data:`UIDLIST_MIN` files or more is answered between them, from the
listing, as Dovecot answers it from ``dovecot-uidlist`` (the build is most of a first
SELECT's cost: issue 15).  For that the UIDs are first made durable in a small file of their
own (:mod:`~mailsuite.store.uidlist`), which the build removes once the index is in place; a
build killed before that leaves the uidlist, and the next build takes its UIDVALIDITY and
UIDs.  Every other opener waits on the folder lock, held from before the listing until the
index is in place, as for any build.  Without a uidlist a killed build leaves nothing that
was told to anyone, and the folder is built again under a new UIDVALIDITY.

The result equals what an empty index and one :meth:`~mailsuite.store.index_scan.IndexScan.sync`
give (same UIDs, flags, sizes, modseqs, meta counters); tests compare the two.  An index that
exists but holds no message (a folder we created empty, then another program filled) is filled
by the same :func:`order_listing`, :func:`columns` and :func:`insert_rows`, in a transaction
of the live file (``IndexScan._fill_empty``).

Processes never connect to a missing index without taking the lock and building it first
(:meth:`~mailsuite.store.index_schema.IndexDatabase._open`).  One may still hold a file that
was removed (``mailsuite reindex`` replacing a damaged index): its close does not checkpoint
into or delete the new file's ``-wal``/``-shm``, because SQLite does neither when the path no
longer names the file it has open (``tests/unit/test_store_index_replaced.py``).
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count, repeat
from operator import itemgetter
from pathlib import Path

from mailsuite.store.index_schema import (
    _CACHE_VERSION,
    _INDEXES,
    _SCHEMA_VERSION,
    _TABLES,
    INDEX_NAME,
    SyncResult,
    keywords_in,
)
from mailsuite.store.maildir import base_of, fsync_dir
from mailsuite.store.uidlist import (
    UIDLIST_TMP,
    can_hold,
    read_uidlist,
    remove_uidlist,
    write_uidlist,
)
from mailsuite.store.uidvalidity import next_uidvalidity

BUILD_SUFFIX = ".build-"
#: a built index's uniqueness of ``messages.base`` (an index made by the general schema's
#: ``UNIQUE`` column otherwise: the same constraint, queries use either alike)
_BASE_INDEX = "CREATE UNIQUE INDEX messages_base ON messages(base)"
#: page cache while building: the whole table and its indexes of a 100,000-message folder
_BUILD_CACHE_KIB = 65536
#: the head of the names most programs write, ``sec.M<usec>P``: see :func:`order_listing`
_PLAIN_HEAD = re.compile(r"[0-9]+\.M[0-9]+P")


@dataclass(frozen=True)
class Built:
    """What a build (or a bulk fill of an empty index) gave: the sync it stands for, and the
    folder's state (UIDs, flag texts, their one modseq) with the meta values it is valid for
    (uidnext, highestmodseq, names_gen)."""

    result: SyncResult
    uids: list[int]
    flags: list[str]
    modseq: int
    uidnext: int
    names_gen: int


@dataclass(frozen=True)
class Ordered:
    """A folder's files in delivery order, ready for one bulk insert.

    ``names`` are "sub/name", or bare ``cur/`` names when ``prefix`` is ``"cur/"`` (a folder
    with nothing in ``new/``: no string is made per message to prefix them); ``joined`` is
    ``"\\n".join(names)``, which the column work and the insert read in one pass each."""

    names: list[str]
    prefix: str
    joined: str

    def rels(self) -> list[str]:
        """Every file as "sub/name", in delivery order."""
        return [self.prefix + n for n in self.names] if self.prefix else self.names


def order_listing(
    new: list[str], cur: list[str], key: Callable[[str], tuple[int, int, int, str]]
) -> Ordered:
    """Every listed file in delivery order of its base (``key``); a base both in ``new/`` and
    ``cur/`` counts once, as its ``cur/`` copy (where a reader moves it).

    For names of the form ``sec.M<usec>P...`` whose seconds all have one width and whose
    microseconds all have one width, with no two alike in both, comparing the names as text
    decides at a digit of the seconds or microseconds, exactly as comparing ``key`` does: a
    plain sort (in C) gives the order.  That is checked after the sort, on the joined names,
    with one regex match (in C, no string made per name): every line has the head, and no line
    has the head of the line before it (names sharing a head are next to each other once
    sorted).  Any other listing is sorted by ``key``.
    """
    if not new:
        cur.sort()
        ordered = Ordered(cur, "cur/", "\n".join(cur))
        if _plain(ordered, ""):
            return ordered
    else:
        rels = ["cur/" + n for n in cur]
        rels += ["new/" + n for n in new]
        rels.sort(key=itemgetter(slice(4, None)))
        ordered = Ordered(rels, "", "\n".join(rels))
        if _plain(ordered, "(?:cur|new)/"):
            return ordered
    by_base = {n[4:].split(":", 1)[0]: n for n in ["new/" + n for n in new]}
    by_base.update((n[4:].split(":", 1)[0], n) for n in ["cur/" + n for n in cur])
    rels = [by_base[b] for b in sorted(by_base, key=key)]
    return Ordered(rels, "", "\n".join(rels))


def _plain(ordered: Ordered, sub: str) -> bool:
    """Is the plain sort of ``ordered`` (by the names less ``sub``) the delivery order?  See
    :func:`order_listing`: one regex match over the joined names, line by line, stopping at
    the first line without the head or with the head of the line before it."""
    names = ordered.names
    if not names:
        return True
    head = _PLAIN_HEAD.match(names[0], 4 if sub else 0)
    if head is None:
        return False
    h = head.group()
    dot = h.index(".")
    fixed = rf"[0-9]{{{dot}}}\.M[0-9]{{{len(h) - dot - 3}}}P"
    # possessive (``*+``): no backtracking state kept per line, three times faster
    lines = re.compile(rf"(?:{sub}({fixed})[^\n]*+(?:\n(?!{sub}\1)|\Z))*+")
    match = lines.match(ordered.joined)
    return match is not None and match.end() == len(ordered.joined)


def delivery_sorted(
    new: list[str], cur: list[str], key: Callable[[str], tuple[int, int, int, str]]
) -> list[str]:
    """Every listed file as "sub/name", in delivery order (:func:`order_listing`)."""
    return order_listing(new, cur, key).rels()


def _w_size(base: str) -> int:
    """``,W=`` of a base (RFC822.SIZE), -1 when absent: as ``index_scan._name_size``."""
    found = -1
    for part in base.split(",")[1:]:
        k, _, value = part.partition("=")
        if k == "W" and value.isdigit():
            found = int(value)
    return found


def listing(folder: Path) -> tuple[int, tuple[int, int], list[str], list[str]] | None:
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
    """Remove what a killed build left (lock held, index missing): its ``.build-`` files, a
    uidlist's temporary file, and a WAL or shared-memory file of a removed index, which must
    not be applied to the new one.  (A uidlist itself stays: its UIDs may have been told.)"""
    stale = (INDEX_NAME + "-wal", INDEX_NAME + "-shm")
    for path in folder.iterdir():
        if path.name.startswith((INDEX_NAME + BUILD_SUFFIX, UIDLIST_TMP)) or path.name in stale:
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Columns:
    """What a bulk insert writes besides the names: each file's flag text (in the order of
    ``ordered``), the flag text of each info suffix found (``"2,S"``, no colon), and how the
    sizes in ``,W=`` are read (:func:`sizes_in_sql`)."""

    ordered: Ordered
    flags: list[str]
    texts: dict[str, str]
    #: every name has an info suffix (":"): the insert needs no case for a name without
    colons: bool
    #: how many names have ``,W=`` (a size: RFC822.SIZE); 0: every size is -1 (first use)
    wsizes: int = 0
    #: every ``,W=`` can be read by SQLite (:func:`sizes_in_sql`); else by Python, per row
    wsizes_in_sql: bool = True

    def sizes(self) -> list[int]:
        """Every name's ``,W=`` size (-1: none), in Python: one call per name."""
        if not self.wsizes:
            return [-1] * len(self.flags)
        return [_w_size(base_of(n.rpartition("/")[2])) for n in self.ordered.rels()]


#: the info suffix of a name with one, to the end of its line of a joined listing
_COLON_INFO = re.compile(r":([^\n]*)")


def columns(ordered: Ordered, flag_text: Callable[[str], str]) -> Columns:
    """The columns of ``ordered`` (see :class:`Columns`), each from one pass in C (a regex
    over the joined names, ``map``): no Python call per message but for ``,W=`` sizes.
    ``flag_text`` gives the flag text of an info suffix (``":2,S"``)."""
    names = ordered.names
    infos = _COLON_INFO.findall(ordered.joined)
    colons = len(infos) == len(names) and ordered.joined.count("\n") == len(names) - 1
    if not colons:  # some name without ":" (or with a newline): one by one
        infos = [n.partition(":")[2] for n in names]
    texts = {info: flag_text(":" + info) for info in set(infos)}
    flags = list(map(texts.__getitem__, infos))
    wsizes = ordered.joined.count(",W=")
    return Columns(ordered, flags, texts, colons, wsizes, sizes_in_sql(ordered.joined, wsizes))


#: a ``,W=`` whose value SQLite's ``CAST(... AS INTEGER)`` may read otherwise than ``_w_size``:
#: not ASCII digits (at most 18, an int64) ending the part (``,``), the base (``:``) or the name
_W_ODD = re.compile(r",W=(?![0-9]{1,18}(?:[,:\n]|\Z))")
#: a name with two ``,W=``; one with ``,W=`` in its info suffix (after the base's ":")
_W_TWICE = re.compile(r",W=[^\n]*,W=")
_W_IN_INFO = re.compile(r":[^\n]*?,W=")


def sizes_in_sql(joined: str, wsizes: int) -> bool:
    """Can the insert read every ``,W=`` size of the names ``joined`` (``wsizes`` of them) as
    ``CAST(substr(name, instr(name, ',W=') + 3) AS INTEGER)`` (SQLite takes the longest
    prefix that is an integer) and get :func:`_w_size`?  Yes when each ``,W=`` is well formed,
    no name has two, and none is in an info suffix: three regex searches in C, against a
    Python call per name (a folder Dovecot wrote has ``,W=`` in every name)."""
    if not wsizes:
        return True
    return not (_W_ODD.search(joined) or _W_TWICE.search(joined) or _W_IN_INFO.search(joined))


#: the fewest messages whose first index is built after the answer, from a uidlist
#: (:mod:`~mailsuite.store.uidlist`): a small folder's build costs less than the uidlist's
#: write and two more directory fsyncs
UIDLIST_MIN = 1000


@dataclass(frozen=True)
class Prepared:
    """A first index about to be built (lock held): the files in UID order, the UIDVALIDITY,
    the listing's time and directory mtimes (None when the names come from a uidlist: the
    first sync lists both directories), and whether the UIDs are durable already (a uidlist:
    they may be told before the index exists)."""

    ordered: Ordered
    uidvalidity: int
    now: int
    stamp: tuple[int, int] | None
    durable: bool

    @property
    def recovered(self) -> bool:
        """Taken from a uidlist a killed build left (not from a listing)."""
        return self.stamp is None

    @property
    def modseq(self) -> int:
        """Every first row's MODSEQ, and the index's HIGHESTMODSEQ (as a first sync of an
        empty index leaves them)."""
        return 2 if self.ordered.names else 1


def prepare(
    folder: Path, key: Callable[[str], tuple[int, int, int, str]], uidlist: bool = False
) -> Prepared | None:
    """The first step of building a missing index (lock held; :func:`finish` is the second;
    ``key`` orders bases: delivery order).  What a killed build left is removed, then the
    names in UID order: a uidlist's when one was left (its UIDVALIDITY and UIDs were made
    durable, and may have been told: they are kept), else the listing's in delivery order
    under a new UIDVALIDITY, written to a uidlist when ``uidlist`` and the folder is big
    enough (:data:`UIDLIST_MIN`).  None when the folder has no ``new/`` or ``cur/`` (and no
    uidlist): nothing to build."""
    remove_leftovers(folder)
    left = read_uidlist(folder)
    if left is not None:
        ordered = Ordered(left.names, left.prefix, left.joined)
        return Prepared(ordered, left.uidvalidity, 0, None, True)
    found = listing(folder)
    if found is None:
        return None
    now, stamp, new, cur = found
    ordered = order_listing(new, cur, key)
    uidvalidity = next_uidvalidity(folder)
    durable = (
        uidlist and len(ordered.names) >= UIDLIST_MIN and can_hold(ordered.names, ordered.joined)
    )
    if durable:
        write_uidlist(folder, uidvalidity, ordered.names, ordered.prefix, ordered.joined)
    return Prepared(ordered, uidvalidity, now, stamp, durable)


#: a line with a lower-case letter after its colon: a name whose info may hold keyword
#: letters (``dovecot-keywords``); without one anywhere, no message has a keyword
_LOWER_INFO = re.compile(r":[^\n]*[a-z]")


def told(ordered: Ordered, flag_text: Callable[[str], str]) -> tuple[int, frozenset[str]]:
    """What a SELECT answered from ``ordered`` needs of the flags: the sequence number of
    the first message without ``\\Seen`` (0: none) and the keywords of the folder, each
    as :func:`columns` and the folder model give them, without the columns' pass over every
    name: names are read up to the first unseen one (``flag_text`` once per info suffix), and
    keywords need a lower-case letter in some info suffix (one regex search; only then are
    the columns made)."""
    keywords: frozenset[str] = frozenset()
    if _LOWER_INFO.search(ordered.joined):
        texts = set(columns(ordered, flag_text).texts.values())
        keywords = frozenset(k for text in texts for k in keywords_in(text))
    seen: dict[str, bool] = {}  # info suffix -> its flag text holds \Seen
    for i, name in enumerate(ordered.names, 1):
        info = name.partition(":")[2]
        has = seen.get(info)
        if has is None:
            has = seen[info] = "\\Seen" in flag_text(":" + info)
        if not has:
            return i, keywords
    return 0, keywords


def finish(
    folder: Path,
    prep: Prepared,
    flag_text: Callable[[str], str],
    trusted: Callable[[int, int], bool],
    claimed: bool = False,
) -> Built:
    """Build the index of ``prep`` (lock held) into a new file, rename it into place, fsync
    the directory, then remove the uidlist (see the module docstring).  ``flag_text`` gives
    the flag text of an info suffix (``":2,S"``: keyword letters included), ``trusted`` says
    whether a directory mtime may be recorded (``index_scan._trusted``).  ``claimed``: every
    message is \\Recent to the session whose SELECT was answered from ``prep`` (RFC 3501
    2.3.2), so none is to anyone else."""
    cols = columns(prep.ordered, flag_text)
    n = len(cols.flags)
    modseq = prep.modseq
    meta: list[tuple[str, int]] = [
        ("version", _SCHEMA_VERSION),
        ("uidvalidity", prep.uidvalidity),
        ("uidnext", n + 1),
        ("highestmodseq", modseq),
        ("recent", n + 1 if claimed else 1),
        ("cache_version", _CACHE_VERSION),
    ]
    if n:
        meta.append(("names_gen", 1))  # as the first sync of an empty index leaves it
    if prep.stamp is not None:
        for sub, st in zip(("new", "cur"), prep.stamp, strict=True):
            if trusted(st, prep.now):
                meta.append(("stamp_" + sub, st))
    tmp = folder / f"{INDEX_NAME}{BUILD_SUFFIX}{os.getpid()}"
    _write(tmp, meta, modseq, cols)
    tmp.rename(folder / INDEX_NAME)
    fsync_dir(folder)
    if prep.durable:
        remove_uidlist(folder)
    uids = list(range(1, n + 1))
    return Built(SyncResult(tuple(uids)), uids, cols.flags, modseq, n + 1, 1 if n else 0)


#: the colon of a row's name (``value``: "sub/base:info")
_COLON = "instr(value, ':')"
#: (base, info) of the row's name when every name has a colon, and when some may not
_CUT_COLON = (f"substr(value, 5, {_COLON} - 5)", f"substr(value, {_COLON} + 1)")
_CUT_ANY = (
    f"CASE WHEN {_COLON} THEN substr(value, 5, {_COLON} - 5) ELSE substr(value, 5) END",
    f"CASE WHEN {_COLON} THEN substr(value, {_COLON} + 1) ELSE '' END",
)
#: where the row's name has ``,W=`` (0: nowhere)
_W_AT = "instr(value, ',W=')"
#: distinct info suffixes a flag ``CASE`` is written for; a folder with more (many keyword
#: combinations) is inserted row by row
_MAX_INFOS = 200


def insert_rows(db: sqlite3.Connection, first_uid: int, modseq: int, cols: Columns) -> int:
    """Insert the files of ``cols`` as rows with UIDs ``first_uid``, ``first_uid + 1``, ...
    and ``modseq`` (sizes from ``,W=`` or -1, internal dates -1: left for first use), in the
    caller's transaction.

    The names go to SQLite as one JSON array (made by one ``replace`` of the joined names, no
    encoder pass) read back by ``json_each``; SQLite cuts the base, reads the ``,W=`` size
    and chooses the flags (one ``CASE`` over the folder's few info suffixes): no Python object
    or call per row, against an ``executemany`` binding three values a row (measured: 60% of
    its time).  Names JSON would have to escape, a ``,W=`` SQLite could read otherwise than
    Python (:func:`sizes_in_sql`), many info suffixes or an SQLite without JSON take the
    ``executemany``.  Returns the number of rows inserted."""
    ordered = cols.ordered
    if not ordered.names:
        return 0
    named = [(i, t) for i, t in cols.texts.items() if t]
    joined = ordered.joined
    if (
        cols.wsizes_in_sql
        and len(named) <= _MAX_INFOS
        and joined.count("\n") == len(ordered.names) - 1
        and _json_safe(joined)
    ):
        base, info = _CUT_COLON if cols.colons else _CUT_ANY
        cases = " ".join("WHEN ? THEN ?" for _ in named)
        flags = f"CASE {info} {cases} ELSE '' END" if named else "''"
        sep = '","' + ordered.prefix
        params: list[object] = [first_uid]  # in the order of the statement's "?"
        for pair in named:
            params += pair
        params.append(f'["{ordered.prefix}{joined.replace(chr(10), sep)}"]')
        size = "-1"
        if cols.wsizes:
            size = f"CAST(substr(value, {_W_AT} + 3) AS INTEGER)"
            if cols.wsizes < len(ordered.names):
                size = f"CASE WHEN {_W_AT} THEN {size} ELSE -1 END"
        try:
            return db.execute(
                "INSERT INTO messages(uid, base, name, flags, size, internaldate, modseq)"
                f" SELECT ? + key, {base}, value, {flags}, {size}, -1.0, {modseq:d}"
                " FROM json_each(?)",
                params,
            ).rowcount
        except sqlite3.OperationalError as exc:
            if "json_each" not in str(exc):  # an SQLite built without JSON: row by row
                raise
    rels = ordered.rels()
    sizes = cols.sizes() if cols.wsizes else repeat(-1)
    return db.executemany(
        "INSERT INTO messages(uid, base, name, flags, size, internaldate, modseq)"
        f" SELECT ?1, {_CUT_ANY[0]}, value, ?3, ?4, -1.0, {modseq:d}"
        " FROM (SELECT ?2 AS value)",
        zip(count(first_uid), rels, cols.flags, sizes),
    ).rowcount


#: the bytes a JSON string may not hold unescaped (RFC 8259 7) but for "\\n", which the
#: array's separators replace
_JSON_UNSAFE = bytes([*range(0x0A), *range(0x0B, 0x20), ord('"'), ord("\\")])


def _json_safe(joined: str) -> bool:
    """Can the names of ``joined`` stand in a JSON string as they are?  Checked on the UTF-8
    bytes with one ``translate`` (a regex class search costs ten times more); a name that is
    no valid UTF-8 (a surrogate escape) is not, and takes the ``executemany``, as before."""
    try:
        raw = joined.encode()
    except UnicodeEncodeError:
        return False
    return len(raw.translate(None, _JSON_UNSAFE)) == len(raw)


def _write(tmp: Path, meta: list[tuple[str, int]], modseq: int, cols: Columns) -> None:
    """Write the index file ``tmp``: tables, meta, the rows (UIDs 1 to n), then the secondary
    indexes; switch it to WAL and fsync it."""
    n = len(cols.flags)
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
        rows = insert_rows(db, 1, modseq, cols)
        (last,) = db.execute("SELECT coalesce(max(uid), 0) FROM messages").fetchone()
        if (rows, last) != (n, n):  # never seen: the listing and the rows disagree
            raise RuntimeError(f"index build of {tmp}: {rows} rows up to UID {last} for {n}")
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
