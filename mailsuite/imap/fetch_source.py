"""One message's bytes for FETCH, and literals streamed from them in pieces.  Our own code.

A FETCH of message bodies used to read each file whole, convert it to CRLF, wrap it in a
literal and join a thousand of them into one write: a client that did not read kept all of
it in the server (issue 10).  Here a message up to ``SMALL`` bytes is still read whole (one
read, parsed in memory: the common case, and the fast one), while a bigger one stays an open
file: its literals are sent as pieces of ``PIECE`` stored bytes converted as they are read, so
what a FETCH holds is one piece, whatever the message size.  A literal's length must be sent
before its content, so a streamed literal is measured first (one pass over the file range,
cheap next to the conversion), and the file is held open so a rename (a flag change) or an
expunge meanwhile cannot change what is sent.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from mailsuite.imap.message import ParsedMessage, Section, split_header, to_crlf

#: Messages up to this size are read whole; bigger ones are streamed from the file.
SMALL = 256 * 1024
#: Stored bytes read (and converted) at a time from a big message.
PIECE = 64 * 1024


class CrlfStream:
    """``to_crlf`` for bytes fed in pieces: the pieces' outputs join to exactly ``to_crlf``
    of the whole.  A CR ending a piece is held back, as it may be the first half of a CRLF
    split across two pieces."""

    __slots__ = ("_held_cr",)

    def __init__(self) -> None:
        self._held_cr = False

    def _take(self, data: bytes) -> bytes:
        if self._held_cr:
            data = b"\r" + data
            self._held_cr = False
        if data.endswith(b"\r"):
            self._held_cr = True
            data = data[:-1]
        return data

    def feed(self, data: bytes) -> bytes:
        data = self._take(data)
        return to_crlf(data) if data else b""

    def feed_length(self, data: bytes) -> int:
        """``len(feed(data))`` without building the output when there is no CR."""
        data = self._take(data)
        if b"\r" not in data:
            return len(data) + data.count(b"\n")
        return len(to_crlf(data))

    def finish(self) -> bytes:
        """A CR held at the very end is a line end of its own (as ``to_crlf`` makes it)."""
        if self._held_cr:
            self._held_cr = False
            return b"\r\n"
        return b""


class MessageFile:
    """One stored message opened for one FETCH response: ``raw`` when it was small enough to
    read whole, else an open file descriptor read in pieces.  Close it when done."""

    def __init__(self, fd: int | None, size: int, raw: bytes | None = None) -> None:
        self.size = size
        self.raw: bytes | None = raw
        self._fd: int | None = fd
        self._header: bytes | None = None
        self._parsed: ParsedMessage | None = None
        self._lengths: dict[tuple[int, int], int] = {}
        if fd is not None and size <= SMALL:
            self.raw = os.read(fd, size + 1)  # one read (+1: it may have grown, as a file may)
            if len(self.raw) > size:
                self.raw = self._read_all()
            self.size = len(self.raw)
            self.close()

    @classmethod
    def of_bytes(cls, raw: bytes) -> MessageFile:
        """A message (or the head of one, for ENVELOPE) already read."""
        return cls(None, len(raw), raw)

    @classmethod
    def open(cls, folder: Path, name: str) -> MessageFile | None:
        """Open ``folder/name``; a file renamed meanwhile (a flag change by another program)
        is found by its unique part.  None when the message is gone."""
        try:
            fd = os.open(folder / name, os.O_RDONLY)
        except FileNotFoundError:
            found = _find_renamed(folder, name)
            if found is None:
                return None
            fd = found
        try:
            return cls(fd, os.fstat(fd).st_size)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> MessageFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ----------------------------------------------------------------------------

    def pieces(self, start: int, end: int) -> Iterator[bytes]:
        """The stored bytes ``[start, end)`` in pieces of at most ``PIECE``."""
        if self.raw is not None:
            for pos in range(start, end, PIECE):
                yield self.raw[pos : min(end, pos + PIECE)]
            return
        yield from self._pread(start, end)

    def _read_all(self) -> bytes:
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        return b"".join(self._pread(0, size))

    def _pread(self, start: int, end: int) -> Iterator[bytes]:
        pos = start
        while pos < end:
            assert self._fd is not None, "MessageFile read after close"
            data = os.pread(self._fd, min(PIECE, end - pos), pos)
            if not data:
                raise OSError(f"message file ended at {pos} of {end} bytes")
            yield data
            pos += len(data)

    def header(self) -> bytes:
        """The header section with its blank line (all of the message if it has none)."""
        if self._header is None:
            if self.raw is not None:
                self._header = self.raw[: split_header(self.raw)[1]]
            else:
                self._header = self._read_header()
        return self._header

    def _read_header(self) -> bytes:
        prefix = b""
        for data in self.pieces(0, self.size):
            prefix += data
            end = split_header(prefix)[1]
            if end < len(prefix) or (end == len(prefix) and prefix.endswith(b"\n\n")):
                return prefix[:end]
        return prefix

    def parsed(self) -> ParsedMessage:
        """The whole message parsed (a big one is read whole for it: the caller takes what
        it needs, offsets mostly, and lets it go)."""
        if self._parsed is not None:
            return self._parsed
        parsed = ParsedMessage(self.raw if self.raw is not None else self._read_all())
        if self.raw is not None:
            self._parsed = parsed  # small: kept for the other items of this response
        return parsed

    def header_parsed(self) -> ParsedMessage:
        """The header only, parsed: enough for ENVELOPE and top-level HEADER.FIELDS."""
        if self.raw is not None:
            return self.parsed()
        return ParsedMessage(self.header())

    def crlf_length(self, start: int, end: int) -> int:
        """Length of ``to_crlf(raw[start:end])`` (remembered for repeated items)."""
        raw = self.raw
        if raw is not None and raw.find(b"\r", start, end) < 0:
            return end - start + raw.count(b"\n", start, end)
        key = (start, end)
        n = self._lengths.get(key)
        if n is None:
            conv = CrlfStream()
            n = sum(conv.feed_length(d) for d in self.pieces(start, end)) + len(conv.finish())
            self._lengths[key] = n
        return n

    # -- literals ---------------------------------------------------------------------------

    def section(self, spec: Section | None, kind: str | None = None) -> tuple[int, int] | bytes:
        """Where BODY[spec] lies in the stored bytes, or its content when it is not a slice
        (HEADER.FIELDS).  ``spec`` None with ``kind`` "HEADER"/"TEXT"/None: RFC822.HEADER,
        RFC822.TEXT, RFC822."""
        if spec is None:
            spec = Section((), kind)
        if spec.part:
            parsed = self.parsed()
        elif spec.kind is None:
            return 0, self.size
        elif spec.kind in ("HEADER", "TEXT"):
            end = len(self.header())
            return (0, end) if spec.kind == "HEADER" else (end, self.size)
        else:
            parsed = self.header_parsed()
        where = parsed.span(spec)
        return where if where is not None else parsed.section(spec)

    def literal(
        self, where: tuple[int, int] | bytes, window: tuple[int, int | None] | None
    ) -> tuple[int, Iterator[bytes]]:
        """A literal's size and content: ``where`` from :meth:`section`, then the
        ``<origin.length>`` window of RFC 3501 6.4.5 (none past the end)."""
        if isinstance(where, bytes):
            data = where
            if window is not None:
                origin, length = window
                data = data[origin:] if length is None else data[origin : origin + length]
            return len(data), iter((data,))
        start, end = where
        total = self.crlf_length(start, end)
        origin, length = window if window is not None else (0, None)
        size = max(0, total - origin) if length is None else max(0, min(length, total - origin))
        return size, self._converted(start, end, origin, size)

    def _converted(self, start: int, end: int, skip: int, size: int) -> Iterator[bytes]:
        if size == 0:
            return
        if self.raw is not None:  # small: converted at once
            yield to_crlf(self.raw[start:end])[skip : skip + size]
            return
        conv = CrlfStream()
        sent = 0
        for data in self.pieces(start, end):
            out = conv.feed(data)
            if skip:
                if len(out) <= skip:
                    skip -= len(out)
                    continue
                out = out[skip:]
                skip = 0
            if sent + len(out) >= size:
                yield out[: size - sent]
                return
            sent += len(out)
            yield out
        tail = conv.finish()[skip:]
        if sent + len(tail) < size:
            raise OSError("message file shorter than measured")
        yield tail[: size - sent]


def _find_renamed(folder: Path, name: str) -> int | None:
    base = name.split("/", 1)[1].split(":", 1)[0]
    for sub in ("cur", "new"):
        try:
            entries = list((folder / sub).iterdir())
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.name.split(":", 1)[0] == base:
                try:
                    return os.open(entry, os.O_RDONLY)
                except FileNotFoundError:
                    continue
    return None
