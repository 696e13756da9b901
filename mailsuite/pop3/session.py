"""The POP3 protocol state machine, without sockets.

Written for mailsuite rather than taken from twisted.mail.pop3 (no STLS, ``DELE 0`` deletes
the last message, per-chunk dot-stuffing lets message content forge replies, SASL PLAIN
cannot work; research/twisted-mail.md 3.1).

A :class:`Session` takes one command line at a time and returns a :class:`Step`: the exact
bytes to send and, where the I/O side has work to do, an action (start TLS, check a
password, stream a large message, run the UPDATE state).  The I/O side reports back with
:meth:`Session.login_finished` / :meth:`Session.update_finished`.  The maildrop is the only
collaborator and is reached through a small interface, so tests use plain objects.

Standards: RFC 1939 (POP3), RFC 2449 (CAPA, response codes), RFC 2595 section 4 (STLS),
RFC 3206 ([SYS/*], [AUTH]), RFC 5034 (AUTH, SASL PLAIN per RFC 4616).
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from mailsuite.dotstuff import DotStuffer, stuff_all
from mailsuite.login import LoginResult, Outcome
from mailsuite.pop3.policy import Expiry, LoginTooSoon, MaildropInUse, MessageGone

#: Messages up to this size are read and sent in one write; larger ones are streamed.  No
#: further command is read while an answer waits unsent (mailsuite.flow), so this is also
#: about the most a client that does not read makes the server hold.
STREAM_THRESHOLD = 256 * 1024
MAX_ARG = 255  # RFC 2449 4: a command line is at most 255 octets; we allow long passwords


class State(enum.Enum):
    AUTHORIZATION = "authorization"
    SASL = "sasl"  # AUTH PLAIN waiting for the client's response line
    LOGIN = "login"  # password being checked / maildrop being opened
    TRANSACTION = "transaction"
    UPDATE = "update"
    CLOSED = "closed"


#: The states the per-command path compares with, by plain module names: naming an Enum
#: member (``State.SASL``) is a descriptor call in Python 3.11 (about 0.2 us, as long as
#: the rest of a NOOP's own work), and hashing one calls ``Enum.__hash__`` in Python.
AUTHORIZATION, SASL, TRANSACTION, CLOSED = (
    State.AUTHORIZATION,
    State.SASL,
    State.TRANSACTION,
    State.CLOSED,
)


def ok(text: str) -> bytes:
    return (b"+OK " + text.encode("utf-8") if text else b"+OK") + b"\r\n"


def err(text: str) -> bytes:
    return b"-ERR " + text.encode("utf-8") + b"\r\n"


# Replies as named constants (DESIGN.md: never strings scattered through the code).
ERR_NO_MESSAGE = err("No such message")
ERR_SYNTAX = err("Syntax error")
ERR_UNKNOWN = err("Unknown command")
ERR_WRONG_STATE = err("Command not valid in this state")
ERR_PLAINTEXT = err("[AUTH] Plaintext authentication disallowed before STLS")
ERR_AUTH_FAILED = err("[AUTH] Authentication failed")
ERR_THROTTLED = err("[SYS/TEMP] Too many failed logins; try again later")
ERR_IN_USE = err("[IN-USE] Mailbox is locked by another POP3 session")
ERR_LOGIN_DELAY = err("[LOGIN-DELAY] Logged in too recently; wait before logging in again")
ERR_TEMP = err("[SYS/TEMP] Temporary server error, try again later")
# Instead of the greeting when a connection limit is reached (RFC 3206 4: SYS/TEMP, a
# temporary problem the user did not cause), then the connection is closed.
ERR_BUSY_IP = err("[SYS/TEMP] Too many connections from your address, try again later")
ERR_BUSY = err("[SYS/TEMP] Too many connections, try again later")
ERR_GONE = err("[SYS/TEMP] Message was removed by another session")
ERR_TOO_MANY = err("Too many errors, closing connection")
ERR_NOT_IMPLEMENTED_APOP = err("APOP not supported; use USER/PASS or AUTH PLAIN")
ERR_CANCELLED = err("Authentication cancelled")
ERR_BAD_BASE64 = err("[AUTH] Invalid base64 in SASL response")
ERR_NO_MECH = err("Unsupported SASL mechanism")
ERR_TLS_ACTIVE = err("TLS is already active")
ERR_TLS_UNAVAILABLE = err("[SYS/PERM] TLS is not available")
ERR_NEED_USER = err("USER first")
OK_NOOP = ok("")


@dataclass(frozen=True)
class Options:
    hostname: str = "localhost"
    tls_available: bool = False
    allow_plaintext: bool = False
    mark_seen: bool = True
    expiry: Expiry | None = None
    login_delay: int | None = None
    max_errors: int = 10


# -- actions for the I/O side ------------------------------------------------------------------


@dataclass(frozen=True)
class StartTLS:
    """Send ``out``, drop any pipelined input, start the TLS handshake, then call
    :meth:`Session.tls_started`."""


@dataclass(frozen=True)
class Authenticate:
    """Check ``username``/``password``; on success open the maildrop; report with
    :meth:`Session.login_finished`."""

    username: str
    password: str


@dataclass
class Stream:
    """Send the rest of a multi-line response: feed the file through the stuffer in chunks,
    then ``stuffer.finish()``, then close the file (anything with ``read(n)``/``close()``)."""

    file: BinaryIO | Any
    stuffer: DotStuffer = field(default_factory=DotStuffer)


@dataclass(frozen=True)
class Update:
    """Run the UPDATE state (``maildrop.commit()``); report with
    :meth:`Session.update_finished`."""


@dataclass(frozen=True)
class Close:
    """Close the connection after sending ``out``."""


Action = StartTLS | Authenticate | Stream | Update | Close | None


@dataclass
class Step:
    out: bytes = b""
    action: Action = None


#: What a command's handler returns: the reply alone (most commands: no Step is made for
#: it, a Python call less per command) or a :class:`Step` with an action.
Answer = bytes | Step


def as_step(answer: Answer) -> Step:
    """An :data:`Answer` as a :class:`Step` (for callers that want one shape)."""
    return answer if isinstance(answer, Step) else Step(answer)


class Session:
    """One POP3 connection's state.  ``tls`` is True for implicit TLS (port 995)."""

    def __init__(self, options: Options, tls: bool = False) -> None:
        self.options = options
        self.tls = tls
        self.state = State.AUTHORIZATION
        self.username: str | None = None  # from USER, waiting for PASS
        self.user: str | None = None  # canonical address once logged in
        self.maildrop: Any = None
        self.errors = 0

    # -- greeting and helpers ---------------------------------------------------------------

    def greeting(self) -> bytes:
        return ok(f"{self.options.hostname} POP3 server ready")

    @property
    def login_allowed(self) -> bool:
        return self.tls or self.options.allow_plaintext

    def capabilities(self) -> list[str]:
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.state is State.AUTHORIZATION:
            if self.login_allowed:
                caps += ["USER", "SASL PLAIN"]
            if not self.tls and self.options.tls_available:
                caps.append("STLS")
        if self.options.expiry is not None:
            caps.append(self.options.expiry.capability())
        if self.options.login_delay:
            caps.append(f"LOGIN-DELAY {self.options.login_delay}")
        caps.append("IMPLEMENTATION mailsuite")
        return caps

    def _error(self, reply: bytes) -> Answer:
        """A client mistake: count it, and hang up after too many (a confused or hostile
        client should not hold a connection forever)."""
        self.errors += 1
        if self.errors >= self.options.max_errors:
            return self._close(reply + ERR_TOO_MANY)
        return reply

    def _close(self, out: bytes) -> Step:
        self.state = State.CLOSED
        return Step(out, Close())

    # -- input ------------------------------------------------------------------------------

    def line(self, raw: bytes) -> Step:
        """One line from the client, without its line end.  The keyword is matched as ASCII,
        case-insensitively (RFC 1939 3), in a table of this state's commands: one lookup,
        and no other case mapping lets some other character stand for a command's letter."""
        if self.state is SASL:
            return as_step(self._sasl_response(raw))
        word, _, arg = raw.partition(b" ")
        return as_step(self.command(word, arg))

    def command(self, word: bytes, arg: bytes) -> Answer:
        """A command line split at its first space (``word``, the rest), as :meth:`line`
        splits it: for an I/O side that split it already (to count the keyword).  Not for
        a SASL response line (:attr:`state` SASL), which is no command: use :meth:`line`.
        The reply alone (bytes) when there is nothing else to do, else a :class:`Step`."""
        state = self.state
        if state is TRANSACTION:
            table = _TRANSACTION_COMMANDS
        elif state is AUTHORIZATION:
            table = _AUTHORIZATION_COMMANDS
        else:
            # the I/O side pauses input during these; reaching here is a bug, not the client's
            return Step(ERR_TEMP)
        keyword = word.upper()
        handler = table.get(keyword)
        if handler is None:
            if keyword in _COMMAND_BYTES:
                return self._error(ERR_WRONG_STATE)
            return self._error(ERR_UNKNOWN)
        try:
            rest = arg.decode("utf-8")
        except UnicodeDecodeError:
            return self._error(ERR_SYNTAX)
        return handler(self, rest)

    # -- both states ------------------------------------------------------------------------

    def _capa(self, rest: str) -> Answer:
        lines = [ok("Capability list follows")]
        lines += [c.encode("ascii") + b"\r\n" for c in self.capabilities()]
        return b"".join(lines) + b".\r\n"

    _authorization_CAPA = _capa
    _transaction_CAPA = _capa

    # -- AUTHORIZATION ----------------------------------------------------------------------

    def _authorization_QUIT(self, rest: str) -> Answer:
        return self._close(ok(f"{self.options.hostname} POP3 server signing off"))

    def _authorization_STLS(self, rest: str) -> Answer:
        # RFC 2595 4: only in AUTHORIZATION, and not once TLS is active
        if rest:
            return self._error(ERR_SYNTAX)
        if self.tls:
            return self._error(ERR_TLS_ACTIVE)
        if not self.options.tls_available:
            return self._error(ERR_TLS_UNAVAILABLE)
        self.username = None
        return Step(ok("Begin TLS negotiation"), StartTLS())

    def tls_started(self) -> None:
        """The I/O side switched to TLS: forget everything learned before (RFC 2595 4)."""
        self.tls = True
        self.username = None
        self.state = State.AUTHORIZATION

    def _authorization_USER(self, rest: str) -> Answer:
        if not self.login_allowed:
            return self._error(ERR_PLAINTEXT)
        name = rest.strip()
        if not name or len(name) > MAX_ARG or " " in name:
            return self._error(ERR_SYNTAX)
        self.username = name
        return Step(ok("Send PASS"))

    def _authorization_PASS(self, rest: str) -> Answer:
        if not self.login_allowed:
            return self._error(ERR_PLAINTEXT)
        if self.username is None:
            return self._error(ERR_NEED_USER)
        if not rest or len(rest) > MAX_ARG:
            self.username = None
            return self._error(ERR_SYNTAX)
        username, self.username = self.username, None
        # RFC 1939 7: the password is the rest of the line (it may contain spaces)
        self.state = State.LOGIN
        return Step(b"", Authenticate(username, rest))

    def _authorization_APOP(self, rest: str) -> Answer:
        return self._error(ERR_NOT_IMPLEMENTED_APOP)

    def _authorization_AUTH(self, rest: str) -> Answer:
        if not rest.strip():
            # Not in RFC 5034, but widely used (RFC 1734 era clients): list the mechanisms.
            mechs = b"PLAIN\r\n" if self.login_allowed else b""
            return Step(ok("Mechanisms follow") + mechs + b".\r\n")
        if not self.login_allowed:
            return self._error(ERR_PLAINTEXT)
        parts = rest.split()
        if len(parts) > 2:
            return self._error(ERR_SYNTAX)
        mechanism = parts[0].upper()
        if mechanism != "PLAIN":
            return self._error(ERR_NO_MECH)
        self.username = None
        if len(parts) == 2:
            # RFC 5034 4: "=" is an empty initial response
            return self._sasl_plain(parts[1] if parts[1] != "=" else "")
        self.state = State.SASL
        return Step(b"+ \r\n")  # RFC 5034 4: empty challenge

    def _sasl_response(self, raw: bytes) -> Answer:
        self.state = State.AUTHORIZATION
        text = raw.decode("ascii", "replace").strip()
        if text == "*":
            return self._error(ERR_CANCELLED)  # RFC 5034 4
        return self._sasl_plain(text)

    def _sasl_plain(self, b64: str) -> Answer:
        try:
            decoded = base64.b64decode(b64.encode("ascii"), validate=True) if b64 else b""
            authzid, authcid, password = decoded.decode("utf-8").split("\0")
        except (binascii.Error, ValueError, UnicodeError):
            return self._error(ERR_BAD_BASE64 if not _is_base64(b64) else ERR_AUTH_FAILED)
        if not authcid or not password or (authzid and authzid != authcid):
            # we do not act on behalf of another user (RFC 4616 2: authzid)
            return self._error(ERR_AUTH_FAILED)
        self.state = State.LOGIN
        return Step(b"", Authenticate(authcid, password))

    def login_finished(
        self, result: LoginResult | None, maildrop: Any = None, failure: BaseException | None = None
    ) -> Step:
        """The outcome of :class:`Authenticate`: the login result, then the opened maildrop
        or the exception opening it raised."""
        self.state = State.AUTHORIZATION
        if result is None or result.outcome is Outcome.THROTTLED:
            return as_step(self._error(ERR_THROTTLED if result is not None else ERR_TEMP))
        if result.outcome is Outcome.BAD_CREDENTIALS:
            return as_step(self._error(ERR_AUTH_FAILED))
        if failure is not None:
            if isinstance(failure, MaildropInUse):
                return Step(ERR_IN_USE)
            if isinstance(failure, LoginTooSoon):
                return Step(ERR_LOGIN_DELAY)
            return Step(ERR_TEMP)
        self.user = result.user
        self.maildrop = maildrop
        self.state = State.TRANSACTION
        count, octets = maildrop.stat()
        return Step(ok(f"Logged in, {count} messages ({octets} octets)"))

    # -- TRANSACTION ------------------------------------------------------------------------

    def _number(self, arg: str) -> int | None:
        """A message number that exists and is not deleted (RFC 1939: numbers start at 1)."""
        if not arg.isdigit() or len(arg) > 10:
            return None
        n = int(arg)
        return n if self.maildrop.valid(n) else None

    def _transaction_STAT(self, rest: str) -> Answer:
        if rest:
            return self._error(ERR_SYNTAX)
        count, octets = self.maildrop.stat()
        return ok(f"{count} {octets}")

    def _transaction_LIST(self, rest: str) -> Answer:
        md = self.maildrop
        if rest:
            n = self._number(rest)
            if n is None:
                return self._error(ERR_NO_MESSAGE)
            return ok(f"{n} {md.message(n).size}")
        count, octets = md.stat()
        body = "".join(f"{n} {md.message(n).size}\r\n" for n in md.live())
        return ok(f"{count} messages ({octets} octets)") + body.encode("ascii") + b".\r\n"

    def _transaction_UIDL(self, rest: str) -> Answer:
        md = self.maildrop
        if rest:
            n = self._number(rest)
            if n is None:
                return self._error(ERR_NO_MESSAGE)
            return ok(f"{n} {md.uidl(n)}")
        body: str = md.uidl_listing()
        return ok("Unique-ID listing follows") + body.encode("ascii") + b".\r\n"

    def _transaction_RETR(self, rest: str) -> Answer:
        n = self._number(rest)
        if n is None:
            return self._error(ERR_NO_MESSAGE if rest.isdigit() else ERR_SYNTAX)
        md = self.maildrop
        size = md.message(n).size
        head = b"+OK %d octets\r\n" % size
        try:
            if size <= STREAM_THRESHOLD:
                step: Answer = stuff_all(md.read(n), head=head)
            else:
                step = Step(head, Stream(md.open_file(n)))
        except MessageGone:
            return ERR_GONE
        md.note_retrieved(n)
        if self.options.mark_seen:
            md.mark_seen(n)
        return step

    def _transaction_TOP(self, rest: str) -> Answer:
        parts = rest.split(" ")
        if len(parts) != 2 or not parts[1].isdigit() or len(parts[1]) > 10:
            return self._error(ERR_SYNTAX)
        n = self._number(parts[0])
        if n is None:
            return self._error(ERR_NO_MESSAGE)
        head = ok("Top of message follows")
        try:
            if self.maildrop.message(n).size <= STREAM_THRESHOLD:
                return stuff_all(self.maildrop.read_top(n, int(parts[1])), head=head)
            return Step(head, Stream(self.maildrop.open_top(n, int(parts[1]))))
        except MessageGone:
            return ERR_GONE

    def _transaction_DELE(self, rest: str) -> Answer:
        n = self._number(rest)
        if n is None:
            return self._error(ERR_NO_MESSAGE)
        self.maildrop.deleted.add(n)
        return ok(f"Message {n} deleted")

    def _transaction_RSET(self, rest: str) -> Answer:
        if rest:
            return self._error(ERR_SYNTAX)
        self.maildrop.deleted.clear()
        count, octets = self.maildrop.stat()
        return ok(f"{count} messages ({octets} octets)")

    def _transaction_NOOP(self, rest: str) -> Answer:
        if rest:
            return self._error(ERR_SYNTAX)
        return OK_NOOP

    def _transaction_QUIT(self, rest: str) -> Answer:
        self.state = State.UPDATE  # RFC 1939 6
        return Step(b"", Update())

    def update_finished(
        self, expunged: list[int] | None, failure: BaseException | None = None
    ) -> Step:
        if failure is not None or expunged is None:
            return self._close(err("[SYS/TEMP] Some deleted messages not removed"))
        return self._close(
            ok(
                f"{self.options.hostname} POP3 server signing off "
                f"({len(expunged)} messages deleted)"
            )
        )


def _commands(state: State) -> dict[bytes, Callable[[Session, str], Answer]]:
    """A state's commands: the keyword (ASCII, upper case) -> its ``_<state>_<KEYWORD>``
    method."""
    prefix = f"_{state.value}_"
    return {
        name[len(prefix) :].encode("ascii"): method
        for name, method in vars(Session).items()
        if name.startswith(prefix)
    }


_AUTHORIZATION_COMMANDS = _commands(State.AUTHORIZATION)
_TRANSACTION_COMMANDS = _commands(State.TRANSACTION)


def _is_base64(text: str) -> bool:
    try:
        base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeError):
        return False
    return True


#: Every command name this server knows (the /metrics label set takes it from here).
COMMANDS = frozenset(
    {
        "USER",
        "PASS",
        "APOP",
        "AUTH",
        "STLS",
        "CAPA",
        "QUIT",
        "STAT",
        "LIST",
        "UIDL",
        "RETR",
        "TOP",
        "DELE",
        "RSET",
        "NOOP",
    }
)
_COMMAND_BYTES = frozenset(c.encode("ascii") for c in COMMANDS)
