"""Message structure for IMAP FETCH: ENVELOPE, BODYSTRUCTURE, BODY[section] (RFC 3501 7.4.2).

Our own light MIME splitter (no Twisted, no ``email`` tree): it records byte offsets into the
stored message, so sections are slices and nothing is re-serialised. Messages are stored with LF
line endings; every function that returns wire bytes converts to CRLF (``to_crlf``), and every
size is the size of that CRLF form. Nothing here raises on malformed mail: garbage in gives a
best-effort structure. ``envelope`` reads only the header.
"""

from __future__ import annotations

import base64
import binascii
import quopri
import re
from collections.abc import Iterable
from dataclasses import dataclass

from mailsuite.imap.envelope import envelope_fields, envelope_from, latin1, nstring, trim

__all__ = [
    "ParsedMessage",
    "Section",
    "body_text",
    "bodystructure",
    "crlf_size",
    "decode_header_value",
    "envelope",
    "header_fields",
    "partial",
    "section",
    "split_header",
    "to_crlf",
]

_MAX_DEPTH = 40
_MAX_PARTS = 5000
_IDENTITY_CTE = frozenset({"", "7bit", "8bit", "binary"})
_CR_RUN = re.compile(rb"\r\n|\r|\n")


# -- line endings and slicing -----------------------------------------------------------------


def to_crlf(data: bytes) -> bytes:
    """LF (or stray CR, or CRLF) line ends -> CRLF, without doubling existing CRs.

    NUL, which an IMAP4rev1 literal may not carry, becomes 0x80 (as Dovecot does); the length
    is unchanged, so sizes stay exact."""
    if b"\x00" in data:
        data = data.replace(b"\x00", b"\x80")
    if b"\r" not in data:
        return data.replace(b"\n", b"\r\n")
    return _CR_RUN.sub(b"\r\n", data)


def _crlf_len(raw: bytes, start: int, end: int) -> int:
    if end <= start:
        return 0
    if raw.find(b"\r", start, end) < 0:
        return end - start + raw.count(b"\n", start, end)
    return len(to_crlf(raw[start:end]))


def crlf_size(raw: bytes) -> int:
    """RFC822.SIZE: the size of the message in its CRLF form."""
    return _crlf_len(raw, 0, len(raw))


def _lines(raw: bytes, start: int, end: int) -> int:
    if end <= start:
        return 0
    if raw.find(b"\r", start, end) < 0:
        n = raw.count(b"\n", start, end)
        return n if raw[end - 1] == 0x0A else n + 1
    data = to_crlf(raw[start:end])
    n = data.count(b"\n")
    return n if data.endswith(b"\n") else n + 1


def partial(data: bytes, origin: int, length: int | None) -> bytes:
    """``<origin.length>`` slice (RFC 3501 6.4.5): empty if the origin is past the end."""
    if origin >= len(data):
        return b""
    return data[origin:] if length is None else data[origin : origin + length]


# -- sections -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Section:
    """A BODY[...] section: part numbers, then HEADER / HEADER.FIELDS[.NOT] / TEXT / MIME / None."""

    part: tuple[int, ...] = ()
    kind: str | None = None
    fields: tuple[str, ...] = ()

    def render(self) -> str:
        """The section text for the response label, e.g. ``1.2.HEADER.FIELDS (FROM TO)``."""
        text = ".".join(str(p) for p in self.part)
        if self.kind:
            text = f"{text}.{self.kind}" if text else self.kind
        if self.fields:
            names = " ".join(_astring_text(f) for f in self.fields)
            text += f" ({names})"
        return text


def _astring_text(name: str) -> str:
    if name and all(c.isascii() and c.isprintable() and c not in ' (){%*"\\]' for c in name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- header parsing -------------------------------------------------------------------------


def split_header(raw: bytes, start: int = 0, end: int | None = None) -> tuple[int, int]:
    """Return ``(fields_end, body_start)``: the header fields are ``raw[start:fields_end]``, the
    header including its blank line is ``raw[start:body_start]``. Without a blank line both are
    ``end``."""
    if end is None:
        end = len(raw)
    if start >= end:
        return end, end
    if raw[start] == 0x0A:
        return start, start + 1
    if raw.startswith(b"\r\n", start):
        return start, start + 2
    i = raw.find(b"\n\n", start, end)
    j = raw.find(b"\n\r\n", start, end)
    if i < 0 and j < 0:
        return end, end
    if j >= 0 and (i < 0 or j < i):
        return j + 1, j + 3
    return i + 1, i + 2


_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")


class _Field:
    __slots__ = ("end", "lname", "start", "value")

    def __init__(self, lname: str, start: int, end: int, value: bytes) -> None:
        self.lname = lname  # lower-cased field name
        self.start = start  # raw offsets of the whole field, folding and final LF included
        self.end = end
        self.value = value  # unfolded value (CR/LF removed), leading whitespace kept


def _parse_fields(raw: bytes, start: int, end: int) -> list[_Field]:
    fields: list[_Field] = []
    pos = start
    cur: _Field | None = None
    parts: list[bytes] = []
    lines = raw[start:end].split(b"\n")  # one C-level pass instead of a find per line
    if lines[-1] == b"":
        lines.pop()  # the block ended with a line end
    last = len(lines) - 1
    for i, line in enumerate(lines):
        line_end = pos + len(line) + 1 if i < last or raw[end - 1] == 0x0A else end
        if line.endswith(b"\r"):
            line = line[:-1]
        if line[:1] in (b" ", b"\t"):
            if cur is not None:
                parts.append(line)
                cur.end = line_end
        else:
            if cur is not None:
                cur.value = b"".join(parts)
            cur = None
            colon = line.find(b":")
            if colon > 0:
                name = line[:colon].rstrip(b" \t")
                if _FIELD_NAME.fullmatch(name):
                    cur = _Field(name.decode("ascii").lower(), pos, line_end, b"")
                    parts = [line[colon + 1 :]]
                    fields.append(cur)
        pos = line_end
    if cur is not None:
        cur.value = b"".join(parts)
    return fields


def header_fields(header: bytes) -> list[tuple[str, bytes]]:
    """``[(lower-cased name, unfolded value)]`` for a header block (for SEARCH)."""
    fields_end, _ = split_header(header)
    return [(f.lname, f.value) for f in _parse_fields(header, 0, fields_end)]


def _first(fields: list[_Field], lname: str) -> bytes | None:
    for f in fields:
        if f.lname == lname:
            return f.value
    return None


def _envelope_from_fields(fields: list[_Field]) -> bytes:
    first: dict[str, bytes] = {}
    for f in reversed(fields):  # the first of each name wins (as _first)
        first[f.lname] = f.value
    return envelope_from(first)


# -- MIME structure -------------------------------------------------------------------------


def _params(text: str) -> list[tuple[str, str]]:
    """``; a=b; c="d e"`` -> ``[("a", "b"), ("c", "d e")]`` (lenient, RFC 2045 5.1)."""
    out: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t;":
            i += 1
        if i >= n:
            break
        j = i
        while j < n and text[j] not in "=;":
            j += 1
        name = text[i:j].strip()
        if j >= n or text[j] == ";":
            i = j  # attribute without a value: ignored
            continue
        j += 1
        while j < n and text[j] in " \t":
            j += 1
        if j < n and text[j] == '"':
            k = j + 1
            buf = []
            while k < n and text[k] != '"':
                if text[k] == "\\" and k + 1 < n:
                    k += 1
                buf.append(text[k])
                k += 1
            value = "".join(buf)
            i = k + 1
            while i < n and text[i] != ";":
                i += 1
        else:
            k = j
            while k < n and text[k] != ";":
                k += 1
            value = re.sub(r"\([^()]*\)", "", text[j:k]).strip()
            i = k
        if name and not any(c in name for c in ' \t"()'):
            out.append((name, value))
    return out


def _strip_comments(text: str) -> str:
    return re.sub(r"\([^()]*\)", "", text).strip()


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")


def _content_type(
    value: bytes | None, default: tuple[str, str]
) -> tuple[str, str, list[tuple[str, str]]]:
    if value is None:
        if default == ("text", "plain"):
            return "text", "plain", [("charset", "us-ascii")]
        return default[0], default[1], []
    text = value.decode("latin-1")
    head, _, rest = text.partition(";")
    mtype, slash, sub = _strip_comments(head).partition("/")
    mtype, sub = mtype.strip(), sub.strip()
    if not slash or not _TOKEN.match(mtype) or not _TOKEN.match(sub):
        # RFC 2045 5.2: an invalid Content-Type means the default.
        return "text", "plain", [("charset", "us-ascii")]
    params = _params(rest)
    if mtype.lower() == "text" and _param(params, "charset") is None:
        params.insert(0, ("charset", "us-ascii"))  # RFC 2045 5.2 default, as Dovecot reports
    return mtype, sub, params


def _param(params: list[tuple[str, str]], name: str) -> str | None:
    for k, v in params:
        if k.lower() == name:
            return v
    return None


class _Part:
    __slots__ = (
        "bstart",
        "children",
        "end",
        "fields",
        "fields_end",
        "hstart",
        "message",
        "mtype",
        "params",
        "subtype",
    )

    def __init__(self, raw: bytes, start: int, end: int, default: tuple[str, str]) -> None:
        self.hstart = start
        self.end = end
        self.fields_end, self.bstart = split_header(raw, start, end)
        self.fields = _parse_fields(raw, start, self.fields_end)
        self.mtype, self.subtype, self.params = _content_type(
            _first(self.fields, "content-type"), default
        )
        self.children: list[_Part] | None = None
        self.message: _Part | None = None

    @property
    def ltype(self) -> tuple[str, str]:
        return self.mtype.lower(), self.subtype.lower()

    def cte(self) -> str:
        value = _first(self.fields, "content-transfer-encoding")
        return "" if value is None else value.decode("latin-1").strip().lower()


class _Budget:
    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts = 0


def _build(
    raw: bytes, start: int, end: int, default: tuple[str, str], depth: int, b: _Budget
) -> _Part:
    part = _Part(raw, start, end, default)
    b.parts += 1
    mtype, sub = part.ltype
    if depth >= _MAX_DEPTH or b.parts > _MAX_PARTS:
        return part
    if mtype == "multipart":
        boundary = _param(part.params, "boundary")
        if not boundary:
            part.mtype, part.subtype, part.params = "text", "plain", [("charset", "us-ascii")]
            return part
        child_default = ("message", "rfc822") if sub == "digest" else ("text", "plain")
        part.children = [
            _build(raw, s, e, child_default, depth + 1, b)
            for s, e in _split_multipart(raw, part.bstart, end, boundary.encode("latin-1"))
        ]
        if not part.children:  # a multipart must have a part: an empty one
            part.children = [_Part(raw, end, end, ("text", "plain"))]
    elif mtype == "message" and sub in ("rfc822", "global") and part.cte() in _IDENTITY_CTE:
        part.message = _build(raw, part.bstart, end, ("text", "plain"), depth + 1, b)
    return part


def _split_multipart(raw: bytes, start: int, end: int, boundary: bytes) -> list[tuple[int, int]]:
    delim = b"--" + boundary
    spans: list[tuple[int, int]] = []
    part_start = -1
    pos = start
    while True:
        i = raw.find(delim, pos, end)
        if i < 0:
            break
        pos = i + len(delim)
        if i != start and raw[i - 1] != 0x0A:
            continue
        nl = raw.find(b"\n", pos, end)
        line_end = end if nl < 0 else nl + 1
        rest = raw[pos : nl if nl >= 0 else end]
        closing = rest.startswith(b"--")
        if not closing and rest.strip(b" \t\r"):
            continue  # a longer boundary that merely starts with ours
        if part_start >= 0:
            stop = i
            if stop > part_start and raw[stop - 1] == 0x0A:
                stop -= 1
                if stop > part_start and raw[stop - 1] == 0x0D:
                    stop -= 1
            spans.append((part_start, max(stop, part_start)))
            if len(spans) >= _MAX_PARTS:
                return spans
        if closing:
            return spans
        part_start = line_end
        pos = line_end
    if part_start >= 0:  # no closing delimiter: the last part runs to the end
        spans.append((part_start, end))
    return spans


# -- BODYSTRUCTURE --------------------------------------------------------------------------


def _pstr(text: str | None) -> bytes:
    return nstring(latin1(text))


def _param_list(params: list[tuple[str, str]]) -> bytes:
    if not params:
        return b"NIL"
    return b"(" + b" ".join(_pstr(k) + b" " + _pstr(v) for k, v in params) + b")"


def _field_str(part: _Part, name: str) -> bytes:
    return nstring(trim(_first(part.fields, name)))


def _disposition(part: _Part) -> bytes:
    value = _first(part.fields, "content-disposition")
    if value is None:
        return b"NIL"
    text = value.decode("latin-1")
    head, _, rest = text.partition(";")
    head = _strip_comments(head)
    if not head:
        return b"NIL"
    return b"(%s %s)" % (_pstr(head), _param_list(_params(rest)))


def _language(part: _Part) -> bytes:
    value = _first(part.fields, "content-language")
    if value is None:
        return b"NIL"
    langs = [x.strip() for x in _strip_comments(value.decode("latin-1")).split(",") if x.strip()]
    if not langs:
        return b"NIL"
    if len(langs) == 1:
        return _pstr(langs[0])
    return b"(" + b" ".join(_pstr(x) for x in langs) + b")"


def _bodystructure(raw: bytes, part: _Part, ext: bool) -> bytes:
    if part.children is not None:
        out = b"".join(_bodystructure(raw, c, ext) for c in part.children)
        out += b" " + _pstr(part.subtype)
        if ext:
            out += b" %s %s %s %s" % (
                _param_list(part.params),
                _disposition(part),
                _language(part),
                _field_str(part, "content-location"),
            )
        return b"(" + out + b")"
    cte = _first(part.fields, "content-transfer-encoding")
    enc = trim(cte) or b"7BIT"
    fields = [
        _pstr(part.mtype),
        _pstr(part.subtype),
        _param_list(part.params),
        _field_str(part, "content-id"),
        _field_str(part, "content-description"),
        nstring(enc),
        b"%d" % _crlf_len(raw, part.bstart, part.end),
    ]
    mtype = part.mtype.lower()
    if part.message is not None:
        m = part.message
        fields.append(_envelope_from_fields(m.fields))
        fields.append(_bodystructure(raw, m, ext))
        fields.append(b"%d" % _lines(raw, part.bstart, part.end))
    elif mtype == "text":
        fields.append(b"%d" % _lines(raw, part.bstart, part.end))
    if ext:
        fields.extend(
            [
                _field_str(part, "content-md5"),
                _disposition(part),
                _language(part),
                _field_str(part, "content-location"),
            ]
        )
    return b"(" + b" ".join(fields) + b")"


# -- the parsed message ---------------------------------------------------------------------


class ParsedMessage:
    """One stored message, parsed lazily. Reuse one instance for all items of one FETCH."""

    __slots__ = ("_fields", "_root", "_split", "raw")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._root: _Part | None = None
        self._fields: list[_Field] | None = None
        self._split: tuple[int, int] | None = None

    def _header_split(self) -> tuple[int, int]:
        if self._split is None:
            self._split = split_header(self.raw)
        return self._split

    @property
    def root(self) -> _Part:
        if self._root is None:
            self._root = _build(self.raw, 0, len(self.raw), ("text", "plain"), 0, _Budget())
        return self._root

    def fields(self) -> list[_Field]:
        if self._fields is None:
            self._fields = (
                self._root.fields
                if self._root is not None
                else _parse_fields(self.raw, 0, self._header_split()[0])
            )
        return self._fields

    @property
    def size(self) -> int:
        """RFC822.SIZE."""
        return crlf_size(self.raw)

    def envelope(self) -> bytes:
        if self._fields is None and self._root is None:  # no need to parse every field
            return envelope_from(envelope_fields(self.raw, self._header_split()[0]))
        return _envelope_from_fields(self.fields())

    def bodystructure(self, extensible: bool = True) -> bytes:
        return _bodystructure(self.raw, self.root, extensible)

    def header(self) -> bytes:
        """RFC822.HEADER / BODY[HEADER] (CRLF, blank line included)."""
        return to_crlf(self.raw[: self._header_split()[1]])

    def text(self) -> bytes:
        """RFC822.TEXT / BODY[TEXT]."""
        return to_crlf(self.raw[self._header_split()[1] :])

    def whole(self) -> bytes:
        """RFC822 / BODY[]."""
        return to_crlf(self.raw)

    def section(self, spec: Section) -> bytes:
        """BODY[spec] content in CRLF form (empty if the part does not exist)."""
        where = self.span(spec)
        if where is not None:
            return to_crlf(self.raw[where[0] : where[1]])
        node = self._resolve(spec.part) if spec.part else None
        if node is None:
            return self._filtered(self.fields(), self._header_split()[1], spec)
        msg = node.message
        assert msg is not None  # span() is None only for header fields of a message
        return self._filtered(msg.fields, msg.bstart, spec, msg.fields_end)

    def span(self, spec: Section) -> tuple[int, int] | None:
        """Where BODY[spec] lies in the stored bytes: its content is ``to_crlf`` of
        ``raw[start:end]`` (``(0, 0)`` when it is empty or the part does not exist).  None for
        HEADER.FIELDS[.NOT], which picks lines rather than a slice (see :meth:`section`).
        Big messages are streamed from the file by these offsets."""
        if not spec.part:
            if spec.kind is None:
                return 0, len(self.raw)
            if spec.kind == "TEXT":
                return self._header_split()[1], len(self.raw)
            if spec.kind == "HEADER":
                return 0, self._header_split()[1]
            return (0, 0) if spec.kind == "MIME" else None
        node = self._resolve(spec.part)
        if node is None:
            return 0, 0
        if spec.kind is None:
            return node.bstart, node.end
        if spec.kind == "MIME":
            return node.hstart, node.bstart
        msg = node.message
        if msg is None:
            return 0, 0
        if spec.kind == "TEXT":
            return msg.bstart, msg.end
        if spec.kind == "HEADER":
            return msg.hstart, msg.bstart
        return None

    def _filtered(
        self, fields: list[_Field], bstart: int, spec: Section, fields_end: int | None = None
    ) -> bytes:
        if fields_end is None:
            fields_end = self._header_split()[0]
        wanted = {f.lower() for f in spec.fields}
        keep = spec.kind == "HEADER.FIELDS"
        out = [self.raw[f.start : f.end] for f in fields if (f.lname in wanted) == keep]
        if out and not out[-1].endswith(b"\n"):
            out.append(b"\n")
        if bstart > fields_end:  # the original had a blank line
            out.append(b"\n")
        return to_crlf(b"".join(out))

    def _resolve(self, path: tuple[int, ...]) -> _Part | None:
        """Part numbering of RFC 3501 6.4.5."""
        cur = self.root
        as_message = True  # cur is a message (top level or encapsulated), not yet a part
        for n in path:
            if not as_message:
                if cur.children is None and cur.message is not None:
                    cur = cur.message
                    as_message = True
                elif cur.children is None:
                    return None
            if cur.children is not None:
                if n > len(cur.children):
                    return None
                cur = cur.children[n - 1]
            elif as_message and n == 1:
                pass  # a non-multipart message's part 1 is its body
            else:
                return None
            as_message = False
        return cur


# -- convenience functions (raw bytes -> wire bytes), for the index cache ---------------------


def envelope(raw: bytes) -> bytes:
    """ENVELOPE of a stored message; reads only the header."""
    return ParsedMessage(raw).envelope()


def bodystructure(raw: bytes, extensible: bool = True) -> bytes:
    """BODYSTRUCTURE (``extensible=True``) or BODY (``False``) of a stored message."""
    return ParsedMessage(raw).bodystructure(extensible)


def section(raw: bytes, spec: Section, partial_range: tuple[int, int] | None = None) -> bytes:
    """BODY[spec]<origin.length> content, CRLF."""
    data = ParsedMessage(raw).section(spec)
    if partial_range is not None:
        data = partial(data, partial_range[0], partial_range[1])
    return data


# -- text for SEARCH ------------------------------------------------------------------------

_ENCODED_WORD = re.compile(rb"=\?([^?\s]+)\?([QqBb])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(rb"(=\?[^?\s]+\?[QqBb]\?[^?\s]*\?=)\s+(?==\?)")


def _charset_decode(data: bytes, charset: str) -> str:
    charset = charset.split("*", 1)[0].strip().lower() or "us-ascii"
    try:
        return data.decode(charset, "replace")
    except LookupError:
        return data.decode("utf-8", "replace")


def decode_header_value(value: bytes) -> str:
    """Unfolded header value with RFC 2047 encoded words decoded (lenient), as text."""
    value = _BETWEEN_WORDS.sub(rb"\1", value)

    def word(m: re.Match[bytes]) -> str:
        charset = m.group(1).decode("ascii", "replace")
        payload = m.group(3)
        try:
            if m.group(2) in b"Bb":
                data = base64.b64decode(payload + b"=" * (-len(payload) % 4), validate=True)
            else:
                data = quopri.decodestring(payload.replace(b"_", b" "), header=True)
        except (binascii.Error, ValueError):
            return m.group().decode("latin-1")
        return _charset_decode(data, charset)

    out: list[str] = []
    pos = 0
    for m in _ENCODED_WORD.finditer(value):
        out.append(_text(value[pos : m.start()]))
        out.append(word(m))
        pos = m.end()
    out.append(_text(value[pos:]))
    return "".join(out)


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _decode_body(raw: bytes, part: _Part) -> str:
    data = raw[part.bstart : part.end]
    cte = part.cte()
    try:
        if cte == "base64":
            data = base64.b64decode(re.sub(rb"[^A-Za-z0-9+/]", b"", data) + b"==", validate=False)
        elif cte == "quoted-printable":
            data = quopri.decodestring(data)
    except (binascii.Error, ValueError):
        pass
    charset = _param(part.params, "charset")
    if charset is None:
        return _text(data)
    return _charset_decode(data, charset)


def _iter_text_parts(part: _Part) -> Iterable[_Part]:
    if part.children is not None:
        for c in part.children:
            yield from _iter_text_parts(c)
    elif part.message is not None:
        yield from _iter_text_parts(part.message)
    elif part.mtype.lower() == "text":
        yield part


def body_text(raw: bytes) -> str:
    """Decoded text of all text/* parts (base64 / quoted-printable, charset), for SEARCH BODY.
    Headers of encapsulated messages are not included; non-text parts are skipped."""
    msg = ParsedMessage(raw)
    return "\n".join(_decode_body(raw, p) for p in _iter_text_parts(msg.root))
