"""IMAP4rev1 server (RFC 3501) with IDLE, UIDPLUS, MOVE, SPECIAL-USE, NAMESPACE, UNSELECT, ENABLE,
LITERAL+, SASL-IR, ID, CHILDREN, CONDSTORE, QRESYNC, LIST-EXTENDED (RFC 5258), LIST-STATUS
(RFC 5819) and ESEARCH (RFC 4731), over the shared Maildir store: the Twisted side.

Our own protocol on ``basic.LineReceiver`` (twisted.mail.imap4.IMAP4Server has STARTTLS
injection, ignores partial FETCH, never sets \\Seen, crashes on APPEND without flags and costs
~120 us per message per FETCH; see research/twisted-mail.md section 2).

``IMAPProtocol`` is the thin I/O adapter: lines, literals in raw mode, pausing input while a
command runs (so pipelined commands are answered in order), STARTTLS, the IDLE continuation,
deadlines and output flow control.  Deadlines (:mod:`mailsuite.deadline`) move only with
complete lines, 64 KiB of literal and the end of a command, never with single bytes: a client
must log in within ``[imap] login_timeout`` of connecting (RFC 3501 5.4 allows a short
timer before login; Dovecot uses 3 minutes) and, logged in, send each line within
``idle_timeout``.  ``session.Session`` is the state machine: it takes parsed
commands and writes responses through the adapter (``session_base`` has its state and output,
``mailbox_commands`` and ``message_commands`` the two groups of commands).  Untagged EXISTS /
EXPUNGE / FETCH FLAGS from other sessions and processes are sent only where RFC 3501 7.4.1 /
5.2 allows, and at once in IDLE.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IPushProducer
from twisted.protocols import basic
from twisted.python.failure import Failure
from zope.interface import implementer

from mailsuite.connection_limits import Admission, ConnectionLimits, Refusal, shared_limits
from mailsuite.deadline import LOGIN, ReadDeadline
from mailsuite.imap.parser import BadCommand, Command, CommandReader, NeedLiteral
from mailsuite.imap.session import Session
from mailsuite.imap.session_base import _Shared, log
from mailsuite.tls import lose_connection


@implementer(IPushProducer)
class _Output:
    """Tracks whether the transport wants us to stop writing (for big FETCH responses)."""

    def __init__(self) -> None:
        self.paused = False
        self.waiting: list[defer.Deferred[None]] = []

    def pauseProducing(self) -> None:  # noqa: N802
        self.paused = True

    def resumeProducing(self) -> None:  # noqa: N802
        self.paused = False
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(None)

    def stopProducing(self) -> None:  # noqa: N802
        self.resumeProducing()


class IMAPProtocol(basic.LineReceiver):
    delimiter = b"\r\n"
    MAX_LENGTH = 64 * 1024

    def __init__(
        self, shared: _Shared, implicit_tls: bool, limits: ConnectionLimits | None = None
    ) -> None:
        self.shared = shared
        self.limits = limits if limits is not None else ConnectionLimits()
        self.admission: Admission | None = None
        self.tls = implicit_tls
        self.session: Session | None = None
        self.reader: CommandReader | None = None
        self._literal: bytearray | None = None
        self._literal_size = 0
        self._cont: defer.Deferred[bytes] | None = None
        self._out: _Output | None = None
        self.peer_ip = ""
        self.deadline: ReadDeadline | None = None

    # -- connection ---------------------------------------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802
        peer = self.transport.getPeer()
        self.peer_ip = getattr(peer, "host", "")
        self.admission = self.limits.admit(self.peer_ip)
        if self.admission.refused is not None:
            # RFC 3501 7.1.5: a BYE greeting refuses the connection.  UNAVAILABLE (RFC 5530)
            # says "temporary": clients retry later instead of asking for a new password.
            log.info("imap: {ip} refused: {limit} reached", ip=self.peer_ip,
                     limit=self.admission.refused.value)
            if self.admission.refused is Refusal.PER_IP:
                self.write(b"* BYE [UNAVAILABLE] Too many connections from your address, "
                           b"try later\r\n")
            else:
                self.write(b"* BYE [UNAVAILABLE] Too many connections, try later\r\n")
            self.transport.loseConnection()
            return
        self.reader = CommandReader(max_append_literal=self.shared.max_literal)
        self.session = Session(self.shared, self)
        self._out = _Output()
        self.transport.registerProducer(self._out, True)
        self.deadline = ReadDeadline(
            self.shared.runtime.reactor, self.deadline_expired, login=self.shared.login_timeout
        )
        self.deadline.wait(self.shared.idle_timeout)
        caps = self.session.capabilities()
        self.write(f"* OK [CAPABILITY {caps}] mailsuite IMAP4rev1 ready\r\n".encode())

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        if self.deadline is not None:
            self.deadline.cancel()
        if self.admission is not None:
            self.admission.release()
        if self.session is not None:
            try:
                self.session.connection_lost()
            except Exception:  # noqa: BLE001
                log.failure("cleanup failed")
        if self._cont is not None:
            d, self._cont = self._cont, None
            d.cancel()

    def deadline_expired(self, why: str) -> None:
        """No login in time, or a line (or literal) too slow: RFC 3501 7.1.5 BYE, close."""
        log.info("IMAP: {why} timeout for {ip}", why=why, ip=self.peer_ip)
        if why == LOGIN:
            self.write(b"* BYE Autologout; no login in time\r\n")
        else:
            self.write(b"* BYE Autologout; idle for too long\r\n")
        self.close()

    def _wait_input(self) -> None:
        """The next line has ``idle_timeout`` from now (logged in or not: before login the
        login deadline comes first)."""
        if self.deadline is not None:
            self.deadline.wait(self.shared.idle_timeout)

    def authenticated(self) -> None:
        if self.deadline is not None:
            self.deadline.logged_in()

    def admit_login(self, user: str) -> str | None:
        """Count this connection as ``user``'s (per user and IP), or say why it may not log
        in: Dovecot's mail_max_userip_connections and its wording."""
        if self.admission is None or self.admission.login(user) is None:
            return None
        log.info("imap: {user} from {ip} refused: max_userip_connections reached",
                 user=user, ip=self.peer_ip)
        return ("Maximum number of connections from user+IP exceeded "
                f"(max_userip_connections={self.limits.max_userip_connections})")

    # -- output ----------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if data and self.transport is not None and not self.transport.disconnecting:
            self.transport.write(data)

    def wait_writable(self) -> defer.Deferred[None] | None:
        if self._out is not None and self._out.paused:
            d: defer.Deferred[None] = defer.Deferred()
            self._out.waiting.append(d)
            return d
        return None

    def _end(self, bye: bytes) -> None:
        """End the session on the server's initiative: a BAD alone never ends it (the client
        may go on), so the untagged BYE says the connection is closing (RFC 3501 7.1.5)."""
        self.write(bye)
        self.close()

    def close(self) -> None:
        """End the connection once what was written has been sent.

        The output producer goes first: over TLS, ``TLSMemoryBIOProtocol.loseConnection``
        sends close_notify and closes only when no producer is registered, so with ours
        still there LOGOUT on 993 or after STARTTLS left the socket open (issue 9; mbsync
        hung waiting for the close that RFC 3501 6.1.3 promises after LOGOUT)."""
        transport = self.transport
        if transport is None or transport.disconnecting:
            return
        out, self._out = self._out, None
        if out is not None:
            transport.unregisterProducer()
            out.resumeProducing()  # a FETCH waiting to write runs to its end (writes dropped)
        lose_connection(transport)

    def start_tls(self) -> None:
        # Anything the client pipelined after STARTTLS is discarded (RFC 3501 6.2.1, the
        # Twisted STARTTLS injection of research section 2.5).
        self.clearLineBuffer()
        self.transport.startTLS(self.shared.runtime.tls)
        self.tls = True
        if self.reader is not None:
            self.reader = CommandReader(max_append_literal=self.shared.max_literal)

    def continuation(self, prompt: bytes) -> defer.Deferred[bytes]:
        """Send ``prompt`` and hand the next line to the returned Deferred (AUTHENTICATE,
        IDLE)."""
        d: defer.Deferred[bytes] = defer.Deferred()
        self._cont = d
        self.write(prompt)
        # input must flow while we wait for the line
        if self.paused:
            self.resumeProducing()
        return d

    # -- input -----------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.session is None:
            return  # refused at connect: nothing the client sends is acted on
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:  # noqa: N802
        self._wait_input()
        if self._cont is not None:
            d, self._cont = self._cont, None
            self.pauseProducing()
            d.callback(line)
            return
        assert self.reader is not None
        try:
            result = self.reader.feed_line(line)
        except Exception:  # noqa: BLE001
            log.failure("command reader failed")
            self.reader = CommandReader(max_append_literal=self.shared.max_literal)
            self.write(b"* BAD Internal error reading the command\r\n")
            return
        self._handle(result)

    def lineLengthExceeded(self, line: bytes) -> None:  # noqa: N802
        # What follows cannot be told apart from commands (the line may have announced a
        # literal), so the connection ends; with a BYE, as every end the server chooses does.
        self.write(b"* BAD [TOOBIG] Line too long\r\n")
        self._end(b"* BYE [TOOBIG] Line too long, closing the connection\r\n")

    def _handle(self, result: Any) -> None:
        if result is None:
            return
        if isinstance(result, NeedLiteral):
            if result.sync:
                self.write(b"+ Ready for literal data\r\n")
            self._literal = bytearray()
            self._literal_size = result.size
            if result.size == 0:
                self._literal_done()
            else:
                self.setRawMode()
            return
        if isinstance(result, BadCommand):
            code = f"[{result.code}] " if result.code else ""
            if result.tag is not None and result.code == "TOOBIG" and result.command:
                self.write(f"{result.tag} NO {code}{result.reason}\r\n".encode())
            else:
                self.write(f"{result.tag or '*'} BAD {code}{result.reason}\r\n".encode())
            if result.close:  # a non-synchronizing literal too big to read and throw away
                self._end(b"* BYE [TOOBIG] Literal too big, closing the connection\r\n")
                return
            if result.discard:
                self._literal = bytearray()
                self._literal_size = result.discard
                self.setRawMode()
            return
        if isinstance(result, Command):
            self._run(result)

    def rawDataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.deadline is not None:
            self.deadline.data(len(data))  # a literal moves the deadline per 64 KiB
        assert self._literal is not None
        need = self._literal_size - len(self._literal)
        self._literal += data[:need]
        rest = data[need:]
        if len(self._literal) >= self._literal_size:
            self.line_mode = 1
            self._literal_done()
            if rest:
                self.setLineMode(rest)

    def _literal_done(self) -> None:
        assert self.reader is not None and self._literal is not None
        data = bytes(self._literal)
        self._literal = None
        self.line_mode = 1
        result = self.reader.feed_literal(data)
        self._handle(result)

    def _run(self, cmd: Command) -> None:
        assert self.session is not None
        metrics = self.shared.runtime.metrics
        if metrics is not None:  # names outside the command table count as "other"
            metrics.imap_command(cmd.command)
        try:
            d = self.session.run(cmd)
        except Exception:  # noqa: BLE001
            log.failure("IMAP command crashed")
            self.write(f"{cmd.tag} NO [SERVERBUG] Internal server error, logged\r\n".encode())
            return
        if d is None:
            return
        finished = False

        def ended(result: object) -> None:
            nonlocal finished
            finished = True
            if isinstance(result, Failure):
                log.failure("IMAP command failed", failure=result)
            if (
                self.paused
                and self.transport is not None
                and not self.transport.disconnecting
                and self._cont is None
            ):
                self._wait_input()  # the command's own time is not the client's
                self.resumeProducing()

        d.addBoth(ended)
        # ``d.called`` is not enough: a Deferred whose callback returned another Deferred
        # (LOGIN: the semaphore's, then the password check's) is "called" but still waiting.
        # Pipelined commands wait until this one has answered (RFC 3501 5.5).
        if not finished and self._cont is None:
            self.pauseProducing()


class IMAPFactory(protocol.Factory):
    def __init__(self, runtime: Any, implicit_tls: bool) -> None:
        self.shared = _Shared(runtime)
        self.implicit_tls = implicit_tls
        cfg = runtime.config.imap
        # imap and imaps count together ([imap] max_connections ...)
        self.limits = shared_limits(
            runtime.connection_limits, "imap", cfg.max_connections,
            cfg.max_connections_per_ip, cfg.max_userip_connections,
        )

    def buildProtocol(self, addr: Any) -> IMAPProtocol:  # noqa: N802
        p = IMAPProtocol(self.shared, self.implicit_tls, self.limits)
        p.factory = self
        return p


def imap_factory(runtime: Any, implicit_tls: bool) -> IMAPFactory:
    """The protocol factory for ``[listen] imap`` (143) and ``imaps`` (993, TLS by service.py)."""
    return IMAPFactory(runtime, implicit_tls)
