"""The Sieve language's syntax (RFC 5228 section 8): lexer, parser, serializer.  Our own code.

No maintained library fits: sievelib parses with process-wide command tables (``require``
mutates shared state), knows neither ``include``, ``mailbox``, ``index`` nor ``ereject``, and
reports errors as free text.  Here the parser knows only the grammar; what the commands mean,
which arguments they take and which extensions they need is :mod:`.validate`'s job.

The tree keeps the script's shape exactly (a single string is not a one-element string list,
a test is not a one-element test list) so that :func:`serialize` and :func:`parse` round-trip;
line numbers are carried for error messages but are not part of equality.

Every problem is a :class:`SieveParseError` with the line and a reason a person can act on;
no other exception leaves :func:`parse` for any input (a hypothesis test holds us to it).
Nesting is bounded so a hostile script cannot exhaust the interpreter's stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Deepest nesting of blocks and tests together (Pigeonhole allows 32 of each).
MAX_NESTING = 64
#: Largest number literal: RFC 5228 2.4.1 needs 2**31 - 1; bigger values are refused, not
#: silently wrapped.
MAX_NUMBER = 2**63 - 1

_QUANTIFIERS = {"K": 2**10, "M": 2**20, "G": 2**30}
_ALPHA = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
_ALNUM = _ALPHA | frozenset("0123456789")
_DIGITS = frozenset("0123456789")


class SieveParseError(Exception):
    """A script that is not valid Sieve: ``line`` (1-based) and ``reason``."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason


@dataclass(frozen=True)
class Tag:
    """A tagged argument such as ``:contains`` (name without the colon, lower case:
    identifiers are case-insensitive, RFC 5228 2.3)."""

    name: str


#: An argument: a tag, a number, a single string, or a string list (a tuple).
Arg = Tag | int | str | tuple[str, ...]


@dataclass(frozen=True)
class Test:
    name: str  # lower case
    args: tuple[Arg, ...] = ()
    #: a single nested test (``not``), a test list (``anyof``), or None
    tests: Test | tuple[Test, ...] | None = None
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Command:
    name: str  # lower case
    args: tuple[Arg, ...] = ()
    tests: Test | tuple[Test, ...] | None = None
    block: tuple[Command, ...] | None = None  # None: ends with ";"
    line: int = field(default=0, compare=False)


# -- lexer -------------------------------------------------------------------------------------

_PUNCT = {"[": "[", "]": "]", "(": "(", ")": ")", "{": "{", "}": "}", ",": ",", ";": ";"}


@dataclass(frozen=True)
class _Token:
    kind: str  # ident tag number string [ ] ( ) { } , ; eof
    value: str | int
    line: int


class _Lexer:
    """Turns script text into tokens; whitespace and both comment forms are skipped."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.line = 1

    def error(self, reason: str, line: int | None = None) -> SieveParseError:
        return SieveParseError(self.line if line is None else line, reason)

    def tokens(self) -> list[_Token]:
        out: list[_Token] = []
        while True:
            tok = self._next()
            out.append(tok)
            if tok.kind == "eof":
                return out

    def _skip_space(self) -> None:
        text, n = self.text, len(self.text)
        while self.pos < n:
            c = text[self.pos]
            if c == "\n":
                self.line += 1
                self.pos += 1
            elif c in " \t\r":
                self.pos += 1
            elif c == "#":  # hash-comment to the end of the line
                end = text.find("\n", self.pos)
                self.pos = n if end < 0 else end
            elif text.startswith("/*", self.pos):  # bracket-comment, does not nest
                end = text.find("*/", self.pos + 2)
                if end < 0:
                    raise self.error("unterminated /* comment")
                self.line += text.count("\n", self.pos, end)
                self.pos = end + 2
            else:
                return

    def _next(self) -> _Token:
        self._skip_space()
        text = self.text
        if self.pos >= len(text):
            return _Token("eof", "", self.line)
        c = text[self.pos]
        line = self.line
        if c in _PUNCT:
            self.pos += 1
            return _Token(c, c, line)
        if c == '"':
            return _Token("string", self._quoted(), line)
        if c == ":":
            self.pos += 1
            name = self._identifier()
            if not name:
                raise self.error("':' must start a tag such as :contains")
            return _Token("tag", name.lower(), line)
        if c in _DIGITS:
            return _Token("number", self._number(), line)
        if c in _ALPHA:
            name = self._identifier()
            if name.lower() == "text" and text.startswith(":", self.pos):
                self.pos += 1
                return _Token("string", self._multiline(line), line)
            return _Token("ident", name.lower(), line)
        if c == "\x00":
            raise self.error("NUL character in script")
        raise self.error(f"unexpected character {c!r}")

    def _identifier(self) -> str:
        start = self.pos
        text = self.text
        if self.pos < len(text) and text[self.pos] in _ALPHA:
            self.pos += 1
            while self.pos < len(text) and text[self.pos] in _ALNUM:
                self.pos += 1
        return text[start : self.pos]

    def _number(self) -> int:
        start = self.pos
        text = self.text
        while self.pos < len(text) and text[self.pos] in _DIGITS:
            self.pos += 1
        digits = text[start : self.pos]
        if len(digits) > 20:
            raise self.error("number too large")
        value = int(digits)
        if self.pos < len(text) and text[self.pos].upper() in _QUANTIFIERS:
            value *= _QUANTIFIERS[text[self.pos].upper()]
            self.pos += 1
        if self.pos < len(text) and text[self.pos] in _ALNUM:
            raise self.error(f"bad number {text[start : self.pos + 1]!r} (quantifiers: K, M, G)")
        if value > MAX_NUMBER:
            raise self.error("number too large")
        return value

    def _quoted(self) -> str:
        """RFC 5228 2.4.2: ``\\\\`` and ``\\"`` are escapes; any other backslash is dropped
        (an undefined escape stands for the character itself)."""
        text = self.text
        start_line = self.line
        self.pos += 1
        out: list[str] = []
        run = self.pos
        while True:
            if self.pos >= len(text):
                raise self.error("unterminated string", start_line)
            c = text[self.pos]
            if c == '"':
                out.append(text[run : self.pos])
                self.pos += 1
                return "".join(out)
            if c == "\\":
                out.append(text[run : self.pos])
                if self.pos + 1 >= len(text):
                    raise self.error("unterminated string", start_line)
                nxt = text[self.pos + 1]
                if nxt == "\n":
                    self.line += 1
                elif nxt == "\x00":
                    raise self.error("NUL character in string")
                out.append(nxt)
                self.pos += 2
                run = self.pos
                continue
            if c == "\n":
                self.line += 1
            elif c == "\x00":
                raise self.error("NUL character in string")
            self.pos += 1

    def _multiline(self, start_line: int) -> str:
        """RFC 5228 2.4.2 multi-line: ``text:`` [spaces] [#comment] CRLF, lines, ``.`` CRLF;
        a line starting with ``..`` stands for one starting with ``.``.  Bare LF line ends
        are accepted too (scripts edited on Unix)."""
        text = self.text
        while self.pos < len(text) and text[self.pos] in " \t":
            self.pos += 1
        if self.pos < len(text) and text[self.pos] == "#":
            end = text.find("\n", self.pos)
            self.pos = len(text) if end < 0 else end
        if text.startswith("\r\n", self.pos):
            self.pos += 2
        elif text.startswith("\n", self.pos):
            self.pos += 1
        else:
            raise self.error("text: must be followed by a line break")
        self.line += 1
        lines: list[str] = []
        while True:
            if self.pos >= len(text):
                raise self.error(
                    "unterminated text: block (end it with a line holding '.')", start_line
                )
            end = text.find("\n", self.pos)
            if end < 0:
                raise self.error(
                    "unterminated text: block (end it with a line holding '.')", start_line
                )
            raw = text[self.pos : end + 1]
            self.pos = end + 1
            content = raw[:-2] if raw.endswith("\r\n") else raw[:-1]
            if "\x00" in content:
                raise self.error("NUL character in string")
            if content == ".":
                self.line += 1
                return "".join(lines)
            if content.startswith("."):
                raw = raw[1:]  # dot-stuffing
            lines.append(raw)
            self.line += 1


# -- parser ------------------------------------------------------------------------------------


class _Parser:
    def __init__(self, tokens: list[_Token]) -> None:
        self.toks = tokens
        self.i = 0
        self.depth = 0

    @property
    def tok(self) -> _Token:
        return self.toks[self.i]

    def error(self, reason: str) -> SieveParseError:
        return SieveParseError(self.tok.line, reason)

    def _describe(self, tok: _Token) -> str:
        if tok.kind == "eof":
            return "end of script"
        if tok.kind == "string":
            return "a string"
        if tok.kind == "number":
            return f"number {tok.value}"
        if tok.kind == "tag":
            return f"tag :{tok.value}"
        if tok.kind == "ident":
            return f"identifier {tok.value!r}"
        return f"'{tok.value}'"

    def _nest(self) -> None:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise self.error(f"nesting deeper than {MAX_NESTING} levels")

    def commands(self, until: str) -> tuple[Command, ...]:
        out: list[Command] = []
        while self.tok.kind != until:
            if self.tok.kind != "ident":
                if until == "}" and self.tok.kind == "eof":
                    raise self.error("missing '}' at end of script")
                raise self.error(f"expected a command, found {self._describe(self.tok)}")
            out.append(self.command())
        return tuple(out)

    def command(self) -> Command:
        name_tok = self.tok
        self.i += 1
        args, tests = self.arguments()
        if self.tok.kind == ";":
            self.i += 1
            return Command(str(name_tok.value), args, tests, None, name_tok.line)
        if self.tok.kind == "{":
            self.i += 1
            self._nest()
            block = self.commands("}")
            self.depth -= 1
            self.i += 1
            return Command(str(name_tok.value), args, tests, block, name_tok.line)
        raise self.error(
            f"expected ';' or '{{' after {name_tok.value!r}, found {self._describe(self.tok)}"
        )

    def arguments(self) -> tuple[tuple[Arg, ...], Test | tuple[Test, ...] | None]:
        args: list[Arg] = []
        while True:
            tok = self.tok
            if tok.kind == "tag":
                args.append(Tag(str(tok.value)))
                self.i += 1
            elif tok.kind == "number":
                args.append(int(tok.value))
                self.i += 1
            elif tok.kind == "string":
                args.append(str(tok.value))
                self.i += 1
            elif tok.kind == "[":
                args.append(self.string_list())
            else:
                break
        tests: Test | tuple[Test, ...] | None = None
        if self.tok.kind == "ident":
            self._nest()
            tests = self.test()
            self.depth -= 1
        elif self.tok.kind == "(":
            self._nest()
            tests = self.test_list()
            self.depth -= 1
        return tuple(args), tests

    def string_list(self) -> tuple[str, ...]:
        self.i += 1  # "["
        items: list[str] = []
        while True:
            if self.tok.kind != "string":
                found = self._describe(self.tok)
                raise self.error(f"expected a string in the list, found {found}")
            items.append(str(self.tok.value))
            self.i += 1
            if self.tok.kind == ",":
                self.i += 1
                continue
            if self.tok.kind == "]":
                self.i += 1
                return tuple(items)
            found = self._describe(self.tok)
            raise self.error(f"expected ',' or ']' in string list, found {found}")

    def test(self) -> Test:
        tok = self.tok
        if tok.kind != "ident":
            raise self.error(f"expected a test, found {self._describe(tok)}")
        self.i += 1
        args, tests = self.arguments()
        return Test(str(tok.value), args, tests, tok.line)

    def test_list(self) -> tuple[Test, ...]:
        self.i += 1  # "("
        items: list[Test] = []
        while True:
            items.append(self.test())
            if self.tok.kind == ",":
                self.i += 1
                continue
            if self.tok.kind == ")":
                self.i += 1
                return tuple(items)
            raise self.error(f"expected ',' or ')' in test list, found {self._describe(self.tok)}")


def parse(text: str) -> tuple[Command, ...]:
    """Parse a whole script (RFC 5228 8.2 ``start = commands``)."""
    parser = _Parser(_Lexer(text).tokens())
    commands = parser.commands("eof")
    return commands


def parse_bytes(data: bytes) -> tuple[Command, ...]:
    """Scripts are UTF-8 (RFC 5228 2.2): invalid UTF-8 is reported with its line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise SieveParseError(line, "script is not valid UTF-8") from None
    return parse(text)


# -- serializer --------------------------------------------------------------------------------


def quote(value: str) -> str:
    """A quoted-string for ``value`` (only ``\\`` and ``"`` need escaping)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _arg(arg: Arg) -> str:
    if isinstance(arg, Tag):
        return ":" + arg.name
    if isinstance(arg, bool):
        raise TypeError("booleans are not Sieve arguments")
    if isinstance(arg, int):
        return str(arg)
    if isinstance(arg, str):
        return quote(arg)
    return "[" + ", ".join(quote(s) for s in arg) + "]"


def _tests(tests: Test | tuple[Test, ...] | None) -> str:
    if tests is None:
        return ""
    if isinstance(tests, Test):
        return " " + _test(tests)
    return " (" + ", ".join(_test(t) for t in tests) + ")"


def _test(test: Test) -> str:
    return test.name + "".join(" " + _arg(a) for a in test.args) + _tests(test.tests)


def serialize(commands: tuple[Command, ...] | list[Command], indent: int = 0) -> str:
    """Canonical text for a parsed script (what :func:`parse` reads back as an equal tree)."""
    pad = "    " * indent
    lines: list[str] = []
    for cmd in commands:
        head = pad + cmd.name + "".join(" " + _arg(a) for a in cmd.args) + _tests(cmd.tests)
        if cmd.block is None:
            lines.append(head + ";\n")
        else:
            lines.append(head + " {\n" + serialize(cmd.block, indent + 1) + pad + "}\n")
    return "".join(lines)
