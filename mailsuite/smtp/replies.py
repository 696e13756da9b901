"""SMTP replies: the one :class:`Reply` type, for what our server says and what a remote server
said to our client, and the server's replies as named constants (RFC 5321 4.2, RFC 3463).

A multi-line reply is one ``Reply`` whose ``text`` holds the lines joined with ``"\\n"``; it is
sent as ``250-first``, ``250-...``, ``250 last`` (RFC 5321 4.2.1), the enhanced status code
repeated on every line (RFC 2034 section 3).  The client parses a reply into the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    """An SMTP reply.  ``enhanced`` is the RFC 3463 code (``"5.1.1"``) or None; ``text`` the
    rest, lines joined with ``"\\n"``.  ``remote`` False marks a reply the client side made up
    itself (no server said it: a connection failure, a timeout, a local decision)."""

    code: int
    enhanced: str | None
    text: str
    remote: bool = True

    @classmethod
    def local(cls, code: int, enhanced: str, text: str) -> Reply:
        """A reply made up on this side (``remote`` False)."""
        return cls(code, enhanced, text, remote=False)

    # -- what it means ------------------------------------------------------------------------

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def status(self) -> str:
        """The enhanced status code, or the one implied by the basic code (RFC 3463)."""
        if self.enhanced:
            return self.enhanced
        return f"{self.code // 100}.0.0"

    # -- encodings ----------------------------------------------------------------------------

    def encode(self) -> bytes:
        """The reply on the wire: one line per text line, ``code-`` on all but the last.
        Computed once per reply (the constants below are sent again and again)."""
        wire: bytes | None = self.__dict__.get("_wire")
        if wire is None:
            wire = self._encode()
            object.__setattr__(self, "_wire", wire)  # a cache, not a field: eq is unchanged
        return wire

    def _encode(self) -> bytes:
        prefix = f"{self.enhanced} " if self.enhanced else ""
        if "\n" not in self.text:
            return f"{self.code} {prefix}{self.text}\r\n".encode()
        texts = self.text.split("\n")
        last = len(texts) - 1
        return "".join(
            f"{self.code}{'-' if i < last else ' '}{prefix}{text}\r\n"
            for i, text in enumerate(texts)
        ).encode("utf-8")

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.enhanced, text, self.remote)

    def diagnostic(self) -> str:
        """For a DSN's Diagnostic-Code field (RFC 3464 2.3.6), text on one line.

        ``smtp; 550 5.1.1 text`` for a server's reply; ``x-mailsuite; text`` for a local one
        (as Postfix writes ``X-Postfix;``), so no one mistakes it for a remote answer.
        """
        flat = " ".join(self.text.split("\n"))
        if not self.remote:
            return f"x-mailsuite; {flat}"
        enhanced = f" {self.enhanced}" if self.enhanced else ""
        return f"smtp; {self.code}{enhanced} {flat}".rstrip()

    def __str__(self) -> str:
        enhanced = f" {self.enhanced}" if self.enhanced else ""
        return f"{self.code}{enhanced} {self.text}".rstrip()


OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RCPT_OK = Reply(250, "2.1.5", "Recipient OK")
RESET = Reply(250, "2.0.0", "Reset")
BYE = Reply(221, "2.0.0", "Bye")
START_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = Reply(214, "2.0.0", "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT")
READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")

#: sent as "<hostname> Error: timeout exceeded" (RFC 5321 3.8 / 4.2: 421 names the host)
TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections from your address, try later")
SERVER_BUSY = Reply(421, "4.7.0", "Too many connections, try later")
INTERNAL_ERROR = Reply(451, "4.3.0", "Internal error, try again later")
TEMP_FAILURE = Reply(451, "4.3.0", "Temporary failure while storing the message, try later")
NO_REMOTE = Reply(451, "4.4.0", "Remote delivery is not available on this server, try later")
TOO_MANY_RCPTS = Reply(452, "4.5.3", "Too many recipients")
NO_STORAGE = Reply(452, "4.3.1", "Insufficient system storage, try later")  # RFC 3463 X.3.1
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")

LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
UNKNOWN_COMMAND = Reply(500, "5.5.2", "Command not recognized")
SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
NEED_EHLO = Reply(503, "5.5.1", "Send EHLO or HELO first")
NEED_MAIL = Reply(503, "5.5.1", "Send MAIL first")
NEED_RCPT = Reply(503, "5.5.1", "Send RCPT first")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already given")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
UNKNOWN_USER = Reply(550, "5.1.1", "No such user here")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
LONG_LINE_DATA = Reply(
    550, "5.6.0", "Message refused: a line is longer than the limit (RFC 5321 4.5.3.1.6)"
)
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops: a mail loop?")
#: RFC 3463 X.2.2 "mailbox full": the recipient is over their storage quota (the reply
#: Dovecot's quota-status service gives Postfix by default); at RCPT when already over, at
#: the end of the data when this message would take the only recipients over.
MAILBOX_FULL = Reply(552, "5.2.2", "Mailbox full: the recipient is over their storage quota")
#: The same as a temporary condition: a queued local delivery waits for space (4.2.2).
MAILBOX_FULL_TEMP = Reply(452, "4.2.2", "Mailbox full: the recipient is over their storage quota")
UNKNOWN_PARAM = Reply(555, "5.5.4", "Parameter not recognized or not implemented")
UTF8_NEEDS_PARAM = Reply(553, "5.6.7", "UTF-8 address needs the SMTPUTF8 parameter")

# AUTH (RFC 4954 section 6) and the submission profile's sender binding (RFC 6409 8.1).
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_BAD = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_THROTTLED = Reply(454, "4.7.0", "Temporary authentication failure, try again later")
AUTH_TEMP = Reply(454, "4.7.0", "Temporary authentication failure")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
AUTH_SYNTAX = Reply(501, "5.5.2", "Cannot decode the response")
AUTH_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication mechanism")
AUTH_TWICE = Reply(503, "5.5.1", "Already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH is not allowed during a mail transaction")
AUTH_NEEDS_EHLO = Reply(503, "5.5.1", "Send EHLO first")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address not owned by the authenticated user")
FROM_NOT_OWNED = Reply(553, "5.7.1", "From: header address not owned by the authenticated user")
FROM_UNUSABLE = Reply(553, "5.7.1", "From: header has no usable address")
HEADERS_TOO_BIG = Reply(552, "5.3.4", "Header section too large")

#: For the mail-authentication checks (issue 12): DMARC p=reject (RFC 7372 3.2).
AUTH_POLICY_REJECT = Reply(550, "5.7.26", "Multiple authentication checks failed")
