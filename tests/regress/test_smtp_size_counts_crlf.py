"""SIZE is the message as transmitted (RFC 1870 section 4: octets "including CR-LF pairs, but
not the SMTP DATA command's terminating dot or doubled quoting dots"), not as stored with LF
line ends.  The bug: a 52,728,000-octet message of ~176-octet CRLF lines was accepted under
``max_message_size = 52428800`` because only the stored (LF) octets were counted.

The real server with a 100,000-octet limit and the same ratio of CRLF overhead (one extra
octet per 176 octets), over raw sockets.
"""

from __future__ import annotations

import pytest

from tests.clients import Reply, SMTPClient
from tests.harness import ALICE, Server, ServerFactory, wait_until

LIMIT = 100_000


@pytest.fixture(scope="module")
def srv(module_servers: ServerFactory) -> Server:
    return module_servers(
        ("smtp",), users=(ALICE,), extra_toml=f"[smtp]\nmax_message_size = {LIMIT}\n"
    )


class Raw(SMTPClient):
    """A raw SMTP dialogue that sends whole messages."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        assert self.greeting.code == 220

    def send_message(self, message: bytes) -> Reply:
        """MAIL, RCPT, DATA (without SIZE=, so only the data count can refuse it)."""
        assert self.cmd("MAIL FROM:<sender@remote.test>")[0] == 250
        assert self.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
        assert self.cmd("DATA")[0] == 354
        stuffed = b"\r\n".join(
            b"." + ln if ln.startswith(b".") else ln for ln in message.split(b"\r\n")
        )
        self.send(stuffed + b".\r\n")
        return self.reply()


def message(tag: str, size: int, line: int = 174, dots: bool = False) -> bytes:
    """A CRLF message of exactly ``size`` octets in RFC 1870's count: ``line``-octet lines plus
    CRLF (176 on the wire, 175 stored).  With ``dots`` every line starts with a dot, which is
    doubled on the wire and must not count."""
    head = f"Subject: {tag}\r\n\r\n".encode()
    body_line = (b"." if dots else b"") + b"x" * (line - (1 if dots else 0)) + b"\r\n"
    n, rest = divmod(size - len(head), len(body_line))
    last = b"y" * (rest - 2) + b"\r\n" if rest >= 2 else b""
    out = head + body_line * n + last
    if rest == 1:  # one octet short: lengthen one line
        out = head + body_line * (n - 1) + body_line[:-2] + b"z\r\n"
    assert len(out) == size, (len(out), size)
    return out


def stored_size(msg: bytes) -> int:
    return len(msg.replace(b"\r\n", b"\n"))


def stored(srv: Server, tag: str) -> list[bytes]:
    box = srv.maildir(ALICE)
    if not box.exists():
        return []
    return [m for m in srv.messages(ALICE) if f"Subject: {tag}\n".encode() in m]


def test_crlf_overhead_pushes_the_message_over_the_limit(srv: Server) -> None:
    # 52,728,000 / 52,428,800 of the limit: over it as sent, under it as stored
    msg = message("crlf-over", LIMIT * 52_728_000 // 52_428_800)
    assert stored_size(msg) <= LIMIT < len(msg)
    raw = Raw(srv.port("smtp"))
    raw.cmd("EHLO client.example")
    code, text = raw.send_message(msg)
    assert code == 552 and "5.3.4" in text, text
    # the session stayed in step: the next command and a small message work
    assert raw.cmd("NOOP")[0] == 250
    code, text = raw.send_message(message("crlf-small", 2000))
    assert code == 250, text
    raw.close()
    wait_until(lambda: stored(srv, "crlf-small"), 5, "the small message in the mailbox")
    assert stored(srv, "crlf-over") == []
    assert list((srv.maildir(ALICE) / "tmp").iterdir()) == []  # nothing half-written is left


def test_exactly_the_limit_is_accepted_and_one_more_octet_is_not(srv: Server) -> None:
    """Boundary, with every line dot-stuffed: the doubled dots are not part of the size."""
    at = message("at-limit", LIMIT, dots=True)
    over = message("over-limit", LIMIT + 1, dots=True)
    raw = Raw(srv.port("smtp"))
    raw.cmd("EHLO client.example")
    code, text = raw.send_message(at)
    assert code == 250, text
    code, text = raw.send_message(over)
    assert code == 552 and "5.3.4" in text, text
    raw.close()
    (got,) = stored(srv, "at-limit")
    assert got.endswith(at.replace(b"\r\n", b"\n"))  # the dots were un-stuffed, not counted
    assert stored(srv, "over-limit") == []


def test_declared_size_uses_the_same_count(srv: Server) -> None:
    raw = Raw(srv.port("smtp"))
    raw.cmd("EHLO client.example")
    assert raw.cmd(f"MAIL FROM:<a@remote.test> SIZE={LIMIT}")[0] == 250
    raw.cmd("RSET")
    code, text = raw.cmd(f"MAIL FROM:<a@remote.test> SIZE={LIMIT + 1}")
    assert code == 552 and "5.3.4" in text
    raw.close()
