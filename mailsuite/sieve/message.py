"""The message as a Sieve script sees it: header fields, addresses, body parts, size.

Headers are read once, up to the blank line, and kept as raw unfolded values; the decoded
form (RFC 2047 encoded-words, RFC 5228 5.7: header comparisons are on decoded text) is made
on demand.  The body is read only when a ``body`` test asks (RFC 5173), at most
:data:`MAX_BODY` bytes of it, and parsed with the stdlib ``email`` package.  Blocking file
I/O: it runs in the delivery's thread like the rest of the interpreter.
"""

from __future__ import annotations

import email
import email.policy
import io
import re
from collections.abc import Callable
from email.header import decode_header, make_header
from email.message import Message
from email.utils import getaddresses
from pathlib import Path

from mailsuite.sieve.match import casemap

#: Largest header section read (bigger ones are cut here; the message is still delivered).
MAX_HEADER = 1024 * 1024
#: Largest body the ``body`` test looks at.
MAX_BODY = 10 * 1024 * 1024


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")  # RFC 6532 header fields are UTF-8
    except UnicodeDecodeError:
        return raw.decode("latin-1")


#: what ``bytes.strip()`` strips (``str.strip()`` would strip other white space too)
_ASCII_SPACE = " \t\n\r\x0b\x0c"


def split_headers(head: bytes) -> list[tuple[str, str]]:
    """Header section -> [(lower-case name, unfolded value)] in order (RFC 5322 2.2.3:
    unfolding removes the line breaks, keeping the white space).

    A line that is not a field (no colon, white space in the name: a From_ line, garbage)
    is skipped.  A section that is UTF-8 as a whole (nearly all: RFC 6532, or ASCII) is
    decoded once and split as text; else each line is decoded on its own, falling back to
    Latin-1 (:func:`split_header_lines`).  Both give the same fields for the same bytes
    (tests/property/test_sieve_fast_match.py)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return split_header_lines(head)
    fields: list[tuple[str, str]] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line:
            continue
        first = line[0]
        if first == " " or first == "\t":
            if fields:
                last_name, last_value = fields[-1]
                fields[-1] = (last_name, last_value + line)
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip(_ASCII_SPACE):
            continue
        fields.append((name.lower(), value.lstrip(" \t")))
    return [(n, v.rstrip(" \t")) for n, v in fields]


def split_header_lines(head: bytes) -> list[tuple[str, str]]:
    """:func:`split_headers` line by line, each line UTF-8 or else Latin-1."""
    fields: list[tuple[str, str]] = []
    for line in head.replace(b"\r\n", b"\n").split(b"\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            if fields:
                last_name, last_value = fields[-1]
                fields[-1] = (last_name, last_value + _text(line))
            continue
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            continue  # not a header field (a From_ line, garbage): skipped
        fields.append((_text(name).lower(), _text(value).lstrip(" \t")))
    return [(n, v.rstrip(" \t")) for n, v in fields]


def decode_words(value: str) -> str:
    """RFC 2047 encoded-words to text; a value that does not decode is used as it is."""
    if "=?" not in value:
        return value
    try:
        return str(make_header(decode_header(value)))
    except (ValueError, LookupError, UnicodeError, AssertionError):
        return value


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ADDR_SPEC = rf"{_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
#: one list member in its plainest forms: ``addr-spec`` or ``[words] <addr-spec>`` (words of
#: atext only: no dots, quotes, comments, groups or encoded text, which take getaddresses)
_SIMPLE_MAILBOX = re.compile(
    rf"[ \t]*(?:(?:{_ATEXT}(?:[ \t]+{_ATEXT})*)?[ \t]*<({_ADDR_SPEC})>|({_ADDR_SPEC}))[ \t]*"
)


def parse_addresses(values: list[str]) -> list[str]:
    """The addr-specs in address header values, display names and groups dropped: exactly
    ``[a for _, a in email.utils.getaddresses(values) if a]``.

    That parser costs tens of microseconds a field, and nearly every address field is a
    list of plain ``a@b`` or ``Name <a@b>``: those are read with one regular expression per
    member; anything else (quotes, comments, groups, dots in a name, other characters) in
    any value takes getaddresses for all of them, as before.  A property test holds the two
    equal (tests/property/test_sieve_fast_match.py)."""
    out: list[str] = []
    for value in values:
        for member in value.split(","):
            m = _SIMPLE_MAILBOX.fullmatch(member)
            if m is None:
                if member.strip(" \t"):
                    return [a for _, a in getaddresses(values) if a]
                continue  # an empty member: getaddresses gives ("", ""), dropped
            out.append(m.group(1) or m.group(2))
    return out


def address_part(address: str, part: str) -> str | None:
    """RFC 5228 2.7.4 / RFC 5233: one part of an address; None when ``:detail`` has no
    separator (then it does not match, RFC 5233 4)."""
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    if part == "all":
        return address
    if part == "localpart":
        return local
    if part == "domain":
        return domain
    user, plus, detail = local.partition("+")
    if part == "user":
        return user
    return detail if plus else None


class MessageView:
    """Read-only access for tests; build it with :meth:`from_file` or :meth:`from_bytes`."""

    def __init__(
        self, fields: list[tuple[str, str]], size: int, body_source: Callable[[], bytes]
    ) -> None:
        self.fields = fields
        self.size = size
        self._body_source = body_source
        self._parsed: Message | None = None
        self._raw_body: bytes | None = None
        self._by_name: dict[str, list[str]] | None = None
        self._decoded: dict[str, list[str]] = {}
        self._addresses: dict[tuple[str, ...], list[str]] = {}
        #: what the interpreter's precompiled tests read, by test shape (see
        #: :mod:`mailsuite.sieve.fastpath`): one message, many rules asking the same thing
        self.memo: dict[tuple[object, ...], list[str]] = {}

    @classmethod
    def from_bytes(cls, data: bytes) -> MessageView:
        head, body = _split(data)
        size = len(data) + data.count(b"\n") - data.count(b"\r\n")
        return cls(split_headers(head), size, lambda: body[:MAX_BODY])

    @classmethod
    def from_buffer(cls, data: bytes, offset: int = 0, size: int | None = None) -> MessageView:
        """:meth:`from_file` for a file whose bytes the caller still has (delivery keeps a
        small message in memory): the same view, no file read."""
        head = _head_in(data, offset)
        if head is None:  # no empty line in the first chunk: read it the file's way
            f = io.BytesIO(data)  # shares ``data``: no copy
            f.seek(offset)
            head = _read_head(f)
        body_at = offset + len(head)
        if size is None:
            size = max(len(data) - offset, 0)
        return cls(split_headers(head), size, lambda: data[body_at : body_at + MAX_BODY])

    @classmethod
    def from_file(cls, path: Path, offset: int = 0, size: int | None = None) -> MessageView:
        """``path[offset:]`` is the message; ``size`` its RFC 5322 (CRLF) size when the
        caller knows it (delivery records it), else the file's size is used."""
        with path.open("rb") as f:
            f.seek(offset)
            head = _read_head(f)
            body_at = offset + len(head)
        if size is None:
            size = max(path.stat().st_size - offset, 0)
        fields = split_headers(head)

        def body() -> bytes:
            with path.open("rb") as f:
                f.seek(body_at)
                return f.read(MAX_BODY)

        return cls(fields, size, body)

    # -- headers -------------------------------------------------------------------------------

    def raw(self, name: str) -> list[str]:
        if self._by_name is None:
            by_name: dict[str, list[str]] = {}
            for n, v in self.fields:
                by_name.setdefault(n, []).append(v)
            self._by_name = by_name
        return self._by_name.get(name.lower(), [])

    def names(self) -> dict[str, list[str]]:
        """The raw values by lower-case field name (every field of the header section)."""
        if self._by_name is None:
            self.raw("")
        assert self._by_name is not None
        return self._by_name

    def header(self, name: str) -> list[str]:
        key = name.lower()
        decoded = self._decoded.get(key)
        if decoded is None:
            decoded = self._decoded[key] = [decode_words(v) for v in self.raw(key)]
        return decoded

    def folded(self, name: str) -> list[str]:
        """:meth:`header` with i;ascii-casemap applied (remembered per message)."""
        key = "\0" + name.lower()
        found = self._decoded.get(key)
        if found is None:
            found = self._decoded[key] = [casemap(v) for v in self.header(name)]
        return found

    def address_parts(self, name: str, part: str, fold: bool) -> list[str]:
        """One part (``all``, ``localpart``, ``domain``, ``user``, ``detail``) of every address
        in the ``name`` fields, folded with i;ascii-casemap when ``fold`` (remembered)."""
        key = f"\1{name.lower()}\0{part}\0{fold:d}"
        found = self._decoded.get(key)
        if found is None:
            found = []
            for addr in self.addresses(self.raw(name)):
                value = address_part(addr, part)
                if value is not None:
                    found.append(casemap(value) if fold else value)
            self._decoded[key] = found
        return found

    def exists(self, name: str) -> bool:
        return bool(self.raw(name))

    def addresses(self, values: list[str]) -> list[str]:
        """The addr-specs in address header values (display names and groups dropped);
        remembered, since a script tests the same headers again and again."""
        key = tuple(values)
        found = self._addresses.get(key)
        if found is None:
            found = self._addresses[key] = parse_addresses(values)
        return found

    # -- body ----------------------------------------------------------------------------------

    def raw_body(self) -> bytes:
        if self._raw_body is None:
            data = self._body_source()
            self._raw_body = (
                data[2:]
                if data.startswith(b"\r\n")
                else (data[1:] if data.startswith(b"\n") else data)
            )
        return self._raw_body

    def parsed(self) -> Message:
        if self._parsed is None:
            head = "".join(
                f"{n}: {v}\n"
                for n, v in self.fields
                if n in ("content-type", "content-transfer-encoding", "mime-version")
            )
            self._parsed = email.message_from_bytes(
                head.encode("utf-8", "replace") + b"\n" + self.raw_body(),
                policy=email.policy.compat32,
            )
        return self._parsed

    def body_texts(self, types: list[str] | None) -> list[str]:
        """RFC 5173 5.2 ``:content``: the decoded text of the parts whose type matches one
        of ``types`` (``"text"`` matches any text/ subtype, ``""`` every part); ``None``
        means ``:raw``."""
        if types is None:
            return [_text(self.raw_body())]
        wanted = [t.lower() for t in types]
        out: list[str] = []
        for part in self.parsed().walk():
            ctype = part.get_content_type().lower()
            main = ctype.split("/", 1)[0]
            if not any(w == "" or w == ctype or ("/" not in w and w == main) for w in wanted):
                continue
            if part.is_multipart():
                # a multipart's own text is its prologue and epilogue (RFC 5173 5.2)
                extra = (part.preamble or "") + (part.epilogue or "")
                if extra:
                    out.append(extra)
                continue
            payload = part.get_payload(decode=True)
            if not isinstance(payload, bytes):
                continue
            charset = part.get_content_charset() or "us-ascii"
            try:
                out.append(payload.decode(charset, "replace"))
            except LookupError:
                out.append(payload.decode("utf-8", "replace"))
        return out


def _split(data: bytes) -> tuple[bytes, bytes]:
    for sep in (b"\r\n\r\n", b"\n\n"):
        at = data.find(sep)
        if at >= 0:
            return data[: at + len(sep) // 2], data[at + len(sep) // 2 :]
    if data.startswith((b"\r\n", b"\n")):
        return b"", data
    return data, b""


#: what :func:`_read_head` reads first: most header sections fit, in one system call
_HEAD_CHUNK = 16 * 1024


def _head_in(data: bytes, offset: int) -> bytes | None:
    """:func:`_read_head` of ``data[offset:]`` when its first chunk holds the empty line that
    ends the header section (nearly always), found in place: no chunk copied twice.  None
    when it does not (then the caller reads it as :func:`_read_head` does)."""
    if data[offset : offset + 1] == b"\n" or data[offset : offset + 2] == b"\r\n":
        return b""  # an empty first line: no header section
    limit = offset + _HEAD_CHUNK
    # "\n\n" / "\n\r\n" ending within the chunk, as _read_head's search of it finds them
    lf, crlf = data.find(b"\n\n", offset, limit), data.find(b"\n\r\n", offset, limit)
    if lf >= 0 or crlf >= 0:
        end = min(lf, crlf) if lf >= 0 and crlf >= 0 else max(lf, crlf)
        return data[offset : end + 1]
    if len(data) - offset < _HEAD_CHUNK:
        return data[offset:][:MAX_HEADER]  # the whole rest is header (no empty line)
    return None


def _read_head(f: object) -> bytes:
    """Lines up to and including the first empty one (or MAX_HEADER bytes)."""
    start = f.tell()  # type: ignore[attr-defined]
    chunk: bytes = f.read(_HEAD_CHUNK)  # type: ignore[attr-defined]
    padded = b"\n" + chunk  # so that an empty first line ends it too
    ends = [at for at in (padded.find(b"\n\r\n"), padded.find(b"\n\n")) if at >= 0]
    if ends:
        return chunk[: min(ends)]
    if len(chunk) < _HEAD_CHUNK:
        return chunk[:MAX_HEADER]  # the whole file is header (no empty line)
    f.seek(start)  # type: ignore[attr-defined]
    lines: list[bytes] = []
    total = 0
    while total < MAX_HEADER:
        line = f.readline(MAX_HEADER - total)  # type: ignore[attr-defined]
        if not line:
            break
        if line in (b"\n", b"\r\n"):
            break
        lines.append(line)
        total += len(line)
    return b"".join(lines)
