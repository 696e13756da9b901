"""Regression: a client that sends commands and never reads must not make the server hold
its output in memory (issue 10).

``FETCH 1:* BODY[]`` over 150 x 1 MiB messages by a client that did not read grew the server
by ~33 MB per connection: every message was read and joined into one write, and the
transport kept it all.  Pipelined commands made it worse: each POP3 RETR of a message under
the streaming threshold, each SMTP EHLO, was answered into the same unbounded buffer while the
server kept reading input.  Now output stops once Twisted's transport buffer (64 KiB) is full:
message bodies are streamed from the file in 64 KiB pieces as the transport drains, and no
further command is read while the output is stalled.

What a stalled connection may cost (the bound the test allows, per client): the transport's
buffer (64 KiB, past which it pauses us) plus one piece written after the pause (<= 64 KiB,
or one POP3 reply of a message under the 256 KiB streaming threshold), the session's objects
and an open file, about 0.5 MiB; 1.5 MiB per client leaves room for the allocator.  The
kernel's socket buffers are not the server's memory (and not in its RSS).  Before the fix a
stalled FETCH reader cost the whole answer: ~50 MiB per client here (``BIG`` messages of
1 MiB; 100 once, but 50 show the same thing: 33 times the bound, and the test's setup and
the reader's FETCH take half the time).

The test prints the RSS it measured (``pytest -s`` shows it).
"""

from __future__ import annotations

import imaplib
import os
import poplib
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailsuite.imap.message import to_crlf
from mailsuite.store.maildir import ensure_folder
from mailsuite.store.write import write_message
from tests.harness import PASSWORD, Server

USER = "joe@example.test"
STALLED = 20  # stalled clients per round
BIG = 50  # 1 MiB messages in joe's INBOX
POP_USERS = 10  # one POP3 session per maildrop, so one user per stalled POP3 reader
POP_SMALL = 60  # 200 KiB messages (sent in one write: below POP3's streaming threshold)
PER_CLIENT = 1536 * 1024  # allowed growth per stalled client (see the module docstring)
SLACK = 8 * 1024 * 1024  # allowed constant growth (allocator arenas, thread stacks)


def _message(n: int, size: int) -> bytes:
    """A message of about ``size`` bytes whose every line is different (so a byte out of
    place shows), with lines starting with "." for POP3's dot-stuffing."""
    head = f"From: a@example.org\nTo: {USER}\nSubject: message {n}\n\n".encode()
    lines = []
    i = 0
    total = len(head)
    while total < size:
        prefix = b"." if i % 97 == 0 else b""
        line = prefix + b"msg %05d line %06d %s\n" % (n, i, os.urandom(24).hex().encode())
        lines.append(line)
        total += len(line)
        i += 1
    return head + b"".join(lines)


def _rss(pid: int) -> int:
    """The server's resident set size in bytes (``VmRSS`` of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _settled_rss(pid: int, timeout: float = 60.0) -> int:
    """The server's RSS once it stops changing (2 s within 256 KiB), or at the deadline."""
    samples: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        samples.append(_rss(pid))
        recent = samples[-10:]
        if len(recent) == 10 and max(recent) - min(recent) < 256 * 1024:
            return recent[-1]
        time.sleep(0.2)
    return samples[-1]


def _mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("stalled")
    s = Server(
        root,
        services=("imap", "imaps", "pop3", "smtp"),
        extra_toml="[auth]\nallow_plaintext = true\n[pop3]\nmark_seen_on_retr = false\n",
    )
    s.start()
    s.add_user(USER)
    box = ensure_folder(s.maildir(USER))
    for n in range(BIG):
        write_message(box, [_message(n, 1024 * 1024)])
    shared = ensure_folder(root / "popsource")
    for n in range(POP_SMALL):
        write_message(shared, [_message(1000 + n, 200 * 1024)])
    for n in range(10):
        write_message(shared, [_message(2000 + n, 1024 * 1024)])
    for u in range(POP_USERS):
        user = f"pop{u}@example.test"
        s.add_user(user)
        dest = ensure_folder(s.maildir(user))
        for f in sorted((shared / "new").iterdir()):
            os.link(f, dest / "new" / f.name)
    yield s
    s.stop()


def _connect(port: int) -> socket.socket:
    """A client socket with a small receive buffer: the server's output stalls early."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(20)
    sock.connect(("127.0.0.1", port))
    return sock


def _read_until(sock: socket.socket, end: bytes) -> bytes:
    data = b""
    while not data.endswith(end):
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed, got {data[-200:]!r}")
        data += chunk
    return data


def _read_tagged(sock: socket.socket, tag: bytes) -> bytes:
    """Read IMAP responses up to and including the tagged one; assert it is OK."""
    data = b""
    while True:
        data += sock.recv(65536)
        lines = data.split(b"\r\n")
        done = [ln for ln in lines[:-1] if ln.startswith(tag + b" ")]
        if done:
            assert done[0].startswith(tag + b" OK"), done[0]
            return data


def _abort(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), as a vanished client's host would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _stalled_imap(port: int, tls: bool = False) -> socket.socket:
    sock = _connect(port)
    if tls:  # the server's self-signed certificate: this test is about memory, not trust
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        sock = context.wrap_socket(sock)
    _read_until(sock, b"\r\n")
    sock.sendall(f'a LOGIN {USER} "{PASSWORD}"\r\n'.encode())
    _read_tagged(sock, b"a")
    sock.sendall(b"b SELECT INBOX\r\n")
    _read_tagged(sock, b"b")
    sock.sendall(b"c FETCH 1:* BODY[]\r\n")
    return sock


def _stalled_pop3(port: int, user: str, count: int) -> socket.socket:
    sock = _connect(port)
    _read_until(sock, b"\r\n")
    sock.sendall(f"USER {user}\r\n".encode())
    _read_until(sock, b"\r\n")
    sock.sendall(f"PASS {PASSWORD}\r\n".encode())
    assert _read_until(sock, b"\r\n").startswith(b"+OK")
    sock.sendall(b"".join(b"RETR %d\r\n" % n for n in range(1, count + 1)))
    return sock


def _stalled_smtp(port: int, count: int) -> list[socket.socket]:
    """``count`` clients pipelining EHLO (a 20-byte command, a 200-byte answer) for as long
    as the server reads: it must stop reading once their answers wait unread.  All at once:
    each client is done when the server has not taken a byte from it for 1 s (or it sent
    2 MiB), so the round takes that second once, not once per client."""
    socks = [_connect(port) for _ in range(count)]
    for sock in socks:
        _read_until(sock, b"\r\n")
        sock.setblocking(False)
    flood = b"EHLO stalled.example\r\n" * 4096
    sent = dict.fromkeys(socks, 0)
    quiet_since = dict.fromkeys(socks, time.monotonic())
    deadline = time.monotonic() + 20
    busy = list(socks)
    while busy and time.monotonic() < deadline:
        for sock in list(busy):
            try:
                sent[sock] += sock.send(flood)
                quiet_since[sock] = time.monotonic()
            except BlockingIOError:
                pass
            if sent[sock] > 2 * 1024 * 1024 or time.monotonic() - quiet_since[sock] >= 1.0:
                busy.remove(sock)
        time.sleep(0.02)
    return socks


def _rounds(server: Server, name: str, open_all: Callable[[], list[socket.socket]]) -> None:
    """Two rounds of stalled clients: growth bounded while they wait, and no growth left
    behind (the second round does not add to the first)."""
    assert server.proc is not None
    pid = server.proc.pid
    base = _settled_rss(pid)
    peaks = []
    for round_no in (1, 2):
        socks = open_all()
        stalled = _settled_rss(pid)
        for s in socks:
            _abort(s)
        after = _settled_rss(pid)
        growth = stalled - base
        print(
            f"\n{name} round {round_no}: {len(socks)} stalled clients: RSS {_mib(base)} -> "
            f"{_mib(stalled)} (+{_mib(growth)}, {_mib(growth // len(socks))} per client); "
            f"after they closed {_mib(after)}"
        )
        assert growth < len(socks) * PER_CLIENT + SLACK, f"{name}: +{_mib(growth)}"
        # what they cost is given back once they are gone (not kept, as the whole answers
        # were before: +100 MiB per FETCH reader, all of it still there after the close)
        assert after - base < SLACK, f"{name}: {_mib(after - base)} kept after the close"
        peaks.append(stalled)
    assert peaks[1] - peaks[0] < SLACK, f"{name}: memory kept after the first round"


def test_normal_reader_gets_every_byte(server: Server) -> None:
    box = server.maildir(USER)
    expected = [to_crlf(f.read_bytes()) for f in sorted((box / "new").iterdir())]
    m = imaplib.IMAP4("127.0.0.1", server.port("imap"))
    m.login(USER, PASSWORD)
    m.select("INBOX", readonly=True)
    start = time.monotonic()
    typ, data = m.fetch("1:*", "(BODY.PEEK[])")
    took = time.monotonic() - start
    assert typ == "OK"
    bodies = [part[1] for part in data if isinstance(part, tuple)]
    print(f"\nFETCH 1:* BODY.PEEK[] of {BIG} x 1 MiB by a reader: {took:.2f} s")
    assert len(bodies) == BIG
    assert sorted(bodies) == sorted(expected)  # every byte of every message
    # a window of a streamed body
    typ, data = m.fetch("7", "(BODY.PEEK[]<1000000.70000>)")
    assert typ == "OK"
    assert data[0][1] == bodies[6][1000000:1070000]
    m.logout()
    pop = poplib.POP3("127.0.0.1", server.port("pop3"))
    pop.user("pop0@example.test")
    pop.pass_(PASSWORD)
    stored = {f.read_bytes() for f in (server.root / "popsource" / "new").iterdir()}
    for n in (1, POP_SMALL + 1):  # one sent whole, one streamed
        _, lines, _ = pop.retr(n)
        assert b"\n".join(lines) + b"\n" in stored
    pop.quit()


def test_stalled_fetch_readers_hold_bounded_memory(server: Server) -> None:
    _rounds(
        server, "IMAP FETCH", lambda: [_stalled_imap(server.port("imap")) for _ in range(STALLED)]
    )


def test_stalled_fetch_readers_over_tls_hold_bounded_memory(server: Server) -> None:
    """The same over implicit TLS (993): the TLS layer passes the pause on."""
    _rounds(
        server,
        "IMAPS FETCH",
        lambda: [_stalled_imap(server.port("imaps"), True) for _ in range(STALLED)],
    )


def test_stalled_pop3_readers_hold_bounded_memory(server: Server) -> None:
    _rounds(
        server,
        "POP3 RETR",
        lambda: [
            _stalled_pop3(server.port("pop3"), f"pop{i}@example.test", POP_SMALL + 10)
            for i in range(POP_USERS)
        ],
    )


def test_stalled_smtp_pipeliners_hold_bounded_memory(server: Server) -> None:
    _rounds(server, "SMTP EHLO", lambda: _stalled_smtp(server.port("smtp"), STALLED))
