"""Unit tests for ENVELOPE, BODYSTRUCTURE and BODY[section] from stored (LF) messages."""

import pytest

from mailsuite.imap.message import (
    ParsedMessage,
    Section,
    body_text,
    bodystructure,
    crlf_size,
    decode_header_value,
    envelope,
    partial,
    section,
    to_crlf,
)
from mailsuite.imap.parser import NIL
from tests.imap_helpers import NESTED, wire


def test_envelope_fields():
    env = wire(envelope(NESTED))
    date, subject, from_, sender, reply_to, to, cc, bcc, irt, mid = env
    assert date == b"Tue, 1 Jul 2003 10:52:37 +0200"
    assert subject == b"=?utf-8?q?R=C3=A9sum=C3=A9?= of the meeting"  # RFC 2047 left as is
    assert from_ == [[b"Joe Q. Public", NIL, b"john.q.public", b"example.com"]]
    assert sender == from_ and reply_to == from_
    assert to == [[b"Mary Smith", NIL, b"mary", b"x.test"], [NIL, NIL, b"jdoe", b"example.org"]]
    assert cc == [[NIL, NIL, b"undisclosed-recipients", NIL], [NIL, NIL, NIL, NIL]]
    assert bcc is NIL
    assert irt == b"<0001@local.machine.example>"
    assert mid == b"<1234@local.machine.example>"


def test_envelope_does_not_need_body():
    head = NESTED.split(b"\n\n", 1)[0] + b"\n\n"
    assert envelope(head + b"\xff" * 10000) == envelope(NESTED)


def test_envelope_groups_routes_and_oddities():
    raw = (
        b"From: A Group:Ed Jones <c@a.test>,joe@where.test,John <jdoe@one.test>;, x@y.test\n"
        b"Sender: \n"
        b"Reply-To: <@route1,@route2:user@host.test>\n"
        b"To: broken\n"
        b'Cc: "Smith, John" <js@x.test> (comment), <>\n'
        b'Subject: \xc3\xa9t\xc3\xa9 "quoted"\n'
        b"\n"
    )
    env = wire(envelope(raw))
    assert env[2] == [
        [NIL, NIL, b"A Group", NIL],
        [b"Ed Jones", NIL, b"c", b"a.test"],
        [NIL, NIL, b"joe", b"where.test"],
        [b"John", NIL, b"jdoe", b"one.test"],
        [NIL, NIL, NIL, NIL],
        [NIL, NIL, b"x", b"y.test"],
    ]
    assert env[3] == env[2]  # empty Sender -> From
    assert env[4] == [[NIL, b"@route1,@route2", b"user", b"host.test"]]
    assert env[5] == [[NIL, NIL, b"broken", b"MISSING_DOMAIN"]]
    assert env[6] == [[b"Smith, John", NIL, b"js", b"x.test"], [NIL, NIL, b"", b""]]
    assert env[1] == 'été "quoted"'.encode()  # 8-bit -> literal, byte exact
    assert b"{" in envelope(raw)
    assert wire(envelope(b"")) == [NIL] * 10


def test_envelope_quoting_with_backslash_and_tab():
    raw = b'Subject: a\\b "c"\td\n\n'
    out = envelope(raw)
    assert out.startswith(b'(NIL "a\\\\b \\"c\\"\td"')
    assert wire(out)[1] == b'a\\b "c"\td'


def test_bodystructure_nested():
    bs = wire(bodystructure(NESTED))
    alt, msg, app, subtype, params, _disp, _lang, _loc = bs
    assert subtype == b"mixed" and params == [b"boundary", b"outer"]
    plain, html, alt_sub = alt[:3]
    assert alt_sub == b"alternative"
    assert plain[:7] == [
        b"text",
        b"plain",
        [b"charset", b"utf-8"],
        NIL,
        NIL,
        b"quoted-printable",
        str(len(b"Caf=C3=A9 au lait\r\nsecond line")),
    ]
    assert plain[7] == "2"  # lines
    assert html[5] == b"base64" and html[7] == "1"
    assert msg[:5] == [b"message", b"rfc822", NIL, NIL, b"forwarded"]
    inner_env, inner_body, inner_lines = msg[7], msg[8], msg[9]
    assert inner_env[1] == b"inner message"
    assert inner_env[2] == [[b"Alice", NIL, b"alice", b"a.test"]]
    assert inner_body[-5] == b"mixed"
    png = inner_body[1]
    assert png[:7] == [b"image", b"png", [b"name", b"x.png"], b"<img1@x>", NIL, b"base64", "12"]
    assert png[7:] == [NIL, NIL, [b"en", b"de"], b"http://x.test/x.png"]
    assert inner_body[0][:2] == [b"text", b"plain"]
    assert inner_body[0][2] == [b"charset", b"us-ascii"]  # RFC 2045 default
    assert msg[10:] == [NIL, [b"attachment", [b"filename", b"fwd.eml"]], NIL, NIL]
    start = NESTED.index(b"From: Alice")
    end = NESTED.index(b"\n--outer\nContent-Type: application")
    assert inner_lines == str(NESTED[start:end].count(b"\n") + 1)  # last line has no LF
    assert msg[6] == str(len(to_crlf(NESTED[start:end])))
    assert app[8] == [b"attachment", [b"filename*", b"utf-8''%E2%82%AC.bin"]]


def test_body_non_extensible():
    body = wire(bodystructure(NESTED, extensible=False))
    assert body[-1] == b"mixed"
    alt = body[0]
    assert alt[-1] == b"alternative"
    assert len(alt[0]) == 8  # basic fields + lines, no extension data
    assert len(body[2]) == 7


def test_simple_message_defaults():
    raw = b"Subject: hi\n\nline one\nline two\n"
    assert bodystructure(raw) == (
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7BIT" 20 2 NIL NIL NIL NIL)'
    )
    assert (
        bodystructure(raw, False) == b'("text" "plain" ("charset" "us-ascii") NIL NIL "7BIT" 20 2)'
    )


@pytest.mark.parametrize(
    "raw",
    ids=lambda raw: repr(raw[:30]),
    argvalues=[
        b"",
        b"no header at all",
        b"Content-Type: multipart/mixed\n\nno boundary",
        b"Content-Type: multipart/mixed; boundary=x\n\nno parts here",
        b"Content-Type: multipart/mixed; boundary=x\n\n--x\nunterminated part",
        b"Content-Type: message/rfc822\n\n",
        b"Content-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\nRnJvbTogeA==\n",
        b"Content-Type: ///;;;===\n\nx",
        b'Content-Type: text/plain; charset="unterminated\n\nx',
        b"\xff\xfe: \x00\x01\n\n\x00",
        b"Content-Type: multipart/mixed; boundary=a\n\n"
        + b"--a\nContent-Type: multipart/mixed; boundary=a\n\n" * 200,
        b"Subject: x\r\nFrom: a@b\r\n\r\nCRLF stored\r\n",
        b'From: <<<>>>,,,;;;:::@@@"\n\n',
        b"Subject: bare\rcr\n\nbody\r",
    ],
)
def test_malformed_never_raises(raw):
    for ext in (True, False):
        wire(bodystructure(raw, ext))
    wire(envelope(raw))
    m = ParsedMessage(raw)
    for spec in (
        Section(),
        Section((1,)),
        Section((1, 1)),
        Section((2,), "MIME"),
        Section((1,), "HEADER"),
        Section((), "HEADER.FIELDS", ("FROM",)),
    ):
        m.section(spec)


def test_multipart_without_parts_gets_one_empty_part():
    bs = wire(bodystructure(b"Content-Type: multipart/mixed; boundary=x\n\nnothing"))
    assert bs[0][:2] == [b"text", b"plain"] and bs[1] == b"mixed"


def test_boundary_prefix_is_not_a_delimiter():
    raw = b"Content-Type: multipart/mixed; boundary=ab\n\n--ab\n\none\n--abc\nstill one\n--ab--\n"
    assert section(raw, Section((1,))) == b"one\r\n--abc\r\nstill one"


def test_sections_nested():
    m = ParsedMessage(NESTED)
    assert m.section(Section((1, 1))) == b"Caf=C3=A9 au lait\r\nsecond line"
    assert m.section(Section((1, 2), "MIME")).startswith(b"Content-Type: text/html")
    assert m.section(Section((1, 2), "MIME")).endswith(b"base64\r\n\r\n")
    assert m.section(Section((2,))).startswith(b"From: Alice <alice@a.test>\r\n")
    assert m.section(Section((2,), "HEADER")).endswith(b"boundary=b2\r\n\r\n")
    assert m.section(Section((2,), "TEXT")).startswith(b"--b2\r\n")
    assert m.section(Section((2, 1))) == b"inner body"
    assert m.section(Section((2, 2))) == b"iVBORw0KGgo="
    assert m.section(Section((2, 2), "MIME")).startswith(b"Content-Type: image/png")
    assert m.section(Section((2,), "HEADER.FIELDS", ("subject", "TO"))) == (
        b"To: bob@b.test\r\nSubject: inner message\r\n\r\n"
    )
    assert m.section(Section((3,))) == b"AAECAw=="
    assert m.section(Section((4,))) == b""
    assert m.section(Section((1, 3))) == b""
    assert m.section(Section((1, 1), "HEADER")) == b""  # not a message/rfc822 part
    assert m.section(Section()) == to_crlf(NESTED)


def test_sections_single_part_and_header_fields():
    raw = b"From: a@b\nSubject: one\n two\nX-Empty:\nsubject: again\n\nbody\n"
    m = ParsedMessage(raw)
    assert m.section(Section((1,))) == b"body\r\n"
    assert m.section(Section((1,), "MIME")) == to_crlf(raw[: raw.index(b"\n\n") + 2])
    assert m.section(Section((), "HEADER.FIELDS", ("SUBJECT",))) == (
        b"Subject: one\r\n two\r\nsubject: again\r\n\r\n"
    )
    assert m.section(Section((), "HEADER.FIELDS.NOT", ("subject", "from"))) == (b"X-Empty:\r\n\r\n")
    assert m.section(Section((), "HEADER.FIELDS", ("nothing",))) == b"\r\n"
    assert m.section(Section((), "TEXT")) == b"body\r\n"
    assert m.header() == b"From: a@b\r\nSubject: one\r\n two\r\nX-Empty:\r\nsubject: again\r\n\r\n"
    # no blank line, no body: no blank line in header fetches
    assert section(b"Subject: x\n", Section((), "HEADER.FIELDS", ("subject",))) == b"Subject: x\r\n"


def test_message_rfc822_top_level():
    raw = b"Content-Type: message/rfc822\n\nSubject: inner\n\ninner text\n"
    assert section(raw, Section((1,), "HEADER")) == b"Subject: inner\r\n\r\n"
    assert section(raw, Section((1, 1))) == b"inner text\r\n"
    bs = wire(bodystructure(raw))
    assert bs[7][1] == b"inner"


def test_crlf_conversion_and_sizes():
    assert to_crlf(b"a\nb\n") == b"a\r\nb\r\n"
    assert to_crlf(b"a\r\nb\n") == b"a\r\nb\r\n"
    assert to_crlf(b"a\rb\r\n") == b"a\r\nb\r\n"
    assert crlf_size(b"a\nb\n") == 6
    assert crlf_size(b"a\r\nb\r\n") == 6
    assert crlf_size(NESTED) == len(to_crlf(NESTED))
    assert partial(b"0123456789", 2, 3) == b"234"
    assert partial(b"0123456789", 8, 30) == b"89"
    assert partial(b"0123456789", 10, 3) == b""
    assert section(NESTED, Section((3,)), (2, 4)) == b"ECAw"


def test_decode_header_value():
    assert decode_header_value(b" =?utf-8?q?R=C3=A9sum=C3=A9?= of") == " Résumé of"
    assert decode_header_value(
        b"=?ISO-8859-1?B?SWYgeW91IGNhbiByZWFkIHRoaXMgeW8=?= "
        b"=?ISO-8859-2?B?dSB1bmRlcnN0YW5kIHRoZSBleGFtcGxlLg==?="
    ) == ("If you can read this you understand the example.")
    assert decode_header_value(b"=?bogus-cs?q?x?=") == "x"
    assert decode_header_value(b"=?utf-8?b?!!!?=") == "=?utf-8?b?!!!?="
    assert decode_header_value("caf\xe9".encode("latin-1")) == "café"


def test_body_text_decodes_parts():
    text = body_text(NESTED)
    assert "Café au lait" in text
    assert "<p>Café</p>" in text
    assert "inner body" in text
    assert "AAECAw" not in text


def test_bodystructure_speed_sanity():
    big = NESTED.replace(b"AAECAw==", b"QUFB\n" * 200000)
    import time

    t = time.perf_counter()
    for _ in range(5):
        envelope(big)
    assert time.perf_counter() - t < 0.05  # header-only, independent of body size
    bodystructure(big)


def test_nul_is_replaced_without_changing_sizes():
    raw = b"Subject: a\n\nx\x00y\n"
    assert section(raw, Section((), "TEXT")) == b"x\x80y\r\n"
    assert crlf_size(raw) == len(to_crlf(raw))
