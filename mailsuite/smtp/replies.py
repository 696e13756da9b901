"""SMTP replies as named constants with enhanced status codes (RFC 5321 4.2, RFC 3463)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str | None
    text: str

    def lines(self, *more: str) -> bytes:
        """Encode as one or more reply lines (``code-`` continuation, RFC 5321 4.2.1)."""
        texts = [self.text, *more]
        out = []
        for i, text in enumerate(texts):
            sep = "-" if i < len(texts) - 1 else " "
            body = f"{self.enhanced} {text}" if self.enhanced else text
            out.append(f"{self.code}{sep}{body}\r\n")
        return "".join(out).encode("utf-8")

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.enhanced, text)


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
TEMP_FAILURE = Reply(451, "4.3.0", "Temporary failure while storing the message, try later")
NO_REMOTE = Reply(451, "4.4.0", "Remote delivery is not available on this server, try later")
TOO_MANY_RCPTS = Reply(452, "4.5.3", "Too many recipients")
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
UNKNOWN_PARAM = Reply(555, "5.5.4", "Parameter not recognized or not implemented")
UTF8_NEEDS_PARAM = Reply(553, "5.6.7", "UTF-8 address needs the SMTPUTF8 parameter")
