"""The few header-section facts mail authentication needs, read from raw bytes.

Why not ``email.parser``: the checks must see the header section exactly as received (a
forged Authentication-Results removed without re-encoding anything else, every From field
counted, folded lines kept), and must not be confused by the parser's repairs.  Lines may end
in CRLF (wire form) or LF (the stored form).
"""

from __future__ import annotations

import email.utils
import re

from mailsuite.mailauth.dns import normalize_name

__all__ = ["Field", "fields", "from_domains", "header_section", "strip_comments", "unfold"]

_NAME = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_LINE = re.compile(rb"[^\n]*\n|[^\n]+$")
_END = re.compile(rb"\r?\n\r?\n")
_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)")


class Field:
    """One header field: its name as written and its raw bytes (all lines, line ends kept)."""

    __slots__ = ("name", "raw")

    def __init__(self, name: str, raw: bytes) -> None:
        self.name = name
        self.raw = raw

    @property
    def lname(self) -> str:
        return self.name.lower()

    def value(self) -> str:
        """The unfolded value after the colon (RFC 5322 2.2.3), decoded leniently."""
        _, _, rest = self.raw.partition(b":")
        return unfold(rest)


def header_section(message: bytes) -> bytes:
    """The header section of ``message`` including the empty line that ends it (if any)."""
    if message.startswith(b"\r\n"):
        return b"\r\n"
    if message.startswith(b"\n"):
        return b"\n"
    m = _END.search(message)
    return message if m is None else message[: m.end()]


def fields(section: bytes) -> list[Field]:
    """Split a header section into fields; a line that is neither a field nor a continuation
    (malformed) is kept as a nameless field so that rewriting loses nothing."""
    out: list[Field] = []
    for line in _LINE.findall(section):
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t") and out:
            out[-1].raw += line
            continue
        m = _NAME.match(line)
        name = m.group(1).decode("ascii") if m else ""
        out.append(Field(name, line))
    return out


def unfold(value: bytes) -> str:
    text = value.decode("utf-8", "replace")
    return re.sub(r"\r?\n(?=[ \t])", "", text).strip()


def strip_comments(text: str) -> str:
    """Remove RFC 5322 comments (nested ones too, innermost first)."""
    previous = None
    while previous != text:
        previous, text = text, _COMMENT.sub(" ", text)
    return text


def from_domains(section: bytes) -> list[str] | None:
    """Domains of every address in every From field (RFC 7489 6.6.1), A-labels, in order,
    without duplicates; None when there is no From field or an address has no usable domain."""
    values = [f.value() for f in fields(section) if f.lname == "from"]
    if not values:
        return None
    domains: list[str] = []
    for _name, address in email.utils.getaddresses(values):
        _, at, domain = address.rpartition("@")
        clean = normalize_name(domain) if at else None
        if clean is None or "." not in clean:
            return None
        if clean not in domains:
            domains.append(clean)
    return domains or None
