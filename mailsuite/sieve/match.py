"""Comparators and match types: how a Sieve test compares values with keys.

* Comparators (RFC 4790 9): ``i;octet`` (code points, the same order as UTF-8 octets),
  ``i;ascii-casemap`` (ASCII letters folded, nothing else), ``i;ascii-numeric`` (the
  leading digits as a number; a string without one is positive infinity, equal only to
  another such string).
* Match types: ``:is``, ``:contains``, ``:matches`` (RFC 5228 2.7.1: ``*`` and ``?``, ``\\``
  escapes) with the wildcard captures of RFC 5229 3.2 (each wildcard matches as little as
  possible, leftmost first), and the relational ``:value``/``:count`` (RFC 5231).

Matching never backtracks exponentially: ``:matches`` without ``?`` is a chain of ``find``
calls, and the general case is the classic last-star wildcard algorithm (O(n*m)); every
comparison is charged to the run's :class:`Budget` so a hostile script ends in an error
(and a keep) instead of holding the delivery thread.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ASCII_LOWER = str.maketrans(_UPPER, _UPPER.lower())


class SieveRuntimeError(Exception):
    """The script failed while running (limit exceeded, bad value): the caller keeps."""


class Budget:
    """Steps and wall-clock time one script run may use (RFC 5228 10: implementations
    should limit the resources a script can consume)."""

    def __init__(
        self, max_steps: int, deadline: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.left = max_steps
        self.deadline = deadline
        self.clock = clock
        self.calls = 0

    def charge(self, n: int = 1) -> None:
        """Count ``n`` steps; the clock is read every 16th call (it costs more than a step)."""
        self.left -= n
        if self.left < 0:
            raise SieveRuntimeError("script used too many steps")
        self.calls += 1
        if not self.calls & 15 and self.clock() > self.deadline:
            raise SieveRuntimeError("script ran for too long")


def casemap(s: str) -> str:
    """i;ascii-casemap folding: only A-Z change (``str.lower`` would fold other letters too,
    so it is used only for ASCII text, where it is the same and faster)."""
    return s.lower() if s.isascii() else s.translate(_ASCII_LOWER)


def _numeric(s: str) -> int | None:
    """RFC 4790 9.1.1: the value of the leading digits; None stands for positive infinity."""
    end = 0
    while end < len(s) and s[end] in "0123456789":
        end += 1
    return int(s[:end]) if end else None


def compare(comparator: str, a: str, b: str) -> int:
    """-1, 0 or 1 as ``a`` orders before, equal to or after ``b``."""
    if comparator == "i;ascii-numeric":
        x, y = _numeric(a), _numeric(b)
        if x is None or y is None:
            return 0 if x is None and y is None else (1 if x is None else -1)
        return (x > y) - (x < y)
    if comparator == "i;ascii-casemap":
        a, b = casemap(a), casemap(b)
    return (a > b) - (a < b)


def relation_holds(relation: str, order: int) -> bool:
    return {
        "gt": order > 0,
        "ge": order >= 0,
        "lt": order < 0,
        "le": order <= 0,
        "eq": order == 0,
        "ne": order != 0,
    }[relation]


# -- :matches ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _tokens(pattern: str) -> tuple[str, ...]:
    """Pattern -> list of single characters, with ``*``/``?`` wildcards as ``"\\0*"`` and
    ``"\\0?"`` (a literal star or question mark stays a one-character string)."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            out.append(pattern[i + 1])
            i += 2
            continue
        out.append("\0" + c if c in "*?" else c)
        i += 1
    return tuple(out)


def glob(pattern: str, text: str, comparator: str) -> list[str] | None:
    """Match ``text`` against a ``:matches`` pattern; returns the wildcards' texts (for
    ``${1}``...) or None.  ``i;ascii-numeric`` never gets here (refused by the validator)."""
    fold = comparator == "i;ascii-casemap"
    pieces = star_pieces(pattern, fold)
    if pieces is not None:
        return match_pieces(pieces, casemap(text) if fold else text, text)
    return _general(_tokens(pattern), text, fold)


@functools.lru_cache(maxsize=4096)
def star_pieces(pattern: str, fold: bool) -> tuple[str, ...] | None:
    """The literal pieces between the ``*`` wildcards of a pattern (folded when ``fold``), or
    None when it has a ``?`` (that takes :func:`_general`).  Made once per pattern."""
    toks = _tokens(pattern)
    if "\0?" in toks:
        return None
    pieces: list[str] = [""]
    for t in toks:
        if t == "\0*":
            pieces.append("")
        else:
            pieces[-1] += t
    return tuple(casemap(p) for p in pieces) if fold else tuple(pieces)


def match_pieces(pieces: tuple[str, ...], hay: str, text: str) -> list[str] | None:
    """Only ``*`` wildcards: the literal ``pieces`` found in ``hay`` (``text`` folded, or
    ``text`` itself; folding keeps every length) left to right, leftmost = shortest stars;
    the captures are cut from ``text``."""
    if len(pieces) == 1:
        return [] if hay == pieces[0] else None
    first, *middle, last = pieces
    if not hay.startswith(first):
        return None
    pos = len(first)
    caps: list[str] = []
    for piece in middle:
        at = hay.find(piece, pos)
        if at < 0:
            return None
        caps.append(text[pos:at])
        pos = at + len(piece)
    end = len(hay) - len(last)
    if end < pos or not hay.endswith(last):
        return None
    caps.append(text[pos:end])
    return caps


def _general(toks_in: tuple[str, ...], text: str, fold: bool) -> list[str] | None:
    """``*`` and ``?``: the last-star algorithm, recording each wildcard's span."""
    hay = casemap(text) if fold else text
    toks = [casemap(t) if fold and not t.startswith("\0") else t for t in toks_in]
    index: dict[int, int] = {}
    for i, tok in enumerate(toks):
        if tok in ("\0*", "\0?"):
            index[i] = len(index)
    spans: list[tuple[int, int]] = [(0, 0)] * len(index)
    ti = pi = 0
    star_pi, star_start, star_ti = -1, 0, 0
    n, m = len(hay), len(toks)
    while ti < n:
        t: str | None = toks[pi] if pi < m else None
        if t == "\0?":
            spans[index[pi]] = (ti, ti + 1)
            ti += 1
            pi += 1
        elif t == "\0*":
            star_pi, star_start, star_ti = pi, ti, ti
            spans[index[pi]] = (ti, ti)
            pi += 1
        elif t is not None and t == hay[ti]:
            ti += 1
            pi += 1
        elif star_pi >= 0:
            star_ti += 1
            spans[index[star_pi]] = (star_start, star_ti)
            ti = star_ti
            pi = star_pi + 1
        else:
            return None
    while pi < m and toks[pi] == "\0*":
        spans[index[pi]] = (ti, ti)
        pi += 1
    if pi != m:
        return None
    return [text[a:b] for a, b in spans]


# -- one test's values against its keys ---------------------------------------------------------


def match_any(
    values: Sequence[str],
    keys: Sequence[str],
    match: str,
    comparator: str,
    relation: str | None,
    budget: Budget,
) -> tuple[bool, list[str] | None]:
    """True when any value matches any key (RFC 5228 2.7.1); for ``:matches`` also the
    captures of the first match (``${0}`` is the whole value)."""
    if match == "count":
        assert relation is not None
        count = str(len(values))
        budget.charge(len(keys))
        return any(relation_holds(relation, compare(comparator, count, k)) for k in keys), None
    budget.charge(len(values) * len(keys) + sum(map(len, values)) // 256)
    if match in ("is", "contains") and comparator != "i;ascii-numeric":
        # the common case, done with whole-list folding and set/substring operations
        if comparator == "i;ascii-casemap":
            values = [casemap(v) for v in values]
            keys = [casemap(k) for k in keys]
        if match == "is":
            return not set(values).isdisjoint(keys), None
        return any(k in v for v in values for k in keys), None
    for value in values:
        for key in keys:
            budget.charge(1 + (len(value) + len(key)) // 256)
            if match == "is":
                if compare(comparator, value, key) == 0:
                    return True, None
            elif match == "matches":
                caps = glob(key, value, comparator)
                if caps is not None:
                    return True, [value, *caps]
            elif match == "value":
                assert relation is not None
                if relation_holds(relation, compare(comparator, value, key)):
                    return True, None
    return False, None
