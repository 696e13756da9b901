"""Unit tests for the IMAP command reader, argument helpers and FETCH attribute parser."""

from datetime import date, datetime, timedelta, timezone

import pytest

from mailsuite.imap.message import Section
from mailsuite.imap.parser import (
    NIL,
    Atom,
    BadCommand,
    Command,
    CommandReader,
    Literal,
    NeedLiteral,
    ParseError,
    Quoted,
    astring,
    flag_list,
    mailbox,
    nz_number,
    parse_date,
    parse_date_time,
    parse_fetch,
    sequence_set,
)


def one(line, **kw):
    return CommandReader(**kw).feed_line(line)


def test_simple_commands():
    c = one(b"a001 NOOP")
    assert c == Command("a001", "NOOP", False, [])
    c = one(b"A2 select INBOX")
    assert c.command == "SELECT" and c.args == [Atom("INBOX")]
    c = one(b"t uid fetch 1:* (FLAGS)")
    assert (c.command, c.uid, c.name) == ("FETCH", True, "UID FETCH")
    assert c.args == [Atom("1:*"), [Atom("FLAGS")]]


def test_tokens():
    c = one(b'a LIST "" "%"')
    assert c.args == [Quoted(b""), Quoted(b"%")]
    assert isinstance(c.args[0], Quoted)
    c = one(rb'a LOGIN "jo\"e" "p\\w"')
    assert c.args == [b'jo"e', b"p\\w"]
    c = one(b"a STORE 1 +FLAGS (\\Seen \\Deleted) ")
    assert c.args == [Atom("1"), Atom("+FLAGS"), [Atom("\\Seen"), Atom("\\Deleted")]]
    c = one(b"a X (a (b (c)) nil) NIL")
    assert c.args == [[Atom("a"), [Atom("b"), [Atom("c")]], NIL], NIL]


def test_fetch_atom_kept_intact():
    c = one(b'a FETCH 1 (BODY.PEEK[HEADER.FIELDS (From "To")]<0.100> BODY[] body[1.2.MIME])')
    assert c.args[1] == [
        Atom('BODY.PEEK[HEADER.FIELDS (From "To")]<0.100>'),
        Atom("BODY[]"),
        Atom("body[1.2.MIME]"),
    ]
    # '[' in an ordinary atom is just a character
    assert one(b"a SELECT foo[bar").args == [Atom("foo[bar")]


@pytest.mark.parametrize(
    "line, reason",
    [
        (b"", "tag"),
        (b"a", "Missing command"),
        (b"+ NOOP", "tag"),
        (b'a LOGIN "unterminated', "Unterminated"),
        (b'a LOGIN "bad \\n escape"', "escape"),
        (b"a X (a", "Unbalanced"),
        (b"a X a)", "Unexpected"),
        (b'a X "a""b"', "space"),
        (b"a X {3} b", "Literal"),
        (b"a FETCH 1 BODY[HEADER", "Unterminated"),
        (b"a UID FROB 1", "UID"),
        (b"a X caf\xc3\xa9", "character"),
        (b"a X ~{3}", "literal8"),
    ],
)
def test_syntax_errors(line, reason):
    r = one(line)
    assert isinstance(r, BadCommand)
    assert reason.lower() in r.reason.lower()
    assert not r.close


def test_bad_command_keeps_tag():
    r = one(b"tag1 LOGIN (")
    assert r.tag == "tag1" and r.command == "LOGIN"
    assert one(b"").tag is None


def test_sync_literal_flow():
    r = CommandReader()
    assert r.feed_line(b"a1 LOGIN {3}") == NeedLiteral(3, True)
    assert r.in_command
    assert r.feed_literal(b"joe") is None
    assert r.feed_line(b" {4}") == NeedLiteral(4, True)
    assert r.feed_literal(b"p w\x00"[:3] + b"!") is None
    c = r.feed_line(b"")
    assert c == Command("a1", "LOGIN", False, [b"joe", b"p w!"])
    assert isinstance(c.args[0], Literal)
    assert not r.in_command
    assert r.feed_line(b"a2 NOOP").command == "NOOP"


def test_literal_plus_and_zero_length():
    r = CommandReader()
    assert r.feed_line(b"a APPEND INBOX {0+}") == NeedLiteral(0, False)
    r.feed_literal(b"")
    assert r.feed_line(b"").args == [Atom("INBOX"), Literal(b"")]


def test_literal_inside_list():
    r = CommandReader()
    assert r.feed_line(b"a X (a {2}") == NeedLiteral(2, True)
    r.feed_literal(b"bc")
    assert r.feed_line(b" d)").args == [[Atom("a"), b"bc", Atom("d")]]


def test_literal_must_be_followed_by_space():
    r = CommandReader()
    r.feed_line(b"a LOGIN {3}")
    r.feed_literal(b"joe")
    res = r.feed_line(b"pw")
    assert isinstance(res, BadCommand) and res.tag == "a"
    assert r.feed_line(b"b NOOP").tag == "b"


def test_sync_literal_too_big_resyncs():
    r = CommandReader(max_literal=10)
    res = r.feed_line(b"a LOGIN {11}")
    assert isinstance(res, BadCommand)
    assert res.code == "TOOBIG" and not res.close and res.discard == 0
    # the client never sends the literal: the next line is a new command
    assert r.feed_line(b"b NOOP") == Command("b", "NOOP", False, [])


def test_nonsync_literal_too_big_closes():
    r = CommandReader(max_literal=10)
    res = r.feed_line(b"a LOGIN {11+}")
    assert isinstance(res, BadCommand) and res.code == "TOOBIG" and res.close


def test_append_has_its_own_limit():
    r = CommandReader(max_literal=10, max_append_literal=1000)
    assert r.feed_line(b"a APPEND INBOX {500}") == NeedLiteral(500, True)
    r.feed_literal(b"x" * 500)
    assert r.feed_line(b"").command == "APPEND"
    res = r.feed_line(b"a APPEND INBOX {1001}")
    assert isinstance(res, BadCommand) and res.code == "TOOBIG"


def test_error_before_nonsync_literal_discards_it():
    r = CommandReader()
    res = r.feed_line(b'a LOGIN "x {5+}')
    assert isinstance(res, BadCommand) and res.discard == 5 and not res.close
    assert r.feed_literal(b"12345") is None
    # the rest of the bad command, with another non-sync literal, is swallowed
    assert r.feed_line(b" more {2+}") == NeedLiteral(2, False)
    assert r.feed_literal(b"zz") is None
    assert r.feed_line(b" end") is None
    assert r.feed_line(b"b NOOP").command == "NOOP"


def test_line_and_command_limits():
    r = CommandReader(max_line=20)
    res = r.feed_line(b"a LOGIN " + b"x" * 50)
    assert isinstance(res, BadCommand) and res.code == "TOOBIG"
    assert r.feed_line(b"b NOOP").command == "NOOP"
    r = CommandReader(max_command=100, max_literal=80)
    assert isinstance(r.feed_line(b"a X {60}"), NeedLiteral)
    r.feed_literal(b"x" * 60)
    res = r.feed_line(b" {60}")
    assert isinstance(res, BadCommand) and res.code == "TOOBIG"


def test_literal_plus_disabled():
    res = one(b"a LOGIN {3+}", literal_plus=False)
    assert isinstance(res, BadCommand) and res.discard == 3


def test_feed_misuse_raises():
    r = CommandReader()
    with pytest.raises(RuntimeError):
        r.feed_literal(b"x")
    r.feed_line(b"a X {2}")
    with pytest.raises(RuntimeError):
        r.feed_line(b"oops")
    with pytest.raises(RuntimeError):
        r.feed_literal(b"abc")


def test_argument_helpers():
    assert astring(Atom("abc")) == b"abc"
    assert astring(Quoted(b"a b")) == b"a b"
    assert astring(NIL) == b"NIL"
    with pytest.raises(ParseError):
        astring([Atom("x")])
    assert mailbox(Atom("inbox")) == "INBOX"
    assert mailbox(Quoted(b"InBox")) == "INBOX"
    assert mailbox(Atom("INBOX.Sent")) == "INBOX.Sent"
    assert mailbox(Atom("Entw&APw-rfe")) == "Entw&APw-rfe"
    with pytest.raises(ParseError):
        mailbox(Quoted(b"\xff"))
    assert nz_number(Atom("42")) == 42
    for bad in (Atom("0"), Atom("x"), Quoted(b"1"), Atom("99999999999")):
        with pytest.raises(ParseError):
            nz_number(bad)
    assert str(sequence_set(Atom("1:*"))) == "1:*"
    with pytest.raises(ParseError):
        sequence_set(Atom("0:1"))


def test_flag_list():
    assert flag_list([Atom("\\seen"), Atom("$Label1"), Atom("\\DELETED")]) == [
        "\\Seen",
        "$Label1",
        "\\Deleted",
    ]
    assert flag_list(Atom("\\Flagged")) == ["\\Flagged"]
    assert flag_list([]) == []
    assert flag_list(NIL) == []  # STORE 1 +FLAGS NIL (issue 9): the empty list
    for bad in ([Atom("\\Recent")], [Quoted(b"x")], [Atom("a]b")], [Atom("\\")], [NIL]):
        with pytest.raises(ParseError):
            flag_list(bad)
    assert flag_list([Atom("\\Recent")], allow_recent=True) == ["\\Recent"]


def test_dates():
    assert parse_date(Atom("1-Feb-1994")) == date(1994, 2, 1)
    assert parse_date(Quoted(b"01-feb-1994")) == date(1994, 2, 1)
    for bad in (Atom("1-Foo-1994"), Atom("31-Feb-1994"), Atom("1994-02-01")):
        with pytest.raises(ParseError):
            parse_date(bad)
    dt = parse_date_time(Quoted(b"01-Feb-1994 21:52:25 -0800"))
    assert dt == datetime(1994, 2, 1, 21, 52, 25, tzinfo=timezone(timedelta(hours=-8)))
    assert parse_date_time(Quoted(b" 1-Feb-1994 21:52:25 +0000")).day == 1
    for bad in (Atom("x"), Quoted(b"01-Feb-1994 21:52:25"), Quoted(b"01-Feb-1994 25:52:25 +0000")):
        with pytest.raises(ParseError):
            parse_date_time(bad)


def fetch(text):
    c = one(b"a FETCH 1 " + text)
    assert isinstance(c, Command), c
    return parse_fetch(c.args[1:])


def test_fetch_macros_and_simple():
    assert [i.name for i in fetch(b"ALL").items] == [
        "FLAGS",
        "INTERNALDATE",
        "RFC822.SIZE",
        "ENVELOPE",
    ]
    assert [i.name for i in fetch(b"fast").items] == ["FLAGS", "INTERNALDATE", "RFC822.SIZE"]
    assert fetch(b"FULL").items[-1].name == "BODY"
    req = fetch(b"(uid rfc822.size MODSEQ)")
    assert [i.name for i in req.items] == ["UID", "RFC822.SIZE", "MODSEQ"]
    assert req.needs_modseq and not req.needs_raw and not req.sets_seen


def test_fetch_sections_and_labels():
    req = fetch(b'(BODY.PEEK[HEADER.FIELDS (FROM "Subject")]<0.1024> BODY[1.2.TEXT] RFC822)')
    a, b, c = req.items
    assert a.section == Section((), "HEADER.FIELDS", ("FROM", "Subject"))
    assert a.partial == (0, 1024) and a.peek and not a.sets_seen
    assert a.label() == "BODY[HEADER.FIELDS (FROM Subject)]<0>"
    assert b.section == Section((1, 2), "TEXT") and b.sets_seen
    assert b.label() == "BODY[1.2.TEXT]"
    assert c.sets_seen and req.sets_seen and req.needs_raw
    assert fetch(b"BODY[]<5.10>").items[0].label() == "BODY[]<5>"
    assert fetch(b"BODY[3.MIME]").items[0].section == Section((3,), "MIME")
    assert fetch(b"BODY[header.fields.not (X-A)]").items[0].label() == (
        "BODY[HEADER.FIELDS.NOT (X-A)]"
    )
    assert not fetch(b"RFC822.HEADER").sets_seen
    assert fetch(b"RFC822.TEXT").sets_seen
    assert fetch(b"BODY").items[0].section is None


@pytest.mark.parametrize(
    "bad",
    [
        b"BODY[MIME]",
        b"BODY[0]",
        b"BODY[1.HEADER.FIELDS]",
        b"BODY[HEADER.FIELDS ()]",
        b"BODY[TEXT (FROM)]",
        b"BODY[]<5>",
        b"BODY[]<5.0>",
        b"BODY[1.FOO]",
        b"FOO",
        b"()",
        b"BINARY[1]",
        b"(FLAGS) (CHANGEDSINCE x)",
        b"(FLAGS) (FOO 1)",
        b"(FLAGS) (VANISHED)",
    ],
)
def test_fetch_errors(bad):
    c = one(b"a FETCH 1 " + bad)
    with pytest.raises(ParseError):
        parse_fetch(c.args[1:])


def test_fetch_changedsince():
    req = fetch(b"(FLAGS) (CHANGEDSINCE 12345)")
    assert req.changedsince == 12345 and req.needs_modseq and not req.vanished
    assert fetch(b"(FLAGS) (CHANGEDSINCE 1 VANISHED)").vanished


def test_fetch_with_uid():
    req = fetch(b"(FLAGS)").with_uid()
    assert [i.name for i in req.items] == ["UID", "FLAGS"]
    assert req.with_uid() is req
