"""Variables (RFC 5229): ``${name}`` / ``${1}`` expansion, ``set`` modifiers, scopes with
``global`` (RFC 6609 3.4), and the imap4flags flag lists (RFC 5232 3) kept as variables."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

#: Longest value a variable holds (RFC 5229 6: implementations may limit it); longer
#: values are cut, as Pigeonhole does.
MAX_VALUE = 64 * 1024
#: Most variables one script may create.
MAX_VARIABLES = 1024

_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*|[0-9]+)\}")
_SYSTEM_FLAGS = {
    f.lower(): f for f in ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft")
}
#: RFC 3501 9: atom-specials (and ``]``) cannot appear in a keyword.
_BAD_KEYWORD = set('(){ %*"\\]')

#: Name of the internal flags variable (RFC 5232 3); not a valid Sieve variable name, so
#: a script cannot reach it by ``${...}``.
INTERNAL_FLAGS = "\0flags"


@dataclass
class Scope:
    """One script's variables; names declared ``global`` live in the shared dict."""

    shared: dict[str, str]
    local: dict[str, str] = field(default_factory=dict)
    global_names: set[str] = field(default_factory=set)

    def _table(self, name: str) -> dict[str, str]:
        return self.shared if name in self.global_names or name == INTERNAL_FLAGS else self.local

    def get(self, name: str) -> str:
        name = name.lower()
        return self._table(name).get(name, "")

    def set(self, name: str, value: str) -> None:
        name = name.lower()
        table = self._table(name)
        if name not in table and len(self.local) + len(self.shared) >= MAX_VARIABLES:
            from mailsuite.sieve.match import SieveRuntimeError

            raise SieveRuntimeError(f"more than {MAX_VARIABLES} variables")
        table[name] = value[:MAX_VALUE]


def expand(text: str, scope: Scope, matches: list[str]) -> str:
    """RFC 5229 3: replace references; unknown variables are empty, references with bad
    names (``${a-b}``) or unknown namespaces are left as they are."""
    if "${" not in text:
        return text

    def repl(m: re.Match[str]) -> str:
        name = m.group(1)
        if name.isdigit():
            n = int(name)
            return matches[n] if n < len(matches) else ""
        if "." in name:
            return m.group(0)  # namespaces (RFC 5229 3) other than none: not supported
        return scope.get(name)

    return _REF.sub(repl, text)[:MAX_VALUE]


def apply_modifiers(value: str, modifiers: dict[str, str]) -> str:
    """RFC 5229 4.1: modifiers by precedence, highest first: :lower/:upper (40),
    :lowerfirst/:upperfirst (30), :quotewildcard (20), :length (10)."""
    case = modifiers.get("case")
    if case == "lower":
        value = value.lower()
    elif case == "upper":
        value = value.upper()
    first = modifiers.get("first")
    if first and value:
        value = (value[0].lower() if first == "lowerfirst" else value[0].upper()) + value[1:]
    if modifiers.get("quote"):
        value = re.sub(r"([*?\\])", r"\\\1", value)
    if modifiers.get("length"):
        value = str(len(value))
    return value


# -- imap4flags ----------------------------------------------------------------------------------


def flag_list(strings: list[str]) -> list[str]:
    """RFC 5232 3: each string may hold several space-separated flags; duplicates (flags are
    case-insensitive) are dropped, keeping the first spelling; system flags are written in
    their canonical case."""
    out: list[str] = []
    seen: set[str] = set()
    for s in strings:
        for flag in s.split():
            key = flag.lower()
            if key in seen:
                continue
            seen.add(key)
            out.append(_SYSTEM_FLAGS.get(key, flag))
    return out


def storable_flags(flags: list[str] | str) -> frozenset[str]:
    """The flags a delivery can set: system flags but ``\\Recent``, and keywords that are
    IMAP atoms (RFC 5232 3: invalid flags are ignored)."""
    items = flag_list([flags] if isinstance(flags, str) else flags)
    out = set()
    for flag in items:
        if flag.startswith("\\"):
            if flag.lower() in _SYSTEM_FLAGS:
                out.add(flag)
        elif not (set(flag) & _BAD_KEYWORD) and all(0x20 < ord(c) < 0x7F for c in flag):
            out.add(flag)
    return frozenset(out)
