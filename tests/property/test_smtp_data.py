"""DATA decoding: any message survives dot-stuffing and any chunking; smuggling never splits."""

from hypothesis import given, settings
from hypothesis import strategies as st

from mailsuite.smtp.data import DataReader

line = st.text(alphabet=st.sampled_from(list("ab. \t.é")), max_size=40).map(
    lambda s: s.encode("utf-8")
)


def wire(lines: list[bytes]) -> bytes:
    """Encode lines as an SMTP client must: CRLF, dot-stuffed, terminated."""
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines) + b".\r\n"


def decode(data: bytes, cuts: list[int]) -> tuple[bytes, bytes | None, DataReader]:
    reader = DataReader()
    out = []
    rest = None
    pos = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        chunk = data[pos:cut]
        pos = max(pos, cut)
        got, rest = reader.feed(chunk)
        out.append(got)
        if rest is not None:
            rest += data[pos:]
            break
    return b"".join(out), rest, reader


@settings(max_examples=400)
@given(st.lists(line, max_size=30), st.lists(st.integers(0, 400), max_size=8))
def test_round_trip_any_chunking(lines: list[bytes], cuts: list[int]) -> None:
    data = wire(lines) + b"MAIL FROM:<x@y>\r\n"
    out, rest, reader = decode(data, cuts)
    assert out == b"".join(ln + b"\n" for ln in lines)
    assert rest == b"MAIL FROM:<x@y>\r\n"
    assert not reader.bare_line_end
    # RFC 1870 4: the SIZE count is the CRLF message without stuffing dots or terminator
    assert reader.wire_size == sum(len(ln) + 2 for ln in lines)


@given(st.lists(st.integers(0, 60), max_size=6))
def test_smuggling_sequences_never_end_data(cuts: list[int]) -> None:
    for evil in (b"\n.\n", b"\r.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"\r\n.\r"):
        data = b"Subject: a\r\n\r\nhello" + evil + b"MAIL FROM:<evil@x>\r\nmore\r\n.\r\nQUIT\r\n"
        out, rest, _ = decode(data, cuts)
        assert rest == b"QUIT\r\n", evil
        assert b"MAIL FROM:<evil@x>" in out


def test_empty_message_and_first_line_dot() -> None:
    out, rest, _ = decode(b".\r\n", [])
    assert out == b"" and rest == b""
    out, rest, _ = decode(b"..x\r\n.\r\n", [1, 2, 3])
    assert out == b".x\n" and rest == b""


def test_long_line_flagged_and_bounded() -> None:
    reader = DataReader(max_line=998)
    total = 0
    for _ in range(100):
        got, rest = reader.feed(b"x" * 10_000)
        total += len(got)
        assert rest is None
        assert len(reader._carry) <= 1001
    got, rest = reader.feed(b"\r\n.\r\n")
    assert rest == b""
    assert reader.line_too_long
    assert total + len(got) == 1_000_001


def test_headers_captured() -> None:
    reader = DataReader()
    reader.feed(b"Received: a\r\nSubject: b\r\n\r\nbody\r\n.\r\n")
    assert reader.header_bytes == b"Received: a\nSubject: b"
    assert reader.headers_complete
