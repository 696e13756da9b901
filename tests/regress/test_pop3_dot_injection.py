"""Regression: message content must not be able to end a RETR early and forge POP3 replies.

twisted.mail.pop3 dot-stuffed each 16 KiB chunk on its own: a line "." exactly at byte
65,536 ended the response and the rest of the message was read as replies to the next
commands (research/twisted-mail.md 3.1).  Here the stuffing state crosses chunk boundaries.
"""

from __future__ import annotations

import io

from mailsuite.dotstuff import DotStuffer


def stream(data: bytes, chunk: int) -> bytes:
    s, f, out = DotStuffer(), io.BytesIO(data), []
    while block := f.read(chunk):
        out.append(s.feed(block))
    return b"".join(out) + s.finish()


def test_dot_line_at_every_offset_of_a_chunk_boundary() -> None:
    for chunk in (16384, 65536):
        for shift in range(-3, 4):
            pad = chunk + shift
            data = b"x" * (pad - 1) + b"\n.\n+OK INJECTED-BY-MESSAGE-CONTENT\n"
            wire = stream(data, chunk)
            assert wire.count(b"\r\n.\r\n") == 1 and wire.endswith(b"\r\n.\r\n")
            assert b"\r\n..\r\n+OK INJECTED" in wire


def test_crlf_split_across_chunks_is_not_doubled() -> None:
    data = b"a" * 16383 + b"\r\n.\r\n"
    wire = stream(data, 16384)
    assert b"\r\r\n" not in wire
    assert wire == b"a" * 16383 + b"\r\n..\r\n.\r\n"
