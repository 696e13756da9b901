"""ManageSieve service (RFC 5804) on ``[listen] managesieve``: the Twisted side of
:mod:`.session`.  Our own code on ``basic.LineReceiver`` (Twisted has no ManageSieve).

Only I/O here: lines go to the :class:`~.parser.CommandReader`; literals are read in raw mode
(exactly N octets; an oversized one is skipped, never buffered); each complete command runs
in the thread pool (script commands touch files) with input paused, so pipelined commands
are answered in order.  STARTTLS drops everything the client sent after the command
(``clearLineBuffer`` and a fresh reader) before the handshake -- the STARTTLS injection
class of bug (RFC 5804 2.2).  Logins go through the shared :class:`~mailsuite.auth.
Authenticator`: the same accounts and the same failure throttling as IMAP and POP3.
Deadlines (:mod:`mailsuite.deadline`) move with complete lines and 64 KiB of literal, never
with single bytes: a client must log in within ``[sieve] login_timeout`` of connecting, and
then send each line within 30 minutes.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, protocol, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsuite.connection_limits import Admission, ConnectionLimits, shared_limits
from mailsuite.deadline import LOGIN, ReadDeadline
from mailsuite.login import LoginResult
from mailsuite.managesieve.parser import BadCommand, Command, CommandReader, NeedLiteral
from mailsuite.managesieve.session import (
    NO_TEMP,
    Authenticate,
    Close,
    Options,
    Session,
    StartTLS,
    State,
    Step,
    response,
)
from mailsuite.runtime import Runtime
from mailsuite.sieve.storage import ScriptStore
from mailsuite.tls import lose_connection
from mailsuite.transport import LineReceiver, Transport, transport_of

log = Logger(namespace="mailsuite.managesieve")

IDLE_TIMEOUT = 1800  # seconds for each line once logged in (before: the login deadline)
MAX_LINE = 8192


class ManageSieveProtocol(LineReceiver):
    delimiter = b"\n"  # CRLF expected; a bare LF is accepted and the CR stripped
    MAX_LENGTH = MAX_LINE

    def __init__(
        self,
        runtime: Runtime,
        options: Options,
        implicit_tls: bool,
        limits: ConnectionLimits | None = None,
        *,
        login_timeout: int,
    ) -> None:
        self.runtime = runtime
        self.login_timeout = login_timeout
        self.deadline: ReadDeadline | None = None
        self.limits = limits if limits is not None else ConnectionLimits()
        self.admission: Admission | None = None
        self.session = Session(options, self._store_for, tls=implicit_tls)
        self.reader = CommandReader(options.max_script_size)
        self.peer = "?"
        self._literal: bytearray | None = None
        self._literal_left = 0
        self._discarding = False

    @property
    def _tx(self) -> Transport:
        return transport_of(self)

    def _store_for(self, user: str) -> ScriptStore:
        cfg = self.runtime.config.sieve
        root = self.runtime.directory.mailbox_root(user)
        return ScriptStore(root, cfg.max_scripts, cfg.max_script_size)

    # -- connection -----------------------------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self._tx.getPeer()
        self.peer = getattr(peer, "host", str(peer))
        self.admission = self.limits.admit(self.peer)
        if self.admission.refused is not None:
            log.info(
                "ManageSieve: {peer} refused: {limit} reached",
                peer=self.peer,
                limit=self.admission.refused.value,
            )
            self.session.state = State.CLOSED  # nothing the client sends is acted on
            self._tx.write(response("BYE", "Too many connections, try again later", "TRYLATER"))
            lose_connection(self._tx)
            return
        self.deadline = ReadDeadline(
            self.runtime.reactor, self.deadline_expired, login=self.login_timeout
        )
        self._wait_input()
        self._tx.write(self.session.greeting())

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        if self.admission is not None:
            self.admission.release()
        self.session.state = State.CLOSED

    def _wait_input(self) -> None:
        """The next line has :data:`IDLE_TIMEOUT` from now (before login, the login deadline
        comes first)."""
        if self.deadline is not None:
            self.deadline.wait(IDLE_TIMEOUT)

    def deadline_expired(self, why: str) -> None:
        """No login in time, or a line too slow: BYE (RFC 5804 1.3) and close."""
        log.info("ManageSieve: {why} timeout for {peer}", why=why, peer=self.peer)
        text = "Login timeout" if why == LOGIN else "Idle timeout"
        self._tx.write(response("BYE", f"{text}, closing connection"))
        lose_connection(self._tx)  # over TLS too: not waiting for a slow peer's close

    def lineLengthExceeded(self, line: bytes) -> None:
        self._tx.write(response("BYE", "Line too long, closing connection"))
        lose_connection(self._tx)

    # -- input ----------------------------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        self._wait_input()
        if self.session.state is State.CLOSED:
            return
        if line.endswith(b"\r"):
            line = line[:-1]
        self._handle(self.reader.feed_line(line))

    def rawDataReceived(self, data: bytes) -> None:
        if self.deadline is not None:
            self.deadline.data(len(data))  # a literal moves the deadline per 64 KiB
        take = data[: self._literal_left]
        rest = data[self._literal_left :]
        self._literal_left -= len(take)
        if self._literal is not None:
            self._literal += take
        if self._literal_left > 0:
            return
        literal, self._literal = self._literal, None
        discarding, self._discarding = self._discarding, False
        self.setLineMode()
        if not discarding and literal is not None:
            self._handle(self.reader.feed_literal(bytes(literal)))
        if rest:
            self.dataReceived(rest)

    def _handle(self, result: Any) -> None:
        if result is None:
            return
        if isinstance(result, NeedLiteral):
            self._read_literal(result.size, keep=True)
        elif isinstance(result, BadCommand):
            self.reader.reset()
            if result.close:
                self._tx.write(response("BYE", result.reason))
                lose_connection(self._tx)
                return
            step = self.session.bad(result.reason, result.code)
            self._perform(step)
            if result.discard and self.session.state is not State.CLOSED:
                self._read_literal(result.discard, keep=False)
        elif isinstance(result, Command):
            self._run(result)

    def _read_literal(self, size: int, keep: bool) -> None:
        self._literal = bytearray() if keep else None
        self._discarding = not keep
        self._literal_left = size
        if size == 0:
            if keep:
                self._literal = None
                self._handle(self.reader.feed_literal(b""))
            return
        self.setRawMode()

    def _run(self, cmd: Command) -> None:
        self.pauseProducing()
        d = self._in_thread(self.session.command, cmd)

        def failed(f: Failure) -> Step:
            log.failure("ManageSieve: {cmd} failed for {peer}", f, cmd=cmd.name, peer=self.peer)
            return Step(NO_TEMP)

        d.addErrback(failed)
        d.addCallback(self._perform)
        d.addErrback(
            lambda f: log.failure(
                "ManageSieve: sending the reply to {peer} failed", f, peer=self.peer
            )
        )
        d.addBoth(self._resume)

    def _in_thread(self, f: Any, *args: Any) -> defer.Deferred[Any]:
        reactor = self.runtime.reactor
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    def _resume(self, _: object) -> None:
        if self.session.state not in (State.CLOSED, State.LOGIN) and self._tx.connected:
            self._wait_input()  # the time the command took is not the client's
            self.resumeProducing()

    # -- actions --------------------------------------------------------------------------------

    def _perform(self, step: Step) -> None:
        if not self._tx.connected:
            return
        if step.out:
            self._tx.write(step.out)
        action = step.action
        if isinstance(action, Close):
            lose_connection(self._tx)
        elif isinstance(action, StartTLS):
            self._start_tls()
        elif isinstance(action, Authenticate):
            self.pauseProducing()
            self._authenticate(action).addBoth(self._resume)

    def _start_tls(self) -> None:
        dropped = self.clearLineBuffer()
        if dropped:
            log.warn(
                "ManageSieve: discarded {n} bytes pipelined after STARTTLS from {peer}",
                n=len(dropped),
                peer=self.peer,
            )
        self.reader.reset()
        self._tx.startTLS(self.runtime.tls)
        self._tx.write(self.session.tls_started())

    @defer.inlineCallbacks
    def _authenticate(self, action: Authenticate) -> Any:
        try:
            result: LoginResult | None = yield self.runtime.auth.login(
                action.username, action.password, self.peer, "managesieve"
            )
        except Exception:
            log.failure("ManageSieve: login check failed")
            result = None
        if not self._tx.connected:
            return
        step = self.session.login_finished(result)
        if self.session.state is State.AUTH:
            if self.deadline is not None:
                self.deadline.logged_in()
            if self.admission is not None:
                self.admission.login(self.session.user or "")  # leaves the pre-login count
        self._perform(step)


class ManageSieveFactory(protocol.ServerFactory):
    noisy = False

    def __init__(self, runtime: Runtime, options: Options, implicit_tls: bool) -> None:
        self.runtime = runtime
        self.options = options
        self.implicit_tls = implicit_tls
        cfg = runtime.config.sieve
        self.limits = shared_limits(
            runtime.connection_limits,
            "managesieve",
            cfg.max_connections,
            cfg.max_connections_per_ip,
        )

    def buildProtocol(self, addr: Any) -> ManageSieveProtocol:
        p = ManageSieveProtocol(
            self.runtime,
            self.options,
            self.implicit_tls,
            self.limits,
            login_timeout=self.runtime.config.sieve.login_timeout,
        )
        p.factory = self
        return p


def managesieve_factory(runtime: Runtime, implicit_tls: bool) -> ManageSieveFactory:
    """``[listen] managesieve`` (4190, STARTTLS)."""
    cfg = runtime.config
    options = Options(
        hostname=cfg.hostname,
        tls_available=runtime.tls is not None,
        allow_plaintext=cfg.auth.allow_plaintext,
        max_script_size=cfg.sieve.max_script_size,
        max_scripts=cfg.sieve.max_scripts,
        max_redirects=cfg.sieve.max_redirects,
    )
    return ManageSieveFactory(runtime, options, implicit_tls)
