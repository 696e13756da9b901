"""Our SMTP client (one transaction per session), on ``basic.LineReceiver``: the transaction
driver.  The wire format (reply parsing, SIZE scan, the dot-stuffed body) is
:mod:`mailsuite.outbound.wire`, the results :mod:`mailsuite.outbound.result`.

Not twisted.mail.smtp.ESMTPClient: it dot-stuffs per 16 KiB chunk (a '.' line at a chunk boundary
smuggles commands to the next server), has no timeouts, and sends no SIZE/BODY/SMTPUTF8.

The queue calls :func:`deliver` once per MX host; the result says, per recipient, what the server
replied, and for the whole session how it ended, so the caller can retry, bounce or move on to the
next MX (:attr:`TransactionResult.try_next_mx`).
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer, endpoints
from twisted.internet.defer import Deferred
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsuite.outbound.downgrade import NotConvertible
from mailsuite.outbound.result import Outcome, Timeouts, TransactionResult
from mailsuite.outbound.wire import (
    CHUNK_SIZE,
    BodyProducer,
    ReplyError,
    ReplyReader,
    parse_extensions,
)
from mailsuite.smtp.replies import Reply
from mailsuite.tls import client_tls_options
from mailsuite.transport import LineReceiver, Transport, transport_of

__all__ = ["SMTPClientSession", "SessionParameters", "deliver"]

log = Logger()

_local = Reply.local


# --------------------------------------------------------------------------- the session


@dataclass(frozen=True)
class SessionParameters:
    """Everything one session needs to know (see :func:`deliver` for the meanings)."""

    host: str
    helo_name: str
    mail_from: str
    rcpts: tuple[str, ...]
    message_path: str
    size: int
    body_8bit: bool = False
    smtputf8: bool = False
    tls: str = "opportunistic"
    tls_verify: bool = False
    tls_client_context: Any = None
    auth: tuple[str, str] | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    chunk_size: int = CHUNK_SIZE
    #: Called when the body is 8-bit and the server lacks 8BITMIME: fires with (path, size)
    #: of a 7-bit copy, or fails with downgrade.NotConvertible (then 5.6.3 as without it).
    downgrade: Callable[[], Deferred[tuple[str, int]]] | None = None


#: How a 421 (RFC 5321 3.8: the server is closing) ends the session, by stage.
_CLOSED_AT = {
    "greeting": Outcome.GREETING_REFUSED,
    "ehlo": Outcome.HELO_REFUSED,
    "mail": Outcome.MAIL_REFUSED,
    "rcpt": Outcome.MAIL_REFUSED,
    "data": Outcome.DATA_REFUSED,
    "data-end": Outcome.DATA_REFUSED,
    "auth": Outcome.AUTH_FAILED,
    "starttls": Outcome.TLS_FAILED,
    "tls": Outcome.HELO_REFUSED,
}


class SMTPClientSession(LineReceiver):
    """One SMTP session: greeting, EHLO/HELO, STARTTLS, AUTH, one transaction, QUIT.

    ``done`` fires with a :class:`TransactionResult` once the connection has closed.
    """

    delimiter = b"\n"  # tolerate servers that end lines with a bare LF; CR is stripped
    MAX_LENGTH = 65536

    def __init__(self, params: SessionParameters, clock: Any) -> None:
        self.params = params
        self.clock = clock
        self.done: Deferred[TransactionResult] = Deferred()
        self.extensions: dict[str, str] = {}
        self.tls_active = False
        self.address: str | None = None
        self.port = 25
        self._stage = "greeting"
        self._replies = ReplyReader()
        self._expect: deque[Callable[[Reply], None]] = deque()
        self._timer: Any = None
        self._result: TransactionResult | None = None
        self._rcpt_replies: dict[str, Reply] = {}
        self._mail_reply: Reply | None = None
        self._pipelined = False
        self._producer: BodyProducer | None = None
        self._closing = False
        self._lines_of_last_reply: list[str] = []
        self._plain_token = ""
        self._downgraded = False

    # -- plumbing

    @property
    def _tx(self) -> Transport:
        return transport_of(self)

    def connectionMade(self) -> None:
        peer = self._tx.getPeer()
        self.address = getattr(peer, "host", None)
        self.port = getattr(peer, "port", 25)
        self._expect.append(self._on_greeting)
        self._arm(self.params.timeouts.greeting)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.clock.callLater(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _progress(self) -> None:
        """The transport wants more body: restart the data block timer."""
        self._arm(self.params.timeouts.data_block)

    def _send(self, line: str, *, secret: bool = False, shown: str | None = None) -> None:
        if secret:
            log.debug("SMTP C: {line}", line=shown or "(credentials)")
        else:
            log.debug("SMTP C: {line}", line=line)
        self._tx.write(self._encode(line) + b"\r\n")

    def _encode(self, line: str) -> bytes:
        return line.encode("utf-8")

    def lineReceived(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if self._closing and not self._expect:
            return
        try:
            complete = self._replies.feed(line)
        except ReplyError as e:
            self._fail(Outcome.PROTOCOL_ERROR, _local(451, "4.5.0", str(e)), abort=True)
            return
        if complete is None:
            return
        reply, lines = complete
        log.debug("SMTP S: {reply}", reply=reply)
        if not self._expect:
            if reply.code == 421:
                self._fail(Outcome.CONNECTION_LOST, reply, abort=False, quit=False)
            else:
                self._fail(
                    Outcome.PROTOCOL_ERROR,
                    _local(451, "4.5.0", f"unexpected reply: {reply}"),
                    abort=True,
                )
            return
        handler = self._expect.popleft()
        self._lines_of_last_reply = lines
        if reply.code == 421 and handler != self._on_quit:
            # RFC 5321 3.8: the server is closing the session.
            self._fail(
                _CLOSED_AT.get(self._stage, Outcome.CONNECTION_LOST), reply, abort=False, quit=False
            )
            return
        handler(reply)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._fail(Outcome.PROTOCOL_ERROR, _local(451, "4.5.0", "reply line too long"), abort=True)

    def _timed_out(self) -> None:
        self._timer = None
        if self._result is not None:  # QUIT unanswered: just go
            self._tx.abortConnection()
            return
        # After the final dot the message may or may not have been delivered (RFC 5321 6.1
        # accepts the duplicate risk): report temporary failure.
        self._fail(
            Outcome.TIMEOUT,
            _local(451, "4.4.2", f"timeout waiting for the server ({self._stage})"),
            abort=True,
        )

    def _fail(
        self, outcome: Outcome, reply: Reply, *, abort: bool = False, quit: bool = True
    ) -> None:
        if self._result is not None:
            return
        recipients = {}
        for rcpt in self.params.rcpts:
            existing = self._rcpt_replies.get(rcpt)
            if existing is not None and not existing.positive:
                recipients[rcpt] = existing
            else:
                recipients[rcpt] = (
                    reply
                    if not reply.positive
                    else _local(451, "4.4.2", "transaction not completed")
                )
        self._finish(outcome, reply, recipients, abort=abort, quit=quit)

    def _finish(
        self,
        outcome: Outcome,
        reply: Reply,
        recipients: dict[str, Reply],
        *,
        abort: bool = False,
        quit: bool = True,
    ) -> None:
        self._result = TransactionResult(
            outcome=outcome,
            reply=reply,
            stage=self._stage,
            recipients=recipients,
            host=self.params.host,
            address=self.address,
            port=self.port,
            tls=self.tls_active,
            extensions=dict(self.extensions),
            downgraded=self._downgraded,
        )
        self._expect.clear()
        if self._producer is not None:
            self._producer.stopProducing()
            self._producer = None
        self._closing = True
        if abort:
            self._disarm()
            self._tx.abortConnection()
        elif quit:
            self._expect.append(self._on_quit)
            self._arm(self.params.timeouts.quit)
            self._send("QUIT")
        else:
            self._disarm()
            self._tx.loseConnection()

    def _on_quit(self, reply: Reply) -> None:
        self._disarm()
        self._tx.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._disarm()
        if self._producer is not None:
            self._producer.stopProducing()
            self._producer = None
        if self._result is None:
            if self._stage == "tls":
                outcome = Outcome.TLS_FAILED
                reply = _local(451, "4.7.5", f"TLS negotiation failed: {reason.value}")
            else:
                outcome = Outcome.CONNECTION_LOST
                reply = _local(451, "4.4.2", f"connection lost ({self._stage}): {reason.value}")
            self._closing = True
            self._fail(outcome, reply, abort=False, quit=False)
        result = self._result
        assert result is not None
        if not self.done.called:
            self.done.callback(result)

    # -- the dialogue

    def _on_greeting(self, reply: Reply) -> None:
        if reply.code != 220:
            self._fail(Outcome.GREETING_REFUSED, reply)
            return
        self._ehlo()

    def _ehlo(self) -> None:
        self._stage = "ehlo" if not self.tls_active else "tls"
        self._expect.append(self._on_ehlo)
        self._arm(self.params.timeouts.command)
        self._send(f"EHLO {self.params.helo_name}")

    def _on_ehlo(self, reply: Reply) -> None:
        if reply.positive:
            self._stage = "ehlo"
            self.extensions = parse_extensions(self._lines_of_last_reply)
            self._after_hello()
        elif reply.permanent and not self.tls_active:
            # RFC 5321 3.2: fall back to HELO when EHLO is not recognized.
            self._expect.append(self._on_helo)
            self._arm(self.params.timeouts.command)
            self._send(f"HELO {self.params.helo_name}")
        else:
            self._fail(Outcome.HELO_REFUSED, reply)

    def _on_helo(self, reply: Reply) -> None:
        if not reply.positive:
            self._fail(Outcome.HELO_REFUSED, reply)
            return
        self.extensions = {}
        self._after_hello()

    def _after_hello(self) -> None:
        p = self.params
        if not self.tls_active and p.tls in ("opportunistic", "required"):
            if "STARTTLS" in self.extensions:
                self._stage = "starttls"
                self._expect.append(self._on_starttls)
                self._arm(p.timeouts.command)
                self._send("STARTTLS")
                return
            if p.tls == "required":
                self._fail(
                    Outcome.TLS_FAILED,
                    _local(451, "4.7.4", "TLS required but STARTTLS not offered"),
                )
                return
        if p.auth is not None:
            self._start_auth()
            return
        self._start_mail()

    def _on_starttls(self, reply: Reply) -> None:
        if reply.code != 220:
            if self.params.tls == "required":
                self._fail(Outcome.TLS_FAILED, reply)
                return
            # RFC 3207 4.1: the client may go on without TLS when the server refuses it.
            self.extensions.pop("STARTTLS", None)
            self._stage = "ehlo"
            self._after_hello_without_tls()
            return
        self._stage = "tls"
        self.clearLineBuffer()  # RFC 3207 4.2: nothing the server said before counts
        self._tx.startTLS(self._tls_context())
        self.tls_active = True
        self.extensions = {}
        self._ehlo()  # RFC 3207 4.2: forget everything, EHLO again

    def _after_hello_without_tls(self) -> None:
        if self.params.auth is not None:
            self._start_auth()
        else:
            self._start_mail()

    def _tls_context(self) -> Any:
        p = self.params
        if p.tls_client_context is not None:
            return p.tls_client_context
        # TLS >= 1.2 and SNI either way; verification against the system trust store or none
        return client_tls_options(p.host, p.tls_verify)

    # -- AUTH (RFC 4954), only over TLS

    def _start_auth(self) -> None:
        assert self.params.auth is not None
        self._stage = "auth"
        if not self.tls_active:
            self._fail(
                Outcome.AUTH_FAILED, _local(451, "4.7.0", "will not send credentials without TLS")
            )
            return
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        user, password = self.params.auth
        self._arm(self.params.timeouts.command)
        if "PLAIN" in mechanisms:
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
            self._plain_token = token
            self._expect.append(self._on_auth_plain)
            self._send(f"AUTH PLAIN {token}", secret=True, shown="AUTH PLAIN ****")
        elif "LOGIN" in mechanisms:
            self._expect.append(self._on_auth_login_user)
            self._send("AUTH LOGIN")
        else:
            self._fail(
                Outcome.AUTH_FAILED,
                _local(451, "4.7.4", "server offers no AUTH mechanism we use (PLAIN, LOGIN)"),
            )

    def _on_auth_plain(self, reply: Reply) -> None:
        if reply.code == 334:  # a server that wants the response after an empty challenge
            self._expect.append(self._on_auth_done)
            self._arm(self.params.timeouts.command)
            self._send(self._plain_token, secret=True)
            return
        self._on_auth_done(reply)

    def _on_auth_login_user(self, reply: Reply) -> None:
        if reply.code != 334:
            self._on_auth_done(reply)
            return
        assert self.params.auth is not None
        self._expect.append(self._on_auth_login_password)
        self._arm(self.params.timeouts.command)
        self._send(base64.b64encode(self.params.auth[0].encode()).decode("ascii"), secret=True)

    def _on_auth_login_password(self, reply: Reply) -> None:
        if reply.code != 334:
            self._on_auth_done(reply)
            return
        assert self.params.auth is not None
        self._expect.append(self._on_auth_done)
        self._arm(self.params.timeouts.command)
        self._send(base64.b64encode(self.params.auth[1].encode()).decode("ascii"), secret=True)

    def _on_auth_done(self, reply: Reply) -> None:
        if reply.code != 235:
            if reply.code == 334:  # more challenges than we know how to answer: cancel
                self._expect.append(self._on_auth_done)
                self._send("*")
                return
            self._fail(Outcome.AUTH_FAILED, reply)
            return
        self._start_mail()

    # -- the transaction

    def _start_mail(self) -> None:
        p = self.params
        self._stage = "mail"
        ext = self.extensions
        needs_utf8 = p.smtputf8 or not all(a.isascii() for a in (p.mail_from, *p.rcpts))
        size_limit = ext.get("SIZE", "")
        if size_limit.isdigit() and int(size_limit) > 0 and p.size > int(size_limit):
            # RFC 1870 6: do not send what the server has said it will not take.
            self._fail(
                Outcome.MESSAGE_UNSENDABLE,
                _local(
                    552, "5.3.4", f"message size {p.size} exceeds the server's limit {size_limit}"
                ),
            )
            return
        if needs_utf8 and "SMTPUTF8" not in ext:
            # RFC 6531 3.2: no downgrade of internationalized addresses/headers.
            self._fail(
                Outcome.MESSAGE_UNSENDABLE,
                _local(553, "5.6.7", "message needs SMTPUTF8 and the server does not offer it"),
            )
            return
        if p.body_8bit and "8BITMIME" not in ext:
            # RFC 6152 3: an 8-bit body may only go to a server that offers 8BITMIME; convert
            # it to 7 bit when we can, else return it.
            if p.downgrade is not None:
                self._convert(p.downgrade)
                return
            self._fail(
                Outcome.MESSAGE_UNSENDABLE,
                _local(554, "5.6.3", "8-bit message and the server does not offer 8BITMIME"),
            )
            return
        params = []
        if "SIZE" in ext:
            params.append(f"SIZE={p.size}")
        if p.body_8bit:
            params.append("BODY=8BITMIME")
        if needs_utf8:
            params.append("SMTPUTF8")
        mail = f"MAIL FROM:<{p.mail_from}>" + "".join(" " + x for x in params)
        self._pipelined = "PIPELINING" in ext
        if self._pipelined:
            # RFC 2920 3.1: MAIL and the RCPTs as one group; replies come back in order.
            self._expect.append(self._on_mail)
            for i in range(len(p.rcpts)):
                self._expect.append(self._rcpt_handler(i))
            self._arm(p.timeouts.mail + p.timeouts.rcpt)
            lines = [mail] + [f"RCPT TO:<{r}>" for r in p.rcpts]
            for line in lines:
                log.debug("SMTP C: {line}", line=line)
            self._tx.write(b"".join(self._encode(x) + b"\r\n" for x in lines))
        else:
            self._expect.append(self._on_mail)
            self._arm(p.timeouts.mail)
            self._send(mail)

    def _convert(self, downgrade: Callable[[], Deferred[tuple[str, int]]]) -> None:
        """Have a 7-bit copy made (in a thread, by the caller), then go on with MAIL."""
        self._arm(self.params.timeouts.command)  # the server may not wait forever either

        def converted(result: tuple[str, int]) -> None:
            if self._result is not None:
                return  # the session ended meanwhile
            path, size = result
            self._downgraded = True
            self.params = dataclasses.replace(
                self.params, message_path=path, size=size, body_8bit=False, downgrade=None
            )
            self._start_mail()

        def failed(f: Failure) -> None:
            if self._result is not None:
                return
            if f.check(NotConvertible):
                self._fail(
                    Outcome.MESSAGE_UNSENDABLE,
                    _local(
                        554,
                        "5.6.3",
                        "8-bit message, the server does not offer 8BITMIME, and it "
                        f"cannot be converted to 7 bit: {f.value}",
                    ),
                )
            else:
                log.failure("converting the message to 7 bit failed", f)
                self._fail(
                    Outcome.MESSAGE_UNSENDABLE,
                    _local(451, "4.3.0", f"converting the message to 7 bit failed: {f.value}"),
                )

        downgrade().addCallbacks(converted, failed)

    def _rcpt_handler(self, i: int) -> Callable[[Reply], None]:
        def handler(reply: Reply) -> None:
            self._on_rcpt(i, reply)

        return handler

    def _on_mail(self, reply: Reply) -> None:
        self._mail_reply = reply
        if self._pipelined:
            self._stage = "rcpt"
            self._arm(self.params.timeouts.rcpt)
            return
        if not reply.positive:
            self._fail(Outcome.MAIL_REFUSED, reply)
            return
        self._send_rcpt(0)

    def _send_rcpt(self, i: int) -> None:
        self._stage = "rcpt"
        self._expect.append(self._rcpt_handler(i))
        self._arm(self.params.timeouts.rcpt)
        self._send(f"RCPT TO:<{self.params.rcpts[i]}>")

    def _on_rcpt(self, i: int, reply: Reply) -> None:
        rcpts = self.params.rcpts
        assert self._mail_reply is not None
        if self._mail_reply.positive:
            self._rcpt_replies[rcpts[i]] = reply
        if i + 1 < len(rcpts):
            if self._pipelined:
                self._arm(self.params.timeouts.rcpt)
            else:
                self._send_rcpt(i + 1)
            return
        if not self._mail_reply.positive:
            self._stage = "mail"
            self._fail(Outcome.MAIL_REFUSED, self._mail_reply)
            return
        if not any(r.positive for r in self._rcpt_replies.values()):
            refused = self._rcpt_replies[rcpts[-1]]
            self._finish(Outcome.ALL_RECIPIENTS_REFUSED, refused, dict(self._rcpt_replies))
            return
        self._stage = "data"
        self._expect.append(self._on_data)
        self._arm(self.params.timeouts.data_init)
        self._send("DATA")

    def _on_data(self, reply: Reply) -> None:
        if reply.code != 354:
            self._fail(
                Outcome.DATA_REFUSED,
                reply
                if not reply.positive
                else _local(451, "4.5.0", f"unexpected reply to DATA: {reply}"),
            )
            return
        try:
            f = Path(self.params.message_path).open("rb")  # noqa: SIM115 - closed by the producer
        except OSError as e:
            # Cannot abandon DATA politely once 354 came; close without the final dot.
            self._fail(
                Outcome.MESSAGE_UNSENDABLE,
                _local(451, "4.3.0", f"cannot read message: {e}"),
                abort=True,
            )
            return
        self._stage = "data"
        self._producer = BodyProducer(
            self._tx, f, self.params.chunk_size, self._progress, self._body_sent
        )
        self._arm(self.params.timeouts.data_block)
        self._tx.registerProducer(self._producer, False)

    def _body_sent(self) -> None:
        self._producer = None
        self._tx.unregisterProducer()
        self._stage = "data-end"
        self._expect.append(self._on_data_end)
        self._arm(self.params.timeouts.data_term)

    def _on_data_end(self, reply: Reply) -> None:
        recipients = {}
        for rcpt in self.params.rcpts:
            rcpt_reply = self._rcpt_replies[rcpt]
            recipients[rcpt] = reply if rcpt_reply.positive else rcpt_reply
        outcome = Outcome.DELIVERED if reply.positive else Outcome.DATA_REFUSED
        self._stage = "done" if reply.positive else "data-end"
        self._finish(outcome, reply, recipients)


# --------------------------------------------------------------------------- entry point


def _endpoint(
    reactor: Any, address: str, port: int, timeout: float, source_address: str | None
) -> Any:
    bind = (source_address, 0) if source_address else None
    if ipaddress.ip_address(address).version == 6:
        return endpoints.TCP6ClientEndpoint(
            reactor, address, port, timeout=timeout, bindAddress=bind
        )
    return endpoints.TCP4ClientEndpoint(reactor, address, port, timeout=timeout, bindAddress=bind)


def deliver(
    reactor: Any,
    host: str,
    port: int,
    addresses: Sequence[str],
    helo_name: str,
    mail_from: str,
    rcpts: Sequence[str],
    message_path: str | os.PathLike[str],
    *,
    size: int | None = None,
    body_8bit: bool = False,
    smtputf8: bool = False,
    tls: str = "opportunistic",
    tls_verify: bool = False,
    tls_client_context: Any = None,
    auth: tuple[str, str] | None = None,
    timeouts: Timeouts = Timeouts(),
    source_address: str | None = None,
    chunk_size: int = CHUNK_SIZE,
    downgrade: Callable[[], Deferred[tuple[str, int]]] | None = None,
) -> Deferred[TransactionResult]:
    """Deliver one stored message to one host; never fails, always fires a TransactionResult.

    ``host`` is the MX name (TLS server name); ``addresses`` its IPs, tried in order until one
    accepts the TCP connection. ``mail_from`` "" is the null sender. ``size`` is the SIZE= value
    (RFC 1870; :func:`scan_message` computes it, default: the file's size). ``body_8bit`` sends
    BODY=8BITMIME (if not offered: ``downgrade`` (see SessionParameters) is asked for a 7-bit
    copy; without one, 5.6.3); ``smtputf8`` (or a non-ASCII address) sends SMTPUTF8.
    ``tls``: "opportunistic" (STARTTLS when offered; if the handshake fails,
    one plaintext retry unless ``tls_verify``), "required" (temporary failure without TLS) or
    "none". ``tls_verify`` uses ``optionsForClientTLS(host)``; ``tls_client_context`` overrides
    both contexts. ``auth`` (user, password) is only ever sent over TLS.
    """
    if tls not in ("opportunistic", "required", "none"):
        raise ValueError(f"tls must be opportunistic, required or none, not {tls!r}")
    if size is None:
        size = Path(message_path).stat().st_size
    params = SessionParameters(
        host=host,
        helo_name=helo_name,
        mail_from=mail_from,
        rcpts=tuple(rcpts),
        message_path=os.fspath(message_path),
        size=size,
        body_8bit=body_8bit,
        smtputf8=smtputf8,
        tls=tls,
        tls_verify=tls_verify,
        tls_client_context=tls_client_context,
        auth=auth,
        timeouts=timeouts,
        chunk_size=chunk_size,
        downgrade=downgrade,
    )
    return defer.ensureDeferred(_deliver(reactor, port, list(addresses), params, source_address))


async def _session(
    reactor: Any, address: str, port: int, params: SessionParameters, source_address: str | None
) -> TransactionResult | str:
    """A TransactionResult, or the reason the connection could not be made."""
    session = SMTPClientSession(params, reactor)
    try:
        endpoint = _endpoint(reactor, address, port, params.timeouts.connect, source_address)
        await endpoints.connectProtocol(endpoint, session)
    except Exception as e:  # any connect failure means: next address
        return f"{address}:{port}: {e}"
    return await session.done


async def _deliver(
    reactor: Any,
    port: int,
    addresses: list[str],
    params: SessionParameters,
    source_address: str | None,
) -> TransactionResult:
    errors = []
    for address in addresses:
        result = await _session(reactor, address, port, params, source_address)
        if isinstance(result, str):
            errors.append(result)
            continue
        if (
            result.outcome is Outcome.TLS_FAILED
            and result.stage == "tls"
            and params.tls == "opportunistic"
            and not params.tls_verify
        ):
            # Opportunistic TLS: a broken handshake is no reason not to deliver in plaintext.
            log.info(
                "TLS with {host} [{address}] failed ({reason}); retrying without TLS",
                host=params.host,
                address=address,
                reason=result.reply.text,
            )
            plain = dataclasses.replace(params, tls="none")
            retry = await _session(reactor, address, port, plain, source_address)
            if isinstance(retry, str):
                return result
            retry.tls_fallback = True
            return retry
        return result
    reply = _local(451, "4.4.1", "no connection: " + ("; ".join(errors) or "no addresses"))
    return TransactionResult(
        outcome=Outcome.CONNECT_FAILED,
        reply=reply,
        stage="connect",
        recipients={r: reply for r in params.rcpts},
        host=params.host,
        address=None,
        port=port,
    )
