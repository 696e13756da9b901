"""The delivery hot path's shortcuts give exactly the reference answers.

* :func:`mailsuite.sieve.message.split_headers` (the section decoded once) == its line by
  line form :func:`~mailsuite.sieve.message.split_header_lines`, on any bytes;
* :func:`mailsuite.sieve.message.parse_addresses` (a regular expression for plain address
  lists) == ``email.utils.getaddresses`` on any header values;
* the grouped tests and skipped runs of :mod:`mailsuite.sieve.plan` == the general path of
  the interpreter (``fast=False``: each test decoded and matched on its own) on generated
  scripts of many rules over generated messages: same actions, same match variables, same
  runtime errors;
* :func:`mailsuite.sieve.plan.screen` (what delivery runs first: "is any rule true?",
  answered without an interpreter, with regular expressions for ``:contains`` and
  ``*text*`` groups) followed, when it cannot tell, by an interpreter that carries on with
  its answers and budget == the general path, on scripts made only of rules (where it
  answers most) and with step limits small enough to run out;
* :meth:`MessageView.from_buffer` (the header section found in place) == :meth:`from_file`.
"""

from __future__ import annotations

from email.utils import getaddresses
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from mailsuite.sieve.actions import Keep
from mailsuite.sieve.interpreter import Interpreter, Limits, SieveEnvelope
from mailsuite.sieve.match import Budget, SieveRuntimeError
from mailsuite.sieve.message import (
    MessageView,
    parse_addresses,
    split_header_lines,
    split_headers,
)
from mailsuite.sieve.plan import Probe, screen
from mailsuite.sieve.validate import Script, compile_script

HEAD_PIECES = st.sampled_from(
    [
        b"Subject",
        b"X-A",
        b":",
        b": ",
        b" ",
        b"\t",
        b"\n",
        b"\r\n",
        b"\r",
        b"\x0b",
        b"\x1c",
        "\u00e9".encode(),
        "\u0085".encode(),
        "\u2028".encode(),
        b"\xff",
        b"v",
        b"From x",
    ]
)


@given(st.lists(HEAD_PIECES, max_size=30).map(b"".join))
@settings(max_examples=800, deadline=None)
def test_split_headers_is_line_by_line(head: bytes) -> None:
    assert split_headers(head) == split_header_lines(head)


def test_view_from_buffer_is_view_from_file(tmp_path: Path) -> None:
    data = b"Return-Path: <a@b>\nSubject: s\r\nX-A: 1\n\r\nbody\n" + b"x" * 100
    path = tmp_path / "m"
    path.write_bytes(data)
    for offset in (0, 19):
        a, b = MessageView.from_file(path, offset), MessageView.from_buffer(data, offset)
        assert (a.fields, a.size, a.raw_body()) == (b.fields, b.size, b.raw_body())


# the characters that decide how an address list parses, and some that do not
ADDRESS_TEXT = st.text('aZ09.-_+@<> \t,"()\\:;[]!#é', max_size=40)
PLAIN = st.sampled_from(
    ["a@b", "x.y@ex-ample.org", "Name <n@d.e>", "A B\t<x@y>", "<q@r>", " ", "", "a@b."]
)


@given(st.lists(st.one_of(ADDRESS_TEXT, PLAIN, st.lists(PLAIN).map(", ".join)), max_size=4))
@settings(max_examples=800, deadline=None)
def test_parse_addresses_is_getaddresses(values: list[str]) -> None:
    assert parse_addresses(values) == [a for _, a in getaddresses(values) if a]


HEADERS = ["Subject", "From", "To", "X-A", "X-Mailer"]
WORDS = ["", "ab", "AB", "a.b", "x@ab.org", "Ab <b@AB.org>", "tag", "[l]", "a*b", "é", "a|b"]
VALUE = st.lists(st.sampled_from(WORDS), max_size=3).map(" ".join)
MESSAGE = st.builds(
    lambda fields: b"".join(f"{n}: {v}\n".encode() for n, v in fields) + b"\nbody\n",
    st.lists(st.tuples(st.sampled_from(HEADERS), VALUE), max_size=6),
)
KEY = st.sampled_from(
    [
        *["ab", "AB", "a", "b.org", "ab.org", "x", "", "tag", "*", "a*", "*b?", "[l]"],
        *["*ab*", "*[L]*", "**", "*a|b*", "a|b", "*é*", "(x"],
    ]
)


def _strings(items: list[str]) -> str:
    return "[" + ", ".join(f'"{s}"' for s in items) + "]"


@st.composite
def _test(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["header", "address", "envelope", "exists"]))
    if kind == "exists":
        return f"exists {_strings(draw(st.lists(st.sampled_from(HEADERS), min_size=1)))}"
    match = draw(st.sampled_from([":is", ":contains", ":matches"]))
    comparator = draw(st.sampled_from(["", ':comparator "i;octet" ']))
    keys = _strings(draw(st.lists(KEY, min_size=1, max_size=3)))
    if kind == "header":
        names = _strings(draw(st.lists(st.sampled_from(HEADERS), min_size=1, max_size=2)))
        return f"header {match} {comparator}{names} {keys}"
    part = draw(st.sampled_from(["", ":localpart ", ":domain ", ":user ", ":detail "]))
    if kind == "address":
        names = _strings(draw(st.lists(st.sampled_from(["From", "To"]), min_size=1)))
        return f"address {part}{match} {comparator}{names} {keys}"
    names = _strings(draw(st.lists(st.sampled_from(["from", "to"]), min_size=1)))
    return f"envelope {part}{match} {comparator}{names} {keys}"


@st.composite
def _rule(draw: st.DrawFn) -> str:
    test = draw(_test())
    shape = draw(st.sampled_from(["plain", "plain", "not", "anyof", "elsif"]))
    action = draw(
        st.sampled_from(
            ['fileinto "F${1}";', 'addflag "${0}";', "stop;", "keep;", 'set "v" "${1}";', ""]
        )
    )
    if shape == "not":
        test = f"not {test}"
    elif shape == "anyof":
        test = f"anyof({test}, {draw(_test())})"
    rule = f"if {test} {{ {action} }}"
    if shape == "elsif":
        rule += f' elsif {draw(_test())} {{ addflag "e${{1}}"; }} else {{ addflag "z"; }}'
    return rule


ENVELOPES = [
    SieveEnvelope("ab@ab.org", "tag+x@example.test", "tag@example.test"),
    SieveEnvelope("", "AB@example.test", "ab@example.test"),
]


def _rules_script(rules: list[str], variables: bool, tail: str = "") -> Script:
    """The generated rules as one script (with "variables" required, or the rules' ``set``
    commands dropped), then ``tail``."""
    requires = '"fileinto", "envelope", "subaddress", "imap4flags"'
    if variables:
        requires += ', "variables"'
    text = f"require [{requires}];\n" + "\n".join(rules) + "\n" + tail
    if not variables:
        text = text.replace('set "v" "${1}";', "")
    return compile_script(text)


@given(
    st.lists(_rule(), min_size=1, max_size=25),
    MESSAGE,
    st.sampled_from(ENVELOPES),
    st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_grouped_tests_and_skipped_runs_are_the_general_path(
    rules: list[str], data: bytes, envelope: SieveEnvelope, variables: bool
) -> None:
    script = _rules_script(rules, variables, 'fileinto "end${1}";\n')
    outs = []
    for fast in (False, True):
        try:
            outs.append(Interpreter(MessageView.from_bytes(data), envelope, fast=fast).run(script))
        except SieveRuntimeError as e:
            outs.append(str(e))
    assert outs[0] == outs[1]


@given(
    st.lists(_rule(), min_size=1, max_size=25),
    MESSAGE,
    st.sampled_from(ENVELOPES),
    st.booleans(),
    st.sampled_from([200_000, 200_000, 60, 12]),
)
@settings(max_examples=300, deadline=None)
def test_screen_then_interpreter_is_the_general_path(
    rules: list[str], data: bytes, envelope: SieveEnvelope, variables: bool, steps: int
) -> None:
    script = _rules_script(rules, variables)
    limits = Limits(max_steps=steps)
    outs: list[object] = []
    for fast in (False, True):
        try:
            view = MessageView.from_bytes(data)
            outs.append(Interpreter(view, envelope, limits, fast=fast).run(script))
        except SieveRuntimeError as e:
            outs.append(str(e))
    message = MessageView.from_bytes(data)
    probe = Probe(message, envelope, Budget(steps, float("inf")))
    try:
        if screen(script, variables, probe):
            outs.append([Keep()])
        else:
            outs.append(Interpreter(message, envelope, limits, probe=probe).run(script))
    except SieveRuntimeError as e:
        outs.append(str(e))
    # the screen charges what the precompiled path charges (the general path charges
    # otherwise, so with a small limit the two may run out at different points)
    assert outs[2] == outs[1]
    if steps > 1000:
        assert outs[2] == outs[0]


def test_screen_answers_a_script_of_rules_alone() -> None:
    """A message no rule of a rules-only script matches is answered by the screen; one rule
    true, or a command outside the rules, leaves it to the interpreter."""
    rules = 'require "fileinto";\nif header :contains "subject" ["[l]", "x|y"] { fileinto "L"; }\n'
    rules += 'if address :domain :is "from" "b.org" { fileinto "B"; }\n'
    envelope = ENVELOPES[0]

    def screened(text: str, data: bytes) -> bool:
        return screen(
            compile_script(text),
            False,
            Probe(MessageView.from_bytes(data), envelope, Budget(10**6, float("inf"))),
        )

    assert screened(rules, b"Subject: x y [L\nFrom: a@c.org\n\nbody\n")
    assert not screened(rules, b"Subject: a [L] b\n\nbody\n")  # :contains folds case
    assert not screened(rules, b"Subject: x|y\n\nbody\n")  # a literal "|", not "x or y"
    assert not screened(rules, b"From: A <a@B.org>\n\nbody\n")
    assert not screened(rules + "keep;\n", b"Subject: none\n\nbody\n")


@given(st.lists(HEAD_PIECES, max_size=40).map(b"".join), st.integers(0, 3))
@settings(max_examples=500, deadline=None)
def test_view_from_buffer_is_view_from_file_on_any_bytes(data: bytes, offset: int) -> None:
    import io

    from mailsuite.sieve import message as m

    f = io.BytesIO(data)
    f.seek(offset)
    assert m._head_in(data, offset) in (None, m._read_head(f))
    a = MessageView.from_buffer(data, offset)
    f.seek(offset)
    assert a.fields == split_headers(m._read_head(f))


def test_view_from_buffer_past_the_first_chunk() -> None:
    """A header section longer than the first read (16 KiB) is read the file's way."""
    from mailsuite.sieve import message as m

    data = b"X-Long: " + b"v" * (m._HEAD_CHUNK + 10) + b"\nSubject: s\n\nbody\n"
    assert m._head_in(data, 0) is None
    assert MessageView.from_buffer(data).header("subject") == ["s"]
