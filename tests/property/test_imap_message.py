"""Property tests: message structure functions never raise and always emit well-formed IMAP."""

from hypothesis import given, settings
from hypothesis import strategies as st

from mailsuite.imap.message import (
    ParsedMessage,
    Section,
    body_text,
    bodystructure,
    crlf_size,
    envelope,
    to_crlf,
)
from tests.imap_helpers import NESTED, nested_message, wire

fragments = st.sampled_from(
    [
        b"From: a@b.c\n",
        b'To: x <y@z>, group: a@b, "q\\"" <c@d>;\n',
        b"Subject: =?utf-8?q?x?=\n",
        b"Content-Type: multipart/mixed; boundary=b\n",
        b'Content-Type: multipart/alternative; boundary="c"\n',
        b"Content-Type: message/rfc822\n",
        b"Content-Type: text/plain; charset=utf-8\n",
        b"Content-Transfer-Encoding: base64\n",
        b"Content-Disposition: attachment; filename=x\n",
        b"\n",
        b"--b\n",
        b"--b--\n",
        b"--c\n",
        b"--c--\n",
        b"body text\n",
        b" folded\n",
        b"\r\n",
        b"\r",
        b'\xff\x00(")\\{3}\n',
        b"no colon line\n",
    ]
)
messages = st.one_of(st.binary(max_size=300), st.lists(fragments, max_size=30).map(b"".join))
sections = st.builds(
    Section,
    st.lists(st.integers(1, 4), max_size=4).map(tuple),
    st.sampled_from([None, "HEADER", "TEXT", "MIME", "HEADER.FIELDS", "HEADER.FIELDS.NOT"]),
    st.just(("From", "content-type")),
)


@settings(max_examples=400)
@given(messages, st.lists(sections, max_size=5))
def test_never_raises_and_well_formed(raw, specs):
    wire(envelope(raw))
    wire(bodystructure(raw))
    wire(bodystructure(raw, extensible=False))
    m = ParsedMessage(raw)
    assert m.size == crlf_size(raw) == len(to_crlf(raw))
    body_text(raw)
    for spec in specs:
        if spec.kind == "MIME" and not spec.part:
            continue
        if spec.kind not in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
            spec = Section(spec.part, spec.kind)
        data = m.section(spec)
        assert b"\r\r" not in data or b"\r\r" in raw
        assert b"\n" not in data.replace(b"\r\n", b"")


@given(st.binary(max_size=200))
def test_crlf_idempotent(data):
    once = to_crlf(data)
    assert to_crlf(once) == once
    assert b"\n" not in once.replace(b"\r\n", b"")
    assert b"\r" not in once.replace(b"\r\n", b"")


@given(st.integers(1, 4), st.integers(0, 3))
def test_section_concatenation(part, _):
    """BODY[n.MIME] + BODY[n] are a contiguous slice of the CRLF message."""
    m = ParsedMessage(NESTED)
    whole = to_crlf(NESTED)
    mime = m.section(Section((part,), "MIME"))
    body = m.section(Section((part,)))
    if mime:
        assert mime + body in whole


def balanced(data: bytes) -> int:
    """The deepest parenthesis nesting of a response value (quoted strings skipped); raises
    AssertionError if the parentheses do not balance."""
    depth = deepest = 0
    i = 0
    while i < len(data):
        c = data[i]
        if c == 0x22:  # skip a quoted string
            i += 1
            while data[i] != 0x22:
                i += 2 if data[i] == 0x5C else 1
        elif c == 0x28:
            depth += 1
            deepest = max(deepest, depth)
        elif c == 0x29:
            depth -= 1
            assert depth >= 0
        i += 1
    assert depth == 0
    return deepest


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from([0, 1, 39, 40, 41, 500, 10_000]) | st.integers(0, 10_000),
    st.sampled_from(["multipart", "rfc822", "mixed"]),
    st.booleans(),
)
def test_deeply_nested_mime_is_bounded(depth, kind, same_boundary):
    """10,000 nested parts: BODYSTRUCTURE, BODY, sections and SEARCH text neither recurse
    without bound nor fail; the structure is cut at a fixed depth and stays well formed."""
    raw = nested_message(depth, kind, same_boundary)
    for extensible in (True, False):
        assert balanced(bodystructure(raw, extensible)) <= 200
    assert balanced(envelope(raw)) <= 3
    m = ParsedMessage(raw)
    m.section(Section((1,) * 10_000))
    m.section(Section((1,) * 50, "MIME"))
    body_text(raw)
