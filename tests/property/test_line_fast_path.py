"""GatedLineReceiver hands a segment that is exactly one line straight to ``lineReceived``
(mailsuite.flow): whatever the segments, the protocol sees the same calls, in the same
order, as on Twisted's ``LineReceiver`` -- lines, over-long lines, a switch to raw mode
(an IMAP literal, SMTP's DATA) and the bytes after it, empty segments."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport
from twisted.protocols import basic

from mailsuite.flow import GatedLineReceiver

RAW = b"RAW"  # a line that switches to raw mode for the next 5 bytes


class Recorder:
    """What both receivers do with their input, recorded as calls."""

    MAX_LENGTH = 12

    def init(self) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.raw_left = 0

    def lineReceived(self, line: bytes) -> None:
        self.calls.append(("line", line))
        if line == RAW:
            self.raw_left = 5
            self.setRawMode()  # type: ignore[attr-defined]

    def rawDataReceived(self, data: bytes) -> None:
        take, rest = data[: self.raw_left], data[self.raw_left :]
        self.raw_left -= len(take)
        self.calls.append(("raw", take))
        if not self.raw_left:
            self.setLineMode(rest)  # type: ignore[attr-defined]

    def lineLengthExceeded(self, line: bytes) -> None:
        self.calls.append(("too long", line))
        self.transport.loseConnection()  # type: ignore[attr-defined]


class Twisted(Recorder, basic.LineReceiver):
    pass


class Ours(Recorder, GatedLineReceiver):
    pass


def feed(proto: Recorder, delimiter: bytes, segments: list[bytes]) -> list[tuple[str, bytes]]:
    proto.init()
    proto.delimiter = delimiter  # type: ignore[attr-defined]
    transport = StringTransport()
    proto.makeConnection(transport)  # type: ignore[attr-defined]
    for segment in segments:
        if transport.disconnecting:
            break
        proto.dataReceived(segment)  # type: ignore[attr-defined]
    return proto.calls


pieces = st.sampled_from([b"\r\n", b"\n", b"NOOP", b"RETR 1", b"x" * 13, RAW, b"12345", b""])
segment = st.lists(pieces, max_size=4).map(b"".join)


@settings(max_examples=1000)
@given(st.sampled_from([b"\n", b"\r\n"]), st.lists(segment, max_size=8))
def test_the_same_calls_as_twisted_line_receiver(delimiter: bytes, segments: list[bytes]) -> None:
    assert feed(Ours(), delimiter, segments) == feed(Twisted(), delimiter, segments)


def test_an_empty_segment_is_no_empty_line() -> None:
    # (with a one-byte delimiter an empty segment "ends" one byte before its start)
    assert feed(Ours(), b"\n", [b"", b"NOOP\n", b""]) == [("line", b"NOOP")]
