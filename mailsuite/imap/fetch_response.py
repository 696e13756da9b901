"""Building FETCH responses in batches from the folder's index and files.  Our own code.

The cheap items (UID, FLAGS, MODSEQ) come from the shared in-memory folder state; INTERNALDATE,
RFC822.SIZE, ENVELOPE and BODYSTRUCTURE from the index (ENVELOPE/BODYSTRUCTURE are computed
from the file once and cached); anything with body content reads the file.  Each batch becomes
one ``bytes`` for one ``transport.write``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mailsuite.imap.message import ParsedMessage, partial
from mailsuite.imap.parser import FetchItem, FetchRequest

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def imap_date(ts: float) -> bytes:
    """INTERNALDATE: ``"17-Jul-1996 02:44:25 +0000"`` (UTC)."""
    t = time.gmtime(ts)
    return b'"%02d-%s-%04d %02d:%02d:%02d +0000"' % (
        t.tm_mday,
        _MONTHS[t.tm_mon - 1].encode(),
        t.tm_year,
        t.tm_hour,
        t.tm_min,
        t.tm_sec,
    )


def literal(data: bytes) -> bytes:
    return b"{%d}\r\n%s" % (len(data), data)


def flags_bytes(flags: str, recent: bool) -> bytes:
    if recent:
        flags = (flags + " \\Recent") if flags else "\\Recent"
    return b"FLAGS (" + flags.encode("utf-8") + b")"


class FetchPlan:
    """What one FETCH needs, decided once for all its messages."""

    def __init__(self, req: FetchRequest, uid_command: bool, condstore: bool) -> None:
        items = list(req.items)
        names = {i.name for i in items}
        # RFC 7162 3.1: with CONDSTORE on, a FETCH that sets \\Seen reports UID and MODSEQ
        if (uid_command or (condstore and req.sets_seen)) and "UID" not in names:
            items.insert(0, FetchItem("UID"))
        if (condstore or req.changedsince is not None) and "MODSEQ" not in names:
            items.append(FetchItem("MODSEQ"))
        self.items = tuple(items)
        names = {i.name for i in self.items}
        self.cheap = names <= {"UID", "FLAGS", "MODSEQ"}
        self.need_size = "RFC822.SIZE" in names
        self.need_date = "INTERNALDATE" in names
        self.need_raw = req.needs_raw or "BODY" in names  # BODY (no section) is computed
        self.need_details = not self.cheap
        #: ENVELOPE is the only item that may need the file: its header is enough
        self.head_only = names - {"UID", "FLAGS", "MODSEQ", "RFC822.SIZE", "INTERNALDATE"} == {
            "ENVELOPE"
        }
        self.sets_seen = req.sets_seen
        self.has_flags = "FLAGS" in names


def build_batch(
    plan: FetchPlan,
    folder: Path,
    batch: Sequence[tuple[int, int]],  # (seq, uid)
    flags: dict[int, str],
    modseqs: dict[int, int],
    is_recent: Callable[[int], bool],
    details: dict[int, tuple[Any, ...]] | None,
    cache_out: list[tuple[int, str, bytes]],
    add_flags: set[int],
) -> bytes:
    """The ``* n FETCH (...)`` lines for ``batch``.  Messages that vanished meanwhile are
    left out.  Computed ENVELOPE/BODYSTRUCTURE values are appended to ``cache_out``."""
    out: list[bytes] = []
    for seq, uid in batch:
        f = flags.get(uid)
        if f is None:
            continue
        parts: list[bytes] = []
        parsed: ParsedMessage | None = None
        row = details.get(uid) if details is not None else None
        if plan.need_details and row is None:
            continue
        for item in plan.items:
            name = item.name
            if name == "UID":
                parts.append(b"UID %d" % uid)
            elif name == "FLAGS":
                parts.append(flags_bytes(f, is_recent(uid)))
            elif name == "MODSEQ":
                parts.append(b"MODSEQ (%d)" % modseqs.get(uid, 1))
            elif name == "RFC822.SIZE":
                parts.append(b"RFC822.SIZE %d" % row[1])  # type: ignore[index]
            elif name == "INTERNALDATE":
                parts.append(b"INTERNALDATE " + imap_date(row[2]))  # type: ignore[index]
            elif name == "ENVELOPE":
                env = row[3]  # type: ignore[index]
                if env is None:
                    parsed = parsed or _parse(folder, row, plan.head_only)
                    if parsed is None:
                        break
                    env = parsed.envelope()
                    cache_out.append((uid, "envelope", env))
                parts.append(b"ENVELOPE " + env)
            elif name == "BODYSTRUCTURE":
                bs = row[4]  # type: ignore[index]
                if bs is None:
                    parsed = parsed or _parse(folder, row, plan.head_only)
                    if parsed is None:
                        break
                    bs = parsed.bodystructure(True)
                    cache_out.append((uid, "bodystructure", bs))
                parts.append(b"BODYSTRUCTURE " + bs)
            else:
                parsed = parsed or _parse(folder, row, plan.head_only)
                if parsed is None:
                    break
                if name == "BODY" and item.section is None:
                    parts.append(b"BODY " + parsed.bodystructure(False))
                elif name == "RFC822":
                    parts.append(b"RFC822 " + literal(parsed.whole()))
                elif name == "RFC822.HEADER":
                    parts.append(b"RFC822.HEADER " + literal(parsed.header()))
                elif name == "RFC822.TEXT":
                    parts.append(b"RFC822.TEXT " + literal(parsed.text()))
                else:  # BODY[section]<partial>
                    assert item.section is not None
                    data = parsed.section(item.section)
                    if item.partial is not None:
                        origin, length = item.partial
                        data = partial(data, origin, length)
                        label = item.label(origin)
                    else:
                        label = item.label()
                    parts.append(label.encode("ascii") + b" " + literal(data))
        else:
            if uid in add_flags and not plan.has_flags:
                parts.append(flags_bytes(f, is_recent(uid)))
            out.append(b"* %d FETCH (%s)\r\n" % (seq, b" ".join(parts)))
    return b"".join(out)


#: the first read of a header-only parse; most headers fit (the read grows until one does)
HEAD_CHUNK = 16384


def read_head(path: str, chunk: int = HEAD_CHUNK) -> bytes:
    """The start of a message file up to and including its header's blank line (the whole
    file when it has none): what ENVELOPE is computed from, without reading the body.

    ``path`` is a string and the reads are ``os.read`` calls: this runs for every message of
    a first FETCH ENVELOPE of a folder, where pathlib's per-call cost showed in profiles."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.read(fd, chunk)
        while (
            b"\n\n" not in data
            and b"\n\r\n" not in data
            and not data.startswith((b"\n", b"\r\n"))
        ):
            more = os.read(fd, max(chunk, len(data)))
            if not more:
                break
            data += more
        return data
    finally:
        os.close(fd)


def _parse(
    folder: Path, row: tuple[Any, ...] | None, head_only: bool = False
) -> ParsedMessage | None:
    """The message of an index row, parsed lazily; with ``head_only`` only its header is read
    (enough for ENVELOPE: the cached value is the same as from the whole file)."""
    if row is None:
        return None
    try:
        if head_only:
            return ParsedMessage(read_head(f"{folder}/{row[0]}"))
        with (folder / row[0]).open("rb") as fh:
            return ParsedMessage(fh.read())
    except FileNotFoundError:
        # renamed by a flag change in another program since we read the index: find it
        name = row[0]
        base = name.split("/", 1)[1].split(":", 1)[0]
        for sub in ("cur", "new"):
            try:
                for entry in (folder / sub).iterdir():
                    if entry.name.split(":", 1)[0] == base:
                        return ParsedMessage(entry.read_bytes())
            except FileNotFoundError:
                continue
        return None
