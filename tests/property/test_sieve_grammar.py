"""Property tests for the Sieve parser: no exception but SieveParseError on any input, and
generated scripts survive serialize -> parse unchanged."""

from __future__ import annotations

import contextlib
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from mailsuite.managesieve.parser import CommandReader
from mailsuite.sieve.grammar import (
    Command,
    SieveParseError,
    Tag,
    parse,
    parse_bytes,
    serialize,
)
from mailsuite.sieve.grammar import (
    Test as SieveTest,
)
from mailsuite.sieve.interpreter import Interpreter, SieveEnvelope
from mailsuite.sieve.match import SieveRuntimeError, glob
from mailsuite.sieve.message import MessageView
from mailsuite.sieve.validate import compile_script

IDENT = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from("abcdefghijklmnopqrstuvwxyz_"),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789_", max_size=8),
).filter(lambda s: s != "text")
STRING = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20
)
ARG = st.one_of(
    IDENT.map(Tag),
    st.integers(min_value=0, max_value=2**40),
    STRING,
    st.lists(STRING, min_size=1, max_size=3).map(tuple),
)


ARGS = st.lists(ARG, max_size=4).map(tuple)
TEST = st.recursive(
    st.builds(SieveTest, IDENT, ARGS, st.none()),
    lambda inner: st.builds(
        SieveTest,
        IDENT,
        ARGS,
        st.one_of(st.none(), inner, st.lists(inner, min_size=1, max_size=3).map(tuple)),
    ),
    max_leaves=6,
)
TESTS = st.one_of(st.none(), TEST, st.lists(TEST, min_size=1, max_size=2).map(tuple))
COMMANDS = st.recursive(
    st.lists(st.builds(Command, IDENT, ARGS, TESTS, st.none()), max_size=3).map(tuple),
    lambda inner: st.lists(
        st.builds(Command, IDENT, ARGS, TESTS, st.one_of(st.none(), inner)), max_size=3
    ).map(tuple),
    max_leaves=10,
)


@given(COMMANDS)
@settings(max_examples=200, deadline=None)
def test_round_trip(tree: tuple[Command, ...]) -> None:
    text = serialize(tree)
    assert parse(text) == tree
    assert serialize(parse(text)) == text


SIEVE_ALPHABET = st.sampled_from(
    [
        *'ifelsheadrtxkp:;{}[](),"\\#/*\n\r .0123456789KMG',
        "text:",
        "require",
        '"fileinto"',
        ":contains",
        "\x00",
    ]
)


@given(st.one_of(st.text(max_size=200), st.lists(SIEVE_ALPHABET, max_size=80).map("".join)))
@settings(max_examples=500, deadline=None)
def test_any_text_gives_a_tree_or_a_parse_error(text: str) -> None:
    for f in (parse, compile_script):
        try:
            f(text)
        except SieveParseError as e:
            assert e.line >= 1 and e.reason


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_any_bytes_give_a_tree_or_a_parse_error(data: bytes) -> None:
    with contextlib.suppress(SieveParseError):
        parse_bytes(data)


@given(st.lists(st.binary(max_size=60), max_size=6))
@settings(max_examples=300, deadline=None)
def test_managesieve_reader_never_raises(lines: list[bytes]) -> None:
    reader = CommandReader(max_literal=100)
    for line in lines:
        result = reader.feed_line(line.replace(b"\n", b""))
        if result is not None and type(result).__name__ == "NeedLiteral":
            reader.feed_literal(b"x" * result.size)  # type: ignore[union-attr]


# -- :matches against a regular-expression model ------------------------------------------------


def _model(pattern: str, text: str, fold: bool) -> list[str] | None:
    """RFC 5229 3.2 as a regex: each wildcard as little as possible, leftmost first."""
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        out.append("(.*?)" if c == "*" else "(.)" if c == "?" else re.escape(c))
        i += 1
    flags = re.DOTALL | (re.IGNORECASE | re.ASCII if fold else 0)
    m = re.fullmatch("".join(out), text, flags)
    return list(m.groups()) if m else None


@given(st.text("ab*?\\", max_size=8), st.text("abAB*?", max_size=12), st.booleans())
@settings(max_examples=1000, deadline=None)
def test_glob_matches_the_regex_model(pattern: str, text: str, fold: bool) -> None:
    comparator = "i;ascii-casemap" if fold else "i;octet"
    assert glob(pattern, text, comparator) == _model(pattern, text, fold)


# -- the interpreter on any message -------------------------------------------------------------

RULES = [
    'if header :contains "subject" "x" { fileinto :create "A"; }',
    'if address :domain :is ["from", "to"] "example.org" { addflag "\\\\Seen"; }',
    'if envelope :detail "to" "tag" { redirect :copy "r@example.org"; }',
    'if header :matches "subject" "*[*]*" { fileinto "L.${2}"; }',
    'if body :text :contains "word" { discard; }',
    'if body :raw :matches "*?*" { keep; }',
    'if date :value "ge" :zone "+0100" "date" "date" "2000-01-01" { setflag "a b"; }',
    'if currentdate :is "weekday" "0" { keep; }',
    'if header :index 2 :last :is "received" "" { stop; }',
    'if header :count "ge" :comparator "i;ascii-numeric" "received" "2" { keep; }',
    'if exists ["x-a", "x-b"] { vacation :days 1 :subject "${1}" "away"; }',
    'if size :over 10K { fileinto "Big"; }',
    'set :upperfirst "v" "${0}"; if string :matches "${v}" "*" { keep; }',
]
HEADER = st.sampled_from(
    [
        b"Subject",
        b"From",
        b"To",
        b"Date",
        b"Received",
        b"Content-Type",
        b"Content-Transfer-Encoding",
        b"MIME-Version",
        b"X-A",
        b"X-B",
    ]
)
MESSAGE = st.builds(
    lambda fields, body: b"".join(n + b": " + v + b"\n" for n, v in fields) + b"\n" + body,
    st.lists(
        st.tuples(HEADER, st.binary(max_size=40).map(lambda b: b.replace(b"\n", b" "))), max_size=8
    ),
    st.binary(max_size=300),
)
SCRIPT_HEAD = (
    'require ["fileinto", "envelope", "subaddress", "body", "variables", "imap4flags",'
    ' "date", "index", "relational", "comparator-i;ascii-numeric", "copy", "mailbox",'
    ' "vacation"];\n'
)


@given(st.lists(st.sampled_from(RULES), min_size=1, max_size=6), MESSAGE)
@settings(max_examples=300, deadline=None)
def test_any_message_gives_actions_or_a_runtime_error(rules: list[str], data: bytes) -> None:
    script = compile_script(SCRIPT_HEAD + "\n".join(rules))
    env = SieveEnvelope("s@example.org", "alice+tag@example.test", "alice@example.test")
    for fast in (False, True):
        try:
            actions = Interpreter(MessageView.from_bytes(data), env, fast=fast).run(script)
        except SieveRuntimeError:
            continue
        assert actions
