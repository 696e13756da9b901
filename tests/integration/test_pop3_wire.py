"""POP3 RETR on the plain-TCP path (replies sent straight to the socket, one command per
segment handed to the protocol without LineReceiver's buffer), byte for byte: every kind of
stored line end, dots everywhere, no final line end, a message at the size that is still
sent in one piece and one just above it (streamed), asked one command per segment and all
pipelined in one segment, with errors in between; the answers must be the same and in order
(RFC 1939 3 and 7, RFC 2449 6.6); and \\Seen on what was retrieved, stored soon after
and when the connection ends without QUIT."""

from __future__ import annotations

import re
import socket

import pytest

from mailsuite.pop3.session import STREAM_THRESHOLD
from mailsuite.store.index import FolderIndex
from mailsuite.store.write import write_message
from tests.harness import ALICE, PASSWORD, Server, ServerFactory, wait_until


def wire(stored: bytes) -> bytes:
    """The multi-line form a client must get, by the RFC's rule and nothing of ours: CRLF
    and LF end lines (a bare CR is content), a line starting with "." gets another one, the
    last line is ended, then ".CRLF"."""
    lines = re.split(rb"\r\n|\n", stored)
    if lines[-1] == b"":
        lines.pop()  # what follows the last line end (or an empty message)
    out = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    return out + b".\r\n"


def body_of(size: int, seed: bytes) -> bytes:
    """About ``size`` bytes of lines with dots at their starts, LF line ends."""
    head = b"Subject: " + seed + b"\n\n"
    line = b".." + seed + b" dot line\n"
    n = (size - len(head)) // len(line)
    data = head + line * n
    return data + b"x" * (size - len(data))  # (ends mid-line)


MESSAGES = [
    b"Subject: lf\n\n.\n..\n.dot\nplain\n",  # LF only, dot lines of every kind
    b"Subject: crlf\r\n\r\n.\r\nbody\r\n",  # CRLF only
    b"Subject: mixed\r\n\nbare\rcr stays\n.x\r\nlast",  # CRLF, LF, bare CR, no final end
    b".starts with a dot\n",
    b"\n",  # an empty header and body
    body_of(STREAM_THRESHOLD - 4000, b"below"),  # still one piece (with CRLF: at the edge)
    body_of(STREAM_THRESHOLD + 1, b"above"),  # streamed in pieces
]


@pytest.fixture
def server(servers: ServerFactory) -> Server:
    s = servers(("pop3",), users=(ALICE,), extra_toml="[auth]\nallow_plaintext = true\n")
    box = s.maildir(ALICE)
    for body in MESSAGES:
        write_message(box, [body])
    return s


class Wire:
    """A raw POP3 connection: send bytes, read exact replies."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.f = self.sock.makefile("rb")
        assert self.f.readline().startswith(b"+OK")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        return self.f.readline()

    def multiline(self) -> bytes:
        out = []
        while (line := self.f.readline()) != b".\r\n":
            assert line.endswith(b"\r\n"), line
            out.append(line)
        return b"".join(out) + b".\r\n"

    def close(self) -> None:
        self.f.close()
        self.sock.close()


def expected_sizes(w: Wire) -> list[int]:
    w.send(b"LIST\r\n")
    assert w.line().startswith(b"+OK")
    listing = w.multiline().split(b"\r\n")[:-2]
    return [int(entry.split()[1]) for entry in listing]


@pytest.mark.parametrize("pipelined", [False, True], ids=["one-per-segment", "pipelined"])
def test_retr_byte_exact_in_order(server: Server, pipelined: bool) -> None:
    w = Wire(server.port("pop3"))
    try:
        w.send(f"USER {ALICE}\r\nPASS {PASSWORD}\r\n".encode())
        assert w.line().startswith(b"+OK") and w.line().startswith(b"+OK Logged in")
        sizes = expected_sizes(w)
        assert len(sizes) == len(MESSAGES)
        # every message, an error and a NOOP between them, and the first one again
        commands = []
        for n in range(1, len(MESSAGES) + 1):
            commands += [b"RETR %d" % n, b"NOOP"]
        commands += [b"RETR 99", b"RETR x", b"RETR 1"]
        if pipelined:
            w.send(b"".join(c + b"\r\n" for c in commands))
        for command in commands:
            if not pipelined:
                w.send(command + b"\r\n")
            status = w.line()
            if command == b"NOOP":
                assert status == b"+OK\r\n"
            elif command in (b"RETR 99", b"RETR x"):
                assert status.startswith(b"-ERR "), (command, status)
            else:
                n = int(command.split()[1])
                assert status == b"+OK %d octets\r\n" % sizes[n - 1], command
                assert w.multiline() == wire(MESSAGES[n - 1]), command
        w.send(b"QUIT\r\n")
        assert w.line().startswith(b"+OK")
    finally:
        w.close()


def seen(server: Server) -> list[bool]:
    index = FolderIndex(server.maildir(ALICE))
    try:
        index.sync(force=True)
        return ["\\Seen" in m.flags for m in index.messages()]
    finally:
        index.close()


def test_retrieved_messages_become_seen_soon_and_without_quit(server: Server) -> None:
    # \Seen is stored a moment after RETR, in one change for what came meanwhile, and
    # when the connection ends without QUIT (the messages were sent)
    w = Wire(server.port("pop3"))
    try:
        w.send(f"USER {ALICE}\r\nPASS {PASSWORD}\r\nRETR 1\r\nRETR 2\r\n".encode())
        assert w.line().startswith(b"+OK") and w.line().startswith(b"+OK Logged in")
        for n in (1, 2):
            assert w.line().startswith(b"+OK") and w.multiline() == wire(MESSAGES[n - 1])
        wait_until(lambda: seen(server)[:3] == [True, True, False], 10, "\\Seen on 1 and 2")
        w.send(b"RETR 3\r\n")
        assert w.line().startswith(b"+OK") and w.multiline() == wire(MESSAGES[2])
    finally:
        w.close()  # no QUIT
    wait_until(lambda: seen(server) == [True] * 3 + [False] * 4, 10, "\\Seen on 3")
