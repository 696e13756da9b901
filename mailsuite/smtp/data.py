"""Decode the DATA stream of an SMTP transaction into stored (LF) message bytes.

Pure and incremental: feed it the bytes as they arrive, in any chunking, and it returns the
bytes to store and tells when the end of data was seen.  Rules (RFC 5321 4.1.1.4, 4.5.2):

* the data ends only at ``CRLF . CRLF`` (or ``. CRLF`` as the very first line).  A ``.`` line
  reached by a bare LF or a bare CR never ends it, so ``\\n.\\n``, ``\\r.\\n``, ``\\n.\\r\\n`` can
  not split one message into two (SMTP smuggling, CVE-2023-51764 class);
* one leading dot is removed from every line that starts with a dot (transparency);
* line ends are stored as LF (the Maildir convention); a bare CR or bare LF is normalised to
  a line end as well, so what we store or relay is never ambiguous;
* lines longer than ``max_line`` octets are noted (the server refuses the message at the end,
  RFC 5321 4.5.3.1.6) without being buffered: memory stays bounded whatever the input.

The common case (clean CRLF text) is handled with a few ``bytes`` operations per chunk rather
than a Python loop per line, which is what lets a 1 MiB message be accepted at disk speed.
"""

from __future__ import annotations

MAX_HEADER_CAPTURE = 256 * 1024


class DataReader:
    """Incremental DATA decoder; see the module docstring for the rules."""

    def __init__(self, max_line: int = 998) -> None:
        self.max_line = max_line
        self._carry = b""  # an incomplete line (never contains LF)
        self._last_crlf = True  # did the last complete line end with CRLF? (start counts)
        self._mid_line = False  # is _carry the continuation of a flushed long line?
        self.done = False
        self.size = 0  # stored bytes so far
        self.newlines = 0  # LF bytes in what was stored so far
        self.line_too_long = False
        self.bare_line_end = False  # a bare CR or LF was seen (and normalised)
        self.eight_bit = False
        self._headers = bytearray()
        self.headers_complete = False

    # -- public ----------------------------------------------------------------------------

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        """Decode ``data``; returns (bytes to store, rest).  ``rest`` is None while the data
        continues, else the bytes after the terminating ``.CRLF`` (pipelined commands)."""
        if self.done:
            return b"", data
        buf = self._carry + data
        cut = buf.rfind(b"\n")
        if cut < 0:
            if len(buf) > self.max_line + 2:
                # A long line with no end yet: flush all but the last byte (it may be the CR
                # of the CRLF that precedes a terminator).
                self.line_too_long = True
                out = self._plain(buf[:-1])
                self._carry = buf[-1:]
                self._mid_line = True
                return out, None
            self._carry = buf
            return b"", None
        region, self._carry = buf[: cut + 1], buf[cut + 1 :]
        out, rest = self._region(region)
        if rest is not None:
            self.done = True
            rest = rest + self._carry
            self._carry = b""
            return out, rest
        if len(self._carry) > self.max_line + 2:
            self.line_too_long = True
            out += self._plain(self._carry[:-1])
            self._carry = self._carry[-1:]
            self._mid_line = True
        return out, None

    @property
    def wire_size(self) -> int:
        """The message size as RFC 1870 section 4 defines it, the count ``SIZE`` limits: the
        octets "including CR-LF pairs, but not the SMTP DATA command's terminating dot or
        doubled quoting dots".  Every stored LF was a line end that travels as CRLF, so this
        is the stored size plus one octet per line (bare CR/LF count as the CRLF they became,
        the same count the SMTP client declares when the message is relayed on)."""
        return self.size + self.newlines

    @property
    def header_bytes(self) -> bytes:
        """The stored header section seen so far (bounded), without the blank line."""
        return bytes(self._headers)

    # -- internals -------------------------------------------------------------------------

    def _plain(self, chunk: bytes) -> bytes:
        """Part of a line with no line end in it: stored as is (bare CRs normalised)."""
        if b"\r" in chunk:
            self.bare_line_end = True
            chunk = chunk.replace(b"\r", b"\n")
            self.newlines += chunk.count(b"\n")
        self._account(chunk)
        return chunk

    def _region(self, region: bytes) -> tuple[bytes, bytes | None]:
        """Decode complete lines (``region`` ends with LF)."""
        # Where could the terminator be?  Prefix the context so that a first line "." is a
        # terminator only when the previous line ended with a real CRLF.
        # Only a real CRLF before the "." line ends the data: at the start of the region that
        # is the previous line's end (a flushed long line or a bare LF never counts).
        if not self._mid_line and self._last_crlf and region.startswith(b".\r\n"):
            end = -2
        else:
            end = region.find(b"\r\n.\r\n")
        rest: bytes | None = None
        if end != -1:
            rest = region[end + 5 :]
            region = region[: end + 2]  # keep the CRLF that ends the last body line
        out = self._decode_lines(region) if region else b""
        return out, rest

    def _decode_lines(self, region: bytes) -> bytes:
        text = region.replace(b"\r\n", b"\n")
        n_lf = text.count(b"\n")
        if len(region) - len(text) == n_lf and b"\r" not in text:
            # Fast path: clean CRLF text (every LF came with its CR, no other CR).
            if not self._mid_line and text.startswith(b".."):
                text = text[1:]
            if b"\n.." in text:
                text = text.replace(b"\n..", b"\n.")
            if not self.line_too_long and len(text) > self.max_line and self._has_long_line(text):
                self.line_too_long = True
            self._mid_line = False
            self._last_crlf = True
            self.newlines += n_lf
            self._account(text)
            return text
        return self._slow(region)

    def _has_long_line(self, text: bytes) -> bool:
        """Is a line of ``text`` (which ends with LF) longer than ``max_line``?  Jumps from
        the last LF of each window of ``max_line + 1`` bytes to the next: about one step per
        ``max_line`` bytes instead of one object per line."""
        limit = self.max_line + 1
        pos, n = 0, len(text)
        while n - pos > self.max_line:
            nl = text.rfind(b"\n", pos, pos + limit)
            if nl < 0:
                return True
            pos = nl + 1
        return False

    def _slow(self, region: bytes) -> bytes:
        """Line by line, for input with bare CR or LF."""
        out = []
        lines = region.split(b"\n")
        lines.pop()  # region ends with LF: the last element is empty
        for i, line in enumerate(lines):
            crlf = line.endswith(b"\r")
            if crlf:
                line = line[:-1]
            else:
                self.bare_line_end = True
            first_continues = i == 0 and self._mid_line
            if not first_continues and line.startswith(b"."):
                line = line[1:]
            if b"\r" in line:
                self.bare_line_end = True
                line = line.replace(b"\r", b"\n")
            if len(line) > self.max_line:
                self.line_too_long = True
            out.append(line)
            self._last_crlf = crlf
        self._mid_line = False
        text = b"\n".join(out) + b"\n"
        self.newlines += text.count(b"\n")
        self._account(text)
        return text

    def _account(self, text: bytes) -> None:
        self.size += len(text)
        if not self.eight_bit and not text.isascii():
            self.eight_bit = True
        if not self.headers_complete:
            start = len(self._headers)
            self._headers += text
            pos = self._headers.find(b"\n\n", max(start - 1, 0))
            if self._headers.startswith(b"\n"):
                pos = 0
            if pos >= 0:
                del self._headers[pos:]
                self.headers_complete = True
            elif len(self._headers) > MAX_HEADER_CAPTURE:
                del self._headers[MAX_HEADER_CAPTURE:]
                self.headers_complete = True
