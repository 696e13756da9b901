"""Precompiled forms of the tests most scripts are made of, for delivery's hot path.

A filter script is mostly ``header``/``address``/``envelope``/``exists`` tests with ``:is``,
``:contains`` or ``:matches`` on constant strings.  For such a test (no ``${`` in its strings,
no ``:index``, no relational match, not ``i;ascii-numeric``) this builds, once per compiled
script (the script cache keeps it), a closure with the header names lower-cased and the keys
already folded, and the message side remembers folded values and address parts, so a run
costs a few lookups instead of the general path's argument decoding.  Everything else goes
the general way in :mod:`.interpreter`; both give the same answers (the interpreter tests run
every script both ways).  :mod:`.plan` builds on these: tests of one :class:`Shape` are
evaluated together, and runs of rules whose tests are all false are passed at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from mailsuite.sieve.match import casemap, glob, match_pieces, star_pieces
from mailsuite.sieve.message import MessageView, address_part
from mailsuite.sieve.validate import Node

#: interpreter -> result; the closure reads ``message``, ``envelope``, ``budget`` and, for
#: ``:matches`` in a script with variables, sets ``matches`` (RFC 5229 3.2).
FastTest = Callable[[Any], bool]


class Shape(NamedTuple):
    """What a precompilable test reads and how it compares (not its keys): tests of one
    script with the same shape read the same values (see :mod:`.plan`)."""

    kind: str  # header, address, envelope, exists
    names: tuple[str, ...]  # lower-case header names / envelope parts (() for exists)
    part: str  # address part ("all" for header tests)
    fold: bool  # values and keys folded with i;ascii-casemap (not for :matches)
    match: str  # is, contains, matches ("" for exists)
    comparator: str


def shape_of(node: Node) -> tuple[Shape, list[str]] | None:
    """The shape of ``node`` and its keys (folded when the shape folds; for ``exists`` the
    lower-case header names), or None when it must take the general path: a string with
    ``${`` (it depends on variables set at run time), ``:index``, a relational match or
    ``i;ascii-numeric``."""
    if node.name == "exists":
        if any("${" in n for n in node.args[0]):
            return None
        return Shape("exists", (), "all", False, "", ""), [n.lower() for n in node.args[0]]
    if node.name not in ("header", "address", "envelope") or "index" in node.tags:
        return None
    match = node.tag("match", "is") or "is"
    comparator = node.value("comparator", "i;ascii-casemap")
    if match not in ("is", "contains", "matches") or comparator == "i;ascii-numeric":
        return None
    if any("${" in s for s in [*node.args[0], *node.args[1]]):
        return None
    part = node.tag("addrpart", "all") or "all"
    fold = comparator == "i;ascii-casemap" and match != "matches"
    keys = [casemap(k) for k in node.args[1]] if fold else list(node.args[1])
    names = tuple(n.lower() for n in node.args[0])
    return Shape(node.name, names, part, fold, match, comparator), keys


def value_reader(shape: Shape) -> Callable[[Any], list[str]]:
    """interpreter -> the values a test of ``shape`` compares, read once per message (kept
    on the message view: many rules ask the same thing)."""
    memo_key = ("\2", shape.kind, shape.names, shape.part, shape.fold)
    collect = _collector(shape.kind, list(shape.names), shape.part, shape.fold)

    def values(it: Any) -> list[str]:
        memo = it.message.memo
        found: list[str] | None = memo.get(memo_key)
        if found is None:
            found = memo[memo_key] = collect(it)
        return found

    return values


def compile_test(node: Node, variables: bool) -> FastTest | None:
    """A closure for ``node``, or None when it must take the general path."""
    if node.name == "exists":
        return _compile_exists(node)
    found = shape_of(node)
    if found is None:
        return None
    shape, keys = found
    return _matcher(shape.match, shape.comparator, keys, value_reader(shape), variables)


def _compile_exists(node: Node) -> FastTest | None:
    """``exists`` with constant names: the header names lower-cased once, not per message.

    A name with ``${`` depends on variables set at run time, so it takes the general path.
    """
    if any("${" in n for n in node.args[0]):
        return None
    names = [n.lower() for n in node.args[0]]

    def exists(it: Any) -> bool:
        it.budget.charge(len(names))
        return all(it.message.exists(n) for n in names)

    return exists


def _collector(kind: str, names: list[str], part: str, fold: bool) -> Callable[[Any], list[str]]:
    """The function that reads the values a test compares: header values, address parts of
    header addresses, or envelope address parts, folded when the comparison folds.

    Chosen at compile time so a run does not decide again what kind of test it is.
    """

    def collect(it: Any) -> list[str]:
        msg: MessageView = it.message
        if kind == "header":
            if len(names) == 1:
                return msg.folded(names[0]) if fold else msg.header(names[0])
            out: list[str] = []
            for n in names:
                out.extend(msg.folded(n) if fold else msg.header(n))
            return out
        if kind == "address":
            if len(names) == 1:
                return msg.address_parts(names[0], part, fold)
            out = []
            for n in names:
                out.extend(msg.address_parts(n, part, fold))
            return out
        out = []
        for n in names:
            addr = it.envelope.sender if n == "from" else it.envelope.recipient
            if not addr:
                out.append("")  # RFC 5228 5.4: the null reverse-path
                continue
            value = address_part(addr, part)
            if value is not None:
                out.append(casemap(value) if fold else value)
        return out

    return collect


def _matcher(
    match: str,
    comparator: str,
    keys: list[str],
    values: Callable[[Any], list[str]],
    variables: bool,
) -> FastTest:
    """The comparison of ``values`` with ``keys`` for ``:is``, ``:contains`` or ``:matches``.

    Each charges the run's budget in proportion to its work, as the general path does, so a
    hostile script cannot spend unbounded time; ``:matches`` sets the match variables
    (RFC 5229 3.2) only in a script that uses variables.
    """
    if match == "is":
        key_set = frozenset(keys)

        def test(it: Any) -> bool:
            vals = values(it)
            it.budget.charge(1 + len(vals))
            return not key_set.isdisjoint(vals)
    elif match == "contains":

        def test(it: Any) -> bool:
            vals = values(it)
            it.budget.charge(1 + len(vals) * len(keys))
            for v in vals:
                for k in keys:
                    if k in v:
                        return True
            return False
    else:
        casefold = comparator == "i;ascii-casemap"
        # (key, its literal pieces, made once) -- None for a pattern with "?"
        patterns = [(k, star_pieces(k, casefold)) for k in keys]

        def test(it: Any) -> bool:
            for v in values(it):
                hay = casemap(v) if casefold else v
                for k, pieces in patterns:
                    it.budget.charge(1 + (len(v) + len(k)) // 256)
                    if pieces is not None:
                        caps = match_pieces(pieces, hay, v)
                    else:
                        caps = glob(k, v, comparator)
                    if caps is not None:
                        if variables:
                            it.matches = [v, *caps]
                        return True
            return False

    return test
