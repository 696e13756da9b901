"""TOP (RFC 1939 7) cut in blocks: ``TopCut`` and ``TopReader`` against a line-at-a-time
reference, for any block size, both stored line-end forms and the edge cases."""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailsuite.pop3.maildrop import TopCut, TopReader


def top_by_lines(data: bytes, body_lines: int) -> bytes:
    """The header section, the blank line and ``body_lines`` body lines, line by line
    (lines end at LF; the first line that is only LF or CRLF ends the header)."""
    out: list[bytes] = []
    in_body, remaining = False, body_lines
    for line in io.BytesIO(data):
        if in_body:
            if remaining <= 0:
                break
            remaining -= 1
        out.append(line)
        if not in_body and line in (b"\n", b"\r\n"):
            in_body = True
    return b"".join(out)


def cut_in_blocks(data: bytes, body_lines: int, block: int) -> bytes:
    cut = TopCut(body_lines)
    out = []
    for i in range(0, len(data), block):
        out.append(cut.feed(data[i : i + block]))
        if cut.done:
            break
    return b"".join(out)


MESSAGE = b"From: a@example.test\nSubject: x\n\nline 1\n.dot line\n..two dots\n\nline 5\nlast"


@pytest.mark.parametrize("form", ["lf", "crlf"])
@pytest.mark.parametrize("block", [1, 2, 3, 5, 64, 1 << 20])
@pytest.mark.parametrize("lines", [0, 1, 3, 4, 6, 7, 100])
def test_top_in_blocks_is_the_line_by_line_top(form: str, block: int, lines: int) -> None:
    data = MESSAGE.replace(b"\n", b"\r\n") if form == "crlf" else MESSAGE
    want = top_by_lines(data, lines)
    assert cut_in_blocks(data, lines, block) == want
    assert TopCut(lines).feed(data) == want


def test_the_edge_cases() -> None:
    # n = 0: the header section and the blank line only
    assert TopCut(0).feed(MESSAGE) == b"From: a@example.test\nSubject: x\n\n"
    # n larger than the body: the whole message, the last line as stored (no line end)
    assert TopCut(50).feed(MESSAGE) == MESSAGE
    # body lines starting with a dot are passed on as they are (stuffing is the caller's)
    assert TopCut(3).feed(MESSAGE).endswith(b"\nline 1\n.dot line\n..two dots\n")
    # no blank line: all of it is header
    assert TopCut(0).feed(b"Subject: only\nX: y\n") == b"Subject: only\nX: y\n"
    assert TopCut(2).feed(b"Subject: only") == b"Subject: only"
    # an empty header section (the message starts with the blank line)
    assert TopCut(1).feed(b"\nbody\nmore\n") == b"\nbody\n"
    assert TopCut(0).feed(b"\r\nbody\r\n") == b"\r\n"
    # a line of spaces is no blank line; a bare CR does not end a line
    assert TopCut(0).feed(b"A: b\n \nC: d\n\nbody\n") == b"A: b\n \nC: d\n\n"
    assert TopCut(0).feed(b"A: b\r\r\nC: d\n\nbody\n") == b"A: b\r\r\nC: d\n\n"
    assert TopCut(0).feed(b"") == b""


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from([b"\n", b"\r\n", b"\r", b".", b"a", b"Subject: x", b" "]), max_size=40
    ),
    st.integers(min_value=0, max_value=8),
    st.integers(min_value=1, max_value=9),
)
def test_top_property(pieces: list[bytes], lines: int, block: int) -> None:
    data = b"".join(pieces)
    assert cut_in_blocks(data, lines, block) == top_by_lines(data, lines)


class CountingFile(io.BytesIO):
    """A file that records the largest read asked of it."""

    largest = 0

    def read(self, size: int | None = -1) -> bytes:
        self.largest = max(self.largest, -1 if size is None or size < 0 else size)
        return super().read(size)


def test_a_huge_header_section_is_streamed_in_blocks_of_the_readers_size() -> None:
    """No read of more than the piece asked for, and each piece at most that big: a
    message of 4 MiB of header lines costs the stream one piece of memory at a time."""
    header = b"".join(b"X-Filler-%d: %s\n" % (i, b"y" * 60) for i in range(60_000))
    data = header + b"\nbody 1\nbody 2\nbody 3\n"
    f = CountingFile(data)
    got = []
    with TopReader(f, 2) as top:
        while piece := top.read(65536):
            assert len(piece) <= 65536
            got.append(piece)
    assert f.largest == 65536
    assert b"".join(got) == header + b"\nbody 1\nbody 2\n"


def test_the_rest_of_a_big_body_is_not_read() -> None:
    f = io.BytesIO(b"A: b\n\n" + b"x\n" * 1_000_000)
    top = TopReader(f, 1)
    assert top.read(4096) == b"A: b\n\nx\n"
    assert top.read(4096) == b""
    assert f.tell() == 4096
