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
from tests.unit.test_imap_message import NESTED, wire

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
