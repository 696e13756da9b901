"""The few header-section facts mail authentication needs, read from raw bytes.

Why not ``email.parser``: the checks must see the header section exactly as received (a
forged Authentication-Results removed without re-encoding anything else, every From field
counted, folded lines kept), and must not be confused by the parser's repairs.  Lines may end
in CRLF (wire form) or LF (the stored form).
"""

from __future__ import annotations

import email.utils
import functools
import re
from collections.abc import Sequence

from mailsuite.mailauth.dns import normalize_name

__all__ = [
    "Field",
    "fields",
    "from_domains",
    "from_domains_in",
    "header_section",
    "strip_comments",
    "unfold",
]

#: a field: its name (RFC 5322 2.2: printable ASCII but ":", before the colon) when the
#: first line has one, the rest of that line, and the continuation lines (space or tab first)
_FIELD = re.compile(rb"(?:([\x21-\x39\x3b-\x7e]+)[ \t]*:)?[^\n]*\n?(?:[ \t][^\n]*\n?)*")
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)")


class Field:
    """One header field: its name as written, lower-cased, and its raw bytes (all lines, line
    ends kept).  Read-only: :func:`fields` hands the same objects to every caller."""

    __slots__ = ("lname", "name", "raw")

    def __init__(self, name: str, raw: bytes) -> None:
        self.name = name
        self.lname = name.lower()
        self.raw = raw

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
    # the first LF followed by CRLF or LF ends it (what ``\r?\n\r?\n`` finds first): found
    # with bytes.find, not a regular expression that tries every byte of the message
    end = len(message)
    for empty in (b"\n\n", b"\n\r\n"):
        at = message.find(empty, 0, end)
        if at >= 0:
            end = at + len(empty)
    return message[:end]


def fields(section: bytes) -> list[Field]:
    """Split a header section into fields; a line that is neither a field nor a continuation
    (malformed) is kept as a nameless field so that rewriting loses nothing.

    The checks of one message (SPF's From, DKIM, ARC, DMARC) each read the same section
    from the same bytes in turn: the last few splits are kept (small sections only)."""
    if len(section) <= _CACHED_SECTION:
        return list(_fields_cached(section))
    return _split(section)


_CACHED_SECTION = 64 * 1024


@functools.lru_cache(maxsize=16)
def _fields_cached(section: bytes) -> tuple[Field, ...]:
    return tuple(_split(section))


def _split(section: bytes) -> list[Field]:
    """One regular expression match per field (its name, if it has one, and its lines):
    a field is a line and the continuation lines after it, up to the empty line."""
    out: list[Field] = []
    pos, end = 0, len(section)
    match = _FIELD.match
    while pos < end:
        first = section[pos]
        if first == 10 or (first == 13 and section.startswith(b"\r\n", pos)):
            break  # the empty line that ends the section
        m = match(section, pos)
        if m is None:  # (cannot be: every part of the pattern is optional)
            break
        name = m[1]
        out.append(Field(name.decode("ascii") if name else "", m[0]))
        pos = m.end()
    return out


def unfold(value: bytes) -> str:
    text = value.decode("utf-8", "replace")
    return _FOLD.sub("", text).strip()


def strip_comments(text: str) -> str:
    """Remove RFC 5322 comments (nested ones too, innermost first)."""
    previous = None
    while previous != text:
        previous, text = text, _COMMENT.sub(" ", text)
    return text


def from_domains(section: bytes) -> list[str] | None:
    """Domains of every address in every From field (RFC 7489 6.6.1), A-labels, in order,
    without duplicates; None when there is no From field or an address has no usable domain."""
    return from_domains_in(fields(section))


def from_domains_in(split: Sequence[Field]) -> list[str] | None:
    """:func:`from_domains` of a section already split by :func:`fields` (the checks of a
    message split it once and read everything from that)."""
    values = tuple(f.value() for f in split if f.lname == "from")
    if not values:
        return None
    if sum(map(len, values)) > 1000:
        return _from_domains(values)
    found = _from_domains_cached(values)
    return None if found is None else list(found)


@functools.lru_cache(maxsize=512)
def _from_domains_cached(values: tuple[str, ...]) -> tuple[str, ...] | None:
    """Kept by the From values: parsing addresses (``email.utils``) is the dearest part of
    reading a header section, and the same senders write the same From field again."""
    found = _from_domains(values)
    return None if found is None else tuple(found)


def _from_domains(values: tuple[str, ...]) -> list[str] | None:
    domains: list[str] = []
    for _name, address in email.utils.getaddresses(values):
        _, at, domain = address.rpartition("@")
        clean = normalize_name(domain) if at else None
        if clean is None or "." not in clean:
            return None
        if clean not in domains:
            domains.append(clean)
    return domains or None
