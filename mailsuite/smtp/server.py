"""Our ESMTP server: the MX (port 25) and submission (587/465) profiles.

Written on ``basic.LineReceiver`` instead of reusing ``twisted.mail.smtp.ESMTP``, whose
``LineOnlyReceiver`` framing executes commands pipelined after STARTTLS, has an unbounded line
buffer and turns long DATA lines into commands (see README, "Why not twisted.mail").  Here:

* replies are answered strictly in order: while a command's answer is pending (end of DATA
  waits for fsync), the protocol is paused and later pipelined commands wait in the buffer;
* STARTTLS throws away anything the client sent after the command (CVE-2011-0411 class);
* DATA is read in raw mode and decoded by :class:`mailsuite.smtp.data.DataReader` (only
  CRLF.CRLF ends a message) and streamed to disk, never held whole in memory;
* every reply carries an enhanced status code (RFC 2034/3463);
* every command line and every 64 KiB of DATA has a deadline fixed when the server starts
  waiting for it, the whole session another (:mod:`mailsuite.deadline`): a client trickling
  bytes is cut as soon as one that sends nothing (RFC 5321 4.5.3.2), with 421 4.4.2.
"""

from __future__ import annotations

import itertools
import os
import time
from email.utils import formatdate
from typing import Any

from twisted.internet import defer, error, interfaces, protocol
from twisted.logger import Logger
from twisted.protocols import basic
from twisted.python.failure import Failure

from mailsuite.connection_limits import Admission, Refusal, shared_limits
from mailsuite.deadline import COMMAND, DATA, SESSION, ReadDeadline
from mailsuite.delivery import DeliveryError, Envelope, IncomingMessage
from mailsuite.directory import LocalBox, Resolution, split_address
from mailsuite.runtime import Runtime
from mailsuite.smtp import replies as R
from mailsuite.smtp.address import AddressError, Path, parse_path
from mailsuite.smtp.data import DataReader
from mailsuite.tls import lose_connection, peer_tls_info

log = Logger(namespace="mailsuite.smtp")

#: RFC 5321 4.5.3.1.4 allows 512 octets per command line; ESMTP parameters and SMTPUTF8
#: addresses may need more (RFC 5321 4.5.3.1.4: extensions may raise it).  Anything longer
#: is answered 500 and the connection closed (it cannot be resynchronised safely).
MAX_COMMAND_LINE = 2048
_ids = itertools.count(int(time.time() * 1000) % 1_000_000)


def _new_id() -> str:
    """A short transaction id for logs and the Received header."""
    n = (int(time.time()) << 20) | (next(_ids) & 0xFFFFF)
    digits = "0123456789BCDFGHJKLMNPQRSTVWXYZ"
    out = ""
    while n:
        n, r = divmod(n, len(digits))
        out = digits[r] + out
    return out + f"{os.getpid() % 1000:03d}"


def _clean_helo(name: str) -> str:
    """A HELO argument made safe for a Received header (no spaces, controls or parens)."""
    allowed = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:[]"
    cleaned = "".join(c if c in allowed else "_" for c in name[:255])
    return cleaned or "unknown"


class SMTPServer(basic.LineReceiver):
    """One SMTP session.  ``profile`` is ``"mx"`` or ``"submission"``."""

    delimiter = b"\r\n"
    MAX_LENGTH = MAX_COMMAND_LINE

    def __init__(self, runtime: Runtime, profile: str, implicit_tls: bool) -> None:
        self.runtime = runtime
        self.config = runtime.config
        self.profile = profile
        self.implicit_tls = implicit_tls
        self.tls_active = implicit_tls
        self.helo: str | None = None
        self.esmtp = False
        self.authenticated_user: str | None = None
        self.errors = 0
        self.peer_ip = "unknown"
        self.admission: Admission | None = None
        self._write_failed = False
        self._io_paused = False
        self.deadline: ReadDeadline | None = None
        self._reset()

    # -- connection ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer_ip = getattr(peer, "host", "unknown")
        self.admission = self.factory.limits.admit(self.peer_ip)
        if self.admission.refused is not None:
            # RFC 5321 3.1 / 4.2.5: 421 instead of the greeting, then close.
            log.info("smtp: {ip} refused: {limit} reached", ip=self.peer_ip,
                     limit=self.admission.refused.value)
            self.reply(R.TOO_MANY_CONNECTIONS if self.admission.refused is Refusal.PER_IP
                       else R.SERVER_BUSY)
            self.transport.loseConnection()
            return
        self.deadline = ReadDeadline(
            self.runtime.reactor,
            self.deadline_expired,
            login=self.login_timeout(),
            session=self.config.smtp.session_timeout,
        )
        self.deadline.wait(self.config.smtp.timeout)
        try:
            self.transport.setTcpNoDelay(True)  # answer small replies at once (Nagle costs ms)
        except (AttributeError, OSError, error.UnsupportedAddressFamily, NotImplementedError):
            pass
        self.reply(R.Reply(220, None, f"{self.config.hostname} ESMTP mailsuite ready"))

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        if self.admission is not None:
            self.admission.release()
        if self.message is not None:
            self.message.abort()
            self.message = None

    def dataReceived(self, data: bytes) -> None:
        if self.admission is None or self.admission.refused is not None:
            return  # refused at connect: nothing the client sends is acted on
        super().dataReceived(data)

    # -- deadlines (RFC 5321 4.5.3.2) ---------------------------------------------------------

    def login_timeout(self) -> int | None:
        """Seconds from connect until the client must have logged in (None: no login)."""
        return None

    def deadline_expired(self, why: str) -> None:
        """A command line, a data block, the login or the session took too long: 421."""
        log.info("smtp: {why} timeout for {ip}", why=why, ip=self.peer_ip)
        what = "connection time limit" if why == SESSION else "timeout"
        self.reply(R.TIMEOUT.with_text(f"{self.config.hostname} Error: {what} exceeded"))
        lose_connection(self.transport)  # over TLS too: not waiting for a slow peer's close

    def pauseProducing(self) -> None:  # noqa: N802
        """Input waits while a command is answered (pipelining order); the time that takes
        is ours, not the client's: only the session and login caps run meanwhile."""
        super().pauseProducing()
        if self.deadline is not None:
            self.deadline.hold()

    def resumeProducing(self) -> None:  # noqa: N802
        if self.deadline is not None:
            self.deadline.wait(self.config.smtp.timeout)  # the next command's deadline
        super().resumeProducing()

    def reply(self, reply: R.Reply, *more: str) -> None:
        self.transport.write(reply.lines(*more))

    def lineLengthExceeded(self, line: bytes) -> None:
        self.reply(R.LINE_TOO_LONG)
        self.transport.loseConnection()

    def _error(self, reply: R.Reply) -> None:
        """Answer a client error and hang up after too many of them (RFC 5321 7.8 / 4.3.2)."""
        self.errors += 1
        if self.errors >= self.config.smtp.max_errors:
            self.reply(R.TOO_MANY_ERRORS)
            log.info("smtp: too many errors from {ip}", ip=self.peer_ip)
            self.transport.loseConnection()
            return
        self.reply(reply)

    # -- transaction state -----------------------------------------------------------------

    def _reset(self) -> None:
        self.sender: Path | None = None
        self.smtputf8 = False
        self.body_8bit_declared = False
        self.local: list[LocalBox] = []
        self.remote: list[str] = []
        self.rcpt_addresses: list[str] = []
        self.message: IncomingMessage | None = None
        self.reader: DataReader | None = None
        self.too_big = False

    # -- commands --------------------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        assert self.deadline is not None
        self.deadline.wait(self.config.smtp.timeout, COMMAND)  # the next line's deadline
        self.command_line(line)

    def command_line(self, line: bytes) -> None:
        """One complete command line (the submission profile also reads AUTH responses)."""
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._error(R.SYNTAX.with_text("Command is not valid UTF-8"))
            return
        if "\r" in text or "\n" in text or "\x00" in text:
            self._error(R.SYNTAX.with_text("Bare CR, LF or NUL in a command"))
            return
        verb, _, arg = text.partition(" ")
        handler = getattr(self, f"smtp_{verb.upper()}", None) if verb.isalpha() else None
        if handler is None:
            self._error(R.UNKNOWN_COMMAND)
            return
        try:
            handler(arg.strip(" ") if verb.upper() not in ("MAIL", "RCPT") else arg)
        except Exception:
            log.failure(
                "smtp: internal error on {verb} from {ip}", verb=verb.upper(), ip=self.peer_ip
            )
            self.reply(R.Reply(451, "4.3.0", "Internal error, try again later"))

    def _extensions(self) -> list[str]:
        ext = [
            "PIPELINING",
            f"SIZE {self.config.smtp.max_message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
        ]
        if self.runtime.tls is not None and not self.tls_active:
            ext.append("STARTTLS")
        ext.extend(self.auth_extensions())
        return ext

    def auth_extensions(self) -> list[str]:
        """AUTH mechanisms to advertise (none on the MX profile; see the submission module)."""
        return []

    def smtp_EHLO(self, arg: str) -> None:
        if not arg:
            self._error(R.SYNTAX.with_text("EHLO needs a domain or address literal"))
            return
        self._reset()
        self.helo = _clean_helo(arg.split(" ")[0])
        self.esmtp = True
        self.reply(
            R.Reply(250, None, f"{self.config.hostname} greets {self.helo}"), *self._extensions()
        )

    def smtp_HELO(self, arg: str) -> None:
        if not arg:
            self._error(R.SYNTAX.with_text("HELO needs a domain"))
            return
        self._reset()
        self.helo = _clean_helo(arg.split(" ")[0])
        self.esmtp = False
        self.reply(R.Reply(250, None, f"{self.config.hostname} greets {self.helo}"))

    def smtp_NOOP(self, arg: str) -> None:
        self.reply(R.OK)

    def smtp_RSET(self, arg: str) -> None:
        self._reset()
        self.reply(R.RESET)

    def smtp_QUIT(self, arg: str) -> None:
        self.reply(R.BYE)
        self.transport.loseConnection()

    def smtp_VRFY(self, arg: str) -> None:
        self.reply(R.VRFY)  # RFC 5321 7.3: do not disclose which users exist

    def smtp_EXPN(self, arg: str) -> None:
        self.reply(R.NOT_IMPLEMENTED.with_text("EXPN is not available"))

    def smtp_HELP(self, arg: str) -> None:
        self.reply(R.HELP)

    def smtp_STARTTLS(self, arg: str) -> None:
        if arg:
            self._error(R.SYNTAX.with_text("STARTTLS takes no argument"))
            return
        if self.tls_active or self.runtime.tls is None:
            self._error(R.TLS_UNAVAILABLE if self.runtime.tls is None else R.BAD_SEQUENCE)
            return
        # Anything the client pipelined after STARTTLS was sent in clear text and must not be
        # executed inside the TLS session (RFC 3207 section 4.2, CVE-2011-0411).
        self.clearLineBuffer()
        self.reply(R.READY_TLS)
        self.transport.startTLS(self.runtime.tls)
        self.tls_active = True
        # RFC 3207 4.2: forget everything learned before TLS, the client must EHLO again.
        self.helo = None
        self.esmtp = False
        self._reset()

    # Overridden by the submission profile.
    def mail_allowed(self) -> R.Reply | None:
        """None when MAIL may proceed, else the refusal (e.g. 530 authentication required)."""
        return None

    def sender_allowed(self, sender: Path) -> R.Reply | None:
        return None

    def smtp_MAIL(self, arg: str) -> None:
        if self.helo is None:
            self._error(R.NEED_EHLO)
            return
        if self.sender is not None:
            self._error(R.NESTED_MAIL)
            return
        refusal = self.mail_allowed()
        if refusal is not None:
            self._error(refusal)
            return
        try:
            path = parse_path(arg, "FROM:", allow_null=True, utf8_ok=self.esmtp)
        except AddressError as e:
            self._error(R.Reply(e.code, e.enhanced, str(e)))
            return
        smtputf8 = False
        body_8bit = False
        for key, value in path.params.items():
            if not self.esmtp:
                self._error(R.UNKNOWN_PARAM.with_text("Parameters need EHLO"))
                return
            if key == "SIZE":
                if value is None or not value.isdigit() or len(value) > 20:
                    self._error(R.SYNTAX.with_text("SIZE needs a number"))
                    return
                if int(value) > self.config.smtp.max_message_size:
                    self._error(R.TOO_BIG)
                    return
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    self._error(R.UNKNOWN_PARAM.with_text("BODY must be 7BIT or 8BITMIME"))
                    return
                body_8bit = value.upper() == "8BITMIME"
            elif key == "SMTPUTF8" and value is None:
                smtputf8 = True
            else:
                self._error(R.UNKNOWN_PARAM.with_text(f"Parameter not supported: {key}"))
                return
        if not path.address.isascii() and not smtputf8:
            self._error(R.UTF8_NEEDS_PARAM)
            return
        refusal = self.sender_allowed(path)
        if refusal is not None:
            self._error(refusal)
            return
        self.sender = path
        self.smtputf8 = smtputf8
        self.body_8bit_declared = body_8bit
        self.reply(R.SENDER_OK)

    def may_relay(self) -> bool:
        """Remote recipients are allowed for authenticated users and trusted networks only."""
        return self.authenticated_user is not None or self.config.relay.is_trusted(self.peer_ip)

    def smtp_RCPT(self, arg: str) -> None:
        if self.sender is None:
            self._error(R.NEED_MAIL)
            return
        try:
            path = parse_path(arg, "TO:", allow_null=False, utf8_ok=self.esmtp)
        except AddressError as e:
            # RFC 5321 4.1.1.3: "<Postmaster>" without a domain must be accepted.
            if (
                arg.strip().upper().replace(" ", "") == "TO:<POSTMASTER>"
                and self.runtime.directory.domains()
            ):
                path = Path(f"postmaster@{self.runtime.directory.domains()[0]}")
            else:
                self._error(R.Reply(e.code, e.enhanced, str(e)))
                return
        if path.params:
            self._error(
                R.UNKNOWN_PARAM.with_text(f"Parameter not supported: {next(iter(path.params))}")
            )
            return
        if not path.address.isascii() and not self.smtputf8:
            self._error(R.UTF8_NEEDS_PARAM)
            return
        if len(self.rcpt_addresses) >= self.config.smtp.max_recipients:
            self.reply(R.TOO_MANY_RCPTS)
            return
        _, domain = split_address(path.address)
        directory = self.runtime.directory
        if directory.is_local_domain(domain):
            resolution = directory.resolve(path.address)
            if resolution.unknown:
                self._error(R.UNKNOWN_USER)
                return
        else:
            if not self.may_relay():
                log.info(
                    "smtp: relay denied from {ip} for {rcpt}", ip=self.peer_ip, rcpt=path.address
                )
                self._error(R.RELAY_DENIED)
                return
            resolution = Resolution(remote=[path.address])
        if resolution.remote and self.runtime.queue is None:
            self.reply(R.NO_REMOTE)
            return
        self._add_recipient(path.address, resolution)
        self.reply(R.RCPT_OK)

    def _add_recipient(self, address: str, resolution: Resolution) -> None:
        self.rcpt_addresses.append(address)
        known = {box.user for box in self.local}
        for box in resolution.local:
            if box.user not in known:
                self.local.append(box)
                known.add(box.user)
        for remote in resolution.remote:
            if remote not in self.remote:
                self.remote.append(remote)

    def smtp_DATA(self, arg: str) -> None:
        if self.sender is None:
            self._error(R.NEED_MAIL)
            return
        if not self.local and not self.remote:
            self._error(R.NEED_RCPT)  # refused RCPTs are not recorded: none was accepted
            return
        envelope = Envelope(
            sender=self.sender.address,
            local=list(self.local),
            remote=list(self.remote),
            smtputf8=self.smtputf8,
            body_8bit=self.body_8bit_declared,
        )
        message = IncomingMessage(self.runtime, envelope, self._received_header())
        try:
            message.check()
        except OSError as e:
            log.error("smtp: cannot store the message: {e}", e=e)
            self.reply(R.TEMP_FAILURE)
            return
        self.message = message
        self.reader = DataReader(max_line=self.config.smtp.max_line_length)
        self.reply(R.START_DATA)
        self.setRawMode()
        assert self.deadline is not None
        # RFC 5321 4.5.3.2.5: a deadline per data block, not per message: a big message
        # that keeps arriving is fine, a trickle is not (see mailsuite.deadline.DATA_BLOCK).
        self.deadline.wait(self.config.smtp.timeout, DATA)

    def rawDataReceived(self, data: bytes) -> None:
        reader, message = self.reader, self.message
        assert reader is not None and message is not None and self.deadline is not None
        self.deadline.data(len(data))
        newlines = reader.newlines
        out, rest = reader.feed(data)
        if out and not self.too_big:
            if reader.wire_size > self.config.smtp.max_message_size:
                # RFC 1870 counts the message as sent (CRLF), not as stored (LF).  Drop what
                # was written at once and read on to the end of the data, storing nothing,
                # so the 552 comes where the client expects a reply (RFC 5321 4.1.1.4).
                self.too_big = True
                message.abort()
            else:
                try:
                    message.write_body(out, reader.newlines - newlines)
                except OSError as e:
                    log.error("smtp: writing the message failed: {e}", e=e)
                    self.too_big = True
                    self._write_failed = True
                if message.backlog and not self._io_paused:
                    drained = message.when_drained()
                    if not drained.called:  # the disk is behind: stop reading until it catches up
                        self._io_paused = True
                        self.transport.pauseProducing()
                        self.deadline.hold()  # waiting for our disk is not the client's time
                        drained.addCallback(self._io_resume)
        if rest is None:
            return
        self.pauseProducing()  # later pipelined commands wait until this one is answered
        self.setLineMode(rest)
        d = self._end_of_data()
        d.addBoth(self._answer_and_resume)

    def _io_resume(self, _: object) -> None:
        self._io_paused = False
        if self.transport is not None and not self.paused and not self.transport.disconnecting:
            if self.deadline is not None:
                self.deadline.wait(self.config.smtp.timeout, DATA)
            self.transport.resumeProducing()

    def _end_of_data(self) -> defer.Deferred[R.Reply]:
        reader, message = self.reader, self.message
        assert reader is not None and message is not None
        self.message = None
        if self._write_failed:
            self._write_failed = False
            message.abort()
            return defer.succeed(R.TEMP_FAILURE)
        if self.too_big:
            message.abort()
            return defer.succeed(R.TOO_BIG)
        if reader.line_too_long:
            message.abort()
            return defer.succeed(R.LONG_LINE_DATA)
        hops = _count_received(reader.header_bytes) + 1
        if hops > self.config.smtp.max_hops:
            message.abort()
            return defer.succeed(R.TOO_MANY_HOPS)
        refusal = self.message_allowed(reader.header_bytes)
        if refusal is not None:
            message.abort()
            return defer.succeed(refusal)
        message.envelope.body_8bit = message.envelope.body_8bit or reader.eight_bit
        txid = self._txid
        rcpts = list(self.rcpt_addresses)
        d = message.finish()

        def done(_: object) -> R.Reply:
            log.info(
                "smtp: {id} from=<{sender}> to={rcpts} size={size} ip={ip}",
                id=txid,
                sender=message.envelope.sender,
                rcpts=",".join(rcpts),
                size=reader.size,
                ip=self.peer_ip,
            )
            return R.OK.with_text(f"Message accepted for delivery as {txid}")

        def failed(f: Failure) -> R.Reply:
            if f.check(OSError, DeliveryError):
                # The store or the queue cannot be written (full, read-only, broken
                # folder): an operating condition, not a bug; the client retries on 451.
                log.error("smtp: delivery of {id} failed: {error}", id=txid, error=f.value)
            else:
                log.failure("smtp: delivery of {id} failed", f, id=txid)
            return R.TEMP_FAILURE

        return d.addCallbacks(done, failed)

    def message_allowed(self, headers: bytes) -> R.Reply | None:
        """Hook for checks on the header section (the submission profile binds From:)."""
        return None

    def _answer_and_resume(self, result: R.Reply | Failure) -> None:
        if isinstance(result, Failure):
            log.failure("smtp: end of data failed", result)
            result = R.TEMP_FAILURE
        self._reset()
        if not self.transport or self.transport.disconnecting:
            return
        self.reply(result)
        self.resumeProducing()

    # -- trace header ----------------------------------------------------------------------

    def protocol_name(self) -> str:
        """RFC 3848 / RFC 6531 3.7.3 "with" keyword."""
        if self.smtputf8:
            name = "UTF8SMTP"
        else:
            name = "ESMTP" if self.esmtp else "SMTP"
        if self.tls_active:
            name += "S"
        if self.authenticated_user is not None:
            name += "A"
        return name

    def _received_header(self) -> bytes:
        """RFC 5321 4.4 trace header; every part is validated or sanitised first."""
        self._txid = _new_id()
        tls = peer_tls_info(self.transport) if self.tls_active else None
        rcpt = f"\n\tfor <{self.rcpt_addresses[0]}>" if len(self.rcpt_addresses) == 1 else ""
        tls_part = f" ({tls})" if tls else ""
        header = (
            f"Received: from {self.helo} ([{self.peer_ip}])\n"
            f"\tby {self.config.hostname} (mailsuite) with {self.protocol_name()}{tls_part}\n"
            f"\tid {self._txid}{rcpt};\n"
            f"\t{formatdate(localtime=True)}\n"
        )
        return header.encode("utf-8")


def _count_received(headers: bytes) -> int:
    count = 0
    for line in headers.split(b"\n"):
        if line[:9].lower() == b"received:":
            count += 1
    return count


class SMTPFactory(protocol.ServerFactory):
    """Builds sessions of one profile.  Connections are counted per profile ("smtp" for the
    MX listeners, "submission" for 587 and 465 together) with the ``[smtp]`` limits, so a
    flood on port 25 cannot lock the users out of submission; ``[relay] trusted_networks``
    are exempt from the per-IP limit."""

    def __init__(self, runtime: Runtime, profile: str, implicit_tls: bool) -> None:
        self.runtime = runtime
        self.profile = profile
        self.implicit_tls = implicit_tls
        cfg = runtime.config
        self.limits = shared_limits(
            runtime.connection_limits,
            "smtp" if profile == "mx" else "submission",
            cfg.smtp.max_connections,
            cfg.smtp.max_connections_per_ip,
            exempt=cfg.relay.is_trusted,
        )

    def buildProtocol(self, addr: Any) -> SMTPServer:
        proto = self.protocol_class()(self.runtime, self.profile, self.implicit_tls)
        proto.factory = self
        return proto

    def protocol_class(self) -> type[SMTPServer]:
        return SMTPServer


def mx_factory(runtime: Runtime, implicit_tls: bool) -> interfaces.IProtocolFactory:
    """The receiving MX service (port 25 role): never offers AUTH."""
    return SMTPFactory(runtime, "mx", implicit_tls)


def submission_factory(runtime: Runtime, implicit_tls: bool) -> interfaces.IProtocolFactory:
    """The submission service (587/465 role), implemented in :mod:`mailsuite.smtp.submission`."""
    from mailsuite.smtp.submission import SubmissionFactory

    return SubmissionFactory(runtime, "submission", implicit_tls)
