"""POP3 service (RFC 1939, 2449, 2595, 3206, 5034): the Twisted side of :mod:`.session`.

Written for mailsuite on ``basic.LineReceiver``; twisted.mail.pop3 is not used (no STLS,
``DELE 0`` deletes the last message, RETR dot-stuffs per chunk so content can forge replies;
research/twisted-mail.md 3.1).

This module does only I/O: it feeds lines to the :class:`~.session.Session`, writes what it
returns and performs its actions.  Ordering under pipelining (RFC 2449 6.6): while a
password is checked, the maildrop is opened (in a worker thread: a cold or locked INBOX holds
that login only, not the process's other sessions), a large message is streamed or the UPDATE
state runs, line processing is paused, so replies go out in command order.  STLS drops
everything the client sent after the command (``clearLineBuffer``) before the handshake starts
(RFC 2595 4, the STARTTLS injection class of bug).  TCP_NODELAY is set: POP3 is a
request/response protocol and Nagle plus delayed ACKs cost ~40 ms per reply.

Deadlines (:mod:`mailsuite.deadline`) move with complete lines and with a message being read
by the client, never with single bytes: AUTHORIZATION ends ``[pop3] login_timeout`` after
connecting (3 minutes like Dovecot), and in TRANSACTION each command has the 10 minutes of
RFC 1939 3.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, protocol, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsuite.auth import LoginResult, Outcome
from mailsuite.config import ConfigError
from mailsuite.connection_limits import Admission, ConnectionLimits, Refusal, shared_limits
from mailsuite.deadline import LOGIN, ReadDeadline
from mailsuite.flow import GatedLineReceiver, OutputFlow, send_now, write_now
from mailsuite.pacing import PIECE
from mailsuite.pop3.maildrop import Claim, Expiry, LoginTooSoon, Maildrop, MaildropInUse, claim
from mailsuite.pop3.session import (
    CLOSED,
    COMMANDS,
    ERR_BUSY,
    ERR_BUSY_IP,
    ERR_TEMP,
    SASL,
    TRANSACTION,
    Authenticate,
    Close,
    Options,
    Session,
    StartTLS,
    State,
    Stream,
    Update,
    as_step,
    err,
)
from mailsuite.runtime import Runtime
from mailsuite.store.space import log_failure
from mailsuite.transport import Transport, no_delay, transport_of

log = Logger(namespace="mailsuite.pop3")

#: A command's keyword (ASCII, upper case) -> its /metrics label; anything else is "other".
_METRIC_NAMES = {name.encode("ascii"): name for name in COMMANDS}
IDLE_TIMEOUT = 600  # RFC 1939 3: an autologout timer of at least 10 minutes (per command)
MAX_LINE = 4096  # commands are short (RFC 2449 4: 255); room for long SASL responses
TALLY_DELAY = 1.0  # seconds a command may wait to be counted in /metrics (_tally_soon)
MAX_UNCOUNTED = 32  # different keywords waiting to be counted before they are at once
SEEN_DELAY = 0.2  # seconds a retrieved message may wait for its \Seen (Maildrop.mark_seen)


class POP3Protocol(GatedLineReceiver):
    delimiter = b"\n"  # CRLF expected; a bare LF is accepted and the CR stripped
    MAX_LENGTH = MAX_LINE
    tx: Transport  # the connection's transport, typed (from connectionMade on)

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
        self.limits = limits if limits is not None else ConnectionLimits()
        self.admission: Admission | None = None
        self.session = Session(options, tls=implicit_tls)
        self.peer = "?"
        self.flow: OutputFlow | None = None
        self.login_timeout = login_timeout
        self.deadline: ReadDeadline | None = None
        self._lines = 0  # complete lines in the batch of input being handled
        #: commands not yet counted in /metrics: keyword as sent -> how many (see _tally)
        self._counts: dict[bytes, int] = {}
        self._counts_flush: Any = None  # the timer that counts them
        self._seen_flush: Any = None  # the timer that stores \Seen of retrieved messages

    # -- connection life --------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.tx = transport_of(self)
        peer = self.tx.getPeer()
        self.peer = getattr(peer, "host", str(peer))
        self.admission = self.limits.admit(self.peer)
        if self.admission.refused is not None:
            log.info(
                "POP3: {peer} refused: {limit} reached",
                peer=self.peer,
                limit=self.admission.refused.value,
            )
            self.session.state = State.CLOSED  # nothing the client sends is acted on
            self.reply(ERR_BUSY_IP if self.admission.refused is Refusal.PER_IP else ERR_BUSY)
            self.tx.loseConnection()
            return
        no_delay(self.tx)
        self.start_flow()
        self.deadline = ReadDeadline(
            self.runtime.reactor, self.deadline_expired, login=self.login_timeout
        )
        self.wait_input()
        self.reply(self.session.greeting())  # now, not after another turn of the reactor

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.stop_flow(self.runtime.heap_trim())
        self._tally()
        if self.deadline is not None:
            self.deadline.cancel()
        if self.admission is not None:
            self.admission.release()
        self._store_seen()  # what was sent is \Seen, QUIT or not
        md = self.session.maildrop
        self.session.maildrop = None
        if md is not None:
            # A dropped connection never reaches UPDATE: nothing is deleted (RFC 1939 6).
            try:
                md.close()
            except Exception:
                log.failure("POP3: closing the maildrop of {user} failed", user=self.session.user)
        self.session.state = State.CLOSED

    def wait_input(self) -> None:
        """The next command has :data:`IDLE_TIMEOUT` from now (before login, the login
        deadline comes first)."""
        if self.deadline is not None:
            self.deadline.wait(IDLE_TIMEOUT)

    def deadline_expired(self, why: str) -> None:
        """No login in time or no command in time: say so and close (no UPDATE state,
        RFC 1939 6: nothing marked deleted is removed)."""
        log.info("POP3: {why} timeout for {peer}", why=why, peer=self.peer)
        text = "Login timeout" if why == LOGIN else "Idle timeout"
        self.reply(err(f"{text}, closing connection"))
        self.hang_up()  # over TLS too; at once if the client does not even read

    def lineLengthExceeded(self, line: bytes) -> None:
        self.reply(err("Line too long, closing connection"))
        self.close_connection()

    # -- input ------------------------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        """One command: answered first; counting it and moving the read deadline wait for
        the end of the batch (:meth:`after_replies`), after the answer is sent."""
        self._lines += 1
        if line.endswith(b"\r"):
            line = line[:-1]
        state = self.session.state
        if state is CLOSED:
            return
        if state is not SASL:  # (a SASL response line is a credential: never looked at)
            self._count(line.partition(b" ")[0])
        try:
            step = self.session.line(line)
        except Exception:
            log.failure("POP3: command failed for {peer}", peer=self.peer)
            self.reply(ERR_TEMP)
            return
        self._perform(step.out, step.action)

    def dataReceived(self, data: bytes) -> None:
        """A segment that is one whole command line in the TRANSACTION state, with nothing
        read before it waiting and no hold (a client waiting for each answer: nearly every
        segment of a session), is answered here in one pass: the keyword counted, the
        session core's step, its reply written at once (:func:`write_now`, no gathering: it
        is the batch's only reply), the read deadline moved and \\Seen scheduled as
        :meth:`after_replies` does.  That is what the general path
        (``GatedLineReceiver.dataReceived``, ``lineReceived``, ``_perform``, ``reply``,
        ``flush_replies``, ``after_replies``, ``send_now``) does for such a line, in a
        dozen Python calls fewer per command.  A step with an action (a big message to
        stream, QUIT) is performed in a batch as there; any other input (several lines, part
        of one, a line too long, before login) goes the general way."""
        end = len(data) - 1  # where the line's LF must be (its length with a CR)
        if not (
            0 < end <= MAX_LINE
            and data.find(b"\n") == end
            and self._replies is None  # (not within a batch: a resumed hold feeds b"")
            and not self.paused
            and not self._buffer
            and self.session.state is TRANSACTION
        ):
            super().dataReceived(data)
            return
        word, _, arg = data[: end - 1 if data[end - 1] == 13 else end].partition(b" ")
        self._count(word)
        try:
            answer = self.session.command(word, arg)
        except Exception:
            log.failure("POP3: command failed for {peer}", peer=self.peer)
            answer = ERR_TEMP
        if type(answer) is bytes:
            write_now(self.tx, answer)
            self._lines = 1
            self.after_replies()
            return
        step = as_step(answer)
        self._replies = []
        self._busyReceiving = True  # input fed meanwhile waits in the buffer (LineReceiver)
        try:
            self._perform(step.out, step.action)
        finally:
            self._busyReceiving = False
            self.flush_replies()
            self._replies = None
        self._lines = 1
        self.after_replies()
        send_now(self.tx)

    def after_replies(self) -> None:
        """The batch's commands are answered: give the next one :data:`IDLE_TIMEOUT` from
        now when a complete line came (progress; bytes alone are not, see
        :mod:`mailsuite.deadline`)."""
        if self._lines:
            self._lines = 0
            if self.deadline is not None:  # (wait_input, one call less per command)
                self.deadline.wait(IDLE_TIMEOUT)
        md = self.session.maildrop
        if md is not None and md.seen_pending and self._seen_flush is None:
            self._seen_flush = self.runtime.reactor.callLater(SEEN_DELAY, self._store_seen)

    def _store_seen(self) -> None:
        """Store \\Seen on what the session retrieved since the last time (see
        :meth:`Maildrop.mark_seen`): :data:`SEEN_DELAY` after a RETR, before the UPDATE
        state, when the connection ends.  A failure is logged; the messages stay unseen."""
        if self._seen_flush is not None:
            if self._seen_flush.active():
                self._seen_flush.cancel()
            self._seen_flush = None
        md = self.session.maildrop
        if md is None:
            return
        try:
            md.flush_seen()
        except Exception as e:
            log_failure(log, e, "POP3: setting \\Seen for {user} failed", user=self.session.user)

    def _count(self, word: bytes) -> None:
        """One command with keyword ``word``, for /metrics: counted here, added to the
        shared counters soon (:meth:`_tally_soon`)."""
        counts = self._counts
        counts[word] = counts.get(word, 0) + 1
        if self._counts_flush is None or len(counts) > MAX_UNCOUNTED:
            self._tally_soon()

    def _tally_soon(self) -> None:
        """Count the commands in /metrics within :data:`TALLY_DELAY` (at once when many
        different keywords wait).  A Prometheus counter's increment is a lock and three
        Python calls, a tenth of a NOOP's own work; a dict entry per keyword is not, and
        a scrape sees a command at most a second late (scrapes are 15 s apart or more),
        and a session's commands all before the reply that ends it (QUIT's) is sent, or
        once the connection drops."""
        if len(self._counts) > MAX_UNCOUNTED:
            self._tally()
        elif self._counts_flush is None:
            self._counts_flush = self.runtime.reactor.callLater(TALLY_DELAY, self._tally)

    def _tally(self) -> None:
        """Add the commands counted here to /metrics (by name; any other word is
        "other")."""
        if self._counts_flush is not None:
            if self._counts_flush.active():
                self._counts_flush.cancel()
            self._counts_flush = None
        counts, self._counts = self._counts, {}
        metrics = self.runtime.metrics
        if metrics is not None:
            for word, n in counts.items():
                metrics.pop3_command(_METRIC_NAMES.get(word.upper(), "other"), n)

    def _perform(self, out: bytes, action: Any) -> None:
        if out:
            self.reply(out)
        if action is None:
            return
        if isinstance(action, Close):
            self._tally()  # counted before the last reply leaves (QUIT, too many errors)
            self.close_connection()
        elif isinstance(action, StartTLS):
            self._start_tls()
        elif isinstance(action, Authenticate):
            self._wait(self._authenticate(action))
        elif isinstance(action, Stream):
            self._wait(self._stream(action))
        elif isinstance(action, Update):
            self._wait(self._update())

    def _wait(self, d: defer.Deferred[None]) -> None:
        """Hold further pipelined commands until ``d`` fires (replies stay in order)."""
        self.pauseProducing()

        def resume(_: object) -> None:
            if self.session.state is not State.CLOSED and self.tx.connected:
                self.wait_input()  # the time the command took is not the client's
                self.resumeProducing()

        d.addErrback(self._internal_error).addCallback(resume)

    def _internal_error(self, failure: Failure) -> None:
        log.failure("POP3: internal error for {peer}", failure, peer=self.peer)
        if self.session.state is State.LOGIN:
            self.session.state = State.AUTHORIZATION
        elif self.session.state is State.UPDATE:
            self.session.state = State.CLOSED
        self.reply(ERR_TEMP)
        if self.session.state is State.CLOSED:
            self.close_connection()

    # -- actions ----------------------------------------------------------------------------

    def _start_tls(self) -> None:
        dropped = self.clearLineBuffer()
        if dropped:
            log.warn(
                "POP3: discarded {n} bytes pipelined after STLS from {peer}",
                n=len(dropped),
                peer=self.peer,
            )
        self.begin_tls(self.runtime.tls)
        self.session.tls_started()

    @defer.inlineCallbacks
    def _authenticate(self, action: Authenticate) -> Any:
        result: LoginResult | None
        try:
            result = yield self.runtime.auth.login(
                action.username, action.password, self.peer, "pop3"
            )
        except Exception:
            log.failure("POP3: login check failed")
            result = None
        maildrop: Maildrop | None = None
        failure: Exception | None = None
        user = result.user if result is not None and result.outcome is Outcome.OK else None
        if user is not None and self.tx.connected:
            try:
                maildrop = yield self._open_maildrop(user)
            except Exception as e:  # MaildropInUse, LoginTooSoon, store errors
                failure = e
                if isinstance(e, MaildropInUse):
                    log.info(
                        "POP3: {user} from {peer} refused: maildrop in use",
                        user=user,
                        peer=self.peer,
                    )
                elif not isinstance(e, LoginTooSoon):
                    log_failure(log, e, "POP3: opening the maildrop of {user} failed", user=user)
        if not self.tx.connected:
            if maildrop is not None:
                maildrop.close()
            return
        step = self.session.login_finished(result, maildrop, failure)
        if self.session.maildrop is not None and self.deadline is not None:
            self.deadline.logged_in()
        if self.session.maildrop is not None:
            if self.admission is not None:
                # Leaves the pre-login per-IP count.  No per-user limit to check: the
                # maildrop lock already holds a user to one session (RFC 1939 8).
                self.admission.login(self.session.user or "")
            log.info(
                "POP3: {user} opened INBOX from {peer} ({n} messages)",
                user=self.session.user,
                peer=self.peer,
                n=len(self.session.maildrop),
            )
        self._perform(step.out, step.action)  # the answer to PASS, sent now

    def _open_maildrop(self, user: str) -> defer.Deferred[Maildrop | None]:
        """INBOX on the folder model IMAP uses (the runtime's one registry of open folders).

        The lock, the login delay, the listing of the messages with their sizes and -- when
        the folder is not open in this process -- the index's open (a build of 100,000 files,
        or a wait for the folder lock another process holds) happen in a worker thread
        (:func:`~mailsuite.pop3.maildrop.claim`), as IMAP's SELECT opens a cold folder: the
        reactor never waits on the disk for them, so the other sessions of the process go
        on meanwhile.  The maildrop is then made in the
        reactor thread (the registry is not thread-safe).  None when the client went away
        meanwhile: what was claimed is released."""
        cfg = self.session.options
        root = self.runtime.directory.mailbox_root(user)
        folders = self.runtime.folder_registry()
        reactor = self.runtime.reactor
        known = folders.find(root)  # open or warm here: its index is not opened again
        if known is not None and known.closed:
            known = None
        d = threads.deferToThreadPool(
            reactor,
            reactor.getThreadPool(),
            claim,
            root,
            login_delay=cfg.login_delay,
            open_index=known is None,
            writer=None if known is None else known.writer,
        )

        def claimed(c: Claim) -> Maildrop | None:
            if not self.tx.connected:
                c.release()
                return None
            return Maildrop(root, folders=folders, expiry=cfg.expiry, claimed=c)

        return d.addCallback(claimed)

    def _stream(self, stream: Stream) -> defer.Deferred[None]:
        """Send a big message (or TOP of one): read a piece, stuff it, write it, and wait
        whenever the transport is full, so a client that does not read holds one piece here
        (``mailsuite.flow``) and a slow reader slows only itself."""
        done: defer.Deferred[None] = defer.Deferred()
        flow = self.flow
        assert flow is not None

        def pump(_: object = None) -> None:
            try:
                while not flow.stopped:
                    data = stream.file.read(PIECE)
                    if not data:
                        self.reply(stream.stuffer.finish())
                        break
                    self.reply(stream.stuffer.feed(data))
                    self.wait_input()  # the client is reading: that is progress
                    wait = flow.wait_writable()
                    if wait is not None:
                        wait.addCallback(pump)
                        return
            except Exception:
                log.failure("POP3: reading a message for RETR failed")
                # The response has started: the only safe end is to drop the connection.
                self.close_connection()
            stream.file.close()
            done.callback(None)

        pump()
        return done

    def _update(self) -> defer.Deferred[None]:
        """The UPDATE state through the shared folder (in the reactor thread, like IMAP's
        EXPUNGE): other sessions of this process are told by the folder itself.  The lock is
        released before the reply, so a client that reconnects at once is not refused with
        [IN-USE]."""
        self._store_seen()  # a failure here is no reason to keep deleted messages
        md = self.session.maildrop
        self.session.maildrop = None
        try:
            try:
                expunged = md.commit()
            finally:
                md.close()
        except Exception as e:
            log_failure(log, e, "POP3: UPDATE for {user} failed", user=self.session.user)
            step = self.session.update_finished(None, e)
        else:
            if expunged:
                log.info(
                    "POP3: {user} deleted {n} messages", user=self.session.user, n=len(expunged)
                )
            step = self.session.update_finished(expunged)
        self._perform(step.out, step.action)
        return defer.succeed(None)


class POP3Factory(protocol.ServerFactory):
    noisy = False

    def __init__(self, runtime: Runtime, options: Options, implicit_tls: bool) -> None:
        self.runtime = runtime
        self.options = options
        self.implicit_tls = implicit_tls
        cfg = runtime.config.pop3
        # pop3 and pop3s count together ([pop3] max_connections ...)
        self.limits = shared_limits(
            runtime.connection_limits, "pop3", cfg.max_connections, cfg.max_connections_per_ip
        )

    def buildProtocol(self, addr: Any) -> POP3Protocol:
        p = POP3Protocol(
            self.runtime,
            self.options,
            self.implicit_tls,
            self.limits,
            login_timeout=self.runtime.config.pop3.login_timeout,
        )
        p.factory = self
        return p


def pop3_factory(runtime: Runtime, implicit_tls: bool) -> POP3Factory:
    """``[listen] pop3`` (110, STLS) and ``pop3s`` (995, TLS wrapped by service.py)."""
    cfg = runtime.config
    try:
        expiry = Expiry.parse(cfg.pop3.expire)
    except ValueError as e:
        raise ConfigError(f"{cfg.where}: [pop3] expire: {e}") from None
    options = Options(
        hostname=cfg.hostname,
        tls_available=runtime.tls is not None,
        allow_plaintext=cfg.auth.allow_plaintext,
        mark_seen=cfg.pop3.leave_on_server_mark_seen,
        expiry=expiry,
        login_delay=cfg.pop3.login_delay,
    )
    return POP3Factory(runtime, options, implicit_tls)
