"""The ESMTP protocol state machine (RFC 5321), without sockets and without Twisted.

Our own server, not ``twisted.mail.smtp.ESMTP``: that one executes commands pipelined after
STARTTLS, has an unbounded line buffer, turns long DATA lines into commands, accepts AUTH in
clear text and reorders pipelined replies when checks are asynchronous (research/
twisted-mail.md).  The I/O side is :mod:`mailsuite.smtp.protocol`; policy (relay, sender
binding, limits, mail authentication) is :mod:`mailsuite.smtp.policy`.

A :class:`Session` takes one command line at a time (:meth:`Session.line`) and returns a
:class:`Step`: the replies to send and, where the I/O side has work to do, an action: start
TLS, check a password, open the message file, switch to data mode, run the end-of-data
checks, make the message durable, close.  The I/O side fulfils the action and reports back
(:meth:`~Session.tls_started`, :meth:`~Session.login_finished`,
:meth:`~Session.message_opened`, :meth:`~Session.checks_done`,
:meth:`~Session.delivery_finished`), which returns the next step.  While an action is
pending the I/O side reads no further command (ordered replies under PIPELINING, RFC 2920).
Message data goes through :meth:`Session.data` chunk by chunk (decoded by
:class:`~mailsuite.smtp.data.DataReader`) and ends with :meth:`Session.end_of_data`.

Every reply carries an enhanced status code (RFC 2034, RFC 3463) except the greeting, EHLO/
HELO, 354 and 334, which RFC 2034 section 3 leaves without one.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from mailsuite.config import Config
from mailsuite.directory import LocalBox, Resolution, normalize
from mailsuite.smtp import replies as R
from mailsuite.smtp import sasl
from mailsuite.smtp.address import AddressError, Path, parse_path
from mailsuite.smtp.data import DataReader
from mailsuite.smtp.headers import HeaderEdit, header_edit
from mailsuite.smtp.policy import Lookup, Profile, ReceivedMessage, Recipient, Verdict
from mailsuite.smtp.replies import Reply
from mailsuite.smtp.trace import clean_helo, new_id, protocol_name, received_field


class State(enum.Enum):
    CONNECTED = "connected"  # greeted; no EHLO/HELO yet
    READY = "ready"  # EHLO/HELO done, no mail transaction
    MAIL = "mail"  # MAIL accepted, no recipient yet
    RCPT = "rcpt"  # at least one recipient accepted
    SASL = "sasl"  # AUTH: the next line is the client's SASL response (RFC 4954 4)
    LOGIN = "login"  # credentials being checked (action Login)
    OPENING = "opening"  # DATA: the message file being opened (action OpenMessage)
    DATA = "data"  # message data arriving (action ReceiveData)
    CHECKING = "checking"  # the data has ended; end-of-data checks running (CheckMessage)
    DELIVERING = "delivering"  # the message being made durable (action Deliver)
    CLOSED = "closed"


#: States in which a line from the client is a command.
COMMAND_STATES = frozenset({State.CONNECTED, State.READY, State.MAIL, State.RCPT})


@dataclass(frozen=True)
class Options:
    """Protocol settings of one listener (from ``[server]``, ``[smtp]``, ``[auth]``)."""

    hostname: str = "localhost"
    max_message_size: int = 50 * 1024 * 1024  # RFC 1870 SIZE
    max_line_length: int = 998  # RFC 5321 4.5.3.1.6, without CRLF
    max_errors: int = 10
    tls_available: bool = False  # a certificate is loaded: STARTTLS may be offered
    allow_plaintext: bool = False  # [auth] allow_plaintext: AUTH before TLS
    #: is this client address in ``[relay] trusted_networks``? (asked only when a check
    #: needs to know: parsing the address costs more than most sessions need)
    trusted_network: Callable[[str], bool] | None = None

    @classmethod
    def from_config(cls, config: Config, tls_available: bool) -> Options:
        return cls(
            hostname=config.hostname,
            max_message_size=config.smtp.max_message_size,
            max_line_length=config.smtp.max_line_length,
            max_errors=config.smtp.max_errors,
            tls_available=tls_available,
            allow_plaintext=config.auth.allow_plaintext,
            trusted_network=config.relay.is_trusted,
        )


# -- actions for the I/O side ------------------------------------------------------------------


@dataclass(frozen=True)
class StartTLS:
    """After the replies: drop every byte the client sent after the command (RFC 3207 4.2,
    CVE-2011-0411), start the handshake, then call :meth:`Session.tls_started`."""


@dataclass(frozen=True)
class Close:
    """Close the connection after the replies."""


@dataclass(frozen=True)
class Login:
    """Check these credentials (with the failed-login throttling); report with
    :meth:`Session.login_finished`."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class OpenMessage:
    """DATA: open the message file for :attr:`Session.transaction` (its first line is
    :meth:`Session.received_field`); report with :meth:`Session.message_opened`."""


@dataclass(frozen=True)
class ReceiveData:
    """After the 354: read raw data and give it to :meth:`Session.data` until it ends."""


@dataclass(frozen=True)
class CheckMessage:
    """Run the profile's end-of-data checks on ``message`` (a coroutine:
    ``session.profile.policy.end_of_data(session, message)``); report the verdict with
    :meth:`Session.checks_done` (an exception: a verdict refusing with a 451)."""

    message: ReceivedMessage


@dataclass(frozen=True)
class Deliver:
    """Make the message durable for every recipient: ``body_8bit`` is the envelope's final
    8-bit flag, ``header`` an edit of the header section the end-of-data checks asked for,
    ``junk`` local copies into the Junk folder.  Report with :meth:`Session.delivery_finished`
    (with the delivery's refusal, if it made one)."""

    body_8bit: bool
    junk: bool = False
    header: HeaderEdit | None = None


@dataclass(frozen=True)
class AbortMessage:
    """Drop the message file (refused at the end of the data)."""


Action = (
    StartTLS | Close | Login | OpenMessage | ReceiveData | CheckMessage | Deliver | AbortMessage
)


@dataclass(frozen=True)
class Step:
    """Replies to send, in order, then the action (if any), and lines for the log."""

    replies: tuple[Reply, ...] = ()
    action: Action | None = None
    log: tuple[str, ...] = ()

    @property
    def out(self) -> bytes:
        replies = self.replies
        if len(replies) == 1:
            return replies[0].encode()
        return b"".join(r.encode() for r in replies)


@dataclass(frozen=True, slots=True)
class DataChunk:
    """What :meth:`Session.data` made of some raw data: ``store`` (LF line ends; ``newlines``
    LF bytes in it) to append to the message; ``drop`` True when the message just went over
    the size limit (drop what was stored, keep reading); ``rest`` not None once the data has
    ended: the bytes after it (pipelined commands), to read in line mode after
    :meth:`Session.end_of_data`."""

    store: bytes
    newlines: int
    drop: bool
    rest: bytes | None


class LoginAnswer(enum.Enum):
    OK = "ok"
    BAD_CREDENTIALS = "bad-credentials"
    THROTTLED = "throttled"  # too many failures from this address or for this user
    ERROR = "error"  # the check itself failed


@dataclass
class Transaction:
    """One mail transaction (MAIL .. end of data): the envelope and the state of its data.
    Replaced by a new one on MAIL, dropped by RSET, EHLO, STARTTLS and the end of data."""

    sender: Path
    smtputf8: bool = False
    body_8bit: bool = False  # BODY=8BITMIME declared (the data may set it too, see Deliver)
    recipients: list[str] = field(default_factory=list)  # accepted RCPTs, in order
    local: list[LocalBox] = field(default_factory=list)  # one per mailbox
    remote: list[str] = field(default_factory=list)  # one per address
    txid: str = ""
    reader: DataReader | None = None
    too_big: bool = False  # over the SIZE limit: nothing more is stored
    write_failed: bool = False  # storing failed: nothing more is stored, 451 at the end

    def add(self, address: str, resolution: Resolution) -> None:
        self.recipients.append(address)
        known = {box.user for box in self.local}
        for box in resolution.local:
            if box.user not in known:
                self.local.append(box)
                known.add(box.user)
        for remote in resolution.remote:
            if remote not in self.remote:
                self.remote.append(remote)


_GREETING = "{} ESMTP mailsuite ready"


class Session:
    """One SMTP connection's state.  ``tls`` is True on implicit-TLS listeners (465);
    ``trusted`` says whether the client is in ``[relay] trusted_networks`` (None: ask
    :attr:`Options.trusted_network` when a check wants to know)."""

    def __init__(
        self,
        options: Options,
        profile: Profile,
        lookup: Lookup,
        *,
        client_ip: str = "unknown",
        tls: bool = False,
        trusted: bool | None = None,
    ) -> None:
        self.options = options
        self.profile = profile
        self.lookup = lookup
        self.client_ip = client_ip
        self.tls = tls
        self._trusted = trusted
        self.state = State.CONNECTED
        self.helo: str | None = None
        self.esmtp = False
        self.user: str | None = None  # canonical address after a successful AUTH
        self.errors = 0
        self.transaction: Transaction | None = None
        self._sasl: sasl.Exchange | None = None

    # -- facts for the policy checks (mailsuite.smtp.policy.Facts) -------------------------

    @property
    def trusted(self) -> bool:
        if self._trusted is None:
            check = self.options.trusted_network
            self._trusted = check(self.client_ip) if check is not None else False
        return self._trusted

    @property
    def recipients(self) -> Sequence[str]:
        return self.transaction.recipients if self.transaction is not None else ()

    @property
    def auth_permitted(self) -> bool:
        """AUTH may be used now: the profile offers it and TLS is on (RFC 4954 4), or
        ``[auth] allow_plaintext`` says clear text is fine."""
        return self.profile.auth and (self.tls or self.options.allow_plaintext)

    def extensions(self) -> list[str]:
        """The EHLO keywords (RFC 5321 4.1.1.1) for the session as it is now."""
        ext = [
            "PIPELINING",  # RFC 2920
            f"SIZE {self.options.max_message_size}",  # RFC 1870
            "8BITMIME",  # RFC 6152
            "ENHANCEDSTATUSCODES",  # RFC 2034
            "SMTPUTF8",  # RFC 6531
        ]
        if self.options.tls_available and not self.tls:
            ext.append("STARTTLS")  # RFC 3207
        if self.auth_permitted and self.user is None:
            ext.append("AUTH " + " ".join(sasl.MECHANISMS))  # RFC 4954
        return ext

    # -- replies and errors ----------------------------------------------------------------

    def greeting(self) -> Step:
        """The 220 greeting, or the connect checks' refusal (then the session closes)."""
        verdict = self.profile.policy.connect(self)
        if verdict.reply is not None:
            return self._close(verdict.reply, _why(verdict))
        return Step((Reply(220, None, _GREETING.format(self.options.hostname)),))

    def _error(self, reply: Reply, log: tuple[str, ...] = ()) -> Step:
        """A client error: answer it, and hang up after too many (RFC 5321 4.3.2, 7.8)."""
        self.errors += 1
        if self.errors >= self.options.max_errors:
            return self._close(R.TOO_MANY_ERRORS, (*log, "too many errors"))
        return Step((reply,), log=log)

    def _refused(self, verdict: Verdict) -> Step:
        """A check refused a command: a permanent refusal counts as a client error."""
        assert verdict.reply is not None
        if verdict.reply.code == 421:  # RFC 5321 3.8: the server closes after a 421
            self.transaction = None
            return self._close(verdict.reply, _why(verdict))
        if verdict.reply.permanent:
            return self._error(verdict.reply, _why(verdict))
        return Step((verdict.reply,), log=_why(verdict))

    def _close(self, reply: Reply, log: tuple[str, ...] = ()) -> Step:
        self.state = State.CLOSED
        return Step((reply,), Close(), log)

    def _idle(self) -> State:
        return State.READY if self.helo is not None else State.CONNECTED

    def _end_transaction(
        self, reply: Reply, action: Action | None = None, log: tuple[str, ...] = ()
    ) -> Step:
        self.transaction = None
        self.state = self._idle()
        return Step((reply,), action, log)

    # -- input -----------------------------------------------------------------------------

    def line(self, raw: bytes) -> Step:
        """One line from the client, without its CRLF."""
        state = self.state
        if state is State.SASL:
            return self._sasl_line(raw)
        if not (
            state is State.READY
            or state is State.MAIL
            or state is State.RCPT
            or state is State.CONNECTED
        ):  # COMMAND_STATES, by identity (hot path)
            if state is State.CLOSED:
                return Step()
            # The I/O side reads no line while an action is pending: a bug, not the client's.
            return Step((R.INTERNAL_ERROR,))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return self._error(R.SYNTAX.with_text("Command is not valid UTF-8"))
        if "\r" in text or "\n" in text or "\x00" in text:
            return self._error(R.SYNTAX.with_text("Bare CR, LF or NUL in a command"))
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        command = COMMANDS.get(verb) if verb.isalpha() else None
        if command is None or (verb == "AUTH" and not self.profile.auth):
            return self._error(R.UNKNOWN_COMMAND)
        # MAIL and RCPT parse their own spaces (RFC 5321 4.1.2 allows none after the colon
        # but a space before a parameter is significant).
        return command(self, arg if verb in ("MAIL", "RCPT") else arg.strip(" "))

    # -- commands without a transaction ---------------------------------------------------

    def _ehlo(self, arg: str) -> Step:
        if not arg:
            return self._error(R.SYNTAX.with_text("EHLO needs a domain or address literal"))
        return self._hello(arg, esmtp=True)

    def _helo(self, arg: str) -> Step:
        if not arg:
            return self._error(R.SYNTAX.with_text("HELO needs a domain"))
        return self._hello(arg, esmtp=False)

    def _hello(self, arg: str, esmtp: bool) -> Step:
        name = clean_helo(arg.split(" ")[0])
        verdict = self.profile.policy.helo(self, name)
        if verdict.reply is not None:
            return self._refused(verdict)
        self.transaction = None  # RFC 5321 4.1.4: EHLO/HELO reset the transaction
        self.helo = name
        self.esmtp = esmtp
        self.state = State.READY
        text = f"{self.options.hostname} greets {name}"
        if esmtp:
            text = "\n".join([text, *self.extensions()])
        return Step((Reply(250, None, text),))

    def _noop(self, arg: str) -> Step:
        return Step((R.OK,))

    def _rset(self, arg: str) -> Step:
        return self._end_transaction(R.RESET)

    def _quit(self, arg: str) -> Step:
        return self._close(R.BYE)

    def _vrfy(self, arg: str) -> Step:
        return Step((R.VRFY,))  # RFC 5321 7.3: do not disclose which users exist

    def _expn(self, arg: str) -> Step:
        return Step((R.NOT_IMPLEMENTED.with_text("EXPN is not available"),))

    def _help(self, arg: str) -> Step:
        return Step((R.HELP,))

    def _starttls(self, arg: str) -> Step:
        if arg:
            return self._error(R.SYNTAX.with_text("STARTTLS takes no argument"))
        if not self.options.tls_available:
            return self._error(R.TLS_UNAVAILABLE)
        if self.tls:
            return self._error(R.BAD_SEQUENCE)
        return Step((R.READY_TLS,), StartTLS())

    def tls_started(self) -> None:
        """The I/O side switched to TLS: forget everything learned before, even an AUTH done
        in clear text under ``allow_plaintext``; the client must EHLO again (RFC 3207 4.2)."""
        self.tls = True
        self.helo = None
        self.esmtp = False
        self.user = None
        self.transaction = None
        self._sasl = None
        self.state = State.CONNECTED

    # -- AUTH (RFC 4954) ------------------------------------------------------------------

    def _auth(self, arg: str) -> Step:
        if not self.auth_permitted:
            return self._error(R.TLS_REQUIRED)
        if self.helo is None or not self.esmtp:
            return self._error(R.AUTH_NEEDS_EHLO)
        if self.user is not None:
            return self._error(R.AUTH_TWICE)  # RFC 4954 4: once per session
        if self.transaction is not None:
            return self._error(R.AUTH_IN_TRANSACTION)  # RFC 4954 4
        mechanism, _, initial = arg.partition(" ")
        if not mechanism or " " in initial:
            return self._error(R.SYNTAX.with_text("Usage: AUTH mechanism [initial-response]"))
        exchange = sasl.Exchange()
        return self._sasl_step(exchange, exchange.start(mechanism, initial or None))

    def _sasl_line(self, raw: bytes) -> Step:
        """A base64 response line, never parsed as a command nor logged."""
        exchange = self._sasl
        assert exchange is not None
        try:
            text = raw.decode("ascii").strip(" ")
        except UnicodeDecodeError:
            text = "\x00"  # not base64: answered as a syntax error
        return self._sasl_step(exchange, exchange.respond(text))

    def _sasl_step(self, exchange: sasl.Exchange, step: sasl.Step) -> Step:
        if isinstance(step, sasl.Challenge):
            self._sasl = exchange
            self.state = State.SASL
            return Step((Reply(334, None, step.text),))
        self._sasl = None
        self.state = State.READY
        if isinstance(step, sasl.Failed):
            if step.kind == "cancelled":
                return Step((R.AUTH_CANCELLED,))
            if step.kind == "mechanism":
                return self._error(R.AUTH_MECHANISM)
            return self._error(R.AUTH_SYNTAX.with_text(step.text))
        creds = step.credentials
        username = creds.authcid
        if creds.authzid and not _same_user(creds.authzid, creds.authcid):
            # RFC 4616 2: acting as another identity is not supported (an authzid naming the
            # user itself is fine); fails like a wrong password, and counts as one.
            username = ""
        self.state = State.LOGIN
        return Step(action=Login(username, creds.password))

    def login_finished(self, answer: LoginAnswer, user: str | None = None) -> Step:
        """The outcome of :class:`Login`; ``user`` is the canonical address when OK."""
        if self.state is not State.LOGIN:
            return Step()
        self.state = State.READY
        if answer is LoginAnswer.OK and user:
            self.user = user
            return Step((R.AUTH_OK,))
        if answer is LoginAnswer.THROTTLED:
            return Step((R.AUTH_THROTTLED,))
        if answer is LoginAnswer.ERROR:
            return Step((R.AUTH_TEMP,))
        return self._error(R.AUTH_BAD)

    # -- the mail transaction -------------------------------------------------------------

    def _mail(self, arg: str) -> Step:
        if self.helo is None:
            return self._error(R.NEED_EHLO)
        if self.transaction is not None:
            return self._error(R.NESTED_MAIL)
        if self.profile.requires_auth:
            if not self.auth_permitted:
                return self._error(R.TLS_REQUIRED)  # RFC 3207 4: 530 5.7.0
            if self.user is None:
                return self._error(R.AUTH_REQUIRED)  # RFC 4954 6: 530 5.7.0
        try:
            path = parse_path(arg, "FROM:", allow_null=True, utf8_ok=self.esmtp)
        except AddressError as e:
            return self._error(Reply(e.code, e.enhanced, str(e)))
        params = self._mail_parameters(path)
        if isinstance(params, Reply):
            return self._error(params)
        smtputf8, body_8bit = params
        if not path.address.isascii() and not smtputf8:
            return self._error(R.UTF8_NEEDS_PARAM)  # RFC 6531 3.4
        verdict = self.profile.policy.mail(self, path)
        if verdict.reply is not None:
            return self._refused(verdict)
        self.transaction = Transaction(path, smtputf8=smtputf8, body_8bit=body_8bit)
        self.state = State.MAIL
        return Step((R.SENDER_OK,))

    def _mail_parameters(self, path: Path) -> tuple[bool, bool] | Reply:
        """(SMTPUTF8, BODY=8BITMIME) from MAIL's parameters, or the reply refusing them."""
        smtputf8 = body_8bit = False
        for key, value in path.params.items():
            if not self.esmtp:
                return R.UNKNOWN_PARAM.with_text("Parameters need EHLO")
            if key == "SIZE":  # RFC 1870 6: refuse at once what will not fit
                if value is None or not value.isdigit() or len(value) > 20:
                    return R.SYNTAX.with_text("SIZE needs a number")
                if int(value) > self.options.max_message_size:
                    return R.TOO_BIG
            elif key == "BODY":  # RFC 6152 2
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return R.UNKNOWN_PARAM.with_text("BODY must be 7BIT or 8BITMIME")
                body_8bit = value.upper() == "8BITMIME"
            elif key == "SMTPUTF8" and value is None:  # RFC 6531 3.4
                smtputf8 = True
            else:
                return R.UNKNOWN_PARAM.with_text(f"Parameter not supported: {key}")
        return smtputf8, body_8bit

    def _rcpt(self, arg: str) -> Step:
        txn = self.transaction
        if txn is None:
            return self._error(R.NEED_MAIL)
        try:
            path = parse_path(arg, "TO:", allow_null=False, utf8_ok=self.esmtp)
        except AddressError as e:
            postmaster = self._bare_postmaster(arg)
            if postmaster is None:
                return self._error(Reply(e.code, e.enhanced, str(e)))
            path = postmaster
        if path.params:
            name = next(iter(path.params))
            return self._error(R.UNKNOWN_PARAM.with_text(f"Parameter not supported: {name}"))
        if not path.address.isascii() and not txn.smtputf8:
            return self._error(R.UTF8_NEEDS_PARAM)
        rcpt = Recipient(path, self.lookup)
        verdict = self.profile.policy.rcpt(self, rcpt)
        if verdict.reply is not None:
            return self._refused(verdict)
        route = self.profile.route
        txn.add(rcpt.address, rcpt.resolution if route is None else route(self, rcpt))
        self.state = State.RCPT
        return Step((R.RCPT_OK,))

    def _bare_postmaster(self, arg: str) -> Path | None:
        """RFC 5321 4.1.1.3: ``RCPT TO:<Postmaster>`` without a domain must be accepted."""
        if arg.strip().upper().replace(" ", "") != "TO:<POSTMASTER>":
            return None
        domains = self.lookup.domains()
        return Path(f"postmaster@{domains[0]}") if domains else None

    def _data(self, arg: str) -> Step:
        txn = self.transaction
        if txn is None:
            return self._error(R.NEED_MAIL)
        if not txn.recipients:
            return self._error(R.NEED_RCPT)  # refused RCPTs are not recorded
        txn.txid = new_id()
        self.state = State.OPENING
        return Step(action=OpenMessage())

    def received_field(self, tls_info: str | None, date: str) -> bytes:
        """Our Received field for the transaction (``tls_info`` from the transport)."""
        txn = self.transaction
        assert txn is not None and self.helo is not None
        protocol = protocol_name(
            esmtp=self.esmtp, smtputf8=txn.smtputf8, tls=self.tls, authenticated=bool(self.user)
        )
        return received_field(
            helo=self.helo,
            client_ip=self.client_ip,
            hostname=self.options.hostname,
            protocol=protocol,
            tls_info=tls_info,
            txid=txn.txid,
            recipients=txn.recipients,
            date=date,
        )

    def message_opened(self, ok: bool) -> Step:
        """The outcome of :class:`OpenMessage`: False when the store cannot take it now."""
        txn = self.transaction
        if self.state is not State.OPENING or txn is None:
            return Step()
        if not ok:
            self.state = State.RCPT  # the transaction stays: the client may try DATA again
            return Step((R.TEMP_FAILURE,))
        txn.reader = DataReader(max_line=self.options.max_line_length)
        self.state = State.DATA
        return Step((R.START_DATA,), ReceiveData())

    # -- the data -------------------------------------------------------------------------

    def data(self, raw: bytes) -> DataChunk:
        """Decode raw message data (RFC 5321 4.1.1.4, 4.5.2: only CRLF.CRLF ends it)."""
        txn = self.transaction
        if self.state is not State.DATA or txn is None or txn.reader is None:
            raise RuntimeError(f"data() in state {self.state.value}")
        reader = txn.reader
        newlines = reader.newlines
        out, rest = reader.feed(raw)
        drop = False
        if txn.too_big or txn.write_failed:
            out = b""
        elif out and reader.wire_size > self.options.max_message_size:
            # RFC 1870 4 counts the message as sent (CRLF), not as stored (LF).  Drop what
            # was stored and read on to the end, storing nothing, so that the 552 comes
            # where the client expects a reply (RFC 5321 4.1.1.4).
            txn.too_big = drop = True
            out = b""
        if rest is not None:
            self.state = State.CHECKING
        return DataChunk(out, reader.newlines - newlines if out else 0, drop, rest)

    def write_failed(self) -> None:
        """Storing the data failed: store nothing more; the end of data answers 451."""
        if self.transaction is not None:
            self.transaction.write_failed = True

    def end_of_data(self, read: Callable[[], Awaitable[bytes]], data: bytes | None = None) -> Step:
        """The data has ended (:attr:`DataChunk.rest` was not None).  ``read`` gives the
        stored message to the end-of-data checks, ``data`` the same when it is in memory
        (see :class:`ReceivedMessage`)."""
        txn = self.transaction
        if self.state is not State.CHECKING or txn is None or txn.reader is None:
            return Step()
        reader = txn.reader
        if txn.write_failed:
            return self._end_transaction(R.TEMP_FAILURE, AbortMessage())
        if txn.too_big:
            return self._end_transaction(R.TOO_BIG, AbortMessage())
        if reader.line_too_long:
            return self._end_transaction(R.LONG_LINE_DATA, AbortMessage())
        policy = self.profile.policy
        verdict = policy.data_headers(self, reader.header_bytes)
        if verdict.reply is not None:
            return self._end_transaction(verdict.reply, AbortMessage(), _why(verdict))
        if not policy.checks_messages:
            return self._deliver(verdict)
        message = ReceivedMessage(
            sender=txn.sender.address,
            recipients=tuple(txn.recipients),
            headers=reader.header_bytes,
            size=reader.size,
            read=read,
            data=data,
        )
        settled = policy.settle(self, message)
        if settled is not None:  # known at once: no action to wait for
            return self.checks_done(settled)
        return Step(action=CheckMessage(message))

    def checks_done(self, verdict: Verdict) -> Step:
        """The combined verdict of the end-of-data checks (:class:`CheckMessage`)."""
        if self.state is not State.CHECKING or self.transaction is None:
            return Step()
        if verdict.disconnect:
            # The message is dropped with the connection (the I/O side aborts it when the
            # connection is lost); the client gets no reply at all.
            self.transaction = None
            self.state = State.CLOSED
            return Step(action=Close(), log=_why(verdict))
        if verdict.reply is not None:
            if verdict.reply.code == 421:
                self.transaction = None
                return self._close(verdict.reply, _why(verdict))
            return self._end_transaction(verdict.reply, AbortMessage(), _why(verdict))
        return self._deliver(verdict)

    def _deliver(self, verdict: Verdict) -> Step:
        txn = self.transaction
        assert txn is not None and txn.reader is not None
        reader = txn.reader
        try:
            edit = header_edit(
                reader.header_bytes, reader.headers_complete, verdict.prepend, verdict.remove
            )
        except ValueError as e:
            return self._end_transaction(R.INTERNAL_ERROR, AbortMessage(), (str(e),))
        txn.body_8bit = txn.body_8bit or reader.eight_bit
        self.state = State.DELIVERING
        return Step(action=Deliver(body_8bit=txn.body_8bit, junk=verdict.junk, header=edit))

    def delivery_finished(self, ok: bool, refusal: Reply | None = None) -> Step:
        """The outcome of :class:`Deliver`: 250 only once the message is durable; ``refusal``
        instead when the delivery refused the message -- the only recipient's Sieve script
        rejected it (RFC 5429 2.1: ``550 5.7.1`` with the script's reason; nothing stored), or
        the disk was full (452 4.3.1); 451 4.3.0 for any other failure."""
        txn = self.transaction
        if self.state is not State.DELIVERING or txn is None or txn.reader is None:
            return Step()
        if not ok:
            return self._end_transaction(refusal or R.TEMP_FAILURE)
        log = (
            f"{txn.txid} from=<{txn.sender.address}> to={','.join(txn.recipients)} "
            f"size={txn.reader.size} ip={self.client_ip}"
        )
        if refusal is not None:
            why = f"{refusal.code} {refusal.enhanced or ''} {refusal.text}".replace("  ", " ")
            return self._end_transaction(refusal, None, (f"{log} refused by delivery: {why}",))
        reply = R.OK.with_text(f"Message accepted for delivery as {txn.txid}")
        return self._end_transaction(reply, None, (log,))

    def connection_lost(self) -> None:
        """The client went away.  A message past its end of data is not the client's any
        more: its checks and delivery finish (and are logged), only the reply is not sent."""
        self._sasl = None
        if self.state not in (State.CHECKING, State.DELIVERING):
            self.state = State.CLOSED


def _why(verdict: Verdict) -> tuple[str, ...]:
    return (verdict.reason,) if verdict.reason else ()


def _same_user(a: str, b: str) -> bool:
    try:
        return normalize(a) == normalize(b)
    except ValueError:
        return False


#: The command table: verb -> handler.  AUTH is answered as unknown on profiles without it.
COMMANDS: dict[str, Callable[[Session, str], Step]] = {
    "EHLO": Session._ehlo,
    "HELO": Session._helo,
    "MAIL": Session._mail,
    "RCPT": Session._rcpt,
    "DATA": Session._data,
    "RSET": Session._rset,
    "NOOP": Session._noop,
    "QUIT": Session._quit,
    "VRFY": Session._vrfy,
    "EXPN": Session._expn,
    "HELP": Session._help,
    "STARTTLS": Session._starttls,
    "AUTH": Session._auth,
}
