"""The reactor never waits on a folder's disk work (issue 15): IMAP STATUS (and LIST's RETURN
(STATUS)) of a folder not open in the process, and a POP3 login's maildrop open, run their
index open -- a build of a folder another program wrote, or a wait for the folder lock another
process holds -- in a worker thread.  Meanwhile another session of the same worker process
(``workers = 1``: one reactor) is answered at once; the command's answer, once the lock is
free, has the right values, in command order; a client that goes away meanwhile leaves
nothing held.

The open is made to wait deterministically: the test holds the folder's index lock (the
``flock`` every index change is made under) on a folder with no index, and waits until the
kernel shows the server blocked on it (``/proc/locks``) before probing the other session.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mailsuite.pop3.maildrop import LOCK_NAME as POP3_LOCK_NAME
from mailsuite.store.index import INDEX_NAME, LOCK_NAME
from tests.clients import IMAPClient, LineClient
from tests.harness import ALICE, BOB, PASSWORD, Server, ServerFactory, wait_until

#: how long the other session may wait for its answer while the open is blocked
PROBE_TIMEOUT = 2.0
N = 30  # messages in the cold folder; the first SEEN of them are \Seen
SEEN = 10
#: SO_LINGER on, 0 s: close() resets the connection at once
_RESET = struct.pack("ii", 1, 0)
STATUS_ITEMS = "MESSAGES UNSEEN UIDNEXT UIDVALIDITY RECENT SIZE HIGHESTMODSEQ"


def _fill(box: Path) -> int:
    """A Maildir folder written by another program (no index): ``N`` messages, ``SEEN`` of
    them read.  Returns their size with CRLF line ends (RFC822.SIZE, POP3 octets)."""
    for sub in ("cur", "new", "tmp"):
        (box / sub).mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(N):
        body = b"From: a@example.org\nSubject: m%d\n\nbody %d\n" % (i, i)
        base = f"{1_700_000_000 + i}.M{i:06d}P7.gen"
        if i < SEEN:
            (box / "cur" / f"{base}:2,S").write_bytes(body)
        else:
            (box / "new" / base).write_bytes(body)
        total += len(body) + body.count(b"\n")
    return total


@contextmanager
def _held(lock: Path) -> Iterator[None]:
    """Hold ``lock`` (an exclusive ``flock``, as another process changing the folder does)."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _waiters(lock: Path) -> int:
    """How many ``flock`` waits are blocked on ``lock`` (``/proc/locks``: ``->`` lines)."""
    ino = str(lock.stat().st_ino)
    return sum(
        1
        for line in Path("/proc/locks").read_text().splitlines()
        if "->" in line and any(f.count(":") == 2 and f.split(":")[2] == ino for f in line.split())
    )


def _wait_blocked(lock: Path) -> None:
    wait_until(lambda: _waiters(lock) > 0, 20, f"the server to wait for {lock.name}")


def _reset(client: LineClient) -> None:
    """Hang up with a reset, at once (the socket's file object closed too: the descriptor
    stays open while it is)."""
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    client.file.close()
    client.sock.close()


def _index_fds(pid: int, box: Path) -> list[str]:
    """The server's descriptors open on the folder's index or its lock file."""
    fd_dir = Path(f"/proc/{pid}/fd")
    names = {str(box / INDEX_NAME), str(box / LOCK_NAME)}
    out = []
    for fd in fd_dir.iterdir():
        try:
            target = str(fd.readlink())
        except OSError:
            continue
        if target in names:
            out.append(target)
    return out


def _status_values(lines: list[bytes]) -> dict[str, int]:
    """The values of the one ``* STATUS`` response among ``lines``."""
    (line,) = [x for x in lines if x.startswith(b"* STATUS ")]
    inner = line[line.index(b"(") + 1 : line.rindex(b")")].split()
    return {inner[i].decode(): int(inner[i + 1]) for i in range(0, len(inner), 2)}


@pytest.fixture
def server(servers: ServerFactory) -> Server:
    """One worker process: every session on one reactor."""
    return servers(
        ("imap", "pop3"),
        users=(ALICE, BOB),
        extra_toml="[auth]\nallow_plaintext = true\n",
        server_toml="workers = 1\n",
    )


# -- IMAP STATUS -----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["STATUS", "LIST-STATUS"])
def test_status_of_a_cold_locked_folder_holds_no_other_session(server: Server, how: str) -> None:
    box = server.maildir(ALICE, "Cold")
    size = _fill(box)
    a = IMAPClient(server.port("imap"), ALICE)
    b = IMAPClient(server.port("imap"), BOB, timeout=PROBE_TIMEOUT)
    with _held(box / LOCK_NAME):
        if how == "STATUS":
            a.send(b"s1 STATUS Cold (" + STATUS_ITEMS.encode() + b")\r\ns2 NOOP\r\n")
        else:
            a.send(b's1 LIST "" "Cold" RETURN (STATUS (' + STATUS_ITEMS.encode() + b"))\r\n")
            a.send(b"s2 NOOP\r\n")
        _wait_blocked(box / LOCK_NAME)
        b.ok("NOOP")  # answered while the open waits for the lock
    got = a.until(b"s1")
    assert got[-1].startswith(b"s1 OK"), got
    assert a.readline().startswith(b"s2 OK")  # the pipelined command after it, in order
    cold = _status_values(got)
    assert {k: cold[k] for k in ("MESSAGES", "UNSEEN", "UIDNEXT", "RECENT", "SIZE")} == {
        "MESSAGES": N,
        "UNSEEN": N - SEEN,
        "UIDNEXT": N + 1,
        "RECENT": N,
        "SIZE": size,
    }
    # the same values as the folder open here answers (the in-memory path), \Recent unclaimed
    a.ok("EXAMINE Cold")
    warm = _status_values(a.ok("STATUS Cold (" + STATUS_ITEMS + ")"))
    assert warm == cold
    a.close()
    b.close()


def test_status_client_gone_while_the_open_waits(server: Server) -> None:
    """The client hangs up while its STATUS waits for the lock: the other session goes on,
    the server keeps nothing of the folder open once the lock is free, and logs no error."""
    box = server.maildir(ALICE, "Cold")
    _fill(box)
    a = IMAPClient(server.port("imap"), ALICE)
    b = IMAPClient(server.port("imap"), BOB, timeout=PROBE_TIMEOUT)
    with _held(box / LOCK_NAME):
        a.send(b"s1 STATUS Cold (MESSAGES)\r\n")
        _wait_blocked(box / LOCK_NAME)
        _reset(a)
        b.ok("NOOP")
    assert server.proc is not None
    pid = server.proc.pid
    wait_until(lambda: (box / INDEX_NAME).exists(), 20, "the index build to end")
    wait_until(lambda: not _index_fds(pid, box), 20, "the server to close the index")
    b.close()
    c = IMAPClient(server.port("imap"), ALICE)
    values = _status_values(c.ok("STATUS Cold (MESSAGES UNSEEN)"))
    assert values == {"MESSAGES": N, "UNSEEN": N - SEEN}
    c.close()


# -- POP3 login --------------------------------------------------------------------------------


class POP3Line(LineClient):
    """A POP3 client on a bare socket (replies read one line at a time)."""

    def __init__(self, port: int, timeout: float = 20.0) -> None:
        super().__init__(port, timeout=timeout)
        assert self.line().startswith("+OK")

    def cmd(self, line: str) -> str:
        self.send_line(line)
        return self.line()

    def login(self, user: str) -> None:
        assert self.cmd(f"USER {user}").startswith("+OK")
        reply = self.cmd(f"PASS {PASSWORD}")
        assert reply.startswith("+OK"), reply


def _pop3_lock_free(box: Path) -> bool:
    """Can the POP3 maildrop lock be taken now (no session holds it)?"""
    fd = os.open(box / POP3_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def test_pop3_login_to_a_cold_locked_inbox_holds_no_other_session(server: Server) -> None:
    box = server.maildir(ALICE)
    size = _fill(box)
    b = POP3Line(server.port("pop3"), timeout=PROBE_TIMEOUT)
    b.login(BOB)
    a = POP3Line(server.port("pop3"))
    assert a.cmd(f"USER {ALICE}").startswith("+OK")
    with _held(box / LOCK_NAME):
        a.send(f"PASS {PASSWORD}\r\nSTAT\r\n".encode())  # STAT pipelined after PASS
        _wait_blocked(box / LOCK_NAME)
        assert b.cmd("NOOP").startswith("+OK")  # answered while the open waits
        assert not _pop3_lock_free(box)  # the maildrop is claimed meanwhile
    assert a.line().startswith("+OK")  # PASS
    assert a.line() == f"+OK {N} {size}"  # STAT, after it
    listed = [a.cmd("LIST")]
    while listed[-1] != ".":
        listed.append(a.line())
    assert len(listed) == N + 2
    # a second login meanwhile is refused as RFC 2449 [IN-USE] says (the warm folder path)
    c = POP3Line(server.port("pop3"))
    assert c.cmd(f"USER {ALICE}").startswith("+OK")
    assert c.cmd(f"PASS {PASSWORD}").startswith("-ERR [IN-USE]")
    c.close()
    assert a.cmd("QUIT").startswith("+OK")
    a.close()
    assert b.cmd("QUIT").startswith("+OK")
    b.close()
    server.wait_log(f"POP3: {ALICE} opened INBOX from 127.0.0.1 ({N} messages)")


def test_pop3_client_gone_while_the_open_waits(server: Server) -> None:
    """The client hangs up while its login waits for the folder lock: the other session goes
    on; once the lock is free the maildrop lock is released (the next login is not refused
    [IN-USE]) and the server logs no error."""
    box = server.maildir(ALICE)
    _fill(box)
    b = POP3Line(server.port("pop3"), timeout=PROBE_TIMEOUT)
    b.login(BOB)
    a = POP3Line(server.port("pop3"))
    assert a.cmd(f"USER {ALICE}").startswith("+OK")
    with _held(box / LOCK_NAME):
        a.send_line(f"PASS {PASSWORD}")
        _wait_blocked(box / LOCK_NAME)
        _reset(a)
        assert b.cmd("NOOP").startswith("+OK")
    # (a paused connection's reset is seen when the answer is written: the maildrop may have
    # been made by then, and is closed with the connection; its folder stays warm here)
    wait_until(lambda: _pop3_lock_free(box), 20, "the server to release the maildrop")
    again = POP3Line(server.port("pop3"))
    again.login(ALICE)
    assert again.cmd("STAT").startswith(f"+OK {N} ")
    assert again.cmd("QUIT").startswith("+OK")
    again.close()
    assert b.cmd("QUIT").startswith("+OK")
    b.close()
