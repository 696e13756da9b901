"""What a POP3 maildrop promises the session core: the EXPIRE policy and the ways opening or
reading it can be refused.  No I/O and no Twisted, so :mod:`mailsuite.pop3.session` (a protocol
core) can name them without reaching the store; :mod:`mailsuite.pop3.maildrop` raises them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Expiry", "LoginTooSoon", "MaildropInUse", "MessageGone"]


class MaildropInUse(Exception):
    """Another POP3 session holds this maildrop (answer ``-ERR [IN-USE]``)."""


class LoginTooSoon(Exception):
    """The last login was less than LOGIN-DELAY seconds ago (answer ``-ERR [LOGIN-DELAY]``)."""


class MessageGone(Exception):
    """The message was removed by another program (an IMAP expunge) during the session."""


@dataclass(frozen=True)
class Expiry:
    """The EXPIRE policy (RFC 2449 6.7): ``None`` days = NEVER, 0 = no mail left on the server
    after a session that retrieved it, n = delete n days after the first retrieval."""

    days: int | None

    @classmethod
    def parse(cls, value: str | None) -> Expiry | None:
        """``None`` (not configured), ``"NEVER"`` or a number of days; ValueError otherwise."""
        if value is None:
            return None
        text = value.strip().upper()
        if text == "NEVER":
            return cls(None)
        if text.isdigit() and int(text) <= 100_000:
            return cls(int(text))
        raise ValueError(f'expected "NEVER" or a number of days, got {value!r}')

    def capability(self) -> str:
        return "EXPIRE NEVER" if self.days is None else f"EXPIRE {self.days}"
