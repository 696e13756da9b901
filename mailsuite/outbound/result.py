"""What one outbound SMTP session came to: how it ended and each recipient's reply.

:func:`mailsuite.outbound.client.deliver` returns a :class:`TransactionResult`; the relay
(:mod:`mailsuite.outbound.relay`) files each recipient as delivered, retry or bounce from it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from mailsuite.smtp.replies import Reply

__all__ = ["Outcome", "Timeouts", "TransactionResult"]


class Outcome(enum.Enum):
    """How a session ended."""

    DELIVERED = "delivered"  # DATA accepted; recipients refused at RCPT keep their replies
    ALL_RECIPIENTS_REFUSED = "all-recipients-refused"
    CONNECT_FAILED = "connect-failed"  # no address accepted a TCP connection
    TLS_FAILED = "tls-failed"  # handshake/verification failed, or TLS required and not offered
    GREETING_REFUSED = "greeting-refused"  # non-220 greeting
    HELO_REFUSED = "helo-refused"  # EHLO and HELO both refused
    AUTH_FAILED = "auth-failed"  # AUTH refused, not offered, or not possible without TLS
    MAIL_REFUSED = "mail-refused"
    DATA_REFUSED = "data-refused"  # at DATA or after the final dot
    MESSAGE_UNSENDABLE = "message-unsendable"  # too big for SIZE, 8-bit/UTF-8 not supported
    TIMEOUT = "timeout"
    CONNECTION_LOST = "connection-lost"
    PROTOCOL_ERROR = "protocol-error"  # unparseable reply


@dataclass
class TransactionResult:
    """What happened in one session with one host.

    ``reply`` is the reply that decided ``outcome`` (local when no server said it); ``stage`` is
    where: connect, greeting, ehlo, starttls, tls, auth, mail, rcpt, data, data-end or done.
    ``recipients`` maps every recipient to its final reply: positive = delivered, transient =
    retry later, permanent = bounce.
    """

    outcome: Outcome
    reply: Reply
    stage: str
    recipients: dict[str, Reply]
    host: str
    address: str | None = None
    port: int = 25
    tls: bool = False
    tls_fallback: bool = False  # TLS handshake failed; this result is from a plaintext retry
    downgraded: bool = False  # the body went as a 7-bit conversion (no 8BITMIME, RFC 6152 3)
    extensions: dict[str, str] = field(default_factory=dict)

    @property
    def delivered(self) -> list[str]:
        return [r for r, reply in self.recipients.items() if reply.positive]

    @property
    def transient_failures(self) -> list[str]:
        return [r for r, reply in self.recipients.items() if reply.transient]

    @property
    def permanent_failures(self) -> list[str]:
        return [r for r, reply in self.recipients.items() if reply.permanent]

    @property
    def try_next_mx(self) -> bool:
        """True when the failure is about this host rather than the message or recipients.

        RFC 5321 5.1: try the next MX when this one could not be reached or did not take the
        transaction; not once any recipient got a definite answer or DATA was started.
        """
        if self.outcome in (
            Outcome.CONNECT_FAILED,
            Outcome.TLS_FAILED,
            Outcome.GREETING_REFUSED,
            Outcome.HELO_REFUSED,
        ):
            return True
        if self.outcome in (Outcome.TIMEOUT, Outcome.CONNECTION_LOST, Outcome.PROTOCOL_ERROR):
            return self.stage in (
                "connect",
                "greeting",
                "ehlo",
                "starttls",
                "tls",
                "auth",
                "mail",
                "rcpt",
            )
        if self.outcome is Outcome.MAIL_REFUSED:
            return self.reply.transient
        return False


@dataclass(frozen=True)
class Timeouts:
    """Seconds. Defaults are RFC 5321 4.5.3.2 where it gives one."""

    connect: float = 60.0
    greeting: float = 300.0  # 4.5.3.2.1
    command: float = 300.0  # EHLO, HELO, STARTTLS, AUTH (not in the RFC; same as MAIL)
    mail: float = 300.0  # 4.5.3.2.2
    rcpt: float = 300.0  # 4.5.3.2.3
    data_init: float = 120.0  # 4.5.3.2.4
    data_block: float = 180.0  # 4.5.3.2.5: no progress writing the body for this long
    data_term: float = 600.0  # 4.5.3.2.6
    quit: float = 30.0
