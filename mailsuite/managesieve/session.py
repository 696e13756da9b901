"""The ManageSieve protocol state machine (RFC 5804), without sockets.  Our own code.

Built like :mod:`mailsuite.pop3.session`: :meth:`Session.command` takes one parsed
:class:`~.parser.Command` and returns a :class:`Step` -- the bytes to send and, where the
I/O side has work to do, an action (start TLS, check a password, close).  Script commands
touch the user's :class:`~mailsuite.sieve.storage.ScriptStore` (small blocking file
operations); the adapter runs :meth:`Session.command` in a thread with input paused, so
replies keep command order and the reactor never waits on a disk.

Rules kept here: AUTHENTICATE PLAIN only over TLS unless ``allow_plaintext`` (RFC 5804 2.1,
the ENCRYPT-NEEDED code); after STARTTLS the capabilities are sent again and nothing learned
before counts (RFC 5804 2.2); PUTSCRIPT/CHECKSCRIPT answer a script that does not compile
with NO and the line and reason (2.6, 2.12); the active script cannot be deleted (2.10).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from mailsuite.login import LoginResult, Outcome
from mailsuite.managesieve.parser import Command
from mailsuite.sieve.grammar import SieveParseError
from mailsuite.sieve.storage import ScriptError, ScriptStore
from mailsuite.sieve.validate import EXTENSIONS, compile_script
from mailsuite.smtp.sasl import Cancelled, SASLError, decode_response, parse_plain

IMPLEMENTATION = "mailsuite"
#: The SIEVE capability: every extension a script may require (the i;octet/i;ascii-casemap
#: comparators are always there and not listed, as Pigeonhole does).
SIEVE_EXTENSIONS = " ".join(
    e for e in EXTENSIONS if e not in ("comparator-i;octet", "comparator-i;ascii-casemap")
)


class State(enum.Enum):
    NONAUTH = "nonauth"
    SASL = "sasl"  # AUTHENTICATE waiting for the client's response string
    LOGIN = "login"  # password being checked
    AUTH = "auth"
    CLOSED = "closed"


def quote(text: str) -> str:
    """A string for a response: quoted when it can be, a ``{N}`` literal otherwise (RFC
    5804 4: quoted strings hold no CR, LF or NUL and are at most 1024 octets)."""
    data = text.encode("utf-8")
    if len(data) <= 1024 and not any(c in text for c in "\r\n\0"):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{{{len(data)}}}\r\n{text}"


def response(kind: str, text: str | None = None, code: str | None = None) -> bytes:
    """``OK``/``NO``/``BYE`` with an optional ``(CODE)`` and human-readable text."""
    out = kind
    if code:
        out += f" ({code})"
    if text is not None:
        out += " " + quote(text)
    return (out + "\r\n").encode("utf-8")


NO_AUTH_FIRST = response("NO", "Authenticate first")
NO_UNKNOWN = response("NO", "Unknown command")
NO_WRONG_STATE = response("NO", "Command not valid in this state")
NO_TEMP = response("NO", "Temporary server error, try again later", "TRYLATER")
NO_ENCRYPT = response("NO", "Use STARTTLS before authenticating", "ENCRYPT-NEEDED")
NO_AUTH_FAILED = response("NO", "Authentication failed")
NO_THROTTLED = response("NO", "Too many failed logins, try again later", "TRYLATER")
NO_MECHANISM = response("NO", "Unsupported SASL mechanism (use PLAIN)")
NO_CANCELLED = response("NO", "Authentication cancelled")
BYE_TOO_MANY = response("BYE", "Too many errors, closing connection")


@dataclass(frozen=True)
class Options:
    hostname: str = "localhost"
    tls_available: bool = False
    allow_plaintext: bool = False
    max_script_size: int = 1024 * 1024
    max_scripts: int = 100
    max_redirects: int = 4
    max_errors: int = 10


@dataclass(frozen=True)
class StartTLS:
    """Send ``out``, drop pipelined input, start TLS, then send :meth:`Session.tls_started`."""


@dataclass(frozen=True)
class Authenticate:
    """Check the password; report with :meth:`Session.login_finished`."""

    username: str
    password: str


@dataclass(frozen=True)
class Close:
    """Close the connection after sending ``out``."""


Action = StartTLS | Authenticate | Close | None


@dataclass
class Step:
    out: bytes = b""
    action: Action = None


#: Commands, the states they run in and their argument kinds ("s" string, "n" number).
_COMMANDS: dict[str, tuple[tuple[State, ...], tuple[str, ...], int]] = {
    # name: (states, argument kinds, required count)
    "CAPABILITY": ((State.NONAUTH, State.AUTH), (), 0),
    "LOGOUT": ((State.NONAUTH, State.AUTH), (), 0),
    "NOOP": ((State.NONAUTH, State.AUTH), ("s",), 0),
    "STARTTLS": ((State.NONAUTH,), (), 0),
    "AUTHENTICATE": ((State.NONAUTH,), ("s", "s"), 1),
    "UNAUTHENTICATE": ((State.AUTH,), (), 0),
    "HAVESPACE": ((State.AUTH,), ("s", "n"), 2),
    "PUTSCRIPT": ((State.AUTH,), ("s", "s"), 2),
    "CHECKSCRIPT": ((State.AUTH,), ("s",), 1),
    "LISTSCRIPTS": ((State.AUTH,), (), 0),
    "SETACTIVE": ((State.AUTH,), ("s",), 1),
    "GETSCRIPT": ((State.AUTH,), ("s",), 1),
    "DELETESCRIPT": ((State.AUTH,), ("s",), 1),
    "RENAMESCRIPT": ((State.AUTH,), ("s", "s"), 2),
}


class Session:
    """One ManageSieve connection.  ``store_for(user)`` opens a user's script store."""

    def __init__(
        self, options: Options, store_for: Callable[[str], ScriptStore], tls: bool = False
    ) -> None:
        self.options = options
        self.store_for = store_for
        self.tls = tls
        self.state = State.NONAUTH
        self.user: str | None = None
        self.store: ScriptStore | None = None
        self.errors = 0

    # -- capabilities ---------------------------------------------------------------------------

    @property
    def login_allowed(self) -> bool:
        return self.tls or self.options.allow_plaintext

    def capabilities(self) -> bytes:
        """RFC 5804 1.7, one capability per line."""
        lines = [
            f'"IMPLEMENTATION" {quote(IMPLEMENTATION)}',
            f'"SASL" "{"PLAIN" if self.login_allowed else ""}"',
            f'"SIEVE" {quote(SIEVE_EXTENSIONS)}',
        ]
        if self.options.tls_available and not self.tls:
            lines.append('"STARTTLS"')
        lines.append(f'"MAXREDIRECTS" "{self.options.max_redirects}"')
        if self.user is not None:
            lines.append(f'"OWNER" {quote(self.user)}')
        lines.append('"UNAUTHENTICATE"')
        lines.append('"VERSION" "1.0"')
        return "".join(line + "\r\n" for line in lines).encode("utf-8")

    def greeting(self) -> bytes:
        return self.capabilities() + response("OK", f"{self.options.hostname} ManageSieve ready")

    # -- errors ---------------------------------------------------------------------------------

    def _error(self, reply: bytes) -> Step:
        """A client mistake: counted; too many end the connection."""
        self.errors += 1
        if self.errors >= self.options.max_errors:
            self.state = State.CLOSED
            return Step(reply + BYE_TOO_MANY, Close())
        return Step(reply)

    def bad(self, reason: str, code: str | None = None) -> Step:
        """What the reader refused (syntax, literal too large)."""
        if self.state is State.SASL:
            self.state = State.NONAUTH
        return self._error(response("NO", reason, code))

    # -- dispatch -------------------------------------------------------------------------------

    def command(self, cmd: Command) -> Step:
        if self.state is State.SASL:
            return self._sasl_answer(cmd)
        if self.state in (State.LOGIN, State.CLOSED):
            return Step(NO_TEMP)  # input is paused in these states; reaching here is a bug
        if not cmd.name:
            return self._error(response("NO", "Expected a command"))
        spec = _COMMANDS.get(cmd.name)
        if spec is None:
            return self._error(NO_UNKNOWN)
        states, kinds, required = spec
        if self.state not in states:
            if self.state is State.NONAUTH:
                return self._error(NO_AUTH_FIRST)
            return self._error(NO_WRONG_STATE)
        if not required <= len(cmd.args) <= len(kinds) or any(
            (k == "n") != isinstance(a, int) for a, k in zip(cmd.args, kinds, strict=False)
        ):
            return self._error(response("NO", f"Syntax error in {cmd.name} arguments"))
        handler: Callable[[list[str | int]], Step] = getattr(self, "_" + cmd.name.lower())
        try:
            return handler(cmd.args)
        except ScriptError as e:
            return Step(response("NO", str(e), e.code))

    # -- any state ------------------------------------------------------------------------------

    def _capability(self, args: list[str | int]) -> Step:
        return Step(self.capabilities() + response("OK", "Capability completed"))

    def _logout(self, args: list[str | int]) -> Step:
        self.state = State.CLOSED
        return Step(response("OK", "Logout complete"), Close())

    def _noop(self, args: list[str | int]) -> Step:
        if args:  # RFC 5804 2.13: the TAG response code echoes the argument
            return Step(response("OK", "Done", f"TAG {quote(str(args[0]))}"))
        return Step(response("OK", "Done"))

    # -- not authenticated ----------------------------------------------------------------------

    def _starttls(self, args: list[str | int]) -> Step:
        if self.tls:
            return self._error(response("NO", "TLS is already active"))
        if not self.options.tls_available:
            return self._error(response("NO", "TLS is not available"))
        return Step(response("OK", "Begin TLS negotiation now"), StartTLS())

    def tls_started(self) -> bytes:
        """RFC 5804 2.2: forget what came before, send the capabilities again."""
        self.tls = True
        self.state = State.NONAUTH
        return self.capabilities() + response("OK", "TLS negotiation successful")

    def _authenticate(self, args: list[str | int]) -> Step:
        if not self.login_allowed:
            return self._error(NO_ENCRYPT)
        if str(args[0]).upper() != "PLAIN":
            return self._error(NO_MECHANISM)
        if len(args) == 2:
            return self._plain(str(args[1]))
        self.state = State.SASL
        return Step(b'""\r\n')  # RFC 5804 2.1: an empty challenge

    def _sasl_answer(self, cmd: Command) -> Step:
        self.state = State.NONAUTH
        if cmd.name or len(cmd.args) != 1 or not isinstance(cmd.args[0], str):
            return self._error(response("NO", "Expected the SASL response as a string"))
        return self._plain(cmd.args[0])

    def _plain(self, b64: str) -> Step:
        try:
            creds = parse_plain(decode_response(b64))
        except Cancelled:
            return self._error(NO_CANCELLED)
        except SASLError as e:
            return self._error(response("NO", str(e)))
        if creds.authzid and creds.authzid.lower() != creds.authcid.lower():
            return self._error(response("NO", "Cannot act as another user"))
        self.state = State.LOGIN
        return Step(b"", Authenticate(creds.authcid, creds.password))

    def login_finished(self, result: LoginResult | None) -> Step:
        self.state = State.NONAUTH
        if result is None:
            return Step(NO_TEMP)
        if result.outcome is Outcome.THROTTLED:
            return self._error(NO_THROTTLED)
        if result.outcome is not Outcome.OK or result.user is None:
            return self._error(NO_AUTH_FAILED)
        self.user = result.user
        self.store = self.store_for(result.user)
        self.state = State.AUTH
        return Step(response("OK", "Logged in"))

    # -- authenticated --------------------------------------------------------------------------

    def _unauthenticate(self, args: list[str | int]) -> Step:
        """RFC 5804 2.14.1: back to the non-authenticated state."""
        self.user = None
        self.store = None
        self.state = State.NONAUTH
        return Step(response("OK", "Unauthenticate completed"))

    def _scripts(self) -> ScriptStore:
        assert self.store is not None
        return self.store

    def _compile(self, text: str) -> bytes | None:
        try:
            compile_script(text, self.options.max_script_size)
        except SieveParseError as e:
            return response("NO", str(e))
        return None

    def _havespace(self, args: list[str | int]) -> Step:
        self._scripts().check_space(str(args[0]), int(args[1]))
        return Step(response("OK", "Putscript would succeed"))

    def _putscript(self, args: list[str | int]) -> Step:
        name, text = str(args[0]), str(args[1])
        store = self._scripts()
        store.check_space(name, len(text.encode("utf-8")))
        refusal = self._compile(text)
        if refusal is not None:
            return Step(refusal)
        store.put(name, text)
        return Step(response("OK", "Putscript completed"))

    def _checkscript(self, args: list[str | int]) -> Step:
        refusal = self._compile(str(args[0]))
        return Step(refusal or response("OK", "Script is valid"))

    def _listscripts(self, args: list[str | int]) -> Step:
        store = self._scripts()
        active = store.active()
        lines = [quote(n) + (" ACTIVE" if n == active else "") + "\r\n" for n in store.names()]
        return Step("".join(lines).encode("utf-8") + response("OK", "Listscripts completed"))

    def _setactive(self, args: list[str | int]) -> Step:
        name = str(args[0])
        store = self._scripts()
        if not name:
            store.activate(None)
            return Step(response("OK", "No script is active now"))
        refusal = self._compile(store.read(name))
        if refusal is not None:
            return Step(refusal)
        store.activate(name)
        return Step(response("OK", f"{name} is active now"))

    def _getscript(self, args: list[str | int]) -> Step:
        data = self._scripts().read(str(args[0])).encode("utf-8")
        done = response("OK", "Getscript completed")
        return Step(b"{%d}\r\n" % len(data) + data + b"\r\n" + done)

    def _deletescript(self, args: list[str | int]) -> Step:
        self._scripts().delete(str(args[0]))
        return Step(response("OK", "Deletescript completed"))

    def _renamescript(self, args: list[str | int]) -> Step:
        self._scripts().rename(str(args[0]), str(args[1]))
        return Step(response("OK", "Renamescript completed"))
