"""The ESMTP server's Twisted side: the MX (port 25) and submission (587/465) listeners.

Written on ``basic.LineReceiver`` instead of reusing ``twisted.mail.smtp.ESMTP`` (see
:mod:`mailsuite.smtp.session` for why).  This module does only I/O: it feeds lines and data to
the :class:`~mailsuite.smtp.session.Session`, writes the replies it returns and fulfils its
actions (checking a password, storing the message, running the end-of-data checks) with the
reactor and runtime it was given.  Here:

* replies go out strictly in command order: while the session waits for an action's outcome
  (a login check, the end-of-data checks, the fsync before 250), input is paused and later
  pipelined commands wait in the buffer (RFC 2920);
* STARTTLS throws away anything the client sent after the command (RFC 3207 4.2,
  CVE-2011-0411 class);
* DATA is read in raw mode, decoded by the session's :class:`~mailsuite.smtp.data.DataReader`
  (only CRLF.CRLF ends a message) and streamed to disk, never held whole in memory; when the
  disk falls behind, reading from the client stops until it catches up;
* connections are counted per profile (``[smtp] max_connections`` and
  ``max_connections_per_ip``);
* every command line and every 64 KiB of DATA has a deadline fixed when the server starts
  waiting for it, the whole session another, and submission the login
  (:mod:`mailsuite.deadline`): a client trickling bytes is cut as soon as one that sends
  nothing (RFC 5321 4.5.3.2), with 421 4.4.2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, interfaces, protocol, tcp
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsuite.auth import LoginResult, Outcome
from mailsuite.connection_limits import Admission, ConnectionLimits, Refusal, shared_limits
from mailsuite.deadline import COMMAND, DATA, SESSION, ReadDeadline
from mailsuite.delivery import (
    JUNK,
    DeliveryError,
    DeliveryResult,
    Envelope,
    IncomingMessage,
)
from mailsuite.flow import GatedLineReceiver
from mailsuite.runtime import Runtime
from mailsuite.smtp import replies as R
from mailsuite.smtp.mailauth_checks import DKIMSigning, MailAuthCheck
from mailsuite.smtp.policy import Lookup, Profile, Verdict, mx_profile, submission_profile
from mailsuite.smtp.replies import Reply
from mailsuite.smtp.session import (
    AbortMessage,
    CheckMessage,
    Close,
    Deliver,
    Login,
    LoginAnswer,
    OpenMessage,
    Options,
    ReceiveData,
    Session,
    StartTLS,
    State,
    Step,
)
from mailsuite.smtp.trace import received_date
from mailsuite.store.space import is_disk_full
from mailsuite.tls import peer_tls_info
from mailsuite.transport import Transport, no_delay, transport_of

log = Logger(namespace="mailsuite.smtp")

#: RFC 5321 4.5.3.1.4 allows 512 octets per command line; ESMTP parameters and SMTPUTF8
#: addresses may need more (extensions may raise it).  Anything longer is answered 500 and
#: the connection closed (it cannot be resynchronised safely).
MAX_COMMAND_LINE = 2048

#: Bytes read from the socket per reactor turn while DATA arrives (Twisted reads 64 KiB).
#: Every read costs a trip through the reactor, the line receiver, the DATA decoder and the
#: message's buffer; a 1 MiB message in four reads instead of sixteen (measured: about a
#: fifth less CPU per 1 MiB message).  Only during DATA, when the server writes nothing: the
#: same attribute is the output size at which Twisted pauses a producer (mailsuite.flow).
DATA_READ_SIZE = 256 * 1024

#: Session states that wait for an action's outcome: no command is read meanwhile.
_WAITING = frozenset({State.LOGIN, State.CHECKING, State.DELIVERING})

#: The connection-count group of each profile (``Runtime.connection_limits``).
_COUNT_GROUP = {"mx": "smtp", "submission": "submission", "sandbox": "smtp"}


class SMTPProtocol(GatedLineReceiver):
    """One SMTP connection."""

    delimiter = b"\r\n"
    MAX_LENGTH = MAX_COMMAND_LINE
    _tx: Transport  # the connection's transport, from connectionMade on

    def __init__(
        self,
        runtime: Runtime,
        profile: Profile,
        options: Options,
        implicit_tls: bool,
        limits: ConnectionLimits | None = None,
    ) -> None:
        self.runtime = runtime
        self.config = runtime.config
        self.limits = limits if limits is not None else ConnectionLimits()
        lookup: Lookup = runtime.directory
        self.session = Session(options, profile, lookup, tls=implicit_tls)
        self.admission: Admission | None = None
        self.message: IncomingMessage | None = None
        self.peer_ip = "unknown"
        self.deadline: ReadDeadline | None = None
        self._held = False  # input paused until a pending action's outcome

    @property
    def _name(self) -> str:
        return self.session.profile.name

    # -- connection life --------------------------------------------------------------------

    def connectionMade(self) -> None:
        self._tx = transport_of(self)  # typed, and looked up once
        peer = self._tx.getPeer()
        self.peer_ip = getattr(peer, "host", "unknown")
        self.session.client_ip = self.peer_ip
        self.admission = self.limits.admit(self.peer_ip)
        if self.admission.refused is not None:
            # RFC 5321 3.1 / 4.2.5: 421 instead of the greeting, then close.
            log.info(
                "smtp: {ip} refused: {limit} reached",
                ip=self.peer_ip,
                limit=self.admission.refused.value,
            )
            self.session.state = State.CLOSED  # nothing the client sends is acted on
            per_ip = self.admission.refused is Refusal.PER_IP
            self._tx.write((R.TOO_MANY_CONNECTIONS if per_ip else R.SERVER_BUSY).encode())
            self._tx.loseConnection()
            return
        # replies wait unread no more than the transport's buffer: no command is read while
        # they do (mailsuite.flow), so a client pipelining EHLO without reading costs 64 KiB
        self.start_flow()
        smtp = self.config.smtp
        self.deadline = ReadDeadline(
            self.runtime.reactor,
            self._deadline_expired,
            # Like Dovecot's login processes: connect to AUTH within a few minutes, or go.
            login=smtp.login_timeout if self.session.profile.requires_auth else None,
            session=smtp.session_timeout,
        )
        self.deadline.wait(smtp.timeout)
        no_delay(self._tx)  # answer small replies at once (Nagle costs ms)
        self._perform(self.session.greeting())  # sent now (GatedLineReceiver.reply)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.stop_flow(self.runtime.heap_trim())
        if self.deadline is not None:
            self.deadline.cancel()
        self.session.connection_lost()
        if self.admission is not None:
            self.admission.release()
        if self.message is not None:
            self.message.abort()
            self.message = None

    def _deadline_expired(self, why: str) -> None:
        """A command line, a data block, the login or the session took too long: 421."""
        log.info("smtp: {why} timeout for {ip}", why=why, ip=self.peer_ip)
        what = "connection time limit" if why == SESSION else "timeout"
        reply = R.TIMEOUT.with_text(f"{self.config.hostname} Error: {what} exceeded")
        self.reply(reply.encode())
        self.hang_up()  # at once if the client does not even read

    def lineLengthExceeded(self, line: bytes) -> None:
        self.reply(R.LINE_TOO_LONG.encode())
        self.close_connection()

    # -- input ------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.session.state is State.CLOSED:
            return  # refused at connect, or closing: nothing the client sends is acted on
        GatedLineReceiver.dataReceived(self, data)  # its replies leave together at the end

    def lineReceived(self, line: bytes) -> None:
        if self.session.state is State.CLOSED:
            return
        assert self.deadline is not None
        self.deadline.wait(self.config.smtp.timeout, COMMAND)  # the next line's deadline
        try:
            step = self.session.line(line)
        except Exception:
            # Never the line in the log: in the SASL state it carries a password.
            log.failure(
                "smtp: internal error in state {state} from {ip}",
                state=self.session.state.value,
                ip=self.peer_ip,
            )
            self.reply(R.INTERNAL_ERROR.encode())
            return
        self._perform(step)

    def rawDataReceived(self, data: bytes) -> None:
        message, deadline = self.message, self.deadline
        assert message is not None and deadline is not None
        deadline.data(len(data))
        chunk = self.session.data(data)
        if chunk.drop:
            message.abort()  # over the size limit: drop what was stored, read on
        elif chunk.store:
            try:
                message.write_body(chunk.store, chunk.newlines)
            except OSError as e:
                log.error("smtp: writing the message failed: {e}", e=e)
                self.session.write_failed()
            if message.backlog and not self.input_held("disk"):
                drained = message.when_drained()
                if not drained.called:  # the disk is behind: stop reading until it catches up
                    self.hold_input("disk")
                    deadline.hold()  # waiting for our disk is not the client's time
                    drained.addCallback(self._io_resume)
        if chunk.rest is None:
            return
        self._hold()  # later pipelined commands wait until this message is answered
        self._data_reads(False)
        self.setLineMode(chunk.rest)
        step = self.session.end_of_data(message.contents, message.held())
        self._perform(self._counted(step))

    def _io_resume(self, _: object) -> None:
        if self.deadline is not None and not self._held:
            self.deadline.wait(self.config.smtp.timeout, DATA)
        self.release_input("disk")

    # -- output and actions -----------------------------------------------------------------

    def _log(self, step: Step) -> None:
        for line in step.log:
            log.info("{profile}: {ip}: {line}", profile=self._name, ip=self.peer_ip, line=line)

    def _perform(self, step: Step) -> None:
        """Log, send the replies (:meth:`GatedLineReceiver.reply`: gathered while a batch of
        input is handled, one send at its end), fulfil the action; hold input
        while the session waits."""
        if step.log:
            self._log(step)
        if step.replies:
            self.reply(step.out)
        action = step.action
        if action is not None:  # (closing and STARTTLS send the gathered replies first)
            _ACTIONS[type(action)](self, action)
        state = self.session.state
        if state is State.LOGIN or state is State.CHECKING or state is State.DELIVERING:
            self._hold()  # (the _WAITING states, compared by identity: this runs per reply)
        elif self._held:
            self._release()

    def _counted(self, step: Step) -> Step:
        """``step`` answers a message (its end of data, or DATA itself when the message
        cannot be stored): count its reply class for ``/metrics``."""
        metrics = self.runtime.metrics
        if step.replies and metrics is not None:
            metrics.smtp_message(self._name, step.replies[0].code)
        return step

    def _close(self, action: Close) -> None:
        # The connection's place in the limits is given back before the client can see the
        # close (what the listener's loseConnection wrapper does: service._release_on_close;
        # a close at once does not pass through it).  Then at once: nothing of this protocol
        # runs after a Close but the end of the batch (its replies are sent here first),
        # which knows the session is closed.
        if self.admission is not None:
            self.admission.release()
        self.close_connection(at_once=True)

    def _data_reads(self, on: bool) -> None:
        """Read :data:`DATA_READ_SIZE` at a time (``on``) or Twisted's default again.  Plain
        TCP only: over TLS the reads are the TLS layer's."""
        tx = self.transport
        if isinstance(tx, tcp.Connection):
            if on:
                tx.bufferSize = DATA_READ_SIZE
            else:
                tx.__dict__.pop("bufferSize", None)  # back to the class's value

    def _receive_data(self, action: ReceiveData) -> None:
        self.setRawMode()
        self._data_reads(True)
        if self.deadline is not None:
            # RFC 5321 4.5.3.2.5: a deadline per data block, not per message: a big message
            # that keeps arriving is fine, a trickle is not (mailsuite.deadline.DATA_BLOCK).
            self.deadline.wait(self.config.smtp.timeout, DATA)

    def _hold(self) -> None:
        """Input waits while a command is answered (pipelining order); the time that takes
        is ours, not the client's: only the session and login caps run meanwhile."""
        if not self._held:
            self._held = True
            self.pauseProducing()
            if self.deadline is not None:
                self.deadline.hold()

    def _release(self) -> None:
        if self._held and self.session.state is not State.CLOSED:
            self._held = False
            if self.transport is not None and not self._tx.disconnecting:
                if self.deadline is not None:
                    self.deadline.wait(self.config.smtp.timeout)  # the next command's
                self.resumeProducing()

    def _connected(self) -> bool:
        return bool(self.transport) and bool(self._tx.connected) and not self._tx.disconnecting

    def _start_tls(self, action: StartTLS) -> None:
        dropped = self.clearLineBuffer()
        if dropped:
            log.warn(
                "smtp: discarded {n} bytes pipelined after STARTTLS from {ip}",
                n=len(dropped),
                ip=self.peer_ip,
            )
        self.begin_tls(self.runtime.tls)
        self.session.tls_started()

    def _login(self, action: Login) -> None:
        try:
            d = self.runtime.auth.login(action.username, action.password, self.peer_ip, "smtp")
        except Exception:
            d = defer.fail()
        d.addCallbacks(self._logged_in, self._login_failed)

    def _logged_in(self, result: LoginResult) -> None:
        user = result.user if result.outcome is Outcome.OK else None
        if user is not None:
            answer = LoginAnswer.OK
            if self.admission is not None:
                self.admission.login(user)  # leaves the pre-login per-IP count
            if self.deadline is not None:
                self.deadline.logged_in()
        elif result.outcome is Outcome.THROTTLED:
            answer = LoginAnswer.THROTTLED
        else:
            answer = LoginAnswer.BAD_CREDENTIALS
        if self._connected():
            self._perform(self.session.login_finished(answer, user))

    def _login_failed(self, failure: Failure) -> None:
        log.failure(
            "{profile}: login check failed for {ip}", failure, profile=self._name, ip=self.peer_ip
        )
        if self._connected():
            self._perform(self.session.login_finished(LoginAnswer.ERROR))

    def _open_message(self, action: OpenMessage) -> None:
        session = self.session
        txn = session.transaction
        assert txn is not None
        envelope = Envelope(
            sender=txn.sender.address,
            local=list(txn.local),
            remote=list(txn.remote),
            smtputf8=txn.smtputf8,
            body_8bit=txn.body_8bit,
        )
        tls_info = peer_tls_info(self.transport) if session.tls else None
        received = session.received_field(tls_info, received_date())
        message = IncomingMessage(self.runtime, envelope, received)
        try:
            message.check()
        except OSError as e:
            log.error("smtp: cannot store the message: {e}", e=e)
            self._perform(self._counted(session.message_opened(False)))
            return
        self.message = message
        self._perform(session.message_opened(True))

    def _abort_message(self, action: AbortMessage | None = None) -> None:
        if self.message is not None:
            self.message.abort()
            self.message = None

    def _check_message(self, action: CheckMessage) -> None:
        """The end-of-data checks (mail authentication): a coroutine, run here."""
        policy = self.session.profile.policy
        d = defer.ensureDeferred(policy.end_of_data(self.session, action.message))

        def failed(failure: Failure) -> Verdict:
            if is_disk_full(failure.value):  # the message could not be written whole
                log.warn("smtp: message from {ip} not stored: the disk is full", ip=self.peer_ip)
                return Verdict(reply=R.NO_STORAGE, reason="the disk is full")
            log.failure("smtp: an end-of-data check failed for {ip}", failure, ip=self.peer_ip)
            return Verdict(reply=R.INTERNAL_ERROR, reason="end-of-data check failed")

        def decided(verdict: Verdict) -> None:
            if not self._connected():
                self._abort_message()  # no 250 can reach the client: it will send again
                return
            self._perform(self._counted(self.session.checks_done(verdict)))

        d.addErrback(failed).addCallback(decided)

    def _deliver(self, action: Deliver) -> None:
        message = self.message
        assert message is not None
        self.message = None  # from here on the message is the delivery's, whatever happens
        message.envelope.body_8bit = action.body_8bit
        txid = self.session.transaction.txid if self.session.transaction else "?"

        def settled(result: DeliveryResult | Failure) -> None:
            # one callback for both outcomes (a Deferred link less per message)
            if isinstance(result, Failure):
                delivered, reply = failed(result)
            else:
                delivered, reply = True, result.reply  # a refusal: the only recipient's
                # script rejected it
            step = self._counted(self.session.delivery_finished(delivered, reply))
            if self._connected():
                self._perform(step)  # the 250 leaves now, then the replies to the
                # pipelined commands its release lets through
            else:
                self._log(step)  # delivered (or not) all the same: say so

        def failed(f: Failure) -> tuple[bool, Reply | None]:
            if is_disk_full(f.value):
                # 452 4.3.1; nothing of the message stays on disk (IncomingMessage removed it)
                log.warn("smtp: {id} not stored: the disk is full", id=txid)
                return False, R.NO_STORAGE
            if f.check(OSError, DeliveryError):
                # The store or the queue cannot be written (full, read-only, broken
                # folder): an operating condition, not a bug; the client retries on 451.
                log.error("smtp: delivery of {id} failed: {error}", id=txid, error=f.value)
            else:
                log.failure("smtp: delivery of {id} failed", f, id=txid)
            return False, None

        finished = message.finish(head_edit=action.header, folder=JUNK if action.junk else None)
        finished.addBoth(settled)


#: How the adapter fulfils each kind of action the session asks for.
_ACTIONS: dict[type[Any], Callable[[SMTPProtocol, Any], None]] = {
    Close: SMTPProtocol._close,
    StartTLS: SMTPProtocol._start_tls,
    Login: SMTPProtocol._login,
    OpenMessage: SMTPProtocol._open_message,
    ReceiveData: SMTPProtocol._receive_data,
    CheckMessage: SMTPProtocol._check_message,
    Deliver: SMTPProtocol._deliver,
    AbortMessage: SMTPProtocol._abort_message,
}


class SMTPFactory(protocol.ServerFactory):
    """Builds sessions of one profile.  Connections are counted per profile ("smtp" for the
    MX listeners, "submission" for 587 and 465 together) with the ``[smtp]`` limits, so a
    flood on port 25 cannot lock the users out of submission; ``[relay] trusted_networks``
    are exempt from the per-IP limit."""

    def __init__(self, runtime: Runtime, profile: Profile, implicit_tls: bool) -> None:
        self.runtime = runtime
        self.profile = profile
        self.implicit_tls = implicit_tls
        cfg = runtime.config
        self.options = Options.from_config(cfg, tls_available=runtime.tls is not None)
        self.limits = shared_limits(
            runtime.connection_limits,
            _COUNT_GROUP[profile.name],
            cfg.smtp.max_connections,
            cfg.smtp.max_connections_per_ip if profile.limit_per_ip else 0,
            exempt=cfg.relay.is_trusted,
        )

    def buildProtocol(self, addr: Any) -> SMTPProtocol:
        proto = SMTPProtocol(
            self.runtime, self.profile, self.options, self.implicit_tls, self.limits
        )
        proto.factory = self
        return proto


def _has_queue(runtime: Runtime) -> Callable[[], bool]:
    return lambda: runtime.queue is not None


def _space_low(runtime: Runtime) -> Callable[[int], bool] | None:
    """The free-space rule of ``[smtp] min_free_space`` (``mailsuite.store.space``)."""
    return runtime.space.too_low if runtime.space is not None else None


def mx_factory(runtime: Runtime, implicit_tls: bool) -> interfaces.IProtocolFactory:
    """``[listen] smtp``: the receiving MX service (port 25 role); never offers AUTH.  Mail
    authentication checks inbound mail and signs what trusted networks relay."""
    profile = mx_profile(
        runtime.config, runtime.directory, _has_queue(runtime), _space_low(runtime)
    )
    if runtime.mail_auth is not None:
        signing = DKIMSigning(runtime.mail_auth, runtime.directory, trusted_only=True)
        check = MailAuthCheck(runtime.mail_auth, signing)
        p = profile
        profile = Profile(p.name, p.auth, p.requires_auth, p.policy.with_checks(check))
    return SMTPFactory(runtime, profile, implicit_tls)


def submission_factory(runtime: Runtime, implicit_tls: bool) -> interfaces.IProtocolFactory:
    """``[listen] submission`` (587, STARTTLS) and ``submissions`` (465, implicit TLS); mail
    from a local domain with a DKIM key is signed before it is made durable."""
    profile = submission_profile(
        runtime.config, runtime.directory, _has_queue(runtime), _space_low(runtime)
    )
    if runtime.mail_auth is not None:
        check = DKIMSigning(runtime.mail_auth, runtime.directory, trusted_only=False)
        p = profile
        profile = Profile(p.name, p.auth, p.requires_auth, p.policy.with_checks(check))
    return SMTPFactory(runtime, profile, implicit_tls)
