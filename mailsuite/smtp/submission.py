"""The message submission profile (RFC 6409) on ports 587 (STARTTLS, RFC 3207) and 465
(implicit TLS, RFC 8314), with SMTP AUTH PLAIN and LOGIN (RFC 4954, RFC 4616).

Our own code on top of :class:`mailsuite.smtp.server.SMTPServer` (twisted.mail's ESMTP AUTH
accepts credentials in clear text and runs commands pipelined after STARTTLS).  Rules:

* before TLS, AUTH is not advertised and AUTH and MAIL are refused ``530 5.7.0`` (unless
  ``[auth] allow_plaintext``); after TLS, MAIL needs a successful AUTH (RFC 6409 section 4.3);
* AUTH runs once per session, never inside a mail transaction (RFC 4954 section 4);
  the base64 continuation lines are read in a sub-state, bounded and never logged;
* the session is paused while the password is checked, so replies to pipelined commands stay
  in order;
* sender binding (RFC 6409 section 8.1 leaves the policy to the MSA): MAIL FROM and every
  address of every From: header must be one the user may send as
  (:meth:`mailsuite.directory.Directory.may_send_as`), else ``553 5.7.1``.  A message without
  a From: header is accepted: the envelope sender is already bound, and RFC 6409 section 8.1
  lets an MSA accept (or complete) such a message; a From: header with no usable address is
  refused.
"""

from __future__ import annotations

from email.utils import getaddresses

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsuite.auth import LoginResult, Outcome
from mailsuite.directory import normalize
from mailsuite.smtp import replies as R
from mailsuite.smtp import sasl
from mailsuite.smtp.address import Path
from mailsuite.smtp.data import MAX_HEADER_CAPTURE
from mailsuite.smtp.server import SMTPFactory, SMTPServer

log = Logger(namespace="mailsuite.smtp.submission")

AUTH_OK = R.Reply(235, "2.7.0", "Authentication successful")
AUTH_BAD = R.Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_THROTTLED = R.Reply(454, "4.7.0", "Temporary authentication failure, try again later")
AUTH_TEMP = R.Reply(454, "4.7.0", "Temporary authentication failure")
AUTH_CANCELLED = R.Reply(501, "5.0.0", "Authentication cancelled")
AUTH_SYNTAX = R.Reply(501, "5.5.2", "Cannot decode the response")
AUTH_MECHANISM = R.Reply(504, "5.5.4", "Unrecognized authentication mechanism")
AUTH_TWICE = R.Reply(503, "5.5.1", "Already authenticated")
AUTH_IN_TRANSACTION = R.Reply(503, "5.5.1", "AUTH is not allowed during a mail transaction")
SENDER_NOT_OWNED = R.Reply(553, "5.7.1", "Sender address not owned by the authenticated user")
FROM_NOT_OWNED = R.Reply(553, "5.7.1", "From: header address not owned by the authenticated user")
FROM_UNUSABLE = R.Reply(553, "5.7.1", "From: header has no usable address")
HEADERS_TOO_BIG = R.Reply(552, "5.3.4", "Header section too large")


def from_addresses(headers: bytes) -> list[list[str]] | None:
    """The addresses of each From: field in a header section (one list per field).

    Fields are unfolded by hand rather than with ``email.parser``, whose mbox ``From `` line
    handling and lenient field names could hide a field another reader would display.  A name
    matches ``From`` case-insensitively, with white space before the colon tolerated (RFC 5322
    obsolete syntax, section 4.5).  Returns None if a From: field cannot be parsed.
    """
    text = headers.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")
    fields: list[list[str]] = []
    current: list[str] | None = None
    for line in text.split("\n"):
        if line[:1] in (" ", "\t"):
            if current is not None:
                current.append(line)
            continue
        name, colon, value = line.partition(":")
        if colon and name.strip(" \t").lower() == "from":
            current = [value]
            fields.append(current)
        else:
            current = None
    out: list[list[str]] = []
    for parts in fields:
        value = " ".join(p.strip() for p in parts)
        pairs = getaddresses([value])
        addresses = [addr for _, addr in pairs if addr]
        if not addresses or any("@" not in a for a in addresses):
            return None
        out.append(addresses)
    return out


class SubmissionServer(SMTPServer):
    """One submission session (587 with STARTTLS, 465 with implicit TLS)."""

    def __init__(self, runtime, profile, implicit_tls):  # type: ignore[no-untyped-def]
        super().__init__(runtime, profile, implicit_tls)
        self._sasl: sasl.Exchange | None = None

    # -- policy hooks ----------------------------------------------------------------------

    def _auth_permitted(self) -> bool:
        return self.tls_active or self.config.auth.allow_plaintext

    def auth_extensions(self) -> list[str]:
        if self.authenticated_user is not None or not self._auth_permitted():
            return []
        return ["AUTH " + " ".join(sasl.MECHANISMS)]

    def mail_allowed(self) -> R.Reply | None:
        if not self._auth_permitted():
            return R.TLS_REQUIRED  # RFC 3207 section 4: 530 5.7.0 Must issue STARTTLS first
        if self.authenticated_user is None:
            return R.AUTH_REQUIRED  # RFC 4954 section 6: 530 5.7.0
        return None

    def sender_allowed(self, sender: Path) -> R.Reply | None:
        assert self.authenticated_user is not None
        if self.runtime.directory.may_send_as(self.authenticated_user, sender.address):
            return None
        log.info(
            "submission: {user} from {ip} may not send as <{sender}>",
            user=self.authenticated_user,
            ip=self.peer_ip,
            sender=sender.address,
        )
        return SENDER_NOT_OWNED

    def message_allowed(self, headers: bytes) -> R.Reply | None:
        user = self.authenticated_user
        assert user is not None
        if len(headers) >= MAX_HEADER_CAPTURE:
            return HEADERS_TOO_BIG  # the From: fields could not all be seen
        fields = from_addresses(headers)
        if fields is None:
            return FROM_UNUSABLE
        for addresses in fields:
            for address in addresses:
                if not self.runtime.directory.may_send_as(user, address):
                    log.info(
                        "submission: {user} from {ip} may not use From: <{addr}>",
                        user=user,
                        ip=self.peer_ip,
                        addr=address,
                    )
                    return FROM_NOT_OWNED
        return None

    def may_relay(self) -> bool:
        # RFC 6409 section 4.3: only authenticated users submit, to any domain.
        return self.authenticated_user is not None

    # -- AUTH (RFC 4954) -------------------------------------------------------------------

    def login_timeout(self) -> int | None:
        # Like Dovecot's login processes: connect to AUTH within a few minutes, or go.
        return self.config.smtp.login_timeout

    def command_line(self, line: bytes) -> None:
        if self._sasl is not None:
            self._sasl_line(line)  # a base64 response, not a command: never parsed or logged
            return
        super().command_line(line)

    def smtp_STARTTLS(self, arg: str) -> None:
        was_tls = self.tls_active
        super().smtp_STARTTLS(arg)
        if self.tls_active and not was_tls:
            # RFC 3207 section 4.2: nothing learned in clear text survives, not even an AUTH
            # done there under [auth] allow_plaintext.
            self.authenticated_user = None

    def smtp_AUTH(self, arg: str) -> None:
        if not self._auth_permitted():
            self._error(R.TLS_REQUIRED)
            return
        if self.helo is None or not self.esmtp:
            self._error(R.Reply(503, "5.5.1", "Send EHLO first"))
            return
        if self.authenticated_user is not None:
            self._error(AUTH_TWICE)
            return
        if self.sender is not None:
            self._error(AUTH_IN_TRANSACTION)
            return
        mechanism, _, initial = arg.partition(" ")
        if not mechanism or " " in initial:
            self._error(R.SYNTAX.with_text("Usage: AUTH mechanism [initial-response]"))
            return
        exchange = sasl.Exchange()
        step = exchange.start(mechanism, initial or None)
        self._sasl_step(exchange, step)

    def _sasl_line(self, line: bytes) -> None:
        exchange = self._sasl
        assert exchange is not None
        try:
            text = line.decode("ascii").strip(" ")
        except UnicodeDecodeError:
            text = "\x00"  # not base64: answered as a syntax error below
        self._sasl_step(exchange, exchange.respond(text))

    def _sasl_step(self, exchange: sasl.Exchange, step: sasl.Step) -> None:
        if isinstance(step, sasl.Challenge):
            self._sasl = exchange
            self.transport.write(f"334 {step.text}\r\n".encode("ascii"))
            return
        self._sasl = None
        if isinstance(step, sasl.Failed):
            if step.kind == "cancelled":
                self.reply(AUTH_CANCELLED)
            elif step.kind == "mechanism":
                self._error(AUTH_MECHANISM)
            else:
                self._error(AUTH_SYNTAX.with_text(step.text))
            return
        self._check(step.credentials)

    def _check(self, creds: sasl.Credentials) -> None:
        username = creds.authcid
        if creds.authzid:
            # RFC 4616 section 2: acting as another identity is not supported; an authzid
            # naming the user itself is fine.
            try:
                same = normalize(creds.authzid) == normalize(creds.authcid)
            except ValueError:
                same = False
            if not same:
                username = ""  # fails like a wrong password (and counts as one)
        self.pauseProducing()  # pipelined commands wait for this answer (ordered replies)
        try:
            d = self.runtime.auth.login(username, creds.password, self.peer_ip, "smtp")
        except Exception:
            d = defer.fail()
        d.addBoth(self._login_done)

    def _login_done(self, result: LoginResult | Failure) -> None:
        if isinstance(result, Failure):
            log.failure("submission: login check failed for {ip}", result, ip=self.peer_ip)
            answer = AUTH_TEMP
        elif result.outcome is Outcome.OK and result.user is not None:
            self.authenticated_user = result.user
            if self.admission is not None:
                self.admission.login(result.user)  # leaves the pre-login per-IP count
            if self.deadline is not None:
                self.deadline.logged_in()
            answer = AUTH_OK
        elif result.outcome is Outcome.THROTTLED:
            answer = AUTH_THROTTLED
        else:
            answer = AUTH_BAD
        if not self.transport or self.transport.disconnecting:
            return
        if answer is AUTH_BAD:
            self._error(answer)
        else:
            self.reply(answer)
        if not self.transport.disconnecting:
            self.resumeProducing()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._sasl = None
        super().connectionLost(reason)


class SubmissionFactory(SMTPFactory):
    """Builds :class:`SubmissionServer` sessions (``[listen] submission`` / ``submissions``)."""

    def protocol_class(self) -> type[SMTPServer]:
        return SubmissionServer
