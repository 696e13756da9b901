"""DATA encoding: CRLF, bare CR, and dot-stuffing across chunk boundaries.

Regression for the twisted.mail.smtp client's per-chunk stuffing (research section 4.2): a line
starting with '.' at a chunk boundary went out unstuffed and smuggled a second message.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailsuite.dotstuff import DotStuffer
from mailsuite.outbound.client import SessionParameters, SMTPClientSession
from mailsuite.outbound.wire import scan_message


def encode(data: bytes, chunk: int) -> bytes:
    enc = DotStuffer(bare_cr_ends_line=True)  # what the SMTP client uses
    out = b"".join(enc.feed(data[i : i + chunk]) for i in range(0, len(data), chunk))
    return out + enc.finish()


def decode(wire: bytes) -> bytes:
    """What a correct server stores: lines up to the lone '.', one leading dot removed."""
    assert wire.endswith(b".\r\n")
    lines = wire.split(b"\r\n")[:-1]
    end = lines.index(b".")
    assert end == len(lines) - 1, "the data ended early: a '.' line was not stuffed"
    return b"".join((x[1:] if x.startswith(b".") else x) + b"\r\n" for x in lines[:end])


def normalized(data: bytes) -> bytes:
    out = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    if out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out


def test_first_line_dot_is_stuffed():
    assert encode(b".\nx\n", 64) == b"..\r\nx\r\n.\r\n"
    assert encode(b"", 64) == b".\r\n"
    assert encode(b"no newline", 64) == b"no newline\r\n.\r\n"


def test_bare_cr_and_crlf_split_across_chunks():
    assert encode(b"a\rb\r\nc\r", 1) == b"a\r\nb\r\nc\r\n.\r\n"
    assert encode(b"a\r\n.b", 2) == b"a\r\n..b\r\n.\r\n"


def test_dot_line_at_every_chunk_boundary():
    for chunk in range(2, 40):
        # every line is exactly `chunk` bytes, so every chunk starts with '.'
        line = b"." + b"x" * (chunk - 2) + b"\n"
        data = line * 7 + b".\n"
        wire = encode(data, chunk)
        assert decode(wire) == normalized(data), chunk
        assert wire.count(b"\r\n.\r\n") == 1


def test_every_split_point_of_a_smuggling_message():
    data = b"Subject: x\n\nbody\n.\nMAIL FROM:<smuggled@evil.test>\nRCPT TO:<v@x>\nDATA\n.\n"
    for chunk in range(1, len(data) + 1):
        assert decode(encode(data, chunk)) == normalized(data)


@settings(max_examples=400, deadline=None)
@given(
    st.binary(max_size=300).map(lambda b: bytes(b".\r\nab"[x % 5] for x in b)), st.integers(1, 50)
)
def test_property_round_trip(data, chunk):
    assert decode(encode(data, chunk)) == normalized(data)


def test_session_streams_in_chunks_with_dots_at_the_boundaries(tmp_path):
    """Through the whole session: 64 KiB of padding, then a '.' line right at the boundary."""
    chunk = 65536
    padding = b"Subject: pad\n\n" + b"x" * (chunk - len(b"Subject: pad\n\n") - 1) + b"\n"
    assert len(padding) == chunk
    smuggle = b".\nMAIL FROM:<smuggled@evil.test>\nRCPT TO:<victim@x.test>\nDATA\nevil\n.\n"
    path = tmp_path / "m"
    path.write_bytes(padding + smuggle + padding + b".\n")
    s = SMTPClientSession(
        SessionParameters(
            host="mx.test",
            helo_name="c.test",
            mail_from="a@c.test",
            rcpts=("b@mx.test",),
            message_path=str(path),
            size=path.stat().st_size,
            tls="none",
            chunk_size=chunk,
        ),
        Clock(),
    )
    t = StringTransport()
    s.makeConnection(t)
    s.dataReceived(b"220 hi\r\n250 mx\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    t.clear()
    writes = 0
    while t.producer is not None:
        t.producer.resumeProducing()
        writes += 1
    assert writes >= 3  # streamed, not read whole
    wire = t.value()
    assert decode(wire) == normalized(path.read_bytes())
    assert b"\r\n.\r\nMAIL FROM" not in wire


def test_scan_message(tmp_path):
    path = tmp_path / "m"
    path.write_bytes(b"A: b\n\nhello\r\nw\xc3\xb6rld\rend")
    info = scan_message(path, chunk_size=3)
    assert info.eight_bit
    assert info.wire_size == len(normalized(path.read_bytes()))
    assert info.longest_line == len("w\xc3\xb6rld".encode("latin-1"))
    path.write_bytes(b"plain\n")
    assert scan_message(path) == type(info)(7, False, 5)
