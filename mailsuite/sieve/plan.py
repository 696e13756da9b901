"""Whole-script precompilation for delivery's hot path: tests grouped, runs of rules skipped.

A filter script is a list of ``if <test> { ... }`` rules, and on most messages almost none
of them match.  The tests that :mod:`.fastpath` can precompile (``header``/``address``/
``envelope``/``exists`` on constant strings) read only the message and the envelope, which
nothing in a run changes (no ``editheader`` here), so their answers do not depend on when
they are asked.  Once per compiled script (:func:`prepare`, kept by the script cache) this
module therefore:

* puts every such test into a :class:`Group` with the other tests that read the same
  values (same kind, header names or envelope parts, address part, folding) with the same
  match type and comparator; a group is evaluated at most once per message, the first time
  one of its tests is asked, in one tight loop (``:is`` is one dictionary lookup per value
  for all its tests together), and its answer is the set of its tests that are true;
* gives each test the closure "is my id in my group's answer" (a ``:matches`` that is true
  in a script with variables then runs its own matcher to set ``${1}``..., RFC 5229 3.2);
* marks each maximal :class:`Run` of consecutive ``if`` rules whose tests are grouped, so
  the interpreter jumps from one true rule to the next (usually: over the whole run) with
  one step charged per rule passed, as walking them would have charged;
* lets delivery ask first (:func:`screen`) whether any rule of a script made only of such
  rules is true for a message: when none is (most mail, for most filter scripts), the
  answer is the implicit keep without an interpreter; otherwise the interpreter carries
  on with what the screen found and charged.  ``:contains`` groups, and ``:matches``
  groups whose patterns are all ``*text*``, first search each value once with one
  alternation of their texts: usually no value holds any, and the group is done.

Answers are exactly those of the general path (the interpreter tests run every script both
ways; ``tests/property`` compares them on generated scripts and messages).  Each group
charges the run's budget for all its tests before it does the work, so a hostile script
still ends in an error instead of holding the delivery thread.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

from mailsuite.sieve.fastpath import Shape, compile_test, shape_of, value_reader
from mailsuite.sieve.match import Budget, casemap, glob, match_pieces, star_pieces
from mailsuite.sieve.validate import Node, Script

#: interpreter -> result (see :data:`mailsuite.sieve.fastpath.FastTest`)
FastTest = Callable[[Any], bool]

_lock = threading.Lock()


class Group:
    """Tests of one script that compare the same values the same way (see the module
    docstring); :meth:`hits` is the set of the ids of those that are true for a message."""

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        self.values = value_reader(shape) if shape.kind != "exists" else None
        #: (test id, folded keys) -- or, for exists, (test id, lower-case names)
        self.entries: list[tuple[int, list[str]]] = []
        self.total_keys = 0
        self.key_chars = 0  # the keys' total length (what a ``:matches`` is charged for)
        #: ``:is``: key -> ids of the tests that have it
        self.index: dict[str, list[int]] = {}
        #: ``:matches``: (test id, pattern, its pieces or None), each pattern of each test
        self.patterns: list[tuple[int, str, tuple[str, ...] | None]] = []
        #: ``exists``: lower-case name -> ids of the tests of that one name; the others
        self.one_name: dict[str, list[int]] = {}
        self.several: list[tuple[int, list[str]]] = []
        #: ``:contains``, and ``:matches`` while every pattern is ``*text*``: the literal
        #: texts searched for, as one alternation (see :meth:`_any_text`)
        self.texts: list[str] | None = [] if shape.match in ("contains", "matches") else None
        self._any: re.Pattern[str] | None = None

    def add(self, tid: int, keys: list[str]) -> None:
        self.entries.append((tid, keys))
        self.total_keys += len(keys)
        self.key_chars += sum(map(len, keys))
        if self.shape.kind == "exists":
            if len(set(keys)) == 1:
                self.one_name.setdefault(keys[0], []).append(tid)
            else:
                self.several.append((tid, keys))
        elif self.shape.match == "is":
            for k in keys:
                ids = self.index.setdefault(k, [])
                if tid not in ids:
                    ids.append(tid)
        elif self.shape.match == "matches":
            casefold = self.shape.comparator == "i;ascii-casemap"
            for k in keys:
                pieces = star_pieces(k, casefold)
                self.patterns.append((tid, k, pieces))
                if self.texts is not None:
                    if pieces is not None and len(pieces) == 3 and not pieces[0] + pieces[2]:
                        self.texts.append(pieces[1])
                    else:
                        self.texts = None  # a pattern that is not "*text*": each is matched
        if self.texts is not None and self.shape.match == "contains":
            self.texts.extend(keys)
        self._any = None

    def _any_text(self) -> re.Pattern[str] | None:
        """One regular expression for "does any value contain any of the texts" -- a plain
        alternation of escaped literals, which finds a match exactly when one of them occurs
        (``str.__contains__`` semantics, the empty text included).  Most messages match no
        rule, so a group usually ends after one search per value instead of a test loop."""
        if self.texts is None:
            return None
        if self._any is None:
            # longest first only to make the alternation's order fixed; any order finds one
            alternatives = sorted(set(self.texts), key=lambda t: (-len(t), t))
            self._any = re.compile("|".join(map(re.escape, alternatives)), re.DOTALL)
        return self._any

    def hits(self, it: Any) -> frozenset[int] | set[int]:
        found: set[int] | None = it.group_hits.get(self)
        if found is None:
            found = it.group_hits[self] = self._evaluate(it)
        return found

    def _evaluate(self, it: Any) -> set[int]:
        shape = self.shape
        budget = it.budget
        found: set[int] = set()
        if shape.kind == "exists":
            # as fastpath's exists: one step per name of each test
            budget.charge(self.total_keys)
            present = it.message.names()
            for name in present.keys() & self.one_name.keys():
                found.update(self.one_name[name])
            for tid, names in self.several:
                if all(n in present for n in names):
                    found.add(tid)
            return found
        assert self.values is not None
        vals: list[str] = self.values(it)
        n_tests = len(self.entries)
        if shape.match == "is":
            budget.charge(n_tests * (1 + len(vals)))
            index = self.index
            for v in vals:
                ids = index.get(v)
                if ids is not None:
                    found.update(ids)
            return found
        size = sum(map(len, vals))
        if shape.match == "contains":
            # what each test's own loop is charged (fastpath), plus the length of the text
            # searched, which the loop's substring searches cost
            budget.charge(n_tests + len(vals) * self.total_keys + n_tests * (size // 256))
            search = self._any_text()
            if search is not None and not any(search.search(v) for v in vals):
                return found
            for v in vals:
                for tid, keys in self.entries:
                    if tid not in found:
                        for k in keys:
                            if k in v:
                                found.add(tid)
                                break
            return found
        # :matches: every (value, pattern) pair charged up front, as fastpath charges each
        budget.charge(
            len(vals) * self.total_keys
            + len(vals) * self.key_chars // 256
            + self.total_keys * size // 256
        )
        casefold = shape.comparator == "i;ascii-casemap"
        comparator = shape.comparator
        search = self._any_text()
        if search is not None and not any(
            search.search(casemap(v) if casefold else v) for v in vals
        ):
            return found  # every pattern is "*text*" and no value holds any of the texts
        for v in vals:
            hay = casemap(v) if casefold else v
            for tid, k, pieces in self.patterns:
                if tid in found:
                    continue
                if pieces is None:
                    if glob(k, v, comparator) is not None:
                        found.add(tid)
                elif len(pieces) == 3 and not pieces[0] and not pieces[2]:
                    if pieces[1] in hay:  # "*text*": only whether, not where (no captures)
                        found.add(tid)
                elif match_pieces(pieces, hay, v) is not None:
                    found.add(tid)
        return found


class Run:
    """Consecutive ``if`` rules of one block, ``start`` to ``end`` (exclusive), each with a
    grouped test: ``pos`` maps a test id to its rule's index in the block."""

    __slots__ = ("end", "groups", "pos", "start")

    def __init__(self, start: int, end: int, pos: dict[int, int], groups: tuple[Group, ...]):
        self.start = start
        self.end = end
        self.pos = pos
        self.groups = groups

    def next_true(self, it: Any, i: int) -> int:
        """The index of the first rule at ``i`` or after whose test is true, ``end`` if none."""
        best = self.end
        pos = self.pos
        for group in self.groups:
            for tid in group.hits(it):
                p = pos.get(tid)
                if p is not None and i <= p < best:
                    best = p
        return best


class Probe:
    """What evaluating groups reads of a run -- the message, the envelope, the budget and
    the answers so far -- without the interpreter's actions, scopes and frames
    (:func:`screen`).  An interpreter that takes over carries on with these."""

    __slots__ = ("budget", "envelope", "group_hits", "message")

    def __init__(self, message: Any, envelope: Any, budget: Budget) -> None:
        self.message = message
        self.envelope = envelope
        self.budget = budget
        self.group_hits: dict[object, set[int]] = {}


def screen(script: Script, variables: bool, probe: Probe) -> bool:
    """True when running ``script`` on the probe's message would do nothing but pass every
    rule: a script made only of ``if`` rules with grouped tests (one :class:`Run` over its
    whole top level -- the usual filter script) none of which is true.  The run then ends in
    the implicit keep without flags (nothing set any), which the caller can answer without an
    interpreter.  The budget is charged exactly what the interpreter charges for the same
    work (the groups, then one step per rule passed), and raises the same
    :class:`~.match.SieveRuntimeError` when it runs out; when it says False, an interpreter
    given the probe's budget and answers (``Interpreter(..., probe=probe)``) finds the
    same answers without asking again."""
    nodes = script.nodes
    if not nodes:
        return False
    prepare(script, variables)
    run: Run | None = nodes[0].run.get(variables)
    if run is None or run.end != len(nodes):
        return False
    if run.next_true(probe, 0) < run.end:
        return False
    probe.budget.charge(run.end)
    return True


def prepare(script: Script, variables: bool) -> None:
    """Build the groups and runs of ``script`` once (thread-safe: delivery threads share the
    compiled scripts); afterwards every test node has ``node.fast[variables]`` (a closure or
    None: the general path) and the first node of each run ``node.run[variables]``."""
    if variables in script.prepared:
        return
    with _lock:
        if variables in script.prepared:
            return
        _Builder(variables).block(script.nodes)
        script.prepared.add(variables)


class _Builder:
    def __init__(self, variables: bool) -> None:
        self.variables = variables
        self.groups: dict[Shape, Group] = {}
        self.next_id = 0

    def block(self, nodes: list[Node]) -> None:
        grouped: list[Group | None] = []
        ids: list[int] = []
        for node in nodes:
            group, tid = None, -1
            for t in node.tests:
                g_t = self.test(t)
                if node.name == "if" and len(node.tests) == 1:
                    group, tid = g_t
            grouped.append(group)
            ids.append(tid)
            if node.block is not None:
                self.block(node.block)
        for start, end in _spans(grouped):
            pos = {ids[i]: i for i in range(start, end)}
            groups = tuple({id(g): g for g in grouped[start:end] if g is not None}.values())
            run = Run(start, end, pos, groups)
            for i in range(start, end):
                nodes[i].run[self.variables] = run

    def test(self, node: Node) -> tuple[Group | None, int]:
        """Compile ``node`` (and the tests under it); its group and id when it has one."""
        for t in node.tests:
            self.test(t)
        single = compile_test(node, self.variables)
        found = shape_of(node)
        if single is None or found is None:
            node.fast[self.variables] = single
            return None, -1
        shape, keys = found
        group = self.groups.get(shape)
        if group is None:
            group = self.groups[shape] = Group(shape)
        tid = self.next_id
        self.next_id += 1
        group.add(tid, keys)
        captures = self.variables and shape.match == "matches"
        node.fast[self.variables] = _grouped(group, tid, single, captures)
        return group, tid


def _grouped(group: Group, tid: int, single: FastTest, captures: bool) -> FastTest:
    """The test as "is my id among my group's hits"; a true ``:matches`` in a script with
    variables runs its own matcher as well, which sets the match variables."""
    if captures:

        def test_and_capture(it: Any) -> bool:
            return tid in group.hits(it) and single(it)

        return test_and_capture

    def test(it: Any) -> bool:
        return tid in group.hits(it)

    return test


def _spans(grouped: list[Group | None]) -> Iterator[tuple[int, int]]:
    """Maximal stretches of consecutive entries that are not None."""
    start = -1
    for i, g in enumerate(grouped):
        if g is None:
            if start >= 0:
                yield start, i
            start = -1
        elif start < 0:
            start = i
    if start >= 0:
        yield start, len(grouped)
