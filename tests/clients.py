"""Raw protocol clients for tests: real sockets on loopback, a deadline on every read.

The standard library's clients (smtplib, imaplib, poplib) hide the exact bytes and refuse
what a broken or hostile client would send; these send any bytes and return the server's
replies as they came, so tests can check reply codes, ordering and syntax.  One class per job:
``LineClient`` (lines over TCP or TLS, any protocol), ``SMTPClient`` (whole multi-line
replies), ``IMAPClient`` (tagged commands up to their tagged reply).
"""

from __future__ import annotations

import base64
import socket
import ssl
from typing import NamedTuple

from tests.harness import PASSWORD
from tests.tls_helpers import HOSTNAME


def read_line(sock: socket.socket) -> bytes:
    """One CRLF-ended line read a byte at a time, so nothing after it is taken from the
    socket: what follows (a TLS handshake after STARTTLS's reply) stays for whoever reads
    next.  ``b""`` when the server closed the connection first."""
    line = b""
    while not line.endswith(b"\r\n"):
        byte = sock.recv(1)
        if not byte:
            return b""
        line += byte
    return line


class LineClient:
    """A client connection from ``source`` (any 127.0.0.x) that sends and reads lines.

    ``tls``: a context for implicit TLS (the server's name is checked against
    ``server_hostname``).  Every read waits at most ``timeout`` seconds, then raises
    ``TimeoutError``: a reply that never comes fails the test instead of hanging it."""

    def __init__(
        self,
        port: int,
        *,
        source: str = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
        server_hostname: str = HOSTNAME,
        timeout: float = 20.0,
    ) -> None:
        self.sock: socket.socket = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
        )
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname=server_hostname)
        self.file = self.sock.makefile("rb")

    def start_tls(self, context: ssl.SSLContext, server_hostname: str = HOSTNAME) -> None:
        """Wrap the connection in TLS (after the server said yes to STARTTLS/STLS)."""
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_line(self, text: str | bytes) -> None:
        self.send((text.encode() if isinstance(text, str) else text) + b"\r\n")

    def readline(self) -> bytes:
        """The next line with its line end; ``b""`` once the server has closed."""
        return self.file.readline()

    def line(self) -> str:
        """The next line as text without its line end; ``""`` once the server has closed."""
        return self.readline().decode("utf-8", "replace").rstrip("\r\n")

    def closed_by_server(self) -> bool:
        """True when the server closes the connection (EOF) without sending anything more;
        False when it sends a line, resets, or keeps the connection open past the timeout."""
        try:
            return self.file.readline() == b""
        except (ConnectionResetError, TimeoutError):
            return False

    def close(self) -> None:
        """Hang up and wait until the server has closed its end too, so a test that
        follows does not find this connection still counted.  A server that keeps its end
        open until the client's timeout fails the test: that is a hang (it once passed here
        silently, as ``TimeoutError`` is an ``OSError``: ManageSieve held a connection after
        LOGOUT over TLS until the client went away)."""
        hung, timeout = False, self.sock.gettimeout()
        try:
            self.sock.shutdown(socket.SHUT_WR)
            while self.file.readline():
                pass
        except TimeoutError:
            hung = True
        except OSError:
            pass
        self.file.close()
        self.sock.close()
        if hung:
            raise AssertionError(
                f"the server kept the connection open {timeout} s after the client hung up"
            )


class Reply(NamedTuple):
    """One whole SMTP reply: its code and its lines joined by newlines."""

    code: int
    text: str

    @property
    def lines(self) -> list[str]:
        return self.text.split("\n")


class SMTPClient(LineClient):
    """A raw SMTP dialogue; ``greeting`` is the server's first reply."""

    def __init__(
        self,
        port: int,
        *,
        source: str = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
        server_hostname: str = HOSTNAME,
        timeout: float = 20.0,
    ) -> None:
        super().__init__(
            port, source=source, tls=tls, server_hostname=server_hostname, timeout=timeout
        )
        self.greeting = self.reply()

    def reply(self) -> Reply:
        """One complete (possibly multi-line, RFC 5321 4.2.1) reply."""
        lines: list[str] = []
        while True:
            raw = self.readline()
            if not raw:
                raise ConnectionError(f"closed by the server after {lines!r}")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line)
            if line[3:4] != "-":
                return Reply(int(line[:3]), "\n".join(lines))

    def cmd(self, line: str) -> Reply:
        self.send_line(line)
        return self.reply()

    def start_tls(
        self, context: ssl.SSLContext, server_hostname: str = HOSTNAME, injected: bytes = b""
    ) -> None:
        """STARTTLS (RFC 3207), then TLS; the caller sends EHLO again.  ``injected`` goes in
        the same write as STARTTLS (what an attacker in the middle would add).  The 220 is
        read byte by byte, so anything the server wrongly sends in clear text after it is
        left for the TLS handshake, which then fails."""
        self.send(b"STARTTLS\r\n" + injected)
        line = read_line(self.sock)
        assert line.startswith(b"220 "), line
        super().start_tls(context, server_hostname)


class IMAPClient(LineClient):
    """Tagged IMAP commands on a bare socket; logged in as ``user`` unless it is None."""

    def __init__(
        self,
        port: int,
        user: str | None = None,
        password: str = PASSWORD,
        *,
        tls: ssl.SSLContext | None = None,
        server_hostname: str = HOSTNAME,
        timeout: float = 20.0,
    ) -> None:
        super().__init__(port, tls=tls, server_hostname=server_hostname, timeout=timeout)
        self.n = 0
        self.greeting = self.readline()
        assert self.greeting.startswith(b"* OK"), self.greeting
        if user is not None:
            self.ok(f'LOGIN "{user}" "{password}"')

    def cmd(self, line: str | bytes) -> list[bytes]:
        """Every line (without line ends) up to and including this command's tagged reply."""
        self.n += 1
        tag = b"r%d" % self.n
        self.send(tag + b" " + (line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.until(tag)

    def until(self, tag: bytes) -> list[bytes]:
        """Every line up to and including the tagged reply for ``tag``."""
        out = []
        while True:
            got = self.readline()
            assert got, f"connection closed after {out}"
            out.append(got.rstrip(b"\r\n"))
            if got.startswith(tag + b" "):
                return out

    def ok(self, line: str | bytes) -> list[bytes]:
        """The untagged lines of a command that must succeed."""
        out = self.cmd(line)
        assert out[-1].split()[1] == b"OK", out
        return out[:-1]

    def close(self) -> None:
        self.cmd("LOGOUT")
        super().close()


class ManageSieveClient(LineClient):
    """A raw ManageSieve (RFC 5804) client; ``greeting`` is the capability response.

    ``starttls_context``: the context STARTTLS uses, and ``login`` then starts TLS first;
    without one ``login`` authenticates in clear text (servers with ``allow_plaintext``)."""

    def __init__(
        self,
        port: int,
        *,
        starttls_context: ssl.SSLContext | None = None,
        source: str = "127.0.0.1",
        timeout: float = 10.0,
    ) -> None:
        super().__init__(port, source=source, timeout=timeout)
        self.starttls_context = starttls_context
        self.greeting = self.response()

    def response(self) -> bytes:
        """Every line (and literal) up to and including the OK, NO or BYE that ends it."""
        out = []
        while True:
            line = self.readline()
            if not line:
                raise ConnectionError("closed: " + repr(b"".join(out)))
            out.append(line)
            if line.startswith(b"{") and line.rstrip().endswith(b"}"):
                out.append(self.file.read(int(line.strip()[1:-1].rstrip(b"+"))))
                continue
            if line.startswith((b"OK", b"NO", b"BYE")):
                return b"".join(out)

    def cmd(self, data: bytes) -> bytes:
        self.send(data + b"\r\n")
        return self.response()

    def starttls(self) -> bytes:
        """STARTTLS, the handshake, and the capabilities the server sends again after it."""
        assert self.starttls_context is not None, "no context for STARTTLS"
        assert self.cmd(b"STARTTLS").startswith(b"OK")
        self.start_tls(self.starttls_context)
        return self.response()

    def login(self, user: str, password: str = PASSWORD) -> None:
        """AUTHENTICATE PLAIN (after STARTTLS when there is a context for it)."""
        if self.starttls_context is not None:
            self.starttls()
        cred = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        answer = self.cmd(f'AUTHENTICATE "PLAIN" "{cred}"'.encode())
        assert answer == b'OK "Logged in"\r\n', answer
