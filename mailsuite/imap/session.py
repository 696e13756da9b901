"""The IMAP session: one connection's state machine (RFC 3501 3).

``Session`` takes parsed commands, checks that each is allowed in the current state and runs
it; a command may finish at once, return a Deferred, or be a generator that yields Deferreds
(or None, to let the reactor breathe between batches).  Here are the commands that change the
session's state (LOGIN, AUTHENTICATE, STARTTLS, SELECT / EXAMINE, UNSELECT, CLOSE, LOGOUT,
ENABLE), IDLE, and the few that only report (CAPABILITY, NOOP, CHECK, ID, NAMESPACE); the
mailbox and message commands come from the ``MailboxCommands`` and ``MessageCommands`` mixins.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from mailsuite.auth import Outcome
from mailsuite.directory import SPECIAL_FOLDERS
from mailsuite.imap.fetch_response import flags_bytes
from mailsuite.imap.mailbox_commands import MailboxCommands
from mailsuite.imap.message_commands import MessageCommands
from mailsuite.imap.parser import (
    NIL,
    Atom,
    Command,
    ParseError,
    astring,
    atom,
    number,
    sequence_set,
)
from mailsuite.imap.quota_commands import CAPABILITIES as QUOTA_CAPABILITIES
from mailsuite.imap.quota_commands import QuotaCommands
from mailsuite.imap.search import BadCharset
from mailsuite.imap.sequence import SequenceSet
from mailsuite.imap.session_base import (
    _AUTH,
    _LOGOUT,
    _NOT_AUTH,
    _SELECTED,
    _bad,
    _no,
    _Reply,
    flags_announcement,
    log,
    vanished_earlier,
)
from mailsuite.store.mailbox import SEPARATOR, Account, MailboxError
from mailsuite.store.maildir import ensure_folder

POLL_INTERVAL = 0.5  # seconds between directory checks while a session is in IDLE

_ANY = {"CAPABILITY", "NOOP", "LOGOUT", "ID"}
_NOT_AUTH_CMDS = {"STARTTLS", "AUTHENTICATE", "LOGIN"}
_AUTH_CMDS = {
    "SELECT",
    "EXAMINE",
    "CREATE",
    "DELETE",
    "RENAME",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "LIST",
    "LSUB",
    "STATUS",
    "APPEND",
    "NAMESPACE",
    "ENABLE",
    "IDLE",
    "GETQUOTAROOT",
    "GETQUOTA",
    "SETQUOTA",
}
_SELECTED_CMDS = {
    "CHECK",
    "CLOSE",
    "UNSELECT",
    "EXPUNGE",
    "SEARCH",
    "FETCH",
    "STORE",
    "COPY",
    "MOVE",
}


class Session(MailboxCommands, MessageCommands, QuotaCommands):
    """One IMAP connection's state machine: which command may run in which state, how it
    runs, and the commands that move between states (its state and output helpers are
    ``SessionBase``'s, as is the ``proto`` it writes to)."""

    # -- capabilities ----------------------------------------------------------------------

    def login_allowed(self) -> bool:
        return self.proto.tls or self.shared.allow_plaintext

    def capabilities(self) -> str:
        caps = ["IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE"]
        if self.state == _NOT_AUTH:
            if not self.proto.tls and self.shared.runtime.tls is not None:
                caps.append("STARTTLS")
            if self.login_allowed():
                caps.append("AUTH=PLAIN")
            else:
                caps.append("LOGINDISABLED")
        else:
            caps += [
                "NAMESPACE",
                "UNSELECT",
                "UIDPLUS",
                "MOVE",
                "SPECIAL-USE",
                "CHILDREN",
                "CONDSTORE",
                "QRESYNC",
                "LIST-EXTENDED",
                "LIST-STATUS",
                "ESEARCH",
                f"APPENDLIMIT={self.shared.max_literal}",
                *QUOTA_CAPABILITIES,
            ]
        return " ".join(caps)

    # -- dispatch ---------------------------------------------------------------------------

    def run(self, cmd: Command) -> defer.Deferred[None] | None:
        """Run a command; returns a Deferred if it finishes later (input stays paused)."""
        name = cmd.command
        handler = getattr(self, "do_" + name.replace("-", "_"), None)
        allowed = (
            name in _ANY
            or (name in _NOT_AUTH_CMDS and self.state == _NOT_AUTH)
            or (name in _AUTH_CMDS and self.state in (_AUTH, _SELECTED))
            or (name in _SELECTED_CMDS and self.state == _SELECTED)
        )
        if handler is None or (name not in _ANY | _NOT_AUTH_CMDS | _AUTH_CMDS | _SELECTED_CMDS):
            self.tagged(cmd.tag, "BAD", f"Unknown command {name}")
            return None
        if not allowed:
            self.tagged(cmd.tag, "BAD", f"{name} is not allowed in the {self.state} state")
            return None
        try:
            result = handler(cmd)
        except Exception as exc:  # noqa: BLE001
            self._failed(cmd, exc)
            return None
        if isinstance(result, Generator):
            return self._drive(cmd, result)
        if isinstance(result, defer.Deferred):
            result.addErrback(lambda f: self._failed(cmd, f.value))
            return result
        return None

    def _failed(self, cmd: Command, exc: BaseException) -> None:
        if isinstance(exc, _Reply):
            self.finish(cmd, exc.status, exc.text, exc.code)
        elif isinstance(exc, BadCharset):
            self.finish(cmd, "NO", str(exc), "BADCHARSET (UTF-8 US-ASCII)")
        elif isinstance(exc, ParseError):
            self.finish(cmd, "BAD", str(exc))
        elif isinstance(exc, MailboxError):
            self.finish(cmd, "NO", str(exc), exc.code)
        else:
            log.failure(
                "IMAP {command} failed for {user}",
                command=cmd.name,
                user=self.user,
                failure=Failure(exc),
            )
            self.finish(cmd, "NO", "Internal server error, logged", "SERVERBUG")

    def _drive(self, cmd: Command, gen: Generator[Any, Any, None]) -> defer.Deferred[None]:
        """Run a generator command: it yields Deferreds to wait on (or None to let the reactor
        breathe between batches)."""
        done: defer.Deferred[None] = defer.Deferred()
        reactor = self.shared.runtime.reactor

        def step(value: Any = None, error: BaseException | None = None) -> None:
            while True:
                try:
                    waited = gen.throw(error) if error is not None else gen.send(value)
                except StopIteration:
                    done.callback(None)
                    return
                except Exception as exc:  # noqa: BLE001
                    self._failed(cmd, exc)
                    done.callback(None)
                    return
                error = None
                value = None
                if waited is None:
                    reactor.callLater(0, step)
                    return
                if isinstance(waited, defer.Deferred):
                    waited.addCallbacks(step, lambda f: step(None, f.value))
                    return
                value = waited

        step()
        return done

    # -- any state --------------------------------------------------------------------------

    def do_CAPABILITY(self, cmd: Command) -> None:
        if cmd.args:
            raise _bad("CAPABILITY takes no arguments")
        self.untagged("CAPABILITY " + self.capabilities())
        self.ok(cmd, "CAPABILITY completed")

    def do_NOOP(self, cmd: Command) -> None:
        self.ok(cmd, "NOOP completed")

    def do_CHECK(self, cmd: Command) -> None:
        self.ok(cmd, "CHECK completed")

    def do_LOGOUT(self, cmd: Command) -> None:
        self.untagged("BYE Logging out")
        self.tagged(cmd.tag, "OK", "LOGOUT completed")
        self._unselect()
        self.state = _LOGOUT
        self.proto.close()

    def do_ID(self, cmd: Command) -> None:
        # RFC 2971: the client's list is accepted (and logged), ours is short.
        if len(cmd.args) != 1 or not (cmd.args[0] is NIL or isinstance(cmd.args[0], list)):
            raise _bad("ID expects a parameter list or NIL")
        if isinstance(cmd.args[0], list):
            log.debug(
                "client ID {items}",
                items=[bytes(x) if isinstance(x, bytes) else x for x in cmd.args[0]],
            )
        self.untagged('ID ("name" "mailsuite" "vendor" "mailsuite")')
        self.ok(cmd, "ID completed")

    # -- not authenticated -----------------------------------------------------------------

    def do_STARTTLS(self, cmd: Command) -> None:
        if self.proto.tls:
            raise _bad("TLS is already active")
        if self.shared.runtime.tls is None:
            raise _no("TLS is not available")
        self.tagged(cmd.tag, "OK", "Begin TLS negotiation now")
        self.proto.start_tls()

    def do_LOGIN(self, cmd: Command) -> defer.Deferred[None] | None:
        if len(cmd.args) != 2:
            raise _bad("LOGIN expects a user name and a password")
        if not self.login_allowed():
            raise _no("Use STARTTLS first", "PRIVACYREQUIRED")
        user = astring(cmd.args[0]).decode("utf-8", "replace")
        password = astring(cmd.args[1]).decode("utf-8", "replace")
        return self._login(cmd, user, password)

    def do_AUTHENTICATE(self, cmd: Command) -> defer.Deferred[None] | None:
        if not cmd.args:
            raise _bad("AUTHENTICATE expects a mechanism")
        mech = atom(cmd.args[0]).upper()
        if mech != "PLAIN":
            raise _no(f"Unsupported mechanism {mech}", "CANNOT")
        if not self.login_allowed():
            raise _no("Use STARTTLS first", "PRIVACYREQUIRED")
        if len(cmd.args) > 2:
            raise _bad("Too many arguments")
        if len(cmd.args) == 2:  # SASL-IR (RFC 4959)
            initial = astring(cmd.args[1])
            return self._plain(cmd, b"" if initial == b"=" else initial)
        d: defer.Deferred[bytes] = self.proto.continuation(b"+ \r\n")
        d.addCallback(lambda line: self._plain(cmd, line))
        return d  # type: ignore[return-value]

    def _plain(self, cmd: Command, b64: bytes) -> defer.Deferred[None] | None:
        if b64.strip() == b"*":
            self.tagged(cmd.tag, "BAD", "Authentication cancelled")
            return None
        try:
            raw = base64.b64decode(b64, validate=True)
            authz, authc, password = raw.split(b"\x00")
        except (binascii.Error, ValueError):
            self.tagged(cmd.tag, "BAD", "Invalid SASL PLAIN response")
            return None
        user = authc.decode("utf-8", "replace")
        if authz and authz.decode("utf-8", "replace").lower() != user.lower():
            self.tagged(cmd.tag, "NO", "Authorization identity must match", "AUTHORIZATIONFAILED")
            return None
        return self._login(cmd, user, password.decode("utf-8", "replace"))

    def _login(self, cmd: Command, user: str, password: str) -> defer.Deferred[None]:
        d = self.shared.runtime.auth.login(user, password, self.proto.peer_ip, "imap")

        def done(result: Any) -> None:
            if result.outcome is Outcome.OK:
                refusal = self.proto.admit_login(result.user)
                if refusal is not None:
                    # Dovecot's answer to mail_max_userip_connections: a temporary NO, the
                    # session stays unauthenticated (RFC 5530 UNAVAILABLE).
                    self.tagged(cmd.tag, "NO", refusal, "UNAVAILABLE")
                    return
                self.user = result.user
                root = self.shared.runtime.directory.mailbox_root(result.user)
                ensure_folder(root)
                self.account = Account(root, SPECIAL_FOLDERS)
                self.state = _AUTH
                self.proto.authenticated()
                self.tagged(cmd.tag, "OK", "Logged in", f"CAPABILITY {self.capabilities()}")
            elif result.outcome is Outcome.THROTTLED:
                self.tagged(cmd.tag, "NO", "Too many failed logins, try later", "UNAVAILABLE")
            else:
                self.tagged(cmd.tag, "NO", "Invalid user name or password", "AUTHENTICATIONFAILED")

        return d.addCallback(done)

    def do_NAMESPACE(self, cmd: Command) -> None:
        self.untagged(f'NAMESPACE (("" "{SEPARATOR}")) NIL NIL')
        self.ok(cmd, "NAMESPACE completed")

    def do_ENABLE(self, cmd: Command) -> None:
        if not cmd.args:
            raise _bad("ENABLE expects capability names")
        enabled = []
        condstore = False
        for tok in cmd.args:
            name = atom(tok).upper()
            if name == "CONDSTORE" and not self.condstore:
                condstore = True
                enabled.append(name)
            elif name == "QRESYNC" and not self.qresync:
                self.qresync = True
                condstore = True
                enabled.append(name)
        self.untagged("ENABLED" + "".join(" " + e for e in enabled))
        if condstore:
            self.enable_condstore()
        self.ok(cmd, "ENABLE completed")

    # -- SELECT / EXAMINE ---------------------------------------------------------------------

    def do_SELECT(self, cmd: Command) -> None:
        self._select(cmd, readonly=False)

    def do_EXAMINE(self, cmd: Command) -> None:
        self._select(cmd, readonly=True)

    def _select(self, cmd: Command, readonly: bool) -> None:
        if not cmd.args:
            raise _bad("Mailbox name expected")
        name = self._mailbox_arg(cmd.args[0])
        qresync_arg: list | None = None
        if len(cmd.args) > 1:
            if len(cmd.args) != 2 or not isinstance(cmd.args[1], list):
                raise _bad("Invalid SELECT parameters")
            toks = cmd.args[1]
            i = 0
            while i < len(toks):
                p = atom(toks[i]).upper()
                if p == "CONDSTORE":
                    self.condstore = True
                    i += 1
                elif p == "QRESYNC":
                    if not self.qresync:
                        raise _bad("QRESYNC must be enabled first")
                    if i + 1 >= len(toks) or not isinstance(toks[i + 1], list):
                        raise _bad("QRESYNC needs parameters")
                    qresync_arg = toks[i + 1]
                    i += 2
                else:
                    raise _bad(f"Unknown SELECT parameter {p}")
        if self.view is not None:
            self._unselect()
            self.untagged("OK [CLOSED] Previous mailbox closed")
        acct = self._acct()
        if not acct.exists(name):
            raise _no("No such mailbox", "NONEXISTENT")
        folder = self.shared.registry.get(acct.path(name))
        v = folder.view(readonly)
        # SELECT claims the messages no session has seen as \Recent; EXAMINE shows them as
        # \Recent without claiming them (RFC 3501 2.3.2, 6.3.2)
        first, end = folder.index.recent_range() if readonly else folder.index.claim_recent()
        if end > first:
            v.recent.append((first, end))
        self.view = v
        self.selected_name = name
        self.state = _SELECTED
        v.on_change = self._changed
        v.keywords = frozenset(folder.keywords)
        out = [
            flags_announcement(v.keywords, readonly).decode(),
            f"* {len(v.uids)} EXISTS\r\n",
            f"* {v.recent_count()} RECENT\r\n",
        ]
        fl = folder.flags
        for i, u in enumerate(v.uids):
            if "\\Seen" not in fl[u]:
                out.append(f"* OK [UNSEEN {i + 1}] First unseen\r\n")
                break
        out += [
            f"* OK [UIDVALIDITY {folder.uidvalidity}] UIDs valid\r\n",
            f"* OK [UIDNEXT {folder.uidnext}] Predicted next UID\r\n",
            f"* OK [HIGHESTMODSEQ {folder.highestmodseq}] Highest\r\n",
        ]
        self.send("".join(out).encode())
        if qresync_arg is not None:
            self._qresync(qresync_arg)
        self.tagged(
            cmd.tag,
            "OK",
            "SELECT completed" if not readonly else "EXAMINE completed",
            "READ-ONLY" if readonly else "READ-WRITE",
        )

    def _qresync(self, toks: list) -> None:
        """RFC 7162 3.2.5: VANISHED (EARLIER) and FETCH of what changed since modseq."""
        v = self.view
        assert v is not None
        if len(toks) < 2:
            raise _bad("QRESYNC needs UIDVALIDITY and MODSEQ")
        uidvalidity = number(toks[0])
        modseq = number(toks[1])
        known: SequenceSet | None = (
            sequence_set(toks[2]) if len(toks) > 2 and isinstance(toks[2], Atom) else None
        )
        if uidvalidity != v.folder.uidvalidity:
            return
        out = [vanished_earlier(v.folder, modseq, known)]
        fl = v.folder.flags
        ms = v.folder.modseqs
        for i, u in enumerate(v.uids):
            if ms.get(u, 0) > modseq:
                out.append(
                    b"* %d FETCH (UID %d %s MODSEQ (%d))\r\n"
                    % (i + 1, u, flags_bytes(fl[u], v.is_recent(u)), ms[u])
                )
        self.send(b"".join(out))

    def _changed(self) -> None:
        """A view's folder changed: push it now if the client is in IDLE."""
        if self.idling is not None:
            self.flush(allow_expunge=True, refresh=False)

    def do_UNSELECT(self, cmd: Command) -> None:
        self._unselect()
        self.tagged(cmd.tag, "OK", "UNSELECT completed")

    def do_CLOSE(self, cmd: Command) -> None:
        v = self.view
        assert v is not None
        if not v.readonly:
            fl = v.folder.flags
            doomed = [u for u in v.uids if "\\Deleted" in fl.get(u, "")]
            if doomed:
                v.folder.expunge(doomed)
        self._unselect()
        self.tagged(cmd.tag, "OK", "CLOSE completed")

    # -- IDLE -------------------------------------------------------------------------------------

    def do_IDLE(self, cmd: Command) -> defer.Deferred[None]:
        if cmd.args:
            raise _bad("IDLE takes no arguments")
        unwatch = None
        if self.view is not None:
            self.flush(allow_expunge=True)
            reactor = self.shared.runtime.reactor

            def start_poll(tick: Callable[[], None]) -> Callable[[], None]:
                poller = LoopingCall(tick)
                poller.clock = reactor
                poller.start(POLL_INTERVAL, now=False)
                return poller.stop

            # changes made in this process arrive at once through the change hub; those of
            # other programs (mutt, a second server) through one poller per folder
            unwatch = self.shared.registry.watch(self.view.folder, start_poll)
        self.idling = (cmd.tag, unwatch)
        d: defer.Deferred[bytes] = self.proto.continuation(b"+ idling\r\n")

        def ended(line: bytes) -> None:
            _, stop = self.idling or (cmd.tag, None)
            self.idling = None
            if stop is not None:
                stop()
            if line.strip().upper() != b"DONE":
                self.finish(cmd, "BAD", "Expected DONE")
            else:
                self.ok(cmd, "IDLE terminated")

        return d.addCallback(ended)

    def connection_lost(self) -> None:
        if self.idling is not None:
            _, stop = self.idling
            if stop is not None:
                stop()
            self.idling = None
        self._unselect()
