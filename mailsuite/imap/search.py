"""IMAP SEARCH: key parsing (RFC 3501 6.4.4, RFC 7162 MODSEQ) and evaluation. Our own code.

``parse_search(args)`` turns the SEARCH argument tokens into a ``SearchProgram``; ``program.bind(
count, max_uid)`` resolves ``*`` and gives a predicate over ``SearchableMessage`` views.
``program.needs`` says what the search reads: ``Needs.NONE`` (flags, sizes, dates, sequence sets:
answer from the index, open no file), ``Needs.HEADER`` or ``Needs.BODY``. Keys of an AND are
evaluated cheapest first, so ``UNSEEN FROM x`` reads headers of unseen messages only.

Text keys match case-insensitively (``str.casefold``) on decoded text: RFC 2047 words in headers,
base64 / quoted-printable and the charset of text/* body parts.
"""

from __future__ import annotations

import email.utils
import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Protocol

from mailsuite.imap.address import address_text
from mailsuite.imap.header_cache import Entry, HeaderCache
from mailsuite.imap.message import body_text, decode_header_value, header_fields, split_header
from mailsuite.imap.parser import (
    NIL,
    Atom,
    ParseError,
    Token,
    astring,
    atom,
    number,
    parse_date,
)
from mailsuite.imap.sequence import SequenceSet, ranges_contain

__all__ = [
    "BadCharset",
    "Needs",
    "SearchProgram",
    "SearchableMessage",
    "header_of",
    "parse_search",
    "search",
]


class SearchableMessage(Protocol):
    """What the predicates read of one message (read-only: a search changes nothing)."""

    @property
    def seq(self) -> int: ...

    @property
    def uid(self) -> int: ...

    @property
    def flags(self) -> frozenset[str]: ...

    @property
    def internaldate(self) -> datetime: ...

    @property
    def size(self) -> int: ...

    @property
    def modseq(self) -> int: ...

    @property
    def recent(self) -> bool: ...

    def header_bytes(self) -> bytes: ...

    def raw(self) -> bytes: ...


class BadCharset(ParseError):
    """Answer ``tag NO [BADCHARSET (UTF-8 US-ASCII)] reason``."""

    supported = ("UTF-8", "US-ASCII")


class Needs(enum.IntEnum):
    NONE = 0
    HEADER = 1
    BODY = 2


Predicate = Callable[["_View"], bool]


class _View:
    """Caches what the text keys read from one message during one evaluation; the header
    fields also in ``cache`` (the folder's, across commands: see ``header_cache``)."""

    __slots__ = ("_addresses", "_body", "_cache", "_entry", "_sent", "msg")

    def __init__(self, msg: SearchableMessage, cache: HeaderCache | None = None) -> None:
        self.msg = msg
        self._cache = cache
        self._entry: Entry | None = None
        self._addresses: dict[str, list[str]] = {}
        self._body: str | None = None
        self._sent: date | None = None

    def _fields_entry(self) -> Entry:
        entry = self._entry
        if entry is None:
            cache = self._cache
            entry = cache.get(self.msg.uid) if cache is not None else None
            if entry is None:
                header = self.msg.header_bytes()
                out: dict[str, list[bytes]] = {}
                for name, value in header_fields(header):
                    out.setdefault(name, []).append(value)
                entry = (
                    cache.put(self.msg.uid, out, len(header))
                    if cache is not None
                    else Entry(out, 0)
                )
            self._entry = entry
        return entry

    def raw_fields(self) -> dict[str, list[bytes]]:
        return self._fields_entry().raw

    def fields(self) -> dict[str, list[str]]:
        """Decoded, case-folded values of every field, by lower-cased name."""
        entry = self._fields_entry()
        if entry.folded is None:
            entry.folded = {
                name: [decode_header_value(v).casefold() for v in values]
                for name, values in entry.raw.items()
            }
        return entry.folded

    def addresses(self, name: str) -> list[str]:
        """The addresses of each ``name`` field written out plainly (comments and folding
        gone, encoded words decoded), case-folded: see ``address_text``."""
        got = self._addresses.get(name)
        if got is None:
            got = self._addresses[name] = [
                decode_header_value(address_text(v.decode("latin-1")).encode("latin-1")).casefold()
                for v in self.raw_fields().get(name, ())
            ]
        return got

    def body(self) -> str:
        if self._body is None:
            self._body = body_text(self.msg.raw()).casefold()
        return self._body

    def sent(self) -> date:
        if self._sent is None:
            values = self.fields().get("date")
            parsed = None
            if values:
                try:
                    parsed = email.utils.parsedate_tz(values[0])
                except (TypeError, ValueError, IndexError):
                    parsed = None
            result: date | None = None
            if parsed is not None:
                try:
                    result = date(parsed[0], parsed[1], parsed[2])
                except (ValueError, TypeError):
                    result = None
            if result is None:  # no usable Date: use the internal date, as Dovecot does
                result = self.msg.internaldate.date()
            self._sent = result
        return self._sent


# -- the key tree ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """A parsed search key: ``op`` with ``args``; AND/OR/NOT hold sub-keys."""

    op: str
    args: tuple[Any, ...] = ()  # sub-keys, strings, numbers, dates or a SequenceSet, by op

    @property
    def needs(self) -> Needs:
        if self.op in ("AND", "OR", "NOT"):
            return max((k.needs for k in self.args), default=Needs.NONE)
        if self.op in ("BODY", "TEXT"):
            return Needs.BODY
        if self.op in ("HEADER", "ADDRESS", "SENTBEFORE", "SENTON", "SENTSINCE"):
            return Needs.HEADER
        return Needs.NONE


@dataclass(frozen=True)
class SearchProgram:
    key: Key
    charset: str = "US-ASCII"
    uses_modseq: bool = field(default=False)

    @property
    def needs(self) -> Needs:
        return self.key.needs

    @property
    def flags_only(self) -> bool:
        """Does the answer for a message depend on its flags alone (system flags and
        keywords combined with AND, OR, NOT)?  Then messages with the same flags answer
        alike: the caller may ask once per distinct flag set (a folder has few)."""
        return _flags_only(self.key)

    def bind(
        self, count: int, max_uid: int, cache: HeaderCache | None = None
    ) -> Callable[[SearchableMessage], bool]:
        """A predicate for this mailbox state (``*`` = ``count`` / ``max_uid``); header
        fields parsed on the way are kept in ``cache`` (keyed by UID) when one is given."""
        pred = _compile(self.key, count, max_uid)
        return lambda msg: pred(_View(msg, cache))


def _flags_only(key: Key) -> bool:
    if key.op in ("AND", "OR", "NOT"):
        return all(_flags_only(k) for k in key.args)
    return key.op in ("FLAG", "ALL")  # (NEW, OLD, RECENT: \\Recent is per session)


def search(
    program: SearchProgram, messages: Iterable[SearchableMessage], count: int, max_uid: int
) -> list[SearchableMessage]:
    """The matching messages, in the order given."""
    pred = _compile(program.key, count, max_uid)
    return [m for m in messages if pred(_View(m))]


# -- parsing --------------------------------------------------------------------------------

_FLAG_KEYS = {
    "ANSWERED": ("\\Answered", True),
    "DELETED": ("\\Deleted", True),
    "DRAFT": ("\\Draft", True),
    "FLAGGED": ("\\Flagged", True),
    "SEEN": ("\\Seen", True),
    "UNANSWERED": ("\\Answered", False),
    "UNDELETED": ("\\Deleted", False),
    "UNDRAFT": ("\\Draft", False),
    "UNFLAGGED": ("\\Flagged", False),
    "UNSEEN": ("\\Seen", False),
}
#: How deeply NOT, OR and parenthesised lists may nest.  Parsing, compiling and evaluating
#: the key tree recurse once per level, so an unbounded ``OR a OR b OR ...`` chain (each OR
#: nests the next) hit Python's recursion limit at about 400 terms and ended in a logged
#: RecursionError; a real client nests a handful of levels (the command reader already caps
#: nested parentheses at 32 the same way).  Deeper programs are answered BAD.
MAX_SEARCH_DEPTH = 100

_ADDRESS_KEYS = {"BCC": "bcc", "CC": "cc", "FROM": "from", "TO": "to"}
_DATE_KEYS = frozenset({"BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"})


class _Tokens:
    def __init__(self, toks: list[Token], charset: str) -> None:
        self.toks = toks
        self.i = 0
        self.charset = charset
        self.uses_modseq = False

    def next(self, what: str) -> object:
        if self.i >= len(self.toks):
            raise ParseError(f"Missing {what}")
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def text(self) -> str:
        raw = astring(self.next("search string"))
        # US-ASCII is a subset of UTF-8; clients that send 8-bit without CHARSET mean UTF-8.
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ParseError(f"Search string is not valid {self.charset}") from None


def parse_search(args: list[Token]) -> SearchProgram:
    """Parse SEARCH arguments (``[CHARSET x] key...``). Raise ``BadCharset`` for charsets other
    than UTF-8/US-ASCII, ``ParseError`` for bad syntax."""
    charset = "US-ASCII"
    toks = list(args)
    if len(toks) >= 2 and isinstance(toks[0], Atom) and toks[0].upper() == "CHARSET":
        name = astring(toks[1]).decode("ascii", "replace").upper()
        if name not in BadCharset.supported:
            raise BadCharset(f"Unsupported charset {name}")
        charset = name
        toks = toks[2:]
    if not toks:
        raise ParseError("Missing search key")
    stream = _Tokens(toks, charset)
    keys = []
    while stream.i < len(toks):
        keys.append(_parse_key(stream, 0))
    key = keys[0] if len(keys) == 1 else Key("AND", tuple(keys))
    return SearchProgram(key, charset, stream.uses_modseq)


def _parse_key(s: _Tokens, depth: int) -> Key:
    """One search key at nesting ``depth`` (NOT, OR and parentheses add a level)."""
    if depth > MAX_SEARCH_DEPTH:
        raise ParseError(f"Search keys nested too deeply (at most {MAX_SEARCH_DEPTH} levels)")
    tok = s.next("search key")
    if isinstance(tok, list):
        if not tok:
            raise ParseError("Empty parenthesised search key")
        sub = _Tokens(tok, s.charset)
        keys = []
        while sub.i < len(tok):
            keys.append(_parse_key(sub, depth + 1))
        s.uses_modseq |= sub.uses_modseq
        return keys[0] if len(keys) == 1 else Key("AND", tuple(keys))
    if tok is NIL or not isinstance(tok, Atom):
        raise ParseError("Invalid search key")
    name = tok.upper()
    if name[:1].isdigit() or name[:1] == "*":
        return Key("SEQ", (_seqset(tok),))
    if name in ("ALL", "NEW", "OLD", "RECENT"):
        return Key(name)
    if name in _FLAG_KEYS:
        flag, present = _FLAG_KEYS[name]
        return Key("FLAG", (flag, present))
    if name in ("KEYWORD", "UNKEYWORD"):
        kw = atom(s.next("keyword"))
        return Key("FLAG", (kw, name == "KEYWORD"))
    if name in _ADDRESS_KEYS:
        return Key("ADDRESS", (_ADDRESS_KEYS[name], s.text().casefold()))
    if name == "SUBJECT":
        return Key("HEADER", ("subject", s.text().casefold()))
    if name == "HEADER":
        field_name = astring(s.next("header field name")).decode("ascii", "replace").lower()
        return Key("HEADER", (field_name, s.text().casefold()))
    if name in ("BODY", "TEXT"):
        return Key(name, (s.text().casefold(),))
    if name in _DATE_KEYS:
        return Key(name, (parse_date(s.next("date")),))
    if name in ("LARGER", "SMALLER"):
        return Key(name, (number(s.next("size"), maximum=2**32 - 1),))
    if name == "UID":
        return Key("UID", (_seqset(s.next("UID set")),))
    if name == "NOT":
        return Key("NOT", (_parse_key(s, depth + 1),))
    if name == "OR":
        a = _parse_key(s, depth + 1)
        b = _parse_key(s, depth + 1)
        return Key("OR", (a, b))
    if name == "MODSEQ":
        # MODSEQ [<entry-name> <entry-type-req>] <mod-sequence-valzer> (RFC 7162 3.1.5)
        tok2 = s.next("mod-sequence value")
        if isinstance(tok2, bytes):  # entry name is a quoted string: skip it and its type
            atom(s.next("entry type"))
            tok2 = s.next("mod-sequence value")
        s.uses_modseq = True
        return Key("MODSEQ", (number(tok2),))
    raise ParseError(f"Unknown search key {name}")


def _seqset(tok: object) -> SequenceSet:
    if not isinstance(tok, Atom):
        raise ParseError("Expected a sequence set")
    try:
        return SequenceSet.parse(str(tok))
    except ValueError as exc:
        raise ParseError(str(exc)) from None


# -- compiling to closures ------------------------------------------------------------------


def _compile(key: Key, count: int, max_uid: int) -> Predicate:
    """The predicate for ``key``: the combinators and message sets here, the rest by family.

    AND and OR test the cheaper operand first (``Key.needs``) so a message is opened only
    when the flags or sizes did not already decide.
    """
    op, a = key.op, key.args
    if op == "ALL":
        return lambda v: True
    if op == "AND":
        preds = [_compile(k, count, max_uid) for k in sorted(a, key=lambda k: k.needs)]
        return lambda v: all(p(v) for p in preds)
    if op == "OR":
        first, second = sorted(a, key=lambda k: k.needs)
        p1, p2 = _compile(first, count, max_uid), _compile(second, count, max_uid)
        return lambda v: p1(v) or p2(v)
    if op == "NOT":
        p = _compile(a[0], count, max_uid)
        return lambda v: not p(v)
    if op == "SEQ":
        ranges = a[0].resolve(count)
        return lambda v: ranges_contain(ranges, v.msg.seq)
    if op == "UID":
        ranges = a[0].resolve(max_uid)
        return lambda v: ranges_contain(ranges, v.msg.uid)
    if op in ("FLAG", "NEW", "OLD", "RECENT"):
        return _compile_flag(op, a)
    if op in ("HEADER", "ADDRESS", "BODY", "TEXT"):
        return _compile_text(op, a)
    return _compile_number(op, a)


def _compile_flag(op: str, a: tuple[Any, ...]) -> Predicate:
    """FLAG, NEW, OLD and RECENT: read from the index row, never from the message file.

    A keyword also matches in another case (clients differ in the case they write); a
    system flag is stored in one spelling and compared exactly.
    """
    if op == "FLAG":
        flag, present = a
        if flag.startswith("\\"):
            return (
                (lambda v: flag in v.msg.flags) if present else (lambda v: flag not in v.msg.flags)
            )
        low = flag.lower()

        def has_keyword(v: _View) -> bool:
            return flag in v.msg.flags or any(f.lower() == low for f in v.msg.flags)

        return has_keyword if present else (lambda v: not has_keyword(v))
    if op == "NEW":
        return lambda v: v.msg.recent and "\\Seen" not in v.msg.flags
    if op == "OLD":
        return lambda v: not v.msg.recent
    return lambda v: v.msg.recent


def _compile_number(op: str, a: tuple[Any, ...]) -> Predicate:
    """Sizes, MODSEQ (RFC 7162 3.1.5) and dates: INTERNALDATE for BEFORE/ON/SINCE, the Date
    header for SENTBEFORE/SENTON/SENTSINCE (RFC 3501 6.4.4), compared by day."""
    if op == "LARGER":
        n = a[0]
        return lambda v: v.msg.size > n
    if op == "SMALLER":
        n = a[0]
        return lambda v: v.msg.size < n
    if op == "MODSEQ":
        n = a[0]
        return lambda v: v.msg.modseq >= n
    if op in ("BEFORE", "ON", "SINCE"):
        d = a[0]
        if op == "BEFORE":
            return lambda v: v.msg.internaldate.date() < d
        if op == "ON":
            return lambda v: v.msg.internaldate.date() == d
        return lambda v: v.msg.internaldate.date() >= d
    if op in ("SENTBEFORE", "SENTON", "SENTSINCE"):
        d = a[0]
        if op == "SENTBEFORE":
            return lambda v: v.sent() < d
        if op == "SENTON":
            return lambda v: v.sent() == d
        return lambda v: v.sent() >= d
    raise AssertionError(f"unknown op {op}")


def _compile_text(op: str, a: tuple[Any, ...]) -> Predicate:
    """HEADER, ADDRESS, BODY and TEXT: substring tests on case-folded text (the needle was
    folded when parsed), which need the message's header or body from the store."""
    if op == "HEADER":
        name, needle = a

        def header_match(v: _View) -> bool:
            values = v.fields().get(name)
            return values is not None and any(needle in x for x in values)

        return header_match
    if op == "ADDRESS":
        name, needle = a

        def address_match(v: _View) -> bool:
            # RFC 3501 6.4.4: the string is "contained in the" field; besides the field as
            # written, match its addresses as they read, so comments, folding and quoting
            # inside an address do not hide it (issue 9; Dovecot matches the parsed form too)
            values = v.fields().get(name)
            if values is None:
                return False
            return any(needle in x for x in values) or any(needle in x for x in v.addresses(name))

        return address_match
    if op == "BODY":
        needle = a[0]
        return lambda v: needle in v.body()
    needle = a[0]

    def text_match(v: _View) -> bool:
        if any(needle in x for vals in v.fields().values() for x in vals):
            return True
        return needle in v.body()

    return text_match


def header_of(raw: bytes) -> bytes:
    """The header block of a stored message (what ``header_bytes`` should return)."""
    return raw[: split_header(raw)[1]]
