"""Building FETCH responses in batches from the folder's index and files.  Our own code.

The cheap items (UID, FLAGS, MODSEQ) come from the shared in-memory folder state; INTERNALDATE,
RFC822.SIZE, ENVELOPE and BODYSTRUCTURE from the index (ENVELOPE/BODYSTRUCTURE are computed
from the file once and cached); anything with body content reads the file
(``fetch_source``: small messages whole, big ones in pieces).  The responses come out as
pieces that the session writes as fast as the client reads (``mailsuite.pacing.paced``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

from mailsuite.imap.fetch_source import PIECE as _PIECE
from mailsuite.imap.fetch_source import MessageFile
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
        self.need_details = not self.cheap
        #: ENVELOPE is the only item that may need the file: its header is enough
        self.head_only = names - {"UID", "FLAGS", "MODSEQ", "RFC822.SIZE", "INTERNALDATE"} == {
            "ENVELOPE"
        }
        self.sets_seen = req.sets_seen
        self.has_flags = "FLAGS" in names
        #: items that always read the file (body content, BODY structure)
        self._content = bool(
            names
            - {"UID", "FLAGS", "MODSEQ", "RFC822.SIZE", "INTERNALDATE", "ENVELOPE", "BODYSTRUCTURE"}
        )
        self._envelope = "ENVELOPE" in names
        self._structure = "BODYSTRUCTURE" in names
        #: some item is a literal (body content)
        self.literals = bool(names & {"RFC822", "RFC822.HEADER", "RFC822.TEXT"}) or any(
            i.name == "BODY" and i.section is not None for i in self.items
        )

    def need_file(self, row: tuple[Any, ...] | None) -> bool:
        """Does this message's response read its file (given its index row)?"""
        if self._content:
            return True
        if row is None:
            return False
        return (self._envelope and row[3] is None) or (self._structure and row[4] is None)


def fetch_pieces(
    plan: FetchPlan,
    folder: Path,
    batch: Sequence[tuple[int, int]],  # (seq, uid)
    flags: dict[int, str],
    modseqs: dict[int, int],
    is_recent: Callable[[int], bool],
    details: dict[int, tuple[Any, ...]] | None,
    cache_out: list[tuple[int, str, bytes]],
    add_flags: set[int],
) -> Generator[bytes, None, None]:
    """The ``* n FETCH (...)`` responses for ``batch``, in pieces for
    ``mailsuite.pacing.paced``: one per message without literals, a message's literals in pieces
    of at most 64 KiB (streamed from the file for big messages, see ``fetch_source``).
    Messages that vanished meanwhile are left out.  Computed ENVELOPE/BODYSTRUCTURE values
    are appended to ``cache_out``."""
    if plan.cheap:
        yield _cheap(plan, batch, flags, modseqs, is_recent)
        return
    out: list[bytes] = []  # messages without literals go out together, ~64 KiB at a time
    size = 0
    for seq, uid in batch:
        f = flags.get(uid)
        if f is None:
            continue
        row = details.get(uid) if details is not None else None
        if plan.need_details and row is None:
            continue
        source = None
        if plan.need_file(row):
            assert row is not None
            source = _open(folder, row[0], plan.head_only)
            if source is None:
                continue  # expunged by another program since we read the index
        try:
            parts = _resolve(plan, uid, f, is_recent, modseqs, row, source, cache_out)
            if uid in add_flags and not plan.has_flags:
                parts.append(flags_bytes(f, is_recent(uid)))
            if not plan.literals:
                line = b"* %d FETCH (%s)\r\n" % (seq, b" ".join(parts))  # type: ignore[arg-type]
                out.append(line)
                size += len(line)
                if size >= _PIECE:
                    yield b"".join(out)
                    out, size = [], 0
                continue
            out.append(b"* %d FETCH (" % seq)
            for i, part in enumerate(parts):
                if i:
                    out.append(b" ")
                if isinstance(part, bytes):
                    out.append(part)
                    continue
                label, (length, content) = part
                out.append(label + b" {%d}\r\n" % length)
                yield b"".join(out)
                out = []
                yield from content
            out.append(b")\r\n")
            size = sum(map(len, out))
        finally:
            if source is not None:
                source.close()
    if out:
        yield b"".join(out)


def _cheap(
    plan: FetchPlan,
    batch: Sequence[tuple[int, int]],
    flags: dict[int, str],
    modseqs: dict[int, int],
    is_recent: Callable[[int], bool],
) -> bytes:
    """UID, FLAGS and MODSEQ only (the FETCH clients repeat most): the batch's responses at
    once, from memory (about 30 bytes a message)."""
    names = [i.name for i in plan.items]
    out = []
    for seq, uid in batch:
        f = flags.get(uid)
        if f is None:
            continue
        parts = []
        for name in names:
            if name == "UID":
                parts.append(b"UID %d" % uid)
            elif name == "FLAGS":
                parts.append(flags_bytes(f, is_recent(uid)))
            else:
                parts.append(b"MODSEQ (%d)" % modseqs.get(uid, 1))
        out.append(b"* %d FETCH (%s)\r\n" % (seq, b" ".join(parts)))
    return b"".join(out)


_Part = bytes | tuple[bytes, tuple[int, Iterator[bytes]]]


def _resolve(
    plan: FetchPlan,
    uid: int,
    f: str,
    is_recent: Callable[[int], bool],
    modseqs: dict[int, int],
    row: tuple[Any, ...] | None,
    source: MessageFile | None,
    cache_out: list[tuple[int, str, bytes]],
) -> list[_Part]:
    """Each item of one message's response: its bytes, or a literal's label, size and
    content (an iterator over the file).  Whatever needs the whole of a big message parsed
    is computed here, so the parse is let go before the first byte is sent."""
    parts: list[_Part] = []
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
                assert source is not None
                env = source.header_parsed().envelope()
                cache_out.append((uid, "envelope", env))
            parts.append(b"ENVELOPE " + env)
        elif name == "BODYSTRUCTURE":
            bs = row[4]  # type: ignore[index]
            if bs is None:
                assert source is not None
                bs = source.parsed().bodystructure(True)
                cache_out.append((uid, "bodystructure", bs))
            parts.append(b"BODYSTRUCTURE " + bs)
        elif name == "BODY" and item.section is None:
            assert source is not None
            parts.append(b"BODY " + source.parsed().bodystructure(False))
        else:
            assert source is not None
            if name == "BODY":
                assert item.section is not None
                where = source.section(item.section)
                label = item.label(item.partial[0] if item.partial else None)
            else:  # RFC822, RFC822.HEADER, RFC822.TEXT
                kind = {"RFC822": None, "RFC822.HEADER": "HEADER", "RFC822.TEXT": "TEXT"}[name]
                where = source.section(None, kind)
                label = name
            parts.append((label.encode("ascii"), source.literal(where, item.partial)))
    return parts


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
            b"\n\n" not in data and b"\n\r\n" not in data and not data.startswith((b"\n", b"\r\n"))
        ):
            more = os.read(fd, max(chunk, len(data)))
            if not more:
                break
            data += more
        return data
    finally:
        os.close(fd)


def _open(folder: Path, name: str, head_only: bool) -> MessageFile | None:
    """A message's file for its response; with ``head_only`` (ENVELOPE is all the file is
    read for) only its header, read with :func:`read_head` (the cached value is the same as
    from the whole file).  None when the message is gone."""
    if head_only:
        try:
            return MessageFile.of_bytes(read_head(f"{folder}/{name}"))
        except FileNotFoundError:
            pass  # renamed by a flag change in another program: found by MessageFile.open
    return MessageFile.open(folder, name)
