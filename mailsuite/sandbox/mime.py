"""A captured message taken apart for people and tests: header fields, text, HTML, attachments.

The MIME tree comes from the stdlib ``email`` package (lenient, decodes base64 and
quoted-printable, RFC 2231 file names); header fields and RFC 2047 words go through the IMAP
server's own readers (:mod:`mailsuite.imap.message`) so both protocols see the same values.
Parts are numbered as IMAP numbers them (RFC 3501 6.4.5: ``1``, ``2.1`` ...), which is also
what Mailpit's ``PartID`` looks like.  Which part is the body, an attachment or an inline
part follows Mailpit (enmime): text/plain and text/html without a file name or an
``attachment`` disposition are the body; other parts with a Content-ID are inline (in a
multipart/related also when they call themselves attachments: the HTML shows them), the rest
attachments; parts with neither a file name nor a Content-ID are not listed.

Nothing here raises on malformed mail: garbage in gives a best-effort result.
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import hashlib
from dataclasses import dataclass, field
from email.message import Message

from mailsuite.imap.message import decode_header_value, header_fields, split_header

#: Parts looked at per message (a hostile message cannot make the parser walk forever).
MAX_PARTS = 1000
MAX_DEPTH = 30


@dataclass
class Part:
    """One leaf of the MIME tree."""

    part_id: str
    content_type: str  # "type/subtype", lower case
    filename: str
    content_id: str  # without the angle brackets
    disposition: str  # "attachment", "inline" or ""
    content: bytes  # transfer-decoded
    charset: str | None = None

    def summary(self) -> dict[str, object]:
        """Mailpit's ``Attachment`` object (without the content)."""
        return {
            "PartID": self.part_id,
            "FileName": self.filename or self.content_id,
            "ContentType": self.content_type,
            "ContentID": self.content_id,
            "Size": len(self.content),
            "Checksums": {
                "MD5": hashlib.md5(self.content, usedforsecurity=False).hexdigest(),
                "SHA1": hashlib.sha1(self.content, usedforsecurity=False).hexdigest(),
                "SHA256": hashlib.sha256(self.content).hexdigest(),
            },
        }


@dataclass
class ParsedMail:
    """A message as the API shows it."""

    #: header fields of the top level in order: (name as written, unfolded value)
    fields: list[tuple[str, str]] = field(default_factory=list)
    text: str = ""
    html: str = ""
    attachments: list[Part] = field(default_factory=list)
    inline: list[Part] = field(default_factory=list)
    #: every leaf by part number (for /part/{PartID})
    parts: dict[str, Part] = field(default_factory=dict)
    _first: dict[str, str] | None = field(default=None, repr=False)

    def header(self, name: str) -> str | None:
        """The first field called ``name`` (any case), unfolded, not decoded."""
        if self._first is None:
            self._first = {}
            for n, v in self.fields:
                self._first.setdefault(n.lower(), v)
        return self._first.get(name.lower())

    def decoded(self, name: str) -> str:
        """The first field called ``name`` with RFC 2047 words decoded ("" if absent)."""
        value = self.header(name)
        return "" if value is None else decode_header_value(value.encode("utf-8")).strip()

    def addresses(self, name: str) -> list[dict[str, str]]:
        """Mailpit's ``[{"Name": ..., "Address": ...}]`` for every field called ``name``."""
        lname = name.lower()
        values = [v for n, v in self.fields if n.lower() == lname]
        out: list[dict[str, str]] = []
        if not values:
            return out
        for display, addr in email.utils.getaddresses(values):
            if not addr and not display:
                continue
            name_text = decode_header_value(display.encode("utf-8")).strip()
            out.append({"Name": name_text, "Address": addr})
        return out


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")  # RFC 6532: header fields may be UTF-8
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def top_fields(raw: bytes) -> list[tuple[str, str]]:
    """The top-level header fields, names as written (our IMAP reader lower-cases them, so
    the names are taken from the raw lines)."""
    fields_end, _ = split_header(raw)
    head = raw[:fields_end]
    names: list[str] = []
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t") or b":" not in line:
            continue
        names.append(_text(line.split(b":", 1)[0].rstrip(b" \t")))
    out = []
    lowered = header_fields(head)
    pos = 0
    for lname, value in lowered:
        # pair each parsed field with the next raw name of the same spelling (case aside)
        while pos < len(names) and names[pos].lower() != lname:
            pos += 1
        name = names[pos] if pos < len(names) else lname
        pos += 1
        out.append((name, " ".join(_text(value).split())))
    return out


def _decode_text(payload: bytes, charset: str | None) -> str:
    charset = (charset or "utf-8").strip().lower()
    try:
        return payload.decode(charset, "replace")
    except LookupError:
        return payload.decode("utf-8", "replace")


def parse(raw: bytes) -> ParsedMail:
    """Take ``raw`` (as stored: LF or CRLF line ends) apart."""
    out = ParsedMail(fields=top_fields(raw))
    try:
        root = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(raw)
    except Exception:
        out.text = _text(raw[split_header(raw)[1] :])
        return out
    texts: list[str] = []
    htmls: list[str] = []
    budget = [MAX_PARTS]

    def visit(part: Message, number: str, depth: int, related: bool) -> None:
        if budget[0] <= 0:
            return
        budget[0] -= 1
        ctype = part.get_content_type()
        if part.is_multipart() and ctype.startswith("multipart/") and depth < MAX_DEPTH:
            children = part.get_payload()
            if not isinstance(children, list):
                return
            inner_related = ctype == "multipart/related"
            for i, child in enumerate(children, 1):
                if isinstance(child, Message):
                    visit(child, f"{number}.{i}" if number else str(i), depth + 1, inner_related)
            return
        leaf = _leaf(part, number or "1", ctype)
        out.parts[leaf.part_id] = leaf
        body_text = ctype in ("text/plain", "text/html") and not leaf.filename
        if body_text and leaf.disposition != "attachment":
            decoded = _decode_text(leaf.content, leaf.charset)
            (texts if ctype == "text/plain" else htmls).append(decoded)
            return
        if not leaf.filename and not leaf.content_id:
            return
        if (leaf.content_id and (related or leaf.disposition != "attachment")) or (
            related and leaf.disposition == "inline"
        ):
            out.inline.append(leaf)
        else:
            out.attachments.append(leaf)

    visit(root, "", 0, False)
    out.text = "\n".join(texts)
    out.html = "\n".join(htmls)
    return out


def _leaf(part: Message, number: str, ctype: str) -> Part:
    if ctype in ("message/rfc822", "message/global"):
        inner = part.get_payload()
        if isinstance(inner, list) and inner and isinstance(inner[0], Message):
            try:
                content = inner[0].as_bytes()
            except Exception:
                content = b""
        else:
            content = b""
    else:
        try:
            payload = part.get_payload(decode=True)
        except Exception:
            payload = None
        content = payload if isinstance(payload, bytes) else b""
    try:
        filename = part.get_filename() or ""
    except Exception:
        filename = ""
    if filename:
        filename = decode_header_value(filename.encode("utf-8", "surrogateescape")).strip()
        filename = filename.replace("/", "_").replace("\\", "_")
    if not filename and ctype in ("message/rfc822", "message/global"):
        filename = "message.eml"
    cid = str(part.get("Content-ID", "") or "").strip().strip("<>").strip()
    disposition = (part.get_content_disposition() or "").lower()
    try:
        charset = part.get_content_charset()
    except Exception:
        charset = None
    return Part(number, ctype, filename, cid, disposition, content, charset)


def canonical_key(name: str) -> str:
    """A field name the way Go's ``textproto.CanonicalMIMEHeaderKey`` writes it (Mailpit's
    headers endpoint keys): ``message-id`` -> ``Message-Id``."""
    if not name or any(c == " " or not (c.isascii() and c.isprintable()) for c in name):
        return name
    return "-".join(w[:1].upper() + w[1:].lower() for w in name.split("-"))
