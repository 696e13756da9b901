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
``idle_timeout``.

``session.Session`` is the state machine, with no Twisted in it (``session_base`` has its
state and output, ``mailbox_commands`` and ``message_commands`` the two groups of commands):
it takes parsed commands, writes responses through this adapter (the ``Connection`` of
:mod:`mailsuite.imap.interface`) and returns a coroutine for a command that must wait.  This
module gives it what it waits on -- Deferreds from the runtime's reactor: worker threads
(``deferToThreadPool``), the password check, timers (``LoopingCall`` for IDLE polling), the
client's next line and room in the output -- and drives the coroutine with
``Deferred.fromCoroutine``, input paused until it ends.  Untagged EXISTS / EXPUNGE / FETCH
FLAGS from other sessions and processes are sent only where RFC 3501 7.4.1 / 5.2 allows, and
at once in IDLE.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from twisted.internet import defer, protocol, threads
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsuite.connection_limits import Admission, ConnectionLimits, Refusal, shared_limits
from mailsuite.deadline import LOGIN, ReadDeadline
from mailsuite.flow import GatedLineReceiver, OutputFlow
from mailsuite.imap.interface import ConnectionGone, Limits, Services
from mailsuite.imap.parser import BadCommand, Command, CommandReader, NeedLiteral
from mailsuite.imap.session import Session
from mailsuite.runtime import Runtime
from mailsuite.transport import Transport, no_delay, transport_of

P = ParamSpec("P")
T = TypeVar("T")
A = TypeVar("A")

log = Logger(namespace="mailsuite.imap")


class IMAPProtocol(GatedLineReceiver):
    """One IMAP connection: the Twisted side of a :class:`Session` (provides its
    :class:`mailsuite.imap.interface.Connection`)."""

    delimiter = b"\r\n"
    MAX_LENGTH = 64 * 1024
    tx: Transport  # the connection's transport, typed (from connectionMade on)

    def __init__(
        self, factory: IMAPFactory, implicit_tls: bool, limits: ConnectionLimits | None = None
    ) -> None:
        self.factory = factory
        self.services = factory.services
        self.reactor = factory.reactor
        self.idle_timeout = factory.idle_timeout
        self.login_timeout = factory.login_timeout
        self.limits = limits if limits is not None else ConnectionLimits()
        self.admission: Admission | None = None
        self._tls = implicit_tls
        self.session: Session | None = None
        self.reader: CommandReader | None = None
        self._literal: bytearray | None = None
        self._literal_size = 0
        self._cont: defer.Deferred[bytes] | None = None
        self.flow: OutputFlow | None = None
        self._peer_ip = ""
        self.deadline: ReadDeadline | None = None

    @property
    def tls(self) -> bool:
        return self._tls

    @property
    def peer_ip(self) -> str:
        return self._peer_ip

    # -- connection ---------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.tx = transport_of(self)
        peer = self.tx.getPeer()
        self._peer_ip = getattr(peer, "host", "")
        self.admission = self.limits.admit(self.peer_ip)
        if self.admission.refused is not None:
            # RFC 3501 7.1.5: a BYE greeting refuses the connection.  UNAVAILABLE (RFC 5530)
            # says "temporary": clients retry later instead of asking for a new password.
            log.info(
                "imap: {ip} refused: {limit} reached",
                ip=self.peer_ip,
                limit=self.admission.refused.value,
            )
            if self.admission.refused is Refusal.PER_IP:
                self.write(
                    b"* BYE [UNAVAILABLE] Too many connections from your address, try later\r\n"
                )
            else:
                self.write(b"* BYE [UNAVAILABLE] Too many connections, try later\r\n")
            self.tx.loseConnection()
            return
        no_delay(self.tx)  # replies go out at once, however they are split (see no_delay)
        self.reader = self._reader()
        self.session = Session(self.services, self)
        self.start_flow()
        self.deadline = ReadDeadline(self.reactor, self.deadline_expired, login=self.login_timeout)
        self.deadline.wait(self.idle_timeout)
        caps = self.session.capabilities()
        self.write(f"* OK [CAPABILITY {caps}] mailsuite IMAP4rev1 ready\r\n".encode())

    def connectionLost(self, reason: Any = None) -> None:
        self.stop_flow(self.factory.runtime.heap_trim())
        if self.deadline is not None:
            self.deadline.cancel()
        if self.admission is not None:
            self.admission.release()
        if self._cont is not None:  # a command waiting on the client ends (and stops IDLE)
            d, self._cont = self._cont, None
            d.errback(ConnectionGone())
        if self.session is not None:
            try:
                self.session.connection_lost()
            except Exception:
                log.failure("cleanup failed")

    def _reader(self) -> CommandReader:
        return CommandReader(max_append_literal=self.services.limits.max_literal)

    def deadline_expired(self, why: str) -> None:
        """No login in time, or a line (or literal) too slow: RFC 3501 7.1.5 BYE, close."""
        log.info("IMAP: {why} timeout for {ip}", why=why, ip=self.peer_ip)
        if why == LOGIN:
            self.write(b"* BYE Autologout; no login in time\r\n")
        else:
            self.write(b"* BYE Autologout; idle for too long\r\n")
        self.hang_up()  # at once if the client does not even read

    def _wait_input(self) -> None:
        """The next line has ``idle_timeout`` from now (logged in or not: before login the
        login deadline comes first)."""
        if self.deadline is not None:
            self.deadline.wait(self.idle_timeout)

    def authenticated(self) -> None:
        if self.deadline is not None:
            self.deadline.logged_in()

    def admit_login(self, user: str) -> str | None:
        """Count this connection as ``user``'s (per user and IP), or say why it may not log
        in: Dovecot's mail_max_userip_connections and its wording."""
        if self.admission is None or self.admission.login(user) is None:
            return None
        log.info(
            "imap: {user} from {ip} refused: max_userip_connections reached",
            user=user,
            ip=self.peer_ip,
        )
        return (
            "Maximum number of connections from user+IP exceeded "
            f"(max_userip_connections={self.limits.max_userip_connections})"
        )

    # -- output ----------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if data and self.transport is not None and not self.tx.disconnecting:
            self.tx.write(data)

    def writable(self) -> defer.Deferred[None]:
        """When the transport has room again (see :mod:`mailsuite.flow`); at the next
        reactor turn if it has now, so other connections run between pieces."""
        wait = self.flow.wait_writable() if self.flow is not None else None
        return wait if wait is not None else deferLater(self.reactor, 0, lambda: None)

    def gone(self) -> bool:
        """The connection is closed or closing: a running command should stop writing."""
        return (
            self.transport is None
            or self.tx.disconnecting
            or (self.flow is not None and self.flow.stopped)
        )

    def output_flowing(self) -> None:
        """The client read what waited: that is progress, for a long FETCH too."""
        if self.session is not None:
            self._wait_input()
        super().output_flowing()

    def _end(self, bye: bytes) -> None:
        """End the session on the server's initiative: a BAD alone never ends it (the client
        may go on), so the untagged BYE says the connection is closing (RFC 3501 7.1.5)."""
        self.write(bye)
        self.close()

    def close(self) -> None:
        """End the connection once what was written has been sent.

        The output producer goes first (``close_connection``): over TLS,
        ``TLSMemoryBIOProtocol.loseConnection`` sends close_notify and closes only when no
        producer is registered, so with ours still there LOGOUT on 993 or after STARTTLS left
        the socket open (issue 9; mbsync hung waiting for the close that RFC 3501 6.1.3
        promises after LOGOUT)."""
        if self.transport is None or self.tx.disconnecting:
            return
        self.close_connection()  # a FETCH waiting to write ends when the connection does

    def start_tls(self) -> None:
        # Anything the client pipelined after STARTTLS is discarded (RFC 3501 6.2.1, the
        # Twisted STARTTLS injection of research section 2.5).
        self.clearLineBuffer()
        self.begin_tls(self.factory.runtime.tls)
        self._tls = True
        if self.reader is not None:
            self.reader = self._reader()

    def next_line(self, prompt: bytes) -> defer.Deferred[bytes]:
        """Send ``prompt`` and hand the next line to the returned Deferred (AUTHENTICATE,
        IDLE); it fails with ConnectionGone if the connection ends first."""
        d: defer.Deferred[bytes] = defer.Deferred()
        self._cont = d
        self.write(prompt)
        self.release_input("command")  # input must flow while we wait for the line
        return d

    # -- input -----------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.session is None:
            return  # refused at connect: nothing the client sends is acted on
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        self._wait_input()
        if self._cont is not None:
            d, self._cont = self._cont, None
            self.pauseProducing()
            d.callback(line)
            return
        assert self.reader is not None
        try:
            result = self.reader.feed_line(line)
        except Exception:
            log.failure("command reader failed")
            self.reader = self._reader()
            self.write(b"* BAD Internal error reading the command\r\n")
            return
        self._handle(result)

    def lineLengthExceeded(self, line: bytes) -> None:
        # What follows cannot be told apart from commands (the line may have announced a
        # literal), so the connection ends; with a BYE, as every end the server chooses does.
        self.write(b"* BAD [TOOBIG] Line too long\r\n")
        self._end(b"* BYE [TOOBIG] Line too long, closing the connection\r\n")

    def _handle(self, result: Command | NeedLiteral | BadCommand | None) -> None:
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

    def rawDataReceived(self, data: bytes) -> None:
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
        metrics = self.factory.runtime.metrics
        if metrics is not None:  # names outside the command table count as "other"
            metrics.imap_command(cmd.command)
        try:
            work = self.session.run(cmd)
        except Exception:
            log.failure("IMAP command crashed")
            self.write(f"{cmd.tag} NO [SERVERBUG] Internal server error, logged\r\n".encode())
            return
        if work is None:
            return
        self._drive(work)

    def _drive(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a command's coroutine (the session answers its failures; one that escapes
        is a bug, logged); input stays paused until it ends, so pipelined commands are
        answered in order (RFC 3501 5.5)."""
        finished = False

        def ended(result: object) -> None:
            nonlocal finished
            finished = True
            if isinstance(result, Failure):
                log.failure("IMAP command failed", failure=result)
            if (
                self.input_held("command")
                and self.transport is not None
                and not self.tx.disconnecting
                and self._cont is None
            ):
                self._wait_input()  # the command's own time is not the client's
                self.release_input("command")

        d = defer.Deferred.fromCoroutine(work)
        d.addBoth(ended)
        # ``d.called`` is not enough: a Deferred whose callback returned another Deferred
        # (LOGIN: the semaphore's, then the password check's) is "called" but still waiting.
        # Pipelined commands wait until this one has answered (RFC 3501 5.5).
        if not finished and self._cont is None:
            self.pauseProducing()


class IMAPFactory(protocol.Factory):
    def __init__(self, runtime: Runtime, implicit_tls: bool) -> None:
        self.runtime = runtime
        self.reactor = runtime.reactor
        self.services = services(runtime)
        self.implicit_tls = implicit_tls
        cfg = runtime.config.imap
        self.idle_timeout = cfg.idle_timeout
        self.login_timeout = cfg.login_timeout
        # imap and imaps count together ([imap] max_connections ...)
        self.limits = shared_limits(
            runtime.connection_limits,
            "imap",
            cfg.max_connections,
            cfg.max_connections_per_ip,
            cfg.max_userip_connections,
        )

    def buildProtocol(self, addr: Any) -> IMAPProtocol:
        return IMAPProtocol(self, self.implicit_tls, self.limits)


def services(runtime: Runtime) -> Services:
    """What the sessions of a listener get from the runtime: its store, logins and
    directory, and the reactor's threads, turns and timers, as Deferreds."""
    reactor = runtime.reactor

    def run_blocking(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> defer.Deferred[T]:
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args, **kwargs)

    def run_staged(
        fn: Callable[[Callable[[A], None]], T], /
    ) -> tuple[defer.Deferred[A | None], defer.Deferred[T]]:
        first: defer.Deferred[A | None] = defer.Deferred()

        def fire(value: A | None) -> None:
            if not first.called:
                first.callback(value)

        def report(value: A) -> None:  # in the worker thread
            reactor.callFromThread(fire, value)

        def ended(result: T | Failure) -> T | Failure:
            fire(None)  # (after the report's own call: callFromThread keeps their order)
            return result

        done = threads.deferToThreadPool(reactor, reactor.getThreadPool(), fn, report)
        done.addBoth(ended)
        return first, done

    def next_turn() -> defer.Deferred[None]:
        return deferLater(reactor, 0, lambda: None)

    def every(seconds: float, tick: Callable[[], None]) -> Callable[[], None]:
        poller = LoopingCall(tick)
        poller.clock = reactor
        poller.start(seconds, now=False)
        return poller.stop

    cfg = runtime.config
    return Services(
        # one registry of open folders per server, shared with POP3 (the one folder model)
        registry=runtime.folder_registry(),
        changes=runtime.changes,
        mailbox_root=runtime.directory.mailbox_root,
        login=runtime.auth.login,
        run_blocking=run_blocking,
        run_staged=run_staged,
        next_turn=next_turn,
        every=every,
        log=log,
        limits=Limits(
            max_literal=cfg.imap.max_literal,
            allow_plaintext=cfg.auth.allow_plaintext,
            tls_available=runtime.tls is not None,
        ),
        quota_limits=lambda user: (
            runtime.directory.quota_limit(user),
            runtime.directory.message_limit(user),
        ),
    )


def imap_factory(runtime: Runtime, implicit_tls: bool) -> IMAPFactory:
    """The protocol factory for ``[listen] imap`` (143) and ``imaps`` (993, TLS by service.py)."""
    return IMAPFactory(runtime, implicit_tls)
