"""The fast paths of a first FETCH ENVELOPE give exactly what the full parsers give.

``simple_address_list`` against ``parse_address_list`` (through ENVELOPE's address structures),
``envelope_fields`` (one regex) against ``_parse_fields`` (every field), and the ENVELOPE of a
header-only read (``read_head``) against the one of the whole file."""

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from mailsuite.imap.envelope import _address_list, _address_list_parsed, envelope_fields
from mailsuite.imap.fetch_response import read_head
from mailsuite.imap.message import ParsedMessage, _envelope_from_fields, _parse_fields, split_header

# the characters that make address syntax: specials, quotes, comments, spaces, 8-bit
_ADDR_ALPHABET = st.sampled_from(
    [
        b"a",
        b"b",
        b"Z",
        b"9",
        b"-",
        b"=",
        b"?",
        b" ",
        b"\t",
        b"<",
        b">",
        b"@",
        b".",
        b",",
        b'"',
        b"(",
        b")",
        b":",
        b";",
        b"\\",
        b"[",
        b"]",
        b"\xe9",
        b"\x85",
        b"\xa0",
    ]
)
_ADDR_PIECES = st.sampled_from(
    [b"user@example.org", b"Some Name ", b"<a.b@c.d>", b'"Last, First" ', b", ", b"x", b" "]
)
_VALUES = st.lists(st.one_of(_ADDR_ALPHABET, _ADDR_PIECES), max_size=24).map(b"".join)


@settings(max_examples=1000, deadline=None)
@given(_VALUES)
def test_simple_addresses_equal_the_full_parser(value: bytes) -> None:
    assert _address_list(value) == _address_list_parsed(value)


def test_simple_addresses_cover_the_plain_forms() -> None:
    from mailsuite.imap.address import simple_address_list

    assert simple_address_list(b' Ann Lee <ann@x.org>, "Lee, Bob" <b@y.org>, c@z') == [
        (b"Ann Lee", b"ann", b"x.org"),
        (b"Lee, Bob", b"b", b"y.org"),
        (None, b"c", b"z"),
    ]
    for other in (b"a@b (Name)", b"group: a@b;", b"<>", b"J. Doe <j@d>", b"\xe9 <a@b>"):
        assert simple_address_list(other) is None  # the full parser's job


_HEADER_LINES = st.lists(
    st.one_of(
        st.sampled_from(
            [
                b"From: A <a@b>",
                b"from :x@y",
                b"To: t@u",
                b"Cc: c@d,\n e@f",
                b"Subject: s",
                b"SUBJECT: second",
                b"Date: Mon, 1 Jan 2024",
                b"Message-ID: <m@x>",
                b"In-Reply-To: <r@x>",
                b"Reply-To:",
                b"Sender: s@t",
                b"Bcc: b@c",
                b"X-From: no",
                b"Fromage: no",
                b"\tfolded",
                b" folded more",
                b"no colon",
                b"Bad Name: v",
                b"To: \r",
                b"Subject: a\rb",
                b"",
            ]
        ),
        st.binary(max_size=12),
    ),
    max_size=14,
)


@settings(max_examples=1000, deadline=None)
@given(_HEADER_LINES, st.sampled_from([b"\n", b"\r\n"]))
def test_envelope_fields_equal_the_full_field_parse(lines: list[bytes], eol: bytes) -> None:
    raw = eol.join(lines) + eol + eol + b"body\n"
    fields_end = split_header(raw)[0]
    assert ParsedMessage(raw).envelope() == _envelope_from_fields(_parse_fields(raw, 0, fields_end))
    wanted = envelope_fields(raw, fields_end)
    for f in _parse_fields(raw, 0, fields_end):
        if f.lname in wanted:
            first = next(g for g in _parse_fields(raw, 0, fields_end) if g.lname == f.lname)
            assert wanted[f.lname] == first.value


def test_envelope_from_the_head_equals_the_whole_file(tmp_path: Path) -> None:
    long_header = b"".join(b"Received: from relay%d by mx\n" % i for i in range(2000))  # > 16 KiB
    cases = [
        b"From: A <a@b>\nSubject: hi\n\n" + b"x" * 100_000,
        long_header + b"Subject: late\nTo: t@u\n\n" + b"y" * 300_000,
        b"Subject: no body and no blank line\nTo: t@u",
        b"\nSubject: in the body\n",
        b"Subject: crlf\r\nTo: t@u\r\n\r\nbody\r\n",
    ]
    for i, raw in enumerate(cases):
        path = tmp_path / str(i)
        path.write_bytes(raw)
        head = read_head(str(path), chunk=4096)
        assert len(head) < len(raw) or i >= 2
        assert ParsedMessage(head).envelope() == ParsedMessage(raw).envelope()
