"""8-bit to 7-bit conversion of a stored message, for a server without 8BITMIME (RFC 6152 3).

Our own code: the stdlib ``email`` package would read the whole message into memory and
re-serialise every header. This streams the file twice with bounded memory (lines are read in
pieces of at most :data:`PIECE` octets; header blocks may not exceed :data:`MAX_HEADER_BLOCK`):

1. a scan walks the MIME structure (multipart boundaries, message/rfc822 parts) and notes, for
   each leaf part, whether its body has 8-bit octets and whether those are valid UTF-8;
2. a write pass copies everything, except that each 8-bit leaf is re-encoded (RFC 2045 6.7
   quoted-printable for text/*, base64 for anything else, with its Content-Transfer-Encoding
   replaced), and "8bit"/"binary" labels on parts that are 7-bit after all become "7bit".

What cannot be converted raises :class:`NotConvertible` (the caller bounces with 5.6.3 as
before): raw 8-bit octets in any header (RFC 6152 leaves no way to encode them without
rewriting the header, which would also break signatures), 8-bit text in a multipart preamble
or epilogue, 8-bit octets inside a part already labelled quoted-printable or base64, or an
unknown transfer encoding. A converted message no longer matches a DKIM body hash made before;
that is the price RFC 6152 accepts over returning the message.
"""

from __future__ import annotations

import codecs
import email.parser
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["MAX_HEADER_BLOCK", "PIECE", "NotConvertible", "downgrade_file"]

#: Read lines in pieces of at most this many octets (a longer line is handled piecewise).
PIECE = 64 * 1024
#: The largest header block of the message or of one part.
MAX_HEADER_BLOCK = 1024 * 1024

_QP_LINE = 75  # encoded characters before a soft line break "=" (76 with it, RFC 2045 6.7)
_B64_LINE = 57  # input octets per 76-character base64 line


class NotConvertible(Exception):
    """The message is 8-bit in a place no content transfer encoding can fix."""


@dataclass
class _Leaf:
    """What the scan learnt about one leaf part's body."""

    eight_bit: bool = False
    utf8: bool = True
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")())

    def feed(self, data: bytes) -> None:
        if data.isascii():
            return
        self.eight_bit = True
        if self.utf8:
            try:
                self.decoder.decode(data)
            except UnicodeDecodeError:
                self.utf8 = False

    def end(self) -> None:
        if self.eight_bit and self.utf8:
            try:
                self.decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                self.utf8 = False


class _QuotedPrintable:
    """RFC 2045 6.7, line by line: literal printable ASCII, ``=XX`` for the rest, trailing
    white space encoded, soft breaks to keep lines within 76 characters."""

    def __init__(self) -> None:
        self.col = 0
        self.space = b""  # white space not yet known to be trailing

    def _token(self, byte: int, out: bytearray) -> None:
        token = bytes((byte,)) if 33 <= byte <= 126 and byte != 61 else b"=%02X" % byte
        if self.col + len(token) > _QP_LINE:
            out += b"=\n"
            self.col = 0
        if self.col == 0 and token == b"-":
            token = b"=2D"  # a continuation line never starts like a boundary ("--")
        out += token
        self.col += len(token)

    def _literal_space(self, out: bytearray) -> None:
        for byte in self.space:
            if self.col + 1 > _QP_LINE:
                out += b"=\n"
                self.col = 0
            out.append(byte)
            self.col += 1
        self.space = b""

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        for byte in data:
            if byte in (32, 9):
                self.space += bytes((byte,))
                continue
            if self.space:
                self._literal_space(out)
            self._token(byte, out)
        return bytes(out)

    def end_line(self, hard_break: bool) -> bytes:
        out = bytearray()
        for byte in self.space:  # trailing white space must be encoded (6.7 rule 3)
            self._token(byte, out)
        self.space = b""
        if hard_break:
            out += b"\n"
        self.col = 0
        return bytes(out)


class _Base64:
    """The body's canonical form (line ends as CRLF) in base64, 76 characters a line. The line
    end before a boundary belongs to the boundary (RFC 2046 5.1.1), so each one is held back
    until more content follows."""

    def __init__(self) -> None:
        self.buf = b""
        self.eol_pending = False

    def _lines(self, final: bool) -> bytes:
        import base64

        cut = len(self.buf) if final else len(self.buf) - len(self.buf) % _B64_LINE
        chunk, self.buf = self.buf[:cut], self.buf[cut:]
        return b"".join(
            base64.b64encode(chunk[i : i + _B64_LINE]) + b"\n"
            for i in range(0, len(chunk), _B64_LINE)
        )

    def feed(self, data: bytes) -> bytes:
        if self.eol_pending:
            self.buf += b"\r\n"
            self.eol_pending = False
        self.buf += data
        return self._lines(final=False)

    def end_line(self, hard_break: bool) -> bytes:
        if hard_break:
            if self.eol_pending:
                self.buf += b"\r\n"
            self.eol_pending = True
        return self._lines(final=False)

    def finish(self, keep_last_eol: bool) -> bytes:
        if self.eol_pending and keep_last_eol:
            self.buf += b"\r\n"
        self.eol_pending = False
        return self._lines(final=True)


def _split_eol(piece: bytes) -> tuple[bytes, bytes]:
    if piece.endswith(b"\r\n"):
        return piece[:-2], b"\r\n"
    if piece.endswith(b"\n"):
        return piece[:-1], b"\n"
    return piece, b""


@dataclass
class _Frame:
    """An open multipart: its boundary and the default type of its parts."""

    boundary: bytes
    child_default: str


class _Walker:
    """One pass over the message. ``plan`` None = scan (learn the leaves); otherwise write."""

    def __init__(self, plan: list[_Leaf] | None, out: BinaryIO | None) -> None:
        self.plan = plan
        self.out = out
        self.leaves: list[_Leaf] = []
        self.frames: list[_Frame] = []
        self.state = "headers"  # headers | body | text (preamble/epilogue)
        self.header: list[bytes] = []
        self.header_size = 0
        self.default = "text/plain"
        self.top = True
        self.leaf: _Leaf | None = None
        self.encoder: _QuotedPrintable | _Base64 | None = None
        self.at_line_start = True
        self.needs_conversion = plan is not None and any(leaf.eight_bit for leaf in plan)

    def write(self, data: bytes) -> None:
        if self.out is not None and data:
            self.out.write(data)

    # -- driving

    def run(self, f: BinaryIO) -> None:
        while piece := f.readline(PIECE):
            complete = piece.endswith(b"\n")
            if self.at_line_start and complete and self._boundary(piece):
                self.at_line_start = True
                continue
            self._piece(piece, self.at_line_start, complete)
            self.at_line_start = complete
        self._end_entity(at_eof=True)

    def _boundary(self, line: bytes) -> bool:
        if not self.frames or not line.startswith(b"--"):
            return False
        stripped = line.rstrip(b" \t\r\n")
        for depth in range(len(self.frames) - 1, -1, -1):
            b = self.frames[depth].boundary
            if stripped in (b"--" + b, b"--" + b + b"--"):
                self._end_entity(at_eof=False)
                del self.frames[depth + 1 :]
                self.write(line)
                if stripped.endswith(b"--") and stripped != b"--" + b:
                    self.frames.pop()
                    self.state = "text"
                else:
                    self._start_entity(self.frames[depth].child_default, top=False)
                return True
        return False

    def _start_entity(self, default: str, top: bool) -> None:
        self.state = "headers"
        self.header = []
        self.header_size = 0
        self.default = default
        self.top = top

    def _piece(self, piece: bytes, line_start: bool, complete: bool) -> None:
        if self.state == "headers":
            if line_start and complete and piece in (b"\n", b"\r\n"):
                self._headers_done(piece)
                return
            self.header_size += len(piece)
            if self.header_size > MAX_HEADER_BLOCK:
                raise NotConvertible(
                    f"a header block is larger than {MAX_HEADER_BLOCK // 1024} KiB"
                )
            self.header.append(piece)
            return
        if self.state == "text":
            if self.plan is None and not piece.isascii():
                raise NotConvertible("8-bit text in a multipart preamble or epilogue")
            self.write(piece)
            return
        # a leaf body
        if self.plan is None:
            assert self.leaf is not None
            self.leaf.feed(piece)
            return
        if self.encoder is None:
            self.write(piece)
            return
        content, _eol = _split_eol(piece) if complete else (piece, b"")
        self.write(self.encoder.feed(content))
        if complete:
            self.write(self.encoder.end_line(hard_break=True))

    def _end_entity(self, at_eof: bool) -> None:
        if self.state == "headers" and (self.header or at_eof):
            self._headers_done(b"")
        if self.state == "body":
            if self.leaf is not None:
                self.leaf.end()
            if isinstance(self.encoder, _QuotedPrintable):
                self.write(self.encoder.end_line(hard_break=False))
            elif isinstance(self.encoder, _Base64):
                # The last line end is the body's own only at the end of the message itself.
                self.write(self.encoder.finish(keep_last_eol=at_eof and not self.frames))
            self.encoder = None
            self.leaf = None

    # -- one entity's header block

    def _headers_done(self, blank: bytes) -> None:
        raw = b"".join(self.header)
        if not raw.isascii():
            where = "the message header" if self.top else "a MIME part header"
            raise NotConvertible(f"8-bit octets in {where} (only SMTPUTF8 could carry them)")
        fields = email.parser.BytesHeaderParser().parsebytes(raw + b"\n")
        has_type = fields.get("content-type") is not None
        ctype = fields.get_content_type() if has_type else self.default
        cte = str(fields.get("content-transfer-encoding", "")).strip().lower()
        eol = blank or (b"\r\n" if self.header and self.header[-1].endswith(b"\r\n") else b"\n")
        boundary = fields.get_param("boundary") if has_type else None
        top = self.top
        lines = self.header
        extra: list[bytes] = []

        if ctype.startswith("multipart/") and isinstance(boundary, str) and boundary:
            lines = self._relabel(lines, cte)
            self.frames.append(
                _Frame(
                    boundary.encode("ascii", "replace"),
                    "message/rfc822" if ctype == "multipart/digest" else "text/plain",
                )
            )
            next_state, leaf_mode = "text", None
        elif ctype == "message/rfc822" and cte in ("", "7bit", "8bit", "binary"):
            lines = self._relabel(lines, cte)
            next_state, leaf_mode = "nested", None
        else:
            next_state = "body"
            index = len(self.leaves)
            if self.plan is None:
                self.leaf = _Leaf()
                self.leaves.append(self.leaf)
                leaf_mode = None
            else:
                info = self.plan[index]
                self.leaves.append(info)
                if cte in ("quoted-printable", "base64"):
                    if info.eight_bit:
                        raise NotConvertible(f"8-bit octets in a part labelled {cte}")
                    leaf_mode = None
                elif not info.eight_bit:
                    lines = self._relabel(lines, cte)
                    leaf_mode = None
                elif cte not in ("", "7bit", "8bit", "binary"):
                    raise NotConvertible(f"8-bit part in the unknown transfer encoding {cte!r}")
                else:
                    leaf_mode = "qp" if ctype.startswith("text/") else "base64"
                    lines = [ln for ln in _fields_without(lines, "content-transfer-encoding")]
                    if not has_type and top:
                        charset = "utf-8" if info.utf8 else "unknown-8bit"
                        extra.append(f"Content-Type: text/plain; charset={charset}".encode())
                    encoding = "quoted-printable" if leaf_mode == "qp" else "base64"
                    extra.append(f"Content-Transfer-Encoding: {encoding}".encode())
        if top and self.needs_conversion and fields.get("mime-version") is None:
            extra.insert(0, b"MIME-Version: 1.0")
        if self.plan is not None:
            self.write(b"".join(lines) + b"".join(x + eol for x in extra) + blank)
        self.header = []
        if next_state == "nested":
            self._start_entity("text/plain", top=False)
            if not blank:  # a message/rfc822 part with no body at all
                self.state = "text"
            return
        self.state = next_state if blank else "text"
        if next_state == "body" and self.plan is not None and leaf_mode is not None:
            self.encoder = _QuotedPrintable() if leaf_mode == "qp" else _Base64()

    @staticmethod
    def _relabel(lines: list[bytes], cte: str) -> list[bytes]:
        """ "8bit"/"binary" is no longer true once the content is 7-bit: say "7bit"."""
        if cte not in ("8bit", "binary"):
            return lines
        out = []
        for name, block in _fields(lines):
            if name == "content-transfer-encoding":
                eol = b"\r\n" if block[-1].endswith(b"\r\n") else b"\n"
                out.append(b"Content-Transfer-Encoding: 7bit" + eol)
            else:
                out.extend(block)
        return out


def _fields(lines: list[bytes]) -> list[tuple[str, list[bytes]]]:
    """Header lines grouped into fields (a field and its folded continuation lines)."""
    out: list[tuple[str, list[bytes]]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and out:
            out[-1][1].append(line)
            continue
        name = line.split(b":", 1)[0].strip().lower().decode("ascii", "replace")
        out.append((name, [line]))
    return out


def _fields_without(lines: list[bytes], name: str) -> list[bytes]:
    return [ln for n, block in _fields(lines) if n != name for ln in block]


def downgrade_file(src: str | os.PathLike[str], scratch_dir: str | os.PathLike[str]) -> Path:
    """Blocking. Write a 7-bit copy of ``src`` into ``scratch_dir`` and return its path (the
    caller removes it). Raises :class:`NotConvertible`; nothing is left behind then."""
    with Path(src).open("rb") as f:
        scan = _Walker(None, None)
        scan.run(f)
    dst = Path(scratch_dir) / f"7bit-{secrets.token_hex(8)}.msg"
    try:
        with Path(src).open("rb") as f, Path(dst).open("xb") as out:
            _Walker(scan.leaves, out).run(f)
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    return dst
