"""IMAP4rev1 command reader and argument helpers (RFC 3501 section 9, RFC 7888 LITERAL+).

Our own code (twisted.mail.imap4's parser cannot do LITERAL+, modifiers or partial FETCH).
No I/O: the protocol adapter feeds complete lines (CRLF stripped) to ``CommandReader.feed_line``;
when the reader answers ``NeedLiteral`` the adapter sends ``+ `` if ``sync`` is set, reads exactly
``size`` octets raw and passes them to ``feed_literal``; then it goes on feeding lines. Each feed
returns one of:

- ``Command``: a complete command (tag, name, UID flag, token list);
- ``NeedLiteral``: read a literal first;
- ``BadCommand``: answer ``tag BAD reason`` (or ``tag NO [TOOBIG] reason`` when ``code`` is
  ``"TOOBIG"`` and the command was recognised); ``close`` says the connection must be closed;
  ``discard`` says a non-synchronising literal of that many octets follows that the adapter must
  read and feed (the reader throws it and the rest of the bad command away);
- ``None``: nothing to answer (used while discarding).

Tokens: ``Atom`` (str), ``Quoted`` and ``Literal`` (bytes), ``NIL``, and Python lists for
parenthesised lists. Fetch atoms such as ``BODY.PEEK[HEADER.FIELDS (FROM TO)]<0.100>`` stay one
``Atom``. AUTHENTICATE continuation lines and IDLE's ``DONE`` are not commands: the server reads
them itself without this reader.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import TypeAlias

from mailsuite.imap.message import Section
from mailsuite.imap.sequence import SequenceSet

__all__ = [
    "NIL",
    "SYSTEM_FLAGS",
    "Atom",
    "BadCommand",
    "Command",
    "CommandReader",
    "FetchItem",
    "FetchRequest",
    "Literal",
    "NeedLiteral",
    "ParseError",
    "Quoted",
    "Token",
    "astring",
    "atom",
    "flag_list",
    "mailbox",
    "nstring",
    "number",
    "nz_number",
    "parse_date",
    "parse_date_time",
    "parse_fetch",
    "sequence_set",
    "string",
]


class ParseError(ValueError):
    """Bad command syntax; ``str(err)`` is a human reason for ``tag BAD reason``."""


class Atom(str):
    """An unquoted token (atoms, numbers, sequence sets, flags, fetch atoms)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Atom({str(self)!r})"


class Quoted(bytes):
    """A quoted string, escapes removed."""

    def __repr__(self) -> str:
        return f"Quoted({bytes(self)!r})"


class Literal(bytes):
    """A literal ``{N}`` / ``{N+}`` string."""

    def __repr__(self) -> str:
        return f"Literal({bytes(self)!r})"


class _Nil:
    __slots__ = ()
    _instance: _Nil | None = None

    def __new__(cls) -> _Nil:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NIL"

    def __bool__(self) -> bool:
        return False


NIL = _Nil()

#: one argument of a command: a parenthesised list holds more of them
Token: TypeAlias = "Atom | Quoted | Literal | _Nil | list[Token]"


@dataclass(frozen=True, slots=True)
class Command:
    tag: str
    command: str  # upper-cased, e.g. "FETCH" (also for "UID FETCH")
    uid: bool  # True for "UID <command>"
    args: list[Token]

    @property
    def name(self) -> str:
        """``"UID FETCH"`` or ``"FETCH"``."""
        return "UID " + self.command if self.uid else self.command


@dataclass(frozen=True, slots=True)
class NeedLiteral:
    size: int
    sync: bool  # send "+ Ready" before reading


@dataclass(frozen=True, slots=True)
class BadCommand:
    tag: str | None  # None: answer untagged "* BAD"
    reason: str
    code: str | None = None  # "TOOBIG" for size limits
    close: bool = False  # close the connection after answering
    discard: int = 0  # octets of a non-sync literal to read and feed before the next line
    command: str | None = None  # the command name, when it was read


Result = Command | NeedLiteral | BadCommand | None

_LITERAL_AT_END = re.compile(rb"(~?)\{(\d{1,20})(\+?)\}\Z")
_TAG_RE = re.compile(rb"[\x21\x23\x24\x26\x27\x2c-\x5b\x5d-\x7a\x7c\x7d\x7e]+")  # no ()*+%"\{
_FETCH_BRACKET = frozenset({"BODY", "BODY.PEEK", "BINARY", "BINARY.PEEK", "BINARY.SIZE"})
_STOP = frozenset(b' ()"')


class _State:
    __slots__ = ("after_literal", "command", "expect_literal", "size", "stack", "tag", "uid")

    def __init__(self) -> None:
        self.stack: list[list[Token]] = [[]]
        self.tag: str | None = None
        self.command: str | None = None
        self.uid = False
        self.size = 0
        self.expect_literal: int | None = None
        self.after_literal = False


class CommandReader:
    """Incremental, size-limited IMAP command reader (see module docstring)."""

    def __init__(
        self,
        *,
        max_line: int = 64 * 1024,
        max_literal: int = 64 * 1024,
        max_append_literal: int = 64 * 1024 * 1024,
        max_command: int = 256 * 1024,
        literal_plus: bool = True,
    ) -> None:
        """``max_literal`` bounds literals of every command but APPEND (which gets
        ``max_append_literal``); ``max_command`` bounds the sum of lines and non-APPEND
        literals of one command. ``literal_plus=False`` rejects ``{N+}`` (LITERAL- servers
        would instead accept it up to 4096 octets; we are LITERAL+)."""
        self.max_line = max_line
        self.max_literal = max_literal
        self.max_append_literal = max_append_literal
        self.max_command = max_command
        self.literal_plus = literal_plus
        self._st = _State()
        self._discarding = False

    # -- feeding ---------------------------------------------------------------------------

    @property
    def in_command(self) -> bool:
        """True between the first line of a command and its end."""
        return self._st.tag is not None or self._discarding

    def feed_line(self, line: bytes) -> Result:
        st = self._st
        if st.expect_literal is not None:
            raise RuntimeError("feed_literal expected")
        m = _LITERAL_AT_END.search(line) if line.endswith(b"}") else None
        if self._discarding:
            if m and not m.group(3):
                # The client waits for "+" that never comes; it has its BAD already.
                self._discarding = False
                return None
            if m:
                n = int(m.group(2))
                if n > self.max_literal:
                    self._discarding = False
                    return BadCommand(None, "Literal too big", "TOOBIG", close=True)
                st.expect_literal = n
                return NeedLiteral(n, False)
            self._discarding = False
            return None
        if len(line) > self.max_line:
            return self._fail("Line too long", m, code="TOOBIG")
        st.size += len(line) + 2
        first = st.tag is None
        try:
            pos = self._head(line) if first else 0
            end = m.start() if m else len(line)
            self._tokens(line, pos, end)
        except ParseError as exc:
            return self._fail(str(exc), m)
        if m is None:
            if st.size > self.max_command:
                return self._fail("Command too long", None, code="TOOBIG")
            return self._finish()
        if m.group(1):
            return self._fail("literal8 (BINARY) is not supported", m)
        size = int(m.group(2))
        sync = not m.group(3)
        if not sync and not self.literal_plus:
            return self._fail("Non-synchronizing literals are not supported", m)
        is_append = st.command == "APPEND"
        limit = self.max_append_literal if is_append else self.max_literal
        if size > limit or (not is_append and st.size + size > self.max_command):
            return self._fail("Literal too big", m, code="TOOBIG")
        if st.size > self.max_command:
            return self._fail("Command too long", m, code="TOOBIG")
        st.expect_literal = size
        if not is_append:
            st.size += size
        return NeedLiteral(size, sync)

    def feed_literal(self, data: bytes) -> Result:
        """Give the literal octets announced by ``NeedLiteral`` (or ``BadCommand.discard``)."""
        st = self._st
        if st.expect_literal is None:
            raise RuntimeError("no literal expected")
        if len(data) != st.expect_literal:
            raise RuntimeError(f"literal of {st.expect_literal} octets expected, got {len(data)}")
        st.expect_literal = None
        if self._discarding:
            return None
        st.stack[-1].append(Literal(data))
        st.after_literal = True
        return None

    # -- internals -------------------------------------------------------------------------

    def _fail(self, reason: str, m: re.Match[bytes] | None, code: str | None = None) -> BadCommand:
        st = self._st
        tag, command = st.tag, st.command
        self._st = _State()
        close = False
        discard = 0
        if m is not None and m.group(3):  # a non-sync literal follows whatever we say
            n = int(m.group(2))
            if n > self.max_literal:
                close = True
            else:
                discard = n
                self._discarding = True
                self._st.expect_literal = n
        return BadCommand(tag, reason, code, close=close, discard=discard, command=command)

    def _finish(self) -> Result:
        st = self._st
        self._st = _State()
        if len(st.stack) != 1:
            return BadCommand(st.tag, "Unbalanced parentheses", command=st.command)
        assert st.tag is not None and st.command is not None
        return Command(st.tag, st.command, st.uid, st.stack[0])

    def _head(self, line: bytes) -> int:
        st = self._st
        m = _TAG_RE.match(line)
        if not m:
            raise ParseError("Missing or invalid tag")
        st.tag = m.group().decode("ascii")
        pos = m.end()
        if line[pos : pos + 1] != b" ":
            raise ParseError("Missing command")
        pos += 1
        name, pos = self._word(line, pos)
        if not name:
            raise ParseError("Missing command")
        st.command = name
        if name == "UID":
            if line[pos : pos + 1] != b" ":
                raise ParseError("Missing command after UID")
            sub, pos = self._word(line, pos + 1)
            if sub not in {"FETCH", "STORE", "COPY", "MOVE", "SEARCH", "EXPUNGE", "SORT", "THREAD"}:
                raise ParseError("Unknown UID command")
            st.uid = True
            st.command = sub
        if pos < len(line):
            if line[pos] != 0x20:
                raise ParseError("Invalid command name")
            pos += 1
        return pos

    @staticmethod
    def _word(line: bytes, pos: int) -> tuple[str, int]:
        end = pos
        n = len(line)
        while end < n and (
            0x41 <= line[end] <= 0x5A
            or 0x61 <= line[end] <= 0x7A
            or (end > pos and (0x30 <= line[end] <= 0x39 or line[end] == 0x2D))
        ):
            end += 1
        return line[pos:end].decode("ascii").upper(), end

    def _tokens(self, line: bytes, pos: int, end: int) -> None:
        stack = self._st.stack
        need_sep = self._st.after_literal
        self._st.after_literal = False
        while pos < end:
            c = line[pos]
            if c == 0x20:
                pos += 1
                need_sep = False
                continue
            if c == 0x29:  # ')'
                if len(stack) == 1:
                    raise ParseError("Unexpected ')'")
                stack.pop()
                pos += 1
                need_sep = False  # ")(" occurs in response grammar (address lists, bodies)
                continue
            if need_sep:
                raise ParseError("Missing space between arguments")
            if c == 0x28:  # '('
                if len(stack) > 32:
                    raise ParseError("Lists nested too deeply")
                new: list[Token] = []
                stack[-1].append(new)
                stack.append(new)
                pos += 1
                continue
            if c == 0x22:  # '"'
                value, pos = _quoted(line, pos, end)
                stack[-1].append(Quoted(value))
                need_sep = True
                continue
            if c == 0x7B:  # '{' not at the end of the line
                raise ParseError("Literal must end the line")
            start = pos
            while pos < end and line[pos] not in _STOP:
                b = line[pos]
                if b < 0x20 or b > 0x7E:
                    raise ParseError("Invalid character in atom")
                if b == 0x5B and line[start:pos].upper().decode("ascii") in _FETCH_BRACKET:
                    pos = _bracket(line, pos, end)
                    continue
                pos += 1
            text = line[start:pos].decode("ascii")
            stack[-1].append(NIL if text.upper() == "NIL" else Atom(text))
            need_sep = True
        # a literal follows; it must be preceded by a separator or '(' / start of line
        if end < len(line) and need_sep:
            raise ParseError("Missing space before literal")


def _quoted(line: bytes, pos: int, end: int) -> tuple[bytes, int]:
    out = bytearray()
    i = pos + 1
    while i < end:
        c = line[i]
        if c == 0x22:
            return bytes(out), i + 1
        if c == 0x5C:
            if i + 1 < end and line[i + 1] in (0x22, 0x5C):
                out.append(line[i + 1])
                i += 2
                continue
            raise ParseError("Invalid escape in quoted string")
        if c == 0:
            raise ParseError("NUL in quoted string")
        out.append(c)
        i += 1
    raise ParseError("Unterminated quoted string")


def _bracket(line: bytes, pos: int, end: int) -> int:
    """Skip ``[...]`` of a fetch atom (spaces, parens and quotes allowed inside)."""
    i = pos + 1
    while i < end:
        c = line[i]
        if c == 0x5D:
            return i + 1
        if c == 0x22:
            _, i = _quoted(line, i, end)
            continue
        if c < 0x20 or c > 0x7E:
            raise ParseError("Invalid character in section")
        i += 1
    raise ParseError("Unterminated '[' in fetch attribute")


# -- argument helpers ------------------------------------------------------------------------


def astring(tok: object) -> bytes:
    """An astring (atom, quoted or literal) as bytes; NIL is the atom ``NIL``."""
    if isinstance(tok, bytes):
        return bytes(tok)
    if isinstance(tok, Atom):
        return tok.encode("ascii")
    if tok is NIL:
        return b"NIL"
    raise ParseError("Expected a string")


def string(tok: object) -> bytes:
    """A quoted string or literal only."""
    if isinstance(tok, bytes):
        return bytes(tok)
    raise ParseError("Expected a quoted string or literal")


def nstring(tok: object) -> bytes | None:
    if tok is NIL:
        return None
    return string(tok)


def atom(tok: object) -> str:
    if isinstance(tok, Atom):
        return str(tok)
    if tok is NIL:
        return "NIL"
    raise ParseError("Expected an atom")


def number(tok: object, *, maximum: int = 2**63 - 1) -> int:
    """A non-negative decimal number (RFC 3501 ``number``; ``mod-sequence-value`` up to 2^63)."""
    if isinstance(tok, Atom) and tok.isdigit() and tok.isascii() and len(tok) <= 20:
        value = int(tok)
        if value <= maximum:
            return value
    raise ParseError("Expected a number")


def nz_number(tok: object, *, maximum: int = 0xFFFFFFFF) -> int:
    value = number(tok, maximum=maximum)
    if value == 0:
        raise ParseError("Expected a non-zero number")
    return value


def sequence_set(tok: object) -> SequenceSet:
    if not isinstance(tok, Atom):
        raise ParseError("Expected a sequence set")
    try:
        return SequenceSet.parse(str(tok))
    except ValueError as exc:
        raise ParseError(str(exc)) from None


def mailbox(tok: object) -> str:
    """A mailbox name as sent (modified UTF-7, or UTF-8 with UTF8=ACCEPT), ``INBOX``
    normalised case-insensitively (RFC 3501 5.1).  Decode with
    :func:`mailsuite.store.mailbox_names.decode` if needed."""
    raw = astring(tok)
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ParseError("Mailbox name is not valid UTF-8") from None
    if any(ord(ch) < 0x20 or ch == "\x7f" for ch in name):
        raise ParseError("Control character in mailbox name")
    if name.upper() == "INBOX":
        return "INBOX"
    return name


SYSTEM_FLAGS = {
    f.lower(): f for f in ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft", "\\Recent")
}
_KEYWORD_BAD = frozenset('(){ %*"\\]')


def _flag(tok: object, allow_recent: bool) -> str:
    if not isinstance(tok, Atom) or not tok:
        raise ParseError("Expected a flag")
    text = str(tok)
    if text.startswith("\\"):
        canonical = SYSTEM_FLAGS.get(text.lower())
        if canonical is None:
            # RFC 3501 flag-extension: unknown \Flags are legal syntax; the server may refuse.
            if any(ch in _KEYWORD_BAD for ch in text[1:]) or len(text) == 1:
                raise ParseError(f"Invalid flag {text}")
            return text
        if canonical == "\\Recent" and not allow_recent:
            raise ParseError("\\Recent cannot be set by the client")
        return canonical
    if any(ch in _KEYWORD_BAD for ch in text):
        raise ParseError(f"Invalid keyword {text}")
    return text


def flag_list(tok: object, *, allow_recent: bool = False) -> list[str]:
    """``(\\Seen $Label)`` (or a single bare flag, as STORE allows) -> canonical flag names.

    ``NIL`` is the empty list: ``STORE 1 +FLAGS NIL`` is what clients that write an empty
    list as NIL send (issue 9).  The grammar would read it as the keyword "NIL"
    (flag-keyword = atom, RFC 3501 9), but a keyword spelled NIL could not be told from nil
    in FETCH and FLAGS responses by the many clients that parse NIL as nil there."""
    if tok is NIL:
        return []
    items = tok if isinstance(tok, list) else [tok]
    return [_flag(t, allow_recent) for t in items]


_MONTHS = {
    m: i + 1
    for i, m in enumerate(
        ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
    )
}
_DATE_RE = re.compile(r"(\d{1,2})-([A-Za-z]{3})-(\d{4})\Z")
_DATE_TIME_RE = re.compile(
    r"([ \d]\d)-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)\Z"
)


def parse_date(tok: object) -> date:
    """SEARCH ``date``: ``1-Feb-1994`` (atom or quoted)."""
    try:
        text = astring(tok).decode("ascii")
    except UnicodeDecodeError:
        raise ParseError("Invalid date") from None
    m = _DATE_RE.match(text)
    if not m or m.group(2).lower() not in _MONTHS:
        raise ParseError("Invalid date, expected e.g. 1-Feb-1994")
    try:
        return date(int(m.group(3)), _MONTHS[m.group(2).lower()], int(m.group(1)))
    except ValueError:
        raise ParseError("Invalid date") from None


def parse_date_time(tok: object) -> datetime:
    """APPEND ``date-time``: ``"01-Feb-1994 21:52:25 -0800"`` -> aware datetime."""
    if not isinstance(tok, bytes):
        raise ParseError("date-time must be a quoted string")
    try:
        text = tok.decode("ascii")
    except UnicodeDecodeError:
        raise ParseError("Invalid date-time") from None
    m = _DATE_TIME_RE.match(text)
    if not m or m.group(2).lower() not in _MONTHS:
        raise ParseError('Invalid date-time, expected e.g. "01-Feb-1994 21:52:25 -0800"')
    day, _, year, hh, mm, ss, sign, zh, zm = m.groups()
    offset = timedelta(hours=int(zh), minutes=int(zm))
    if offset >= timedelta(hours=24):
        raise ParseError("Invalid time zone")
    try:
        return datetime(
            int(year),
            _MONTHS[m.group(2).lower()],
            int(day),
            int(hh),
            int(mm),
            int(ss),
            tzinfo=timezone(-offset if sign == "-" else offset),
        )
    except ValueError:
        raise ParseError("Invalid date-time") from None


# -- FETCH attributes (RFC 3501 6.4.5, RFC 7162 3.1.4) -------------------------------------

_SIMPLE = frozenset(
    {
        "FLAGS",
        "INTERNALDATE",
        "RFC822",
        "RFC822.HEADER",
        "RFC822.TEXT",
        "RFC822.SIZE",
        "ENVELOPE",
        "BODY",
        "BODYSTRUCTURE",
        "UID",
        "MODSEQ",
    }
)
_MACROS = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
_SECTION_RE = re.compile(
    r"(?P<part>(?:[1-9]\d{0,8})(?:\.[1-9]\d{0,8})*)?"
    r"(?:(?(part)\.)(?P<kind>HEADER\.FIELDS\.NOT|HEADER\.FIELDS|HEADER|TEXT|MIME))?\Z",
    re.IGNORECASE,
)
_BODY_ATOM_RE = re.compile(
    r"(?P<name>BODY(?:\.PEEK)?)\[(?P<section>[^\]]*)\](?:<(?P<start>\d{1,10})(?:\.(?P<len>\d{1,10}))?>)?\Z",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class FetchItem:
    """One fetch attribute. ``name`` is upper-cased: ``FLAGS``, ``BODY[]`` items have ``name``
    ``"BODY"`` and a ``section``; ``BODY`` without a section is the non-extensible structure."""

    name: str
    section: Section | None = None
    partial: tuple[int, int] | None = None  # <origin.length>
    peek: bool = False

    @property
    def sets_seen(self) -> bool:
        """Fetching this sets \\Seen (RFC 3501 6.4.5): BODY[...], RFC822, RFC822.TEXT."""
        if self.name == "BODY" and self.section is not None:
            return not self.peek
        return self.name in ("RFC822", "RFC822.TEXT")

    def label(self, origin_served: int | None = None) -> str:
        """The response label: ``BODY[1.HEADER.FIELDS (FROM)]<0>`` (only the origin octet,
        RFC 3501 7.4.2; never ``.PEEK``)."""
        if self.section is None:
            return self.name
        text = f"BODY[{self.section.render()}]"
        if self.partial is not None:
            text += f"<{self.partial[0] if origin_served is None else origin_served}>"
        return text


@dataclass(frozen=True, slots=True)
class FetchRequest:
    items: tuple[FetchItem, ...]
    changedsince: int | None = None  # CHANGEDSINCE modifier (RFC 7162 3.1.4.1)
    vanished: bool = False  # QRESYNC VANISHED modifier (parsed; the server decides)

    @property
    def sets_seen(self) -> bool:
        return any(i.sets_seen for i in self.items)

    @property
    def needs_modseq(self) -> bool:
        """MODSEQ must be returned (asked for, or implied by CHANGEDSINCE)."""
        return self.changedsince is not None or any(i.name == "MODSEQ" for i in self.items)

    def with_uid(self) -> FetchRequest:
        """The request for UID FETCH: UID is always returned (RFC 3501 6.4.8)."""
        if any(i.name == "UID" for i in self.items):
            return self
        return FetchRequest((FetchItem("UID"), *self.items), self.changedsince, self.vanished)

    @property
    def needs_raw(self) -> bool:
        """The message file must be read (not answerable from the index alone)."""
        return any(
            i.name in ("RFC822", "RFC822.HEADER", "RFC822.TEXT") or i.section is not None
            for i in self.items
        )


def _header_list(text: str) -> tuple[str, ...]:
    reader = CommandReader()
    res = reader.feed_line(b"x X " + text.encode("ascii"))
    if not isinstance(res, Command) or len(res.args) != 1 or not isinstance(res.args[0], list):
        raise ParseError("Invalid header list")
    names = []
    for tok in res.args[0]:
        name = astring(tok).decode("ascii", "replace")
        if not name or any(c <= " " or c == ":" or c > "~" for c in name):
            raise ParseError("Invalid header field name")
        names.append(name)
    if not names:
        raise ParseError("Empty header list")
    return tuple(names)


def _fetch_item(tok: object) -> FetchItem:
    if not isinstance(tok, Atom):
        raise ParseError("Invalid fetch attribute")
    text = str(tok)
    upper = text.upper()
    if upper in _SIMPLE:
        return FetchItem(upper)
    m = _BODY_ATOM_RE.match(text)
    if not m:
        if upper.startswith("BINARY"):
            raise ParseError("BINARY fetch is not supported")
        raise ParseError(f"Unknown fetch attribute {text}")
    spec = m.group("section")
    fields: tuple[str, ...] = ()
    head, sep, rest = spec.partition(" ")
    sm = _SECTION_RE.match(head)
    if not sm:
        raise ParseError("Invalid section")
    kind = (sm.group("kind") or "").upper() or None
    part = tuple(int(p) for p in sm.group("part").split(".")) if sm.group("part") else ()
    if kind in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
        if not sep:
            raise ParseError("HEADER.FIELDS needs a header list")
        fields = _header_list(rest)
    elif sep:
        raise ParseError("Invalid section")
    if kind == "MIME" and not part:
        raise ParseError("MIME needs a part number")
    partial = None
    if m.group("start") is not None:
        if m.group("len") is None or int(m.group("len")) == 0:
            raise ParseError("Partial needs <origin.length> with a non-zero length")
        partial = (int(m.group("start")), int(m.group("len")))
    peek = m.group("name").upper() == "BODY.PEEK"
    return FetchItem("BODY", Section(part, kind, fields), partial, peek)


def parse_fetch(args: list[Token]) -> FetchRequest:
    """Parse the FETCH arguments after the sequence set: an item, a macro or a list, then an
    optional modifier list ``(CHANGEDSINCE n [VANISHED])``."""
    if not args:
        raise ParseError("Missing fetch attributes")
    spec, mods = args[0], args[1:]
    items: list[FetchItem] = []
    if isinstance(spec, Atom) and spec.upper() in _MACROS:
        items = [FetchItem(n) for n in _MACROS[spec.upper()]]
    elif isinstance(spec, list):
        if not spec:
            raise ParseError("Empty fetch attribute list")
        items = [_fetch_item(t) for t in spec]
    else:
        items = [_fetch_item(spec)]
    changedsince = None
    vanished = False
    if mods:
        if len(mods) != 1 or not isinstance(mods[0], list) or not mods[0]:
            raise ParseError("Invalid fetch modifiers")
        toks = mods[0]
        i = 0
        while i < len(toks):
            name = atom(toks[i]).upper()
            if name == "CHANGEDSINCE" and i + 1 < len(toks) and changedsince is None:
                changedsince = number(toks[i + 1])
                i += 2
            elif name == "VANISHED" and not vanished:
                vanished = True
                i += 1
            else:
                raise ParseError(f"Unknown fetch modifier {name}")
        if vanished and changedsince is None:
            raise ParseError("VANISHED requires CHANGEDSINCE")
    return FetchRequest(tuple(items), changedsince, vanished)
