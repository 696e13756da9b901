"""ManageSieve command lines (RFC 5804 4): an atom, then strings and numbers, where a string
is quoted or a literal ``{N+}`` (RFC 5804's client form) or ``{N}`` (accepted alike: RFC 5804
defines no continuation for it, so the data simply follows, as Dovecot does).

:class:`CommandReader` takes one line (without CRLF) at a time and says what it needs next:
a complete :class:`Command`, a :class:`NeedLiteral` (the I/O side then reads exactly that
many octets and calls :meth:`CommandReader.feed_literal`), or a :class:`BadCommand`.  Literal
sizes are bounded (``max_literal``, the script size limit); a larger one is refused and its
octets skipped, never buffered.  A line that is only a string is a SASL continuation answer
(RFC 5804 2.1) and comes back as a Command with an empty name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_ARGS = 8
#: Hard limit on any literal the client may announce (even ones we only skip).
MAX_ANNOUNCED = 2**31 - 1


@dataclass
class Command:
    name: str  # upper case; "" for a bare string line (SASL response)
    args: list[str | int] = field(default_factory=list)


@dataclass(frozen=True)
class NeedLiteral:
    size: int


@dataclass(frozen=True)
class BadCommand:
    reason: str
    code: str | None = None
    discard: int = 0  # literal octets to read and drop before the next line
    close: bool = False


Result = Command | NeedLiteral | BadCommand | None


class _Syntax(Exception):
    pass


class CommandReader:
    def __init__(self, max_literal: int) -> None:
        self.max_literal = max_literal
        self._partial: Command | None = None

    def reset(self) -> None:
        self._partial = None

    def feed_line(self, line: bytes) -> Result:
        cmd = self._partial
        self._partial = None
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return BadCommand("Command is not valid UTF-8")
        pos = 0
        if cmd is None:
            if not text:
                return None  # empty lines are ignored
            if text[0] in '"{':
                cmd = Command("")
            else:
                end = text.find(" ")
                end = len(text) if end < 0 else end
                name = text[:end]
                if not name.isalpha() or len(name) > 20:
                    return BadCommand("Bad command name")
                cmd = Command(name.upper())
                pos = end
        try:
            return self._arguments(cmd, text, pos)
        except _Syntax as e:
            return BadCommand(f"Syntax error: {e}")

    def feed_literal(self, data: bytes) -> Result:
        cmd = self._partial
        if cmd is None:
            return BadCommand("Unexpected literal")
        try:
            cmd.args.append(data.decode("utf-8"))
        except UnicodeDecodeError:
            self._partial = None
            return BadCommand("String is not valid UTF-8")
        return None  # the rest of the command follows on the next line

    def _arguments(self, cmd: Command, text: str, pos: int) -> Result:
        n = len(text)
        while pos < n:
            if text[pos] != " ":
                if not cmd.args and not cmd.name and pos == 0:
                    pass  # a bare string line starts at once
                else:
                    raise _Syntax("arguments must be separated by one space")
            else:
                pos += 1
            if pos >= n:
                raise _Syntax("trailing space")
            if len(cmd.args) >= MAX_ARGS:
                raise _Syntax("too many arguments")
            c = text[pos]
            if c == '"':
                value, pos = _quoted(text, pos)
                cmd.args.append(value)
            elif c == "{":
                end = text.find("}", pos)
                if end != n - 1:
                    raise _Syntax("a literal {N+} must end the line")
                spec = text[pos + 1 : end]
                if spec.endswith("+"):
                    spec = spec[:-1]
                if not spec.isdigit() or len(spec) > 10:
                    raise _Syntax("bad literal size")
                size = int(spec)
                if size > MAX_ANNOUNCED:
                    return BadCommand("Literal too large", close=True)
                if size > self.max_literal:
                    return BadCommand(
                        f"Literal larger than the limit of {self.max_literal} octets",
                        "QUOTA/MAXSIZE",
                        discard=size,
                    )
                self._partial = cmd
                return NeedLiteral(size)
            elif c.isdigit():
                end = pos
                while end < n and text[end].isdigit():
                    end += 1
                if end - pos > 10 or (end < n and text[end] != " "):
                    raise _Syntax("bad number")
                cmd.args.append(int(text[pos:end]))
                pos = end
            else:
                raise _Syntax("expected a string or a number")
        return cmd


def _quoted(text: str, pos: int) -> tuple[str, int]:
    """RFC 5804 4: ``\\"`` and ``\\\\`` are the only escapes; no CR/LF inside."""
    out: list[str] = []
    i = pos + 1
    n = len(text)
    while i < n:
        c = text[i]
        if c == '"':
            return "".join(out), i + 1
        if c == "\\":
            if i + 1 < n and text[i + 1] in '"\\':
                out.append(text[i + 1])
                i += 2
                continue
            raise _Syntax("bad escape in quoted string")
        if c in "\r\n\0":
            raise _Syntax("control character in quoted string")
        out.append(c)
        i += 1
    raise _Syntax("unterminated quoted string")
