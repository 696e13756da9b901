"""Stored message bytes -> POP3 multi-line body: CRLF line ends and dot-stuffing.

Written for mailsuite (twisted.mail.pop3 stuffs each 16 KiB chunk on its own, so a line
``.`` straddling a chunk boundary ends the response early and the rest of the message is
read as server replies; see research/twisted-mail.md 3.1).  Here the state that crosses a
chunk boundary is kept explicitly: whether the next byte starts a line, and a CR held back
when it is the last byte of a chunk (it may be the first half of a CRLF).

RFC 1939 section 3: every line is terminated by CRLF; a line starting with "." is sent with
one more "."; the response ends with ".CRLF" on a line of its own.
"""

from __future__ import annotations

TERMINATOR = b".\r\n"


class DotStuffer:
    """Feed stored bytes in chunks of any size; get wire bytes back.  ``finish()`` returns
    the tail including the terminating ``.CRLF`` (and a CRLF first if the message did not
    end with a line end)."""

    __slots__ = ("_at_line_start", "_held_cr")

    def __init__(self) -> None:
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
        # LF and CRLF -> CRLF (a bare CR stays as it is; index.crlf_size counts the same way)
        if b"\r\n" in data:
            data = data.replace(b"\r\n", b"\n")
        data = data.replace(b"\n", b"\r\n")
        data = data.replace(b"\n.", b"\n..")
        if self._at_line_start and data[:1] == b".":
            data = b"." + data
        self._at_line_start = data.endswith(b"\n")
        return data

    def finish(self) -> bytes:
        tail = b""
        if self._held_cr:
            self._held_cr = False
            # a final bare CR: the message ends mid-line, "\r" itself is content
            tail = b"\r"
            self._at_line_start = False
        if not self._at_line_start:
            tail += b"\r\n"
        return tail + TERMINATOR


def stuff_all(data: bytes) -> bytes:
    """The whole multi-line body for ``data`` in one piece (small messages)."""
    s = DotStuffer()
    return s.feed(data) + s.finish()

