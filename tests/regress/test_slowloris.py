"""Regression (issue 10): slowloris.  A client sending one byte at a time kept an SMTP session
open for ever (the idle timer restarted on every byte), POP3 and IMAP gave a client that
never logged in 10 and 2 minutes per byte, and ManageSieve 2 minutes per line.  Now every command line, every block of DATA, the
time until login and the whole SMTP session have deadlines that bytes do not move.

Each test trickles one byte every 0.5 s against a server configured with 2-second limits and
measures when the server hangs up, from the moment it started waiting."""

from __future__ import annotations

import base64
import socket
import time
from pathlib import Path

import pytest

from tests.harness import PASSWORD, Server, ServerFactory

USER = "joe@example.test"
LIMIT = 2.0  # the configured timeouts, seconds
SLACK = 1.5  # scheduling on a loaded machine: cut by LIMIT + SLACK at the latest
GIVE_UP = 12.0  # a server that has not hung up by then would let the trickle go on for ever


@pytest.fixture(scope="module")
def srv(module_servers: ServerFactory) -> Server:
    extra = (
        "[auth]\nallow_plaintext = true\n"
        f"[smtp]\ntimeout = {int(LIMIT)}\nlogin_timeout = {int(LIMIT)}\nsession_timeout = 60\n"
        f"[imap]\nlogin_timeout = {int(LIMIT)}\n"
        f"[pop3]\nlogin_timeout = {int(LIMIT)}\n"
        f"[sieve]\nlogin_timeout = {int(LIMIT)}\n"
    )
    return module_servers(
        ("smtp", "submission", "imap", "pop3", "managesieve"), users=(USER,), extra_toml=extra
    )


class Conversation:
    """A raw client that reads what the server says and notices when it hangs up."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.received = b""
        self.closed = False

    def read_until(self, marker: bytes) -> bytes:
        deadline = time.monotonic() + 10
        while marker not in self.received:
            assert time.monotonic() < deadline, self.received
            self._recv(10)
            assert not self.closed, self.received
        head, _, self.received = self.received.partition(marker)
        return head + marker

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv(self, timeout: float) -> None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        except OSError:
            data = b""
        if data:
            self.received += data
        else:
            self.closed = True

    def trickle(self, data: bytes, every: float = 0.5) -> float:
        """Send ``data`` one byte at a time (repeated as needed) until the server hangs up;
        returns the seconds that took (or fails after GIVE_UP)."""
        start = time.monotonic()
        i = 0
        while not self.closed:
            assert time.monotonic() - start < GIVE_UP, f"still open: {self.received!r}"
            try:
                self.sock.sendall(data[i % len(data) : i % len(data) + 1])
            except OSError:
                self.closed = True
                break
            i += 1
            until = time.monotonic() + every
            while not self.closed and time.monotonic() < until:
                self._recv(max(0.01, until - time.monotonic()))
        return time.monotonic() - start

    def commands_until_closed(self, line: bytes, every: float = 0.5) -> float:
        """Send a whole ``line`` every ``every`` seconds until the server hangs up; returns
        the seconds that took (or fails after GIVE_UP)."""
        start = time.monotonic()
        while not self.closed:
            assert time.monotonic() - start < GIVE_UP, f"still open: {self.received!r}"
            try:
                self.sock.sendall(line)
            except OSError:
                self.closed = True
                break
            until = time.monotonic() + every
            while not self.closed and time.monotonic() < until:
                self._recv(max(0.01, until - time.monotonic()))
        return time.monotonic() - start

    def lines_every(self, line: bytes, every: float, seconds: float, answer: bytes) -> None:
        """Send a whole ``line`` every ``every`` seconds for ``seconds``; each is answered."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.send(line)
            self.read_until(answer)
            time.sleep(every)

    def close(self) -> None:
        self.sock.close()


def plain() -> str:
    return base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()


# -- SMTP --------------------------------------------------------------------------------------


def test_smtp_command_trickle_is_cut_within_the_timeout(srv: Server) -> None:
    c = Conversation(srv.port("smtp"))
    c.read_until(b"\r\n")
    elapsed = c.trickle(b"NOOP but never the end of the line ")
    assert elapsed <= LIMIT + SLACK, elapsed
    assert c.received.startswith(b"421 4.4.2 mx.example.test Error: timeout exceeded\r\n")


def test_smtp_trickled_complete_commands_each_have_the_deadline(srv: Server) -> None:
    """Whole commands, each trickled: the deadline starts when the server waits for a line."""
    c = Conversation(srv.port("smtp"))
    c.read_until(b"\r\n")
    elapsed = c.trickle(b"NOOP\r\n", every=0.45)  # 6 bytes: 2.7 s per command
    assert elapsed <= LIMIT + SLACK, elapsed
    assert b"421 4.4.2" in c.received


def test_smtp_data_trickle_is_cut_within_the_timeout(srv: Server) -> None:
    c = Conversation(srv.port("smtp"))
    c.read_until(b"\r\n")
    c.send(b"EHLO client.test\r\n")
    c.read_until(b"250 ")
    c.read_until(b"\r\n")
    c.send(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<" + USER.encode() + b">\r\nDATA\r\n")
    c.read_until(b"354 ")
    c.read_until(b"\r\n")
    elapsed = c.trickle(b"Subject: slow\r\n\r\nvery slow body\r\n")
    assert elapsed <= LIMIT + SLACK, elapsed
    assert c.received.startswith(b"421 4.4.2 mx.example.test Error: timeout exceeded\r\n")
    assert srv.messages(USER) == [] or all(b"Subject: slow" not in m for m in srv.messages(USER))


def test_smtp_slow_but_moving_upload_is_accepted(srv: Server) -> None:
    """A big message sent slowly (64 KiB every 0.8 s, 4.8 s in all, more than the 2-second
    timeout) arrives: DATA has a deadline per block, not one for the whole message."""
    c = Conversation(srv.port("smtp"))
    c.read_until(b"\r\n")
    c.send(b"EHLO client.test\r\nMAIL FROM:<a@remote.test>\r\n")
    c.send(b"RCPT TO:<" + USER.encode() + b">\r\nDATA\r\n")
    c.read_until(b"354 ")
    c.read_until(b"\r\n")
    line = b"x" * 78 + b"\r\n"
    block = b"Subject: big and slow\r\n\r\n" + line * (65536 // len(line) + 1)
    start = time.monotonic()
    for _ in range(6):
        c.send(block)
        time.sleep(0.8)
    c.send(b".\r\n")
    assert c.read_until(b"\r\n").startswith(b"250 ")
    assert time.monotonic() - start > LIMIT * 2
    c.send(b"QUIT\r\n")
    assert c.read_until(b"\r\n").startswith(b"221 ")
    c.close()


def test_submission_must_authenticate_within_the_login_timeout(srv: Server) -> None:
    c = Conversation(srv.port("submission"))
    c.read_until(b"\r\n")
    c.send(b"EHLO client.test\r\n")
    c.read_until(b"250 ")
    c.read_until(b"\r\n")
    elapsed = c.commands_until_closed(b"NOOP\r\n")  # complete commands in time, never AUTH
    assert elapsed <= LIMIT + SLACK, elapsed
    assert b"421 4.4.2 mx.example.test Error: timeout exceeded\r\n" in c.received


def test_submission_after_auth_has_no_login_deadline(srv: Server) -> None:
    c = Conversation(srv.port("submission"))
    c.read_until(b"\r\n")
    c.send(b"EHLO client.test\r\n")
    c.read_until(b"250 ")
    c.read_until(b"\r\n")
    c.send(f"AUTH PLAIN {plain()}\r\n".encode())
    assert c.read_until(b"\r\n").startswith(b"235 ")
    c.lines_every(b"NOOP\r\n", 0.5, LIMIT + SLACK + 0.5, b"250 2.0.0 OK\r\n")
    c.send(b"QUIT\r\n")
    assert c.read_until(b"\r\n").startswith(b"221 ")
    c.close()


def test_smtp_session_has_a_cap(tmp_path: Path) -> None:
    """Commands in time, for ever: the session cap ends it."""
    extra = "[smtp]\ntimeout = 30\nsession_timeout = 3\n"
    with Server(tmp_path, services=("smtp",), extra_toml=extra) as s:
        c = Conversation(s.port("smtp"))
        c.read_until(b"\r\n")
        elapsed = c.commands_until_closed(b"NOOP\r\n")
        assert elapsed <= 3 + SLACK, elapsed
        assert b"421 4.4.2 mx.example.test Error: connection time limit exceeded\r\n" in c.received


# -- POP3 and IMAP before login ------------------------------------------------------------------


def test_pop3_trickle_before_login_is_cut(srv: Server) -> None:
    c = Conversation(srv.port("pop3"))
    c.read_until(b"\r\n")
    elapsed = c.trickle(b"USER " + USER.encode() + b"\r\n")  # complete lines now and then
    assert elapsed <= LIMIT + SLACK, elapsed
    assert c.received.endswith(b"-ERR Login timeout, closing connection\r\n")


def test_pop3_logged_in_is_not_cut_by_the_login_timeout(srv: Server) -> None:
    c = Conversation(srv.port("pop3"))
    c.read_until(b"\r\n")
    c.send(f"USER {USER}\r\nPASS {PASSWORD}\r\n".encode())
    c.read_until(b"\r\n")
    assert c.read_until(b"\r\n").startswith(b"+OK")
    c.lines_every(b"NOOP\r\n", 0.5, LIMIT + SLACK + 0.5, b"+OK")
    c.send(b"QUIT\r\n")
    c.read_until(b"\r\n")
    c.close()


def test_imap_trickle_before_login_is_cut(srv: Server) -> None:
    c = Conversation(srv.port("imap"))
    c.read_until(b"\r\n")
    elapsed = c.trickle(b"a NOOP\r\n")
    assert elapsed <= LIMIT + SLACK, elapsed
    assert b"* BYE Autologout; no login in time\r\n" in c.received


def test_imap_logged_in_is_not_cut_by_the_login_timeout(srv: Server) -> None:
    c = Conversation(srv.port("imap"))
    c.read_until(b"\r\n")
    c.send(f'a LOGIN {USER} "{PASSWORD}"\r\n'.encode())
    assert b"a OK" in c.read_until(b"\r\n")
    c.lines_every(b"b NOOP\r\n", 0.5, LIMIT + SLACK + 0.5, b"b OK NOOP completed\r\n")
    c.send(b"c LOGOUT\r\n")
    c.read_until(b"c OK")
    c.close()


def test_managesieve_lines_before_login_are_cut(srv: Server) -> None:
    c = Conversation(srv.port("managesieve"))
    c.read_until(b'OK "mx.example.test ManageSieve ready"\r\n')
    elapsed = c.commands_until_closed(b"NOOP\r\n", every=0.5)  # answered, but never a login
    assert elapsed <= LIMIT + SLACK, elapsed
    assert c.received.endswith(b'BYE "Login timeout, closing connection"\r\n')


def test_managesieve_trickle_before_login_is_cut(srv: Server) -> None:
    c = Conversation(srv.port("managesieve"))
    c.read_until(b'ManageSieve ready"\r\n')
    elapsed = c.trickle(b"CAPABILITY\r\n")
    assert elapsed <= LIMIT + SLACK, elapsed
    assert b'BYE "Login timeout' in c.received
