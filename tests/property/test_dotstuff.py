"""Dot-stuffing: ``stuff_all`` (one piece, POP3 RETR of a small message) gives exactly what
the chunked :class:`DotStuffer` (streamed RETR, the SMTP client) gives for the same bytes
cut anywhere, and what a POP3 or SMTP reader decodes is the message with CRLF line ends."""

from hypothesis import given, settings
from hypothesis import strategies as st

from mailsuite.dotstuff import TERMINATOR, DotStuffer, stuff_all

# Line ends of every kind, dots where they matter, a non-ASCII byte.
message = st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"a", b" ", b"\xe9"])).map(
    b"".join
)


def chunked(data: bytes, cuts: list[int], bare_cr_ends_line: bool) -> bytes:
    s = DotStuffer(bare_cr_ends_line)
    out = []
    pos = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        out.append(s.feed(data[pos:cut]))
        pos = max(pos, cut)
    return b"".join(out) + s.finish()


@settings(max_examples=500)
@given(message, st.lists(st.integers(min_value=0, max_value=60), max_size=8), st.booleans())
def test_stuff_all_equals_the_chunked_stuffer(data: bytes, cuts: list[int], bare: bool) -> None:
    assert stuff_all(data, bare) == chunked(data, cuts, bare)


@settings(max_examples=300)
@given(message)
def test_the_reader_gets_the_lines_back(data: bytes) -> None:
    wire = stuff_all(data)
    assert wire.endswith(b"\r\n" + TERMINATOR) or wire == TERMINATOR
    lines = wire[: -len(TERMINATOR)].split(b"\r\n")[:-1] if wire != TERMINATOR else []
    assert all(line != b"." for line in lines)  # no early end of the response
    unstuffed = [line[1:] if line.startswith(b".") else line for line in lines]
    expected = data.replace(b"\r\n", b"\n").split(b"\n")
    if expected and expected[-1] == b"":
        expected.pop()
    assert unstuffed == expected


@settings(max_examples=200)
@given(message, st.booleans(), st.sampled_from([b"", b"+OK 12 octets\r\n"]))
def test_the_head_comes_first_and_is_left_as_it_is(data: bytes, bare: bool, head: bytes) -> None:
    assert stuff_all(data, bare, head=head) == head + stuff_all(data, bare)
