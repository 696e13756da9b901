"""What the IMAP message tests share: a reader for response values and a sample message.

``wire`` parses what the server would send (an ENVELOPE, a BODYSTRUCTURE, literals included)
with the server's own command reader, so a test compares structures instead of byte strings.
``NESTED`` is a message with every MIME shape the FETCH code handles: nested multiparts, an
attached message/rfc822, encoded words, quoted-printable and base64 parts; ``nested_message``
makes one as deep as asked.  ``Msg`` is a message as SEARCH sees it, counting what it read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from mailsuite.imap.parser import Command, CommandReader, NeedLiteral
from mailsuite.imap.search import header_of


def wire(data: bytes) -> Any:
    """Parse an IMAP response value with our own reader (literals included)."""
    r = CommandReader(max_line=10**7, max_literal=10**7, max_command=10**8)
    chunks = re.split(rb"(\{\d+\}\r\n)", data)
    line = b"x X " + chunks[0]
    i = 1
    while i < len(chunks):
        n = int(chunks[i][1:-3])
        res = r.feed_line(line + b"{%d}" % n)
        assert isinstance(res, NeedLiteral), res
        rest = chunks[i + 1]
        r.feed_literal(rest[:n])
        line = rest[n:]
        i += 2
    res = r.feed_line(line)
    assert isinstance(res, Command), (res, data)
    assert len(res.args) == 1
    return res.args[0]


NESTED = b"""Return-Path: <bounce@example.org>
From: "Joe Q. Public" <john.q.public@example.com>
To: Mary Smith <mary@x.test>, jdoe@example.org
Cc: undisclosed-recipients:;
Subject: =?utf-8?q?R=C3=A9sum=C3=A9?= of the
 meeting
Date: Tue, 1 Jul 2003 10:52:37 +0200
Message-ID: <1234@local.machine.example>
In-Reply-To: <0001@local.machine.example>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="outer"

This is a MIME preamble.
--outer
Content-Type: multipart/alternative; boundary=inner

--inner
Content-Type: text/plain; charset="utf-8"
Content-Transfer-Encoding: quoted-printable

Caf=C3=A9 au lait
second line
--inner
Content-Type: text/html; charset=utf-8
Content-Transfer-Encoding: base64

PHA+Q2Fmw6k8L3A+
--inner--

--outer
Content-Type: message/rfc822
Content-Disposition: attachment; filename="fwd.eml"
Content-Description: forwarded

From: Alice <alice@a.test>
To: bob@b.test
Subject: inner message
Content-Type: multipart/mixed; boundary=b2

--b2
Content-Type: text/plain

inner body
--b2
Content-Type: image/png; name=x.png
Content-Transfer-Encoding: base64
Content-Language: en, de
Content-Location: http://x.test/x.png
Content-ID: <img1@x>

iVBORw0KGgo=
--b2--
--outer
Content-Type: application/octet-stream
Content-Transfer-Encoding: base64
Content-Disposition: attachment; filename*=utf-8''%E2%82%AC.bin

AAECAw==
--outer--
epilogue
"""


def nested_message(depth: int, kind: str, same_boundary: bool) -> bytes:
    """A message whose MIME tree is ``depth`` levels deep: multiparts inside multiparts,
    message/rfc822 inside message/rfc822, or both alternating."""
    head: list[bytes] = [b"From: a@example.org\nSubject: deep\nMIME-Version: 1.0\n"]
    tail: list[bytes] = []
    for level in range(depth):
        rfc822 = kind == "rfc822" or (kind == "mixed" and level % 2)
        if rfc822:
            head.append(b"Content-Type: message/rfc822\n\nSubject: level %d\n" % level)
        else:
            b = b"b" if same_boundary else b"b%d" % level
            head.append(b"Content-Type: multipart/mixed; boundary=%s\n\n--%s\n" % (b, b))
            tail.append(b"\n--%s--\n" % b)
    return b"".join(head) + b"Content-Type: text/plain\n\nleaf text\n" + b"".join(reversed(tail))


@dataclass
class Msg:
    seq: int
    uid: int
    raw_bytes: bytes = b"Subject: x\n\nbody\n"
    flags: frozenset = frozenset()
    internaldate: datetime = datetime(2024, 3, 10, 23, 30, tzinfo=timezone(timedelta(hours=-5)))
    size: int = 100
    modseq: int = 1
    recent: bool = False
    reads: list = field(default_factory=list)

    def header_bytes(self):
        self.reads.append("header")
        return header_of(self.raw_bytes)

    def raw(self):
        self.reads.append("raw")
        return self.raw_bytes
