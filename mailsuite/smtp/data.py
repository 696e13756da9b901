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
    def header_bytes(self) -> bytes:
        """The stored header section seen so far (bounded), without the blank line."""
        return bytes(self._headers)

    # -- internals -------------------------------------------------------------------------

    def _plain(self, chunk: bytes) -> bytes:
        """Part of a line with no line end in it: stored as is (bare CRs normalised)."""
        if b"\r" in chunk:
            self.bare_line_end = True
            chunk = chunk.replace(b"\r", b"\n")
        self._account(chunk)
        return chunk

    def _region(self, region: bytes) -> tuple[bytes, bytes | None]:
        """Decode complete lines (``region`` ends with LF)."""
        # Where could the terminator be?  Prefix the context so that a first line "." is a
        # terminator only when the previous line ended with a real CRLF.
        if self._mid_line:
            prefix = b""
        elif self._last_crlf:
            prefix = b"\r\n"
        else:
            prefix = b"\n"
        probe = prefix + region
        end = probe.find(b"\r\n.\r\n")
        rest: bytes | None = None
        if end >= 0:
            body_end = end + 2 - len(prefix)  # keep the CRLF that ends the last body line
            rest = probe[end + 5 :]
            region = region[: max(body_end, 0)]
        out = self._decode_lines(region) if region else b""
        return out, rest

    def _decode_lines(self, region: bytes) -> bytes:
        n_lf = region.count(b"\n")
        n_crlf = region.count(b"\r\n")
        if n_lf == n_crlf and region.count(b"\r") == n_crlf:
            # Fast path: clean CRLF text.
            text = region.replace(b"\r\n", b"\n")
            if self._mid_line:
                head, sep, tail = text.partition(b"\n")
                text = head + sep + (b"\n" + tail).replace(b"\n..", b"\n.")[1:]
            else:
                text = (b"\n" + text).replace(b"\n..", b"\n.")[1:]
            if (
                not self.line_too_long
                and len(text) > self.max_line
                and max(map(len, text.split(b"\n"))) > self.max_line
            ):
                self.line_too_long = True
            self._mid_line = False
            self._last_crlf = True
            self._account(text)
            return text
        return self._slow(region)

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
