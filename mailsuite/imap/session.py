"""The IMAP session: one connection's state machine (RFC 3501 3).

``Session`` takes parsed commands, checks that each is allowed in the current state and runs
it.  A command either finishes at once (``run`` returns None) or is a coroutine that awaits
what only the adapter can do -- a worker thread, a password check, the client's next line,
room in the output buffer -- through :mod:`mailsuite.imap.interface`; ``run`` returns that
coroutine, wrapped so that a failure becomes the command's tagged answer, and the adapter
drives it (``Deferred.fromCoroutine``) with input paused, so pipelined commands are answered
in order (RFC 3501 5.5).  Nothing here imports Twisted: the session can be driven by a test
with no reactor and no sockets.

Here are the commands that change the session's state (LOGIN, AUTHENTICATE, STARTTLS,
SELECT / EXAMINE, UNSELECT, CLOSE, LOGOUT, ENABLE), IDLE, and the few that only report
(CAPABILITY, NOOP, CHECK, ID, NAMESPACE); the mailbox and message commands come from the
``MailboxCommands`` and ``MessageCommands`` mixins.
"""

from __future__ import annotations

import base64
import binascii
import inspect
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from mailsuite.directory import SPECIAL_FOLDERS
from mailsuite.imap.fetch_response import flags_bytes
from mailsuite.imap.interface import ConnectionGone
from mailsuite.imap.mailbox_commands import MailboxCommands
from mailsuite.imap.message_commands import MessageCommands
from mailsuite.imap.parser import (
    NIL,
    Atom,
    Command,
    ParseError,
    Token,
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
    vanished_earlier,
)
from mailsuite.login import Outcome
from mailsuite.store.index import FolderIndex
from mailsuite.store.index_schema import Early, EarlyAnswer
from mailsuite.store.mailbox import (
    SEPARATOR,
    Account,
    Folder,
    MailboxError,
    opened_index,
)
from mailsuite.store.maildir import ensure_folder
from mailsuite.store.space import is_disk_full, log_failure

POLL_INTERVAL = 0.5  # seconds between directory checks while a session is in IDLE


def select_answer(
    keywords: frozenset[str] | set[str],
    readonly: bool,
    exists: int,
    recent: int,
    first_unseen: int,
    uidvalidity: int,
    uidnext: int,
    highestmodseq: int,
) -> bytes:
    """The untagged responses of SELECT / EXAMINE (RFC 3501 6.3.1, RFC 7162 3.1.2.1
    HIGHESTMODSEQ): one function for a folder open and one answered from its listing, so
    the two answers are the same bytes.  ``first_unseen`` 0: no message is unseen."""
    out = [
        flags_announcement(keywords, readonly).decode(),
        f"* {exists} EXISTS\r\n",
        f"* {recent} RECENT\r\n",
    ]
    if first_unseen:
        out.append(f"* OK [UNSEEN {first_unseen}] First unseen\r\n")
    out += [
        f"* OK [UIDVALIDITY {uidvalidity}] UIDs valid\r\n",
        f"* OK [UIDNEXT {uidnext}] Predicted next UID\r\n",
        f"* OK [HIGHESTMODSEQ {highestmodseq}] Highest\r\n",
    ]
    return "".join(out).encode()


def _select_completed(readonly: bool) -> tuple[str, str]:
    """The tagged OK's text and response code (RFC 3501 6.3.1-2)."""
    if readonly:
        return "EXAMINE completed", "READ-ONLY"
    return "SELECT completed", "READ-WRITE"


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
#: Every command name this server knows (the /metrics label set takes it from here).
COMMANDS = frozenset(_ANY | _NOT_AUTH_CMDS | _AUTH_CMDS | _SELECTED_CMDS)


class Session(MailboxCommands, MessageCommands, QuotaCommands):
    """One IMAP connection's state machine: which command may run in which state, how it
    runs, and the commands that move between states (its state and output helpers are
    ``SessionBase``'s, as is the ``proto`` it writes to)."""

    # -- capabilities ----------------------------------------------------------------------

    def login_allowed(self) -> bool:
        return self.proto.tls or self.shared.limits.allow_plaintext

    def capabilities(self) -> str:
        caps = ["IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE"]
        if self.state == _NOT_AUTH:
            if not self.proto.tls and self.shared.limits.tls_available:
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
                f"APPENDLIMIT={self.shared.limits.max_literal}",
                *QUOTA_CAPABILITIES,
            ]
        return " ".join(caps)

    # -- dispatch ---------------------------------------------------------------------------

    def run(self, cmd: Command) -> Coroutine[Any, Any, None] | None:
        """Run a command: None when it has been answered, else the coroutine that answers it
        (for the adapter to drive, input paused until it ends; it raises nothing)."""
        name = cmd.command
        handler = getattr(self, "do_" + name.replace("-", "_"), None)
        allowed = (
            name in _ANY
            or (name in _NOT_AUTH_CMDS and self.state == _NOT_AUTH)
            or (name in _AUTH_CMDS and self.state in (_AUTH, _SELECTED))
            or (name in _SELECTED_CMDS and self.state == _SELECTED)
        )
        if handler is None or name not in COMMANDS:
            self.tagged(cmd.tag, "BAD", f"Unknown command {name}")
            return None
        if not allowed:
            self.tagged(cmd.tag, "BAD", f"{name} is not allowed in the {self.state} state")
            return None
        try:
            result = handler(cmd)
        except Exception as exc:
            self._failed(cmd, exc)
            return None
        if inspect.iscoroutine(result):
            return self._complete(cmd, result)
        return None

    async def _complete(self, cmd: Command, work: Coroutine[Any, Any, None]) -> None:
        """Run a command's coroutine to its end: a failure is answered like one raised at
        once; a connection lost while it waited for the client ends it quietly."""
        try:
            await work
        except ConnectionGone:
            pass
        except Exception as exc:
            self._failed(cmd, exc)

    def _failed(self, cmd: Command, exc: BaseException) -> None:
        """Answer a command that raised ``exc`` (called in the ``except`` block: an
        unexpected exception is logged with its traceback)."""
        if isinstance(exc, _Reply):
            self.finish(cmd, exc.status, exc.text, exc.code)
        elif isinstance(exc, BadCharset):
            self.finish(cmd, "NO", str(exc), "BADCHARSET (UTF-8 US-ASCII)")
        elif isinstance(exc, ParseError):
            self.finish(cmd, "BAD", str(exc))
        elif isinstance(exc, MailboxError):
            self.finish(cmd, "NO", str(exc), exc.code)
        elif is_disk_full(exc):
            # RFC 5530 OVERQUOTA, as Dovecot answers ENOSPC; nothing was left half-done
            self.log.warn(
                "IMAP {command} for {user}: the disk is full", command=cmd.name, user=self.user
            )
            self.finish(cmd, "NO", "Not enough disk space", "OVERQUOTA")
        else:
            self.log.failure("IMAP {command} failed for {user}", command=cmd.name, user=self.user)
            self.finish(cmd, "NO", "Internal server error, logged", "SERVERBUG")

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
            self.log.debug(
                "client ID {items}",
                items=[bytes(x) if isinstance(x, bytes) else x for x in cmd.args[0]],
            )
        self.untagged('ID ("name" "mailsuite" "vendor" "mailsuite")')
        self.ok(cmd, "ID completed")

    # -- not authenticated -----------------------------------------------------------------

    def do_STARTTLS(self, cmd: Command) -> None:
        if self.proto.tls:
            raise _bad("TLS is already active")
        if not self.shared.limits.tls_available:
            raise _no("TLS is not available")
        self.tagged(cmd.tag, "OK", "Begin TLS negotiation now")
        self.proto.start_tls()

    async def do_LOGIN(self, cmd: Command) -> None:
        if len(cmd.args) != 2:
            raise _bad("LOGIN expects a user name and a password")
        if not self.login_allowed():
            raise _no("Use STARTTLS first", "PRIVACYREQUIRED")
        user = astring(cmd.args[0]).decode("utf-8", "replace")
        password = astring(cmd.args[1]).decode("utf-8", "replace")
        await self._login(cmd, user, password)

    async def do_AUTHENTICATE(self, cmd: Command) -> None:
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
            await self._plain(cmd, b"" if initial == b"=" else initial)
        else:
            await self._plain(cmd, await self.proto.next_line(b"+ \r\n"))

    async def _plain(self, cmd: Command, b64: bytes) -> None:
        if b64.strip() == b"*":
            self.tagged(cmd.tag, "BAD", "Authentication cancelled")
            return
        try:
            raw = base64.b64decode(b64, validate=True)
            authz, authc, password = raw.split(b"\x00")
        except (binascii.Error, ValueError):
            self.tagged(cmd.tag, "BAD", "Invalid SASL PLAIN response")
            return
        user = authc.decode("utf-8", "replace")
        if authz and authz.decode("utf-8", "replace").lower() != user.lower():
            self.tagged(cmd.tag, "NO", "Authorization identity must match", "AUTHORIZATIONFAILED")
            return
        await self._login(cmd, user, password.decode("utf-8", "replace"))

    async def _login(self, cmd: Command, user: str, password: str) -> None:
        result = await self.shared.login(user, password, self.proto.peer_ip, "imap")
        if result.outcome is Outcome.OK and result.user is not None:
            refusal = self.proto.admit_login(result.user)
            if refusal is not None:
                # Dovecot's answer to mail_max_userip_connections: a temporary NO, the
                # session stays unauthenticated (RFC 5530 UNAVAILABLE).
                self.tagged(cmd.tag, "NO", refusal, "UNAVAILABLE")
                return
            self.user = result.user
            root = self.shared.mailbox_root(result.user)
            ensure_folder(root)
            self.account = Account(root, SPECIAL_FOLDERS)
            self.state = _AUTH
            self.proto.authenticated()
            self.tagged(cmd.tag, "OK", "Logged in", f"CAPABILITY {self.capabilities()}")
        elif result.outcome is Outcome.THROTTLED:
            self.tagged(cmd.tag, "NO", "Too many failed logins, try later", "UNAVAILABLE")
        else:
            self.tagged(cmd.tag, "NO", "Invalid user name or password", "AUTHENTICATIONFAILED")

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

    def do_SELECT(self, cmd: Command) -> Coroutine[Any, Any, None] | None:
        return self._select(cmd, readonly=False)

    def do_EXAMINE(self, cmd: Command) -> Coroutine[Any, Any, None] | None:
        return self._select(cmd, readonly=True)

    def _select(self, cmd: Command, readonly: bool) -> Coroutine[Any, Any, None] | None:
        """SELECT / EXAMINE (RFC 3501 6.3.1-2).  A folder this process has not open is opened
        in a worker thread first (:func:`~mailsuite.store.mailbox.opened_index`: a first
        sight of 100,000 files must not hold every other session for half a second)."""
        if not cmd.args:
            raise _bad("Mailbox name expected")
        name = self._mailbox_arg(cmd.args[0])
        qresync_arg: list[Token] | None = None
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
                    params = toks[i + 1] if i + 1 < len(toks) else None
                    if not isinstance(params, list):
                        raise _bad("QRESYNC needs parameters")
                    qresync_arg = params
                    i += 2
                else:
                    raise _bad(f"Unknown SELECT parameter {p}")
        if self.view is not None:
            self._unselect()
            self.untagged("OK [CLOSED] Previous mailbox closed")
        acct = self._acct()
        if not acct.exists(name):
            raise _no("No such mailbox", "NONEXISTENT")
        path = acct.path(name)
        if not self.shared.registry.has(path):
            return self._select_cold(cmd, readonly, name, path, qresync_arg)
        self._selected(cmd, readonly, name, self.shared.registry.get(path), qresync_arg)
        return None

    async def _select_cold(
        self,
        cmd: Command,
        readonly: bool,
        name: str,
        path: Path,
        qresync_arg: list[Token] | None,
    ) -> None:
        """:meth:`_select` of a folder not open here: its index opened (built, filled,
        synced) in a worker thread, then handed to the registry.

        A folder whose index is missing (new to us) is answered from its listing before the
        index is built (:mod:`~mailsuite.store.index_build`: the UIDs made durable first),
        as Dovecot answers from ``dovecot-uidlist``; this command then waits for the build
        (input stays paused, so the client's next command waits too), and the session gets
        the folder as it was told (:meth:`~mailsuite.store.mailbox.Folder.view_as_told`).
        Not with QRESYNC parameters: those need the index's expunge history."""
        staged = self.shared.run_staged
        if staged is None or qresync_arg is not None:
            index = await self.shared.run_blocking(opened_index, path)
            if self.proto.gone():
                index.close()
                return
            self._selected(cmd, readonly, name, self.shared.registry.get(path, index), qresync_arg)
            return

        def open_early(report: Callable[[Early], None]) -> FolderIndex:
            return opened_index(path, EarlyAnswer(report, not readonly))

        first, done = staged(open_early)
        told = await first
        if told is None:  # the index existed, or the folder is small: built before answering
            index = await done
            if self.proto.gone():
                index.close()
                return
            self._selected(cmd, readonly, name, self.shared.registry.get(path, index), qresync_arg)
            return
        if not self.proto.gone():
            # every message is \Recent: a new index's watermark is its first UID
            self.send(
                select_answer(
                    told.keywords,
                    readonly,
                    told.exists,
                    told.exists,
                    told.first_unseen,
                    told.uidvalidity,
                    told.uidnext,
                    told.modseq,
                )
            )
            self.tagged(cmd.tag, "OK", *_select_completed(readonly))
        try:
            index = await done
        except Exception as e:
            log_failure(self.log, e, "index build of {path} failed", path=str(path))
            # the client was told the folder: it cannot be kept, nor taken back
            self.untagged("BYE Mailbox index could not be built, please reconnect")
            self.proto.close()
            return
        if self.proto.gone():
            index.close()
            return
        folder = self.shared.registry.get(path, index)
        v = folder.view_as_told(readonly, told)
        self.view = v
        self.selected_name = name
        self.state = _SELECTED
        v.on_change = self._changed

    def _selected(
        self,
        cmd: Command,
        readonly: bool,
        name: str,
        folder: Folder,
        qresync_arg: list[Token] | None,
    ) -> None:
        """The rest of :meth:`_select`, with the folder open: the view, \\Recent and the
        untagged answers."""
        v = folder.view(readonly)
        # SELECT claims the messages no session has seen as \Recent; EXAMINE shows them as
        # \Recent without claiming them (RFC 3501 2.3.2, 6.3.2)
        first, end = (
            folder.index.recent_range() if readonly else folder.index.claim_recent(wait=False)
        )
        if end > first:
            v.recent.append((first, end))
        self.view = v
        self.selected_name = name
        self.state = _SELECTED
        v.on_change = self._changed
        v.keywords = frozenset(folder.keywords)
        fl = folder.flags
        first_unseen = next((i + 1 for i, u in enumerate(v.uids) if "\\Seen" not in fl[u]), 0)
        self.send(
            select_answer(
                v.keywords,
                readonly,
                len(v.uids),
                v.recent_count(),
                first_unseen,
                folder.uidvalidity,
                folder.uidnext,
                folder.highestmodseq,
            )
        )
        if qresync_arg is not None:
            self._qresync(qresync_arg)
        self.tagged(cmd.tag, "OK", *_select_completed(readonly))

    def _qresync(self, toks: list[Token]) -> None:
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

    async def do_CLOSE(self, cmd: Command) -> None:
        v = self.view
        assert v is not None
        if not v.readonly:
            fl = v.folder.flags
            doomed = [u for u in v.uids if "\\Deleted" in fl.get(u, "")]
            if doomed:
                await self.expunge_off_loop(v.folder, doomed)
        self._unselect()
        self.tagged(cmd.tag, "OK", "CLOSE completed")

    # -- IDLE -------------------------------------------------------------------------------------

    async def do_IDLE(self, cmd: Command) -> None:
        """RFC 2177: changes are pushed while the client waits (``_changed``), until DONE."""
        if cmd.args:
            raise _bad("IDLE takes no arguments")
        unwatch = None
        if self.view is not None:
            self.flush(allow_expunge=True)
            every = self.shared.every

            def start_poll(tick: Callable[[], None]) -> Callable[[], None]:
                return every(POLL_INTERVAL, tick)

            # changes made in this process arrive at once through the change hub; those of
            # other programs (mutt, a second server) through one poller per folder
            unwatch = self.shared.registry.watch(self.view.folder, start_poll)
        self.idling = (cmd.tag, unwatch)
        try:
            line = await self.proto.next_line(b"+ idling\r\n")
        finally:
            self._stop_idling()
        if line.strip().upper() != b"DONE":
            self.finish(cmd, "BAD", "Expected DONE")
        else:
            self.ok(cmd, "IDLE terminated")

    def _stop_idling(self) -> None:
        if self.idling is not None:
            _, stop = self.idling
            self.idling = None
            if stop is not None:
                stop()

    def connection_lost(self) -> None:
        self._stop_idling()
        self._unselect()
