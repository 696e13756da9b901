"""Property tests: the command reader never raises on arbitrary input and round-trips tokens."""

import contextlib
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from mailsuite.imap.parser import (
    BadCommand,
    Command,
    CommandReader,
    NeedLiteral,
    ParseError,
    parse_fetch,
)
from mailsuite.imap.search import parse_search

lines = st.lists(st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")))
imapish = st.lists(
    st.sampled_from(
        [
            b"a",
            b" ",
            b"(",
            b")",
            b'"',
            b"\\",
            b"{3}",
            b"{2+}",
            b"NIL",
            b"FETCH",
            b"UID",
            b"1:*",
            b"BODY[",
            b"]",
            b"<0.5>",
            b"HEADER.FIELDS",
            b"SEARCH",
            b"OR",
            b"NOT",
            b"CHARSET",
            b"UTF-8",
            b"FROM",
            b"x",
            b"\xff",
            b"*",
            b"\x00",
            b"MODSEQ",
            b"CHANGEDSINCE",
            b"5",
        ]
    ),
    max_size=25,
).map(b"".join)


def drive(reader, line_list, data):
    results = []
    for line in line_list:
        if reader._st.expect_literal is not None:
            n = reader._st.expect_literal
            results.append(reader.feed_literal(data.draw(st.binary(min_size=n, max_size=n))))
        res = reader.feed_line(line)
        results.append(res)
        if isinstance(res, NeedLiteral):
            n = res.size
            results.append(reader.feed_literal(data.draw(st.binary(min_size=n, max_size=n))))
        elif isinstance(res, BadCommand) and res.discard:
            n = res.discard
            results.append(reader.feed_literal(b"\0" * n))
    return results


def check_args(results):
    for res in results:
        assert res is None or isinstance(res, (Command, NeedLiteral, BadCommand))
        if isinstance(res, Command):
            for fn in (parse_fetch, parse_search):
                with contextlib.suppress(ParseError):
                    fn(res.args)
                with contextlib.suppress(ParseError):
                    fn(res.args[1:])


@settings(max_examples=300)
@given(lines, st.data())
def test_reader_never_raises_on_bytes(line_list, data):
    check_args(drive(CommandReader(max_literal=50), line_list, data))


@settings(max_examples=500)
@given(st.lists(imapish, max_size=5), st.data())
def test_reader_never_raises_on_imapish(line_list, data):
    line_list = [b"t1 " + x for x in line_list]
    check_args(drive(CommandReader(max_literal=50), line_list, data))


@settings(max_examples=300)
@given(st.lists(imapish, max_size=6))
def test_fetch_and_search_arguments(chunks):
    r = CommandReader()
    res = r.feed_line(b"t FETCH 1 " + b" ".join(chunks))
    check_args([res])
    r = CommandReader()
    res = r.feed_line(b"t SEARCH " + b" ".join(chunks))
    check_args([res])


safe = st.binary(max_size=20).filter(lambda b: b"\r" not in b and b"\n" not in b and b"\0" not in b)


@given(st.lists(safe, min_size=1, max_size=5))
def test_quoted_and_literal_roundtrip(values):
    """Every string comes back byte-exact, whether sent quoted or as a literal."""
    r = CommandReader()
    parts = []
    for v in values:
        if re.fullmatch(rb"[\x20-\x7e]*", v):
            parts.append(b'"' + v.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"')
        else:
            parts.append(None)
    line = b"t X"
    args = []
    for v, quoted in zip(values, parts, strict=True):
        if quoted is not None:
            line += b" " + quoted
        else:
            res = r.feed_line(line + b" {%d}" % len(v))
            assert res == NeedLiteral(len(v), True)
            r.feed_literal(v)
            line = b""
        args.append(v)
    res = r.feed_line(line)
    assert isinstance(res, Command), res
    assert res.args == args
