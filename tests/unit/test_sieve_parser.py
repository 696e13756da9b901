"""Sieve syntax (RFC 5228 2 and 8) and the validator's checks, with the error lines."""

from __future__ import annotations

import pytest

from mailsuite.sieve.grammar import (
    MAX_NESTING,
    Command,
    SieveParseError,
    Tag,
    parse,
    parse_bytes,
)
from mailsuite.sieve.grammar import (
    Test as SieveTest,
)
from mailsuite.sieve.validate import compile_script, decode_encoded, valid_script_name


def test_tree_shape() -> None:
    tree = parse('if header :contains ["Subject", "X"] "a" { keep; } stop;')
    assert tree == (
        Command(
            "if",
            tests=SieveTest("header", (Tag("contains"), ("Subject", "X"), "a")),
            block=(Command("keep"),),
        ),
        Command("stop"),
    )
    assert tree[0].line == 1


def test_comments_and_line_numbers() -> None:
    text = "# hash comment\n/* bracket\ncomment */ keep;\n\n  discard;"
    tree = parse(text)
    assert [c.name for c in tree] == ["keep", "discard"]
    assert [c.line for c in tree] == [3, 5]


def test_numbers_with_quantifiers() -> None:
    tree = parse("size :over 1K; size :over 2m; size :over 3G; size :over 42;")
    assert [c.args[1] for c in tree] == [1024, 2 * 2**20, 3 * 2**30, 42]


def test_quoted_string_escapes() -> None:
    # RFC 5228 2.4.2: \\ and \" are escapes; any other backslash just drops out
    (cmd,) = parse(r'x "a\\b\"c\d";')
    assert cmd.args == ('a\\b"cd',)


def test_multiline_text_with_dot_stuffing_and_crlf() -> None:
    text = "x text: # comment\r\nline one\r\n..dot\r\n.\r\n;"
    (cmd,) = parse(text)
    assert cmd.args == ("line one\r\n.dot\r\n",)
    (cmd,) = parse("x text:\nunix\n.\n;")
    assert cmd.args == ("unix\n",)


def test_identifiers_and_tags_are_case_insensitive() -> None:
    (cmd,) = parse('IF Header :CONTAINS "a" "b" { KEEP; }')
    assert cmd.name == "if" and cmd.tests == SieveTest("header", (Tag("contains"), "a", "b"))


@pytest.mark.parametrize(
    "text, line, reason",
    [
        ("keep", 1, "expected ';' or '{' after 'keep'"),
        ("keep;\nif true {\n keep;\n", 4, "missing '}'"),
        ('keep;\n"x";', 2, "expected a command"),
        ('x "abc', 1, "unterminated string"),
        ("x text:\nabc\n", 1, "unterminated text:"),
        ("x text: junk\n.\n;", 1, "text: must be followed by a line break"),
        ("/* open", 1, "unterminated /* comment"),
        ("x 10X;", 1, "bad number"),
        ("x 99999999999999999999G;", 1, "number too large"),
        ("x [];", 1, "expected a string in the list"),
        ('x ["a" "b"];', 1, "expected ',' or ']'"),
        ("if anyof (true; false) {}", 1, "expected ',' or ')'"),
        ("x @;", 1, "unexpected character '@'"),
        ("x : ;", 1, "':' must start a tag"),
        ('x "a\x00";', 1, "NUL character"),
    ],
)
def test_syntax_errors_name_line_and_reason(text: str, line: int, reason: str) -> None:
    with pytest.raises(SieveParseError) as info:
        parse(text)
    assert info.value.line == line
    assert reason in info.value.reason
    assert str(info.value).startswith(f"line {line}: ")


def test_nesting_is_bounded() -> None:
    deep = "if true {" * (MAX_NESTING + 1) + "}" * (MAX_NESTING + 1)
    with pytest.raises(SieveParseError, match="nesting"):
        parse(deep)
    tests = "if " + "not " * (MAX_NESTING + 5) + "true {}"
    with pytest.raises(SieveParseError, match="nesting"):
        parse(tests)


def test_invalid_utf8_is_a_parse_error() -> None:
    with pytest.raises(SieveParseError, match="UTF-8") as info:
        parse_bytes(b"keep;\n# \xff\n")
    assert info.value.line == 2


# -- validator ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, reason",
    [
        ('keep; require "fileinto";', "require must come before any other command"),
        ('if true { require "fileinto"; }', "require must come before any other command"),
        ('require "x-unknown";', "unsupported extension"),
        ('fileinto "a";', 'needs require "fileinto"'),
        ("frobnicate;", "unknown command 'frobnicate'"),
        ("if frob { }", "unknown test 'frob'"),
        ("if keep { }", "unknown test 'keep'"),
        ("else { }", "else without a preceding if"),
        ("keep; elsif true { }", "elsif without a preceding if"),
        ("if true;", "if needs a block"),
        ("keep { }", "keep takes no block"),
        ("if true true {}", "true takes no test"),
        ('if true "x" {}', "true takes no arguments"),
        ('redirect ["a@example.com"];', "redirect takes a string"),
        ('redirect "not an address";', "not an address"),
        ('if header :is :contains "a" "b" {}', ":contains used together with :is"),
        ('if header :is :is "a" "b" {}', ":is used twice"),
        ('if header :over "a" "b" {}', "header has no tag :over"),
        ('if header "a" :is "b" {}', "tag :is must come before"),
        ("if size 100 {}", "size needs :over or :under"),
        ('if header :comparator "i;nope" "a" "b" {}', "unknown comparator"),
        (
            'if header :comparator "i;ascii-numeric" "a" "b" {}',
            'needs require "comparator-i;ascii-numeric"',
        ),
        (
            'require "comparator-i;ascii-numeric"; if header :contains :comparator "i;ascii-numeric" '
            '"a" "b" {}',
            "cannot do :contains",
        ),
        ('if header :count "gt" "a" "b" {}', 'needs require "relational"'),
        ('require "relational"; if header :value "big" "a" "b" {}', "unknown relation"),
        ('if address "subject" "x" {}', "holds no addresses"),
        ('if header "bad name" "x" {}', "not a header field name"),
        ('require "envelope"; if envelope "via" "x" {}', "unknown envelope part"),
        ('require "variables"; set "1a" "x";', "not a variable name"),
        ('require "date"; if date "date" "fortnight" "x" {}', "unknown date part"),
        ('require "date"; if date :zone "+25" "date" "year" "x" {}', "+hhmm"),
        ('require "index"; if header :last "a" "b" {}', ":last needs :index"),
        ('require "index"; if header :index 0 "a" "b" {}', ":index counts from 1"),
        (
            'require "vacation"; vacation :days 1 :seconds 2 "x";',
            'needs require "vacation-seconds"',
        ),
        (
            'require ["vacation", "vacation-seconds"]; vacation :days 1 :seconds 2 "x";',
            "together with :days",
        ),
        ('require "include"; include "../x";', "not a script name"),
        ('require "include"; global "x";', 'needs require "variables"'),
        ('require "fileinto"; fileinto :create "a";', 'needs require "mailbox"'),
        ('require "fileinto"; fileinto :copy "a";', 'needs require "copy"'),
        ('require "imap4flags"; setflag "v" "\\\\Seen";', 'needs require "variables"'),
        ("if allof true {}", "allof needs a test list"),
        ("if not (true) {}", "not needs one test"),
    ],
)
def test_validator_errors(text: str, reason: str) -> None:
    with pytest.raises(SieveParseError) as info:
        compile_script(text)
    assert reason in info.value.reason, info.value.reason


def test_script_size_limit() -> None:
    with pytest.raises(SieveParseError, match="larger than the limit"):
        compile_script("keep;" * 300, max_size=1024)


def test_every_extension_together() -> None:
    compile_script("""
    require ["fileinto", "envelope", "encoded-character", "imap4flags", "copy", "body",
             "variables", "relational", "comparator-i;ascii-numeric", "subaddress",
             "mailbox", "date", "index", "reject", "ereject", "vacation",
             "vacation-seconds", "include"];
    if envelope :detail "to" "x" { fileinto :copy :create :flags "\\\\Seen" "a"; }
    """)


def test_encoded_character_rules() -> None:
    assert decode_encoded("${hex:E2 82 AC}") == "€"
    assert decode_encoded("${unicode: 20AC 41 }") == "€A"
    assert decode_encoded("${hex:}") == ""
    assert decode_encoded("${hex:fff}") == "${hex:fff}"  # more than two digits: left alone
    assert decode_encoded("${unicode:D800}") == "${unicode:D800}"  # surrogate: left alone
    assert decode_encoded("${hex:ff}") == "${hex:ff}"  # not UTF-8: left alone


@pytest.mark.parametrize(
    "name, ok",
    [
        ("vacation", True),
        ("mes règles", True),
        ("", False),
        (".hidden", False),
        ("a/b", False),
        ("a\nb", False),
        ("a\u2028b", False),
        ("x" * 129, False),
    ],
)
def test_script_names(name: str, ok: bool) -> None:
    assert valid_script_name(name) is ok
