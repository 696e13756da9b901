"""Mailpit's search syntax, turned into a WHERE clause over the sandbox catalog.

The same words as Mailpit (https://mailpit.axllent.org/docs/usage/search-filters/): terms are
separated by spaces, ``"quoted phrases"`` are one term, and every term must match (AND).  A
term starting with ``-`` or ``!`` must not match.  Terms:

=======================================  ===================================================
``from:T`` ``to:T`` ``cc:T`` ``bcc:T``   T in that address field (name or address)
``reply-to:T``  ``addressed:T``          in Reply-To; in any of From/To/Cc/Bcc/Reply-To
``subject:T``  ``message-id:T``          in the subject; in the Message-ID
``tag:T``  ``is:tagged``                 has tag T (X-Tags header); has any tag
``is:read``  ``is:unread``               read state (Maildir ``\\Seen``, shared with IMAP)
``has:attachment(s)``  ``has:inline(s)`` has attachments; has inline parts
``after:D``  ``before:D``                received on/after, on/before D (ISO date or date and
                                         time; in ``tz`` when given, else local time)
``larger:S``  ``smaller:S``              size above/below S bytes (``10k``, ``1.5m``)
anything else                            in the search text: From, To, Cc, Bcc, Reply-To,
                                         Subject, Return-Path, the text (or the HTML's
                                         text) and the attachment names
=======================================  ===================================================

Beyond Mailpit: ``inbox:NAME`` (exactly that inbox).  Matching is case-insensitive.  Terms that
Mailpit ignores (no letter or digit in them, an unreadable date or size) are ignored here too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

#: The catalog columns the address terms look in (JSON text of Mailpit's address lists).
ADDRESS_COLUMNS = {
    "to": "to_json",
    "from": "from_json",
    "cc": "cc_json",
    "bcc": "bcc_json",
    "reply-to": "reply_to_json",
}

_HAS_WORD = re.compile(r"[A-Za-z0-9]")
_SIZE = re.compile(r"^(\d+)(\.\d+)?\s?([a-z]{1,2})?$")


@dataclass(frozen=True)
class Term:
    """One search term: ``kind`` is the prefix without its colon ("text" for free text),
    ``value`` the cleaned value, ``negate`` for a ``-``/``!`` term."""

    kind: str
    value: str
    negate: bool = False


def split_args(query: str) -> list[str]:
    """Split on spaces, keeping ``"quoted phrases"`` (and ``'single'``) together without
    their quotes, as Mailpit's ``tools.ArgsParser``."""
    out: list[str] = []
    current: list[str] = []
    quote: str | None = None
    had = False
    for ch in query:
        if quote is not None:
            if ch == quote:
                quote = None
            else:
                current.append(ch)
            continue
        if ch in "\"'":
            quote = ch
            had = True
        elif ch.isspace():
            if current or had:
                out.append("".join(current))
            current, had = [], False
        else:
            current.append(ch)
    if current or had:
        out.append("".join(current))
    return out


_TO_SPACE = str.maketrans({c: " " for c in '\ufeff\r\n\t<>",;()'})


def clean(text: str) -> str:
    """Mailpit's ``cleanString``: line ends, tabs, ``<>",;()`` to spaces; lower case; white
    space collapsed."""
    return " ".join(text.translate(_TO_SPACE).split()).lower()


_PREFIXES = (
    "to",
    "from",
    "cc",
    "bcc",
    "reply-to",
    "addressed",
    "subject",
    "message-id",
    "tag",
    "after",
    "before",
    "larger",
    "smaller",
    "inbox",
)
_FLAGS = {
    "is:read": "read",
    "is:unread": "unread",
    "is:tagged": "tagged",
    "has:attachment": "attachment",
    "has:attachments": "attachment",
    "has:inline": "inline",
    "has:inlines": "inline",
}


def parse(query: str) -> list[Term]:
    """The terms of ``query`` (see the module docstring); never raises."""
    terms: list[Term] = []
    for word in split_args(query):
        if not clean(word):
            continue
        negate = False
        if len(word) > 1 and word[0] in "-!":
            negate = True
            word = word[1:]
        if not _HAS_WORD.search(word):
            continue
        lower = word.lower()
        if lower in _FLAGS:
            terms.append(Term("is", _FLAGS[lower], negate))
            continue
        prefix, colon, rest = word.partition(":")
        kind = prefix.lower()
        if colon and kind in _PREFIXES:
            value = rest.lower() if kind == "subject" else clean(rest)
            if kind == "inbox":
                value = rest.strip().lower()
            if value:
                terms.append(Term(kind, value, negate))
            continue
        value = clean(word)
        if value:
            terms.append(Term("text", value, negate))
    return terms


def size_bytes(text: str) -> int:
    """``10k``, ``1.5MB``, ``300`` -> bytes; 0 when unreadable (Mailpit's ``sizeToBytes``)."""
    m = _SIZE.match(text.lower())
    if not m:
        return 0
    number = float(m.group(1) + (m.group(2) or ""))
    unit = m.group(3) or ""
    factor = {"": 1, "k": 1024, "kb": 1024, "m": 1024 * 1024, "mb": 1024 * 1024}.get(unit)
    return int(number * factor) if factor else 0


def parse_date(text: str, tz: str | None) -> int | None:
    """An ``after:``/``before:`` date -> milliseconds since the epoch; None when unreadable."""
    text = text.strip().upper()
    try:
        zone = ZoneInfo(tz) if tz else None
    except (ZoneInfoNotFoundError, ValueError):
        zone = None
    try:
        when = datetime.fromisoformat(text.replace(" ", "T"))
    except ValueError:
        try:
            when = datetime.strptime(text, "%d %b %Y")
        except ValueError:
            return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=zone) if zone else when.astimezone()
    return int(when.timestamp() * 1000)


def _like(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


_LIKE = " LIKE ? ESCAPE '\\'"


def to_sql(terms: list[Term], tz: str | None = None) -> tuple[str, list[object]]:
    """A WHERE expression (``1`` for no terms) and its parameters."""
    parts: list[str] = []
    params: list[object] = []
    for t in terms:
        sql: str | None = None
        args: list[object] = []
        if t.kind in ADDRESS_COLUMNS:
            sql, args = ADDRESS_COLUMNS[t.kind] + _LIKE, [_like(t.value)]
        elif t.kind == "addressed":
            cols = list(ADDRESS_COLUMNS.values())
            sql = "(" + " OR ".join(c + _LIKE for c in cols) + ")"
            args = [_like(t.value)] * len(cols)
        elif t.kind == "subject":
            sql, args = "subject" + _LIKE, [_like(t.value)]
        elif t.kind == "message-id":
            sql, args = "message_id" + _LIKE, [_like(t.value)]
        elif t.kind == "text":
            sql, args = "search_text" + _LIKE, [_like(t.value)]
        elif t.kind == "tag":
            sql = "EXISTS (SELECT 1 FROM json_each(tags_json) WHERE lower(value) = ?)"
            args = [t.value]
        elif t.kind == "inbox":
            sql, args = "inbox = ?", [t.value]
        elif t.kind == "is":
            sql = {
                "read": "read = 1",
                "unread": "read = 0",
                "tagged": "json_array_length(tags_json) > 0",
                "attachment": "attachments > 0",
                "inline": "inline > 0",
            }[t.value]
        elif t.kind in ("after", "before"):
            parsed = parse_date(t.value, tz)
            if parsed is None:
                continue
            # as Mailpit: a bare day is its midnight, compared inclusively
            sql = "created >= ?" if t.kind == "after" else "created <= ?"
            args = [parsed]
        elif t.kind in ("larger", "smaller"):
            size = size_bytes(t.value)
            if size <= 0:
                continue
            sql = "size > ?" if t.kind == "larger" else "size < ?"
            args = [size]
        if sql is None:
            continue
        parts.append(f"NOT ({sql})" if t.negate else f"({sql})")
        params.extend(args)
    return (" AND ".join(parts) or "1"), params
