"""Regression (issue 9): a BAD never ends an IMAP session; STORE ... NIL is accepted.

The acceptance test saw ``STORE 1 +FLAGS NIL`` answered ``BAD Expected a flag`` and the next
command find the connection closed.  The server side of that close could not be reproduced
(many clients, mutt and mbsync among them, drop the connection themselves on a BAD); what the
server did do was end the session after a BAD in two places, a line over 64 KiB and a
non-synchronizing literal too big to read, with no BYE.  Now every BAD leaves the session
usable, and where the server must close it says ``* BYE`` first (RFC 3501 7.1.5).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator

import pytest

from tests.harness import PASSWORD, Server, ServerFactory
from tests.tls_helpers import HOSTNAME, CertAuthority

USER = "bad@example.test"

# (command line or raw bytes to send, status expected in the tagged reply)
BAD_COMMANDS = [
    b"x1 STORE 1 +FLAGS (NIL)",
    b"x2 STORE 1 +FLAGS (",
    b"x3 STORE 1 +FLAGS {5+}\r\n\\Seen",  # a literal where a flag atom belongs
    b"x4 FETCH 1 (NOSUCH)",
    b"x5 FETCH 999 (FLAGS)",
    b"x6 SEARCH NOSUCHKEY",
    b"x7 UID BOGUS 1",
    b"x8 BOGUS",
    b"x9 SELECT",
    b'x10 LIST (BOGUS) "" "*"',
    b"x11 STATUS INBOX (BOGUS)",
    b"x12 LOGIN someone else",  # not allowed once authenticated
    b"x13 BOGUS {5+}\r\nhello",  # the literal of a bad command is read and thrown away
    b"x14 FETCH 1 BODY[",
    b"x15 STORE 1 BOGUS (\\Seen)",
    b"x16 SEARCH CHARSET",
    b"x17 ENABLE",
    b"x18 \x00\xff garbage",
]


@pytest.fixture(scope="module")
def server(module_servers: ServerFactory) -> Iterator[Server]:
    s = module_servers(
        ("imap", "imaps"), tls=True, users=(USER,), extra_toml="[auth]\nallow_plaintext = true\n"
    )
    yield s
    assert "Traceback" not in s.output()


class Session:
    def __init__(self, server: Server, ca: CertAuthority, tls: bool) -> None:
        sock = socket.create_connection(
            ("127.0.0.1", server.port("imaps" if tls else "imap")), timeout=10
        )
        self.sock: socket.socket | ssl.SSLSocket = (
            ca.client_context().wrap_socket(sock, server_hostname=HOSTNAME) if tls else sock
        )
        self.file = self.sock.makefile("rb")
        assert self.file.readline().startswith(b"* OK")

    def send(self, line: bytes) -> list[bytes]:
        """Send one command; every line up to its tagged reply (or an untagged BAD for a
        command whose tag could not be read)."""
        tag = line.split(b" ", 1)[0]
        self.sock.sendall(line + b"\r\n")
        out = []
        while True:
            got = self.file.readline()
            assert got, f"the server closed the connection after {line!r}: {out}"
            out.append(got.rstrip(b"\r\n"))
            if got.startswith(tag + b" ") or got.startswith(b"* BAD"):
                return out

    def ok(self, line: bytes) -> list[bytes]:
        out = self.send(line)
        assert out[-1].split()[1] == b"OK", out
        return out


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "imaps"])
def test_no_bad_reply_ends_the_session(server: Server, ca: CertAuthority, tls: bool) -> None:
    s = Session(server, ca, tls)
    s.ok(f'a LOGIN {USER} "{PASSWORD}"'.encode())
    s.ok(b"b APPEND INBOX {4+}\r\nhi\r\n")
    s.ok(b"c SELECT INBOX")
    for n, line in enumerate(BAD_COMMANDS):
        out = s.send(line)
        assert out[-1].split()[1] == b"BAD", (line, out)
        assert not any(x.startswith(b"* BYE") for x in out), (line, out)
        s.ok(b"n%d NOOP" % n)  # the session goes on
    # IDLE ended by something other than DONE
    s.sock.sendall(b"i IDLE\r\n")
    assert s.file.readline().startswith(b"+")
    assert s.send(b"i NOTDONE")[-1].startswith(b"i BAD")
    s.ok(b"z NOOP")
    assert s.send(b"q LOGOUT")[0].startswith(b"* BYE")
    s.sock.close()


def test_store_flags_nil_is_an_empty_list(server: Server, ca: CertAuthority) -> None:
    s = Session(server, ca, False)
    s.ok(f'a LOGIN {USER} "{PASSWORD}"'.encode())
    s.ok(b"b CREATE Nil")
    s.ok(b"c APPEND Nil (\\Seen $k) {4+}\r\nhi\r\n")
    s.ok(b"d SELECT Nil")
    assert s.ok(b"e STORE 1 +FLAGS NIL")[:-1] == [b"* 1 FETCH (FLAGS ($k \\Seen \\Recent))"]
    assert s.ok(b"f STORE 1 -FLAGS.SILENT NIL")[:-1] == []
    assert s.ok(b"g UID STORE 1 FLAGS NIL")[:-1] == [b"* 1 FETCH (UID 1 FLAGS (\\Recent))"]
    assert s.ok(b"h FETCH 1 (FLAGS)")[:-1] == [b"* 1 FETCH (FLAGS (\\Recent))"]
    s.send(b"q LOGOUT")
    s.sock.close()


def test_a_line_too_long_ends_with_bye(server: Server, ca: CertAuthority) -> None:
    s = Session(server, ca, False)
    s.ok(f'a LOGIN {USER} "{PASSWORD}"'.encode())
    s.sock.sendall(b"b NOOP " + b"x" * 70_000 + b"\r\n")
    lines = s.file.read().split(b"\r\n")  # up to the close
    assert lines[0].startswith(b"* BAD [TOOBIG]")
    assert lines[1].startswith(b"* BYE [TOOBIG]")
    assert lines[2:] == [b""]
    s.sock.close()


def test_a_nonsync_literal_too_big_ends_with_bye(server: Server, ca: CertAuthority) -> None:
    s = Session(server, ca, False)
    s.ok(f'a LOGIN {USER} "{PASSWORD}"'.encode())
    s.sock.sendall(b"b SEARCH TEXT {999999999+}\r\n")
    lines = s.file.read().split(b"\r\n")
    assert lines[0].startswith(b"b ") and b"[TOOBIG]" in lines[0]
    assert lines[1].startswith(b"* BYE [TOOBIG]")
    s.sock.close()
