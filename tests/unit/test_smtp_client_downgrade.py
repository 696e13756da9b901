"""8-bit to 7-bit conversion for servers without 8BITMIME (RFC 6152 3): the streaming
converter (mailsuite.outbound.downgrade) and the client session asking for a converted copy."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import pytest
from twisted.internet import defer

from mailsuite.outbound import downgrade as dg
from mailsuite.outbound.downgrade import NotConvertible, downgrade_file
from mailsuite.outbound.result import Outcome
from tests.outbound_helpers import Harness

TEXT = "Grüße aus Köln — “Anführungszeichen”, trailing blanks   \n.dot\n--not a boundary\n"


def convert(tmp_path: Path, message: bytes) -> bytes:
    src = tmp_path / "in.eml"
    src.write_bytes(message)
    out = downgrade_file(src, tmp_path)
    data = out.read_bytes()
    out.unlink()
    assert data.isascii(), "the copy must be 7-bit"
    assert max(len(line) for line in data.split(b"\n")) <= 998
    return data


def parse(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)  # type: ignore


def test_single_part_text_becomes_quoted_printable(tmp_path: Path) -> None:
    long_line = "é" * 300
    body = TEXT + long_line + "\n"
    msg = (
        "Received: from a by b\nSubject: hi\nMIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n" + body
    ).encode()
    data = convert(tmp_path, msg)
    assert data.startswith(b"Received: from a by b\nSubject: hi\n")
    m = parse(data)
    assert m["Content-Transfer-Encoding"] == "quoted-printable"
    assert data.count(b"Content-Transfer-Encoding") == 1
    assert m.get_content() == body
    assert all(len(line) <= 76 for line in data.split(b"\n"))
    assert b"blanks=20=20=20\n" in data  # trailing white space is encoded (RFC 2045 6.7)


def test_non_mime_8bit_message_gets_mime_headers(tmp_path: Path) -> None:
    data = convert(tmp_path, ("Subject: plain\n\n" + TEXT).encode())
    m = parse(data)
    assert m["MIME-Version"] == "1.0"
    assert m.get_content_type() == "text/plain" and m.get_param("charset") == "utf-8"
    assert m.get_content() == TEXT
    latin1 = convert(tmp_path, b"Subject: plain\n\ncaf\xe9\n")
    assert b"charset=unknown-8bit" in latin1 and b"caf=E9\n" in latin1


def test_multipart_converts_only_the_8bit_parts(tmp_path: Path) -> None:
    msg = (
        (
            "Subject: mixed\nMIME-Version: 1.0\n"
            'Content-Type: multipart/mixed; boundary="b1"\n\npreamble\n'
            "--b1\nContent-Type: text/plain; charset=us-ascii\n\nascii only\n"
            "--b1\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
            + TEXT
            + "--b1\nContent-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
            "<p>schön</p>\n"
            "--b1\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: binary\n\n"
        ).encode()
        + b"\x00\xff\xfe raw\n\nmore\n"
        + (
            "--b1\nContent-Type: message/rfc822\nContent-Transfer-Encoding: 8bit\n\n"
            "Subject: inner\nContent-Type: text/plain; charset=utf-8\n\nÄrger\n"
            "--b1--\nepilogue\n"
        ).encode()
    )
    data = convert(tmp_path, msg)
    parts = list(parse(data).iter_parts())
    assert parts[0].get_content() == "ascii only"
    assert parts[1]["Content-Transfer-Encoding"] == "quoted-printable"
    assert parts[1].get_content() == TEXT.rstrip("\n")  # the last LF belongs to the boundary
    assert parts[2].get_content() == "<p>schön</p>"
    assert parts[3]["Content-Transfer-Encoding"] == "base64"
    assert parts[3].get_payload(decode=True) == b"\x00\xff\xfe raw\r\n\r\nmore"
    assert parts[4]["Content-Transfer-Encoding"] == "7bit"  # relabelled, was 8bit
    inner = parts[4].get_content()
    assert inner["Content-Transfer-Encoding"] == "quoted-printable"
    assert inner.get_content() == "Ärger"
    assert b"preamble\n" in data and b"epilogue\n" in data


def test_7bit_message_labelled_8bit_is_only_relabelled(tmp_path: Path) -> None:
    msg = b"Subject: x\nMIME-Version: 1.0\nContent-Transfer-Encoding: 8bit\n\nplain\n"
    assert convert(tmp_path, msg) == msg.replace(b"8bit", b"7bit")


@pytest.mark.parametrize(
    "message,why",
    [
        ("Subject: Grüße\n\nbody ä\n".encode(), "message header"),
        (
            (
                "MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n\n"
                '--b\nContent-Type: text/plain; name="ä.txt"\n\nä\n--b--\n'
            ).encode(),
            "part header",
        ),
        ("MIME-Version: 1.0\nContent-Transfer-Encoding: base64\n\nä\n".encode(), "base64"),
        (
            "MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n\nä\n--b\n\nx\n--b--\n".encode(),
            "preamble",
        ),
    ],
)
def test_what_cannot_be_converted(tmp_path: Path, message: bytes, why: str) -> None:
    src = tmp_path / "in.eml"
    src.write_bytes(message)
    with pytest.raises(NotConvertible, match=why):
        downgrade_file(src, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.eml"]  # nothing left behind


def test_large_message_is_streamed_in_bounded_pieces(tmp_path: Path, monkeypatch) -> None:
    """A 4 MiB part with one 300 KiB line: read in pieces of at most PIECE octets."""
    reads: list[int] = []
    real_open = Path.open

    class Spy:
        def __init__(self, f):
            self.f = f

        def readline(self, limit=-1):
            assert 0 < limit <= dg.PIECE
            line = self.f.readline(limit)
            reads.append(len(line))
            return line

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    src = tmp_path / "big.eml"

    def spy_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        return Spy(f) if mode == "rb" and path == src else f

    monkeypatch.setattr(Path, "open", spy_open)
    body = "ü" * 150_000 + "\n" + ("zeile mit ümlaut\n" * 200_000)
    msg = ("MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n\n" + body).encode()
    src.write_bytes(msg)
    out = downgrade_file(src, tmp_path)
    assert max(reads) <= dg.PIECE
    m = parse(out.read_bytes())
    assert m.get_content() == body


# ------------------------------------------------------------------ the client session


def test_client_sends_the_converted_copy_without_body_8bitmime(tmp_path: Path) -> None:
    source = (
        "Subject: t\nMIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n\nGrüße\n"
    ).encode()
    converted = tmp_path / "converted"
    asked = []

    def downgrade() -> defer.Deferred[tuple[str, int]]:
        asked.append(True)
        path = downgrade_file(tmp_path / "message", tmp_path)
        path.rename(converted)
        return defer.succeed((str(converted), 999))

    h = Harness(tmp_path, body=source, body_8bit=True, downgrade=downgrade, rcpts=("bob@mx.test",))
    h.greet_ehlo("PIPELINING", "SIZE 100000")
    assert asked == [True]
    assert h.sent() == ["MAIL FROM:<alice@client.test> SIZE=999", "RCPT TO:<bob@mx.test>"]
    h.server("250 ok", "250 ok")
    assert h.sent() == ["DATA"]
    h.server("354 go")
    wire = h.pump_body()
    assert wire.isascii() and b"Gr=C3=BC=C3=9Fe\r\n" in wire
    assert b"Content-Transfer-Encoding: quoted-printable\r\n" in wire
    h.server("250 2.0.0 queued")
    h.sent()
    h.server("221 bye")
    r = h.close()
    assert r.outcome is Outcome.DELIVERED and r.downgraded


def test_client_bounces_5_6_3_when_the_copy_cannot_be_made(tmp_path: Path) -> None:
    def downgrade() -> defer.Deferred[tuple[str, int]]:
        return defer.fail(NotConvertible("8-bit octets in the message header"))

    h = Harness(tmp_path, body_8bit=True, downgrade=downgrade)
    h.greet_ehlo("PIPELINING")
    assert h.sent() == ["QUIT"]
    h.server("221 bye")
    r = h.close()
    assert r.outcome is Outcome.MESSAGE_UNSENDABLE and r.reply.status == "5.6.3"
    assert r.reply.permanent and "message header" in r.reply.text


def test_client_waits_for_the_copy_and_ignores_it_after_a_disconnect(tmp_path: Path) -> None:
    pending: defer.Deferred[tuple[str, int]] = defer.Deferred()
    h = Harness(tmp_path, body_8bit=True, downgrade=lambda: pending)
    h.greet_ehlo("PIPELINING")
    assert h.sent() == []  # nothing until the copy exists
    h.t.disconnecting = True
    r = h.close()
    assert r.outcome is Outcome.CONNECTION_LOST
    pending.callback(("/nonexistent", 1))  # too late: no effect, no error
    assert h.sent() == []
