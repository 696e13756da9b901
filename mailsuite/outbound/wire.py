"""The SMTP client's wire format: reading replies, announcing and sending the message.

Pure except :class:`BodyProducer`, which streams a stored message into a transport: the
whole message is dot-stuffed by one :class:`~mailsuite.dotstuff.DotStuffer` (not per chunk as
twisted.mail's client does, where a '.' line at a chunk boundary smuggles commands to the next
server) with CRLF line ends (RFC 5321 4.5.2).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from twisted.internet.interfaces import IPullProducer
from zope.interface import implementer

from mailsuite.dotstuff import DotStuffer
from mailsuite.smtp.replies import Reply
from mailsuite.transport import Transport

__all__ = [
    "CHUNK_SIZE",
    "BodyProducer",
    "MessageInfo",
    "ReplyError",
    "ReplyReader",
    "make_reply",
    "parse_extensions",
    "scan_message",
]

CHUNK_SIZE = 64 * 1024

# --------------------------------------------------------------------------- replies

#: RFC 3463 status code at the start of a reply line; its class must match the reply code's.
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")
#: Continuation lines accepted in one reply before it is treated as a protocol error.
MAX_REPLY_LINES = 1000


class ReplyError(Exception):
    """A reply line that is not ``NNN[ -]text``, or a reply without end.  ``str()`` says
    what, with at most 80 bytes of the line."""


def make_reply(code: int, lines: list[str]) -> Reply:
    """A :class:`Reply` from the text of its lines: the enhanced code (RFC 2034) taken from
    the first line (and dropped from the others), the texts joined with ``"\\n"``."""
    first = lines[0] if lines else ""
    enhanced = None
    m = _ENHANCED.match(first)
    if m and m.group(1) == str(code)[0]:
        enhanced = f"{m.group(1)}.{int(m.group(2))}.{int(m.group(3))}"
        first = first[m.end() :]
        rest = []
        for extra in lines[1:]:
            m2 = _ENHANCED.match(extra)
            rest.append(extra[m2.end() :] if m2 else extra)
        lines = [first, *rest]
    return Reply(code, enhanced, "\n".join(lines).strip())


class ReplyReader:
    """Assembles reply lines into replies (RFC 5321 4.2.1: ``NNN-`` continues, ``NNN `` or
    a bare ``NNN`` ends)."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def feed(self, line: bytes) -> tuple[Reply, list[str]] | None:
        """One line without its line end: the finished reply and the text of its lines
        (EHLO keywords are read from them), or None while the reply goes on."""
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
            raise ReplyError(f"unparseable reply: {line[:80]!r}")
        self._lines.append(line[4:].decode("utf-8", "replace"))
        if line[3:4] == b"-":
            if len(self._lines) > MAX_REPLY_LINES:
                raise ReplyError("reply too long")
            return None
        lines, self._lines = self._lines, []
        return make_reply(int(line[:3]), lines), lines


def parse_extensions(lines: list[str]) -> dict[str, str]:
    """EHLO keywords (upper case) and their parameters from a 250 reply's lines
    (RFC 5321 4.1.1.1: the first line is the greeting)."""
    extensions: dict[str, str] = {}
    for line in lines[1:]:
        keyword, _, value = line.strip().partition(" ")
        if keyword:
            extensions[keyword.upper()] = value.strip()
    return extensions


# --------------------------------------------------------------------------- the message


_NEWLINES = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class MessageInfo:
    """``wire_size``: octets with CRLF line ends, before dot-stuffing (RFC 1870's SIZE value).
    ``eight_bit``: any octet > 127. ``longest_line``: octets without the line end."""

    wire_size: int
    eight_bit: bool
    longest_line: int


def scan_message(path: str | os.PathLike[str], chunk_size: int = CHUNK_SIZE) -> MessageInfo:
    """Read a stored message once (blocking, chunked) to learn what MAIL FROM must declare."""
    size = 0
    eight_bit = False
    longest = 0
    current = 0
    pending_cr = False
    with Path(path).open("rb") as f:
        while chunk := f.read(chunk_size):
            if pending_cr:
                chunk = b"\r" + chunk
                pending_cr = False
            if chunk.endswith(b"\r"):
                chunk = chunk[:-1]
                pending_cr = True
            if not eight_bit and not chunk.isascii():
                eight_bit = True
            lines = _NEWLINES.split(chunk)
            for line in lines[:-1]:
                current += len(line)
                longest = max(longest, current)
                size += current + 2
                current = 0
            current += len(lines[-1])
    if pending_cr:
        longest = max(longest, current)
        size += current + 2
        current = 0
    if current:
        longest = max(longest, current)
        size += current + 2
    return MessageInfo(size, eight_bit, longest)


@implementer(IPullProducer)
class BodyProducer:
    """Streams the message file into the transport as the transport asks for more.

    ``progress`` is called before each chunk (the client restarts its data block timer),
    ``sent`` once the final ``.`` line has been written."""

    def __init__(
        self,
        transport: Transport,
        f: BinaryIO,
        chunk_size: int,
        progress: Callable[[], None],
        sent: Callable[[], None],
    ) -> None:
        self._transport = transport
        self._file: BinaryIO | None = f
        self._encoder = DotStuffer(bare_cr_ends_line=True)  # SMTP never sends a bare CR
        self._chunk_size = chunk_size
        self._progress = progress
        self._sent = sent

    def resumeProducing(self) -> None:
        if self._file is None:
            return
        self._progress()
        chunk = self._file.read(self._chunk_size)
        if chunk:
            data = self._encoder.feed(chunk)
            if data:
                self._transport.write(data)
            return
        self._close()
        self._transport.write(self._encoder.finish())
        self._sent()

    def stopProducing(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
