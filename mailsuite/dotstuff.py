"""Stored message bytes -> the CRLF, dot-stuffed multi-line form of SMTP DATA and POP3 RETR.

One encoder for both protocols (RFC 5321 4.5.2, RFC 1939 3): every line end becomes CRLF and
every line starting with "." gets one more, including the first line and lines split across
chunks, and ``finish()`` ends the last line if needed and adds the terminating ``.CRLF``.
Written for mailsuite because twisted.mail's SMTP client and POP3 server stuff each 16 KiB
chunk on its own, so a "." line straddling a chunk boundary ends the data early and the rest
of the message is read as commands or replies (research/twisted-mail.md 1.6, 3.1).

State crossing a chunk boundary: whether the next byte starts a line, and a CR held back
when it is the last byte of a chunk (it may be the first half of a CRLF).

Bare CR: SMTP must never send one (RFC 5321 2.3.8), so the SMTP client asks for it to become
a line end; POP3 sends the stored bytes as they are (the index counts RFC822.SIZE that way).
"""

from __future__ import annotations

import re

TERMINATOR = b".\r\n"
_LINE_ENDS = re.compile(rb"\r\n|\r|\n")


class DotStuffer:
    """Feed stored bytes in chunks of any size; get wire bytes back."""

    __slots__ = ("_at_line_start", "_bare_cr_ends_line", "_held_cr")

    def __init__(self, bare_cr_ends_line: bool = False) -> None:
        self._bare_cr_ends_line = bare_cr_ends_line
        self._at_line_start = True
        self._held_cr = False

    def feed(self, data: bytes) -> bytes:
        if self._held_cr:
            data = b"\r" + data
            self._held_cr = False
        if not data:
            return b""
        if data.endswith(b"\r"):
            self._held_cr = True
            data = data[:-1]
            if not data:
                return b""
        if self._bare_cr_ends_line:
            data = _LINE_ENDS.sub(b"\r\n", data)
        else:  # LF and CRLF -> CRLF; a bare CR stays content
            if b"\r\n" in data:
                data = data.replace(b"\r\n", b"\n")
            data = data.replace(b"\n", b"\r\n")
        data = data.replace(b"\n.", b"\n..")
        if self._at_line_start and data[:1] == b".":
            data = b"." + data
        self._at_line_start = data.endswith(b"\n")
        return data

    def finish(self) -> bytes:
        """The tail: a held CR, the end of an unfinished last line, and ``.CRLF``."""
        tail = b""
        if self._held_cr:
            self._held_cr = False
            if self._bare_cr_ends_line:
                tail = b"\r\n"
                self._at_line_start = True
            else:
                tail = b"\r"  # the message ends mid-line; "\r" itself is content
                self._at_line_start = False
        if not self._at_line_start:
            tail += b"\r\n"
        return tail + TERMINATOR


def stuff_all(data: bytes, bare_cr_ends_line: bool = False, head: bytes = b"") -> bytes:
    """``head`` and then the whole multi-line form of ``data`` in one piece (small
    messages): what :class:`DotStuffer` gives fed in any chunks (a property test checks
    it), in at most one ``bytes.replace`` per rewrite the message needs and one copy to
    join it to ``head`` (the reply's status line) and the terminator.

    A message stored with CRLF line ends throughout (counted, not copied) is left as it is;
    only one with bare LFs is rewritten (LF -> CRLF, after CRLF -> LF when it mixes both);
    and dot-stuffing copies only a message that has a line starting with ".".  A message
    with no CR at all (bare LFs throughout: how Dovecot and most MDAs store mail) is found
    with one ``memchr`` and rewritten in one pass, without counting line ends."""
    if bare_cr_ends_line:
        data = _LINE_ENDS.sub(b"\r\n", data)
    elif b"\r" not in data:
        data = data.replace(b"\n", b"\r\n")  # (a copy of the same bytes when there is no LF)
    else:  # LF and CRLF -> CRLF; a bare CR stays content
        lf = data.count(b"\n")
        if lf:
            crlf = data.count(b"\r\n")
            if crlf != lf:
                if crlf:
                    data = data.replace(b"\r\n", b"\n")
                data = data.replace(b"\n", b"\r\n")
    if b"\n." in data:
        data = data.replace(b"\n.", b"\n..")
    parts = [head]
    if data[:1] == b".":
        parts.append(b".")
    parts.append(data)
    if data and not data.endswith(b"\n"):
        parts.append(b"\r\n")
    parts.append(TERMINATOR)
    return b"".join(parts)
