"""IMAP4rev1 server (RFC 3501) with IDLE, UIDPLUS, MOVE, SPECIAL-USE, NAMESPACE, UNSELECT, ENABLE,
LITERAL+, SASL-IR, ID, CHILDREN, CONDSTORE, QRESYNC, LIST-EXTENDED (RFC 5258), LIST-STATUS
(RFC 5819) and ESEARCH (RFC 4731), over the shared Maildir store.

Our own protocol on ``basic.LineReceiver`` (twisted.mail.imap4.IMAP4Server has STARTTLS
injection, ignores partial FETCH, never sets \\Seen, crashes on APPEND without flags and costs
~120 us per message per FETCH; see research/twisted-mail.md section 2).

``IMAPProtocol`` is the thin I/O adapter: lines, literals in raw mode, pausing input while a
command runs (so pipelined commands are answered in order), STARTTLS, the IDLE continuation,
timeouts and output flow control.  ``Session`` is the state machine: it takes parsed commands
and writes responses through the adapter.  Untagged EXISTS / EXPUNGE / FETCH FLAGS from other
sessions and processes are sent only where RFC 3501 7.4.1 / 5.2 allows, and at once in IDLE.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol, threads
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.protocols import basic
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from mailsuite.auth import Outcome
from mailsuite.directory import SPECIAL_FOLDERS
from mailsuite.imap.fetch_response import FetchPlan, build_batch, flags_bytes
from mailsuite.imap.parser import (
    NIL,
    Atom,
    BadCommand,
    Command,
    CommandReader,
    NeedLiteral,
    ParseError,
    astring,
    atom,
    flag_list,
    mailbox,
    number,
    parse_date_time,
    parse_fetch,
    sequence_set,
)
from mailsuite.imap.search import BadCharset, Needs, parse_search
from mailsuite.imap.sequence import SequenceSet, compress
from mailsuite.store.mailbox import (
    SEPARATOR,
    Account,
    FolderRegistry,
    FolderView,
    MailboxError,
    append_blocking,
    copy_blocking,
    move_inbox_blocking,
)
from mailsuite.store.maildir import ensure_folder

log = Logger(namespace="mailsuite.imap")

SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
BATCH = 1000  # messages per output batch (one transport.write each)
POLL_INTERVAL = 0.5  # seconds between directory checks while a session is in IDLE
PREAUTH_TIMEOUT = 120


class _Reply(Exception):
    """Raised inside a command to end it with ``tag <status> [code] text``."""

    def __init__(self, status: str, text: str, code: str | None = None) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.code = code


def _no(text: str, code: str | None = None) -> _Reply:
    return _Reply("NO", text, code)


def _bad(text: str) -> _Reply:
    return _Reply("BAD", text)


def quote(text: str | bytes) -> bytes:
    data = text.encode("utf-8") if isinstance(text, str) else text
    if b"\r" in data or b"\n" in data or len(data) > 1024:
        return b"{%d}\r\n%s" % (len(data), data)
    return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """LIST wildcards: ``*`` matches anything, ``%`` anything but the separator."""
    out = []
    for ch in pattern:
        if ch == "*":
            out.append(".*")
        elif ch == "%":
            out.append("[^" + re.escape(SEPARATOR) + "]*")
        else:
            out.append(re.escape(ch))
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def _inbox_norm(name: str) -> str:
    if name.upper() == "INBOX":
        return "INBOX"
    if name.upper().startswith("INBOX" + SEPARATOR):
        return "INBOX" + name[5:]
    return name


# -- shared per-process state -----------------------------------------------------------------


class _Shared:
    """What all sessions of one listener share: runtime and open folders."""

    _registries: dict[int, FolderRegistry] = {}

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        key = id(runtime)
        reg = _Shared._registries.get(key)
        if reg is None:
            reactor = runtime.reactor
            reg = FolderRegistry(runtime.changes, lambda f: reactor.callLater(0, f))
            _Shared._registries[key] = reg
        self.registry = reg
        cfg = runtime.config
        self.max_literal = cfg.imap.max_literal
        self.idle_timeout = cfg.imap.idle_timeout
        self.allow_plaintext = cfg.auth.allow_plaintext


# -- the session ------------------------------------------------------------------------------

_NOT_AUTH, _AUTH, _SELECTED, _LOGOUT = "not authenticated", "authenticated", "selected", "logout"

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


class Session:
    """One IMAP connection's state machine.  ``proto`` provides ``write(bytes)``, ``tls``,
    ``start_tls()``, ``peer_ip``, ``wait_writable()`` and ``close()``."""

    def __init__(self, shared: _Shared, proto: Any) -> None:
        self.shared = shared
        self.proto = proto
        self.state = _NOT_AUTH
        self.user: str | None = None
        self.account: Account | None = None
        self.view: FolderView | None = None
        self.selected_name: str | None = None
        self.condstore = False
        self.qresync = False
        self.idling: tuple[str, Any] | None = None  # (tag, poller)

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
                failure=__import__("twisted.python.failure", fromlist=["Failure"]).Failure(exc),
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

    # -- output -----------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.proto.write(data)

    def untagged(self, text: str | bytes) -> None:
        if isinstance(text, str):
            text = text.encode("utf-8")
        self.send(b"* " + text + b"\r\n")

    def tagged(self, tag: str, status: str, text: str, code: str | None = None) -> None:
        code_part = f"[{code}] " if code else ""
        self.send(f"{tag} {status} {code_part}{text}\r\n".encode())

    def finish(self, cmd: Command, status: str, text: str, code: str | None = None) -> None:
        """Send pending unsolicited responses (where allowed), then the tagged reply."""
        if self.view is not None and self.state == _SELECTED:
            try:
                self.flush(allow_expunge=cmd.uid or cmd.command not in ("FETCH", "STORE", "SEARCH"))
            except Exception:  # noqa: BLE001
                log.failure("flushing updates failed")
        self.tagged(cmd.tag, status, text, code)

    def ok(self, cmd: Command, text: str, code: str | None = None) -> None:
        self.finish(cmd, "OK", text, code)

    # -- unsolicited updates ------------------------------------------------------------------

    def flush(self, allow_expunge: bool = True, refresh: bool = True) -> None:
        v = self.view
        if v is None:
            return
        if refresh and v.invalid is None:
            try:
                v.folder.refresh()
            except Exception:  # noqa: BLE001
                log.failure("refresh failed")
        if v.invalid is not None:
            reason = v.invalid
            self.untagged("BYE " + reason)
            self._unselect()
            self.proto.close()
            return
        out: list[bytes] = []
        if allow_expunge and v.pending_expunged:
            if self.qresync:
                gone = sorted(v.pending_expunged)
                v.take_expunges()
                out.append(b"* VANISHED " + compress(gone).encode() + b"\r\n")
            else:
                for seq in v.take_expunges():
                    out.append(b"* %d EXPUNGE\r\n" % seq)
        before_recent = v.recent_count()
        exists = v.take_added() if (allow_expunge or not v.pending_expunged) else None
        if exists is not None:
            if not v.readonly:
                first, end = v.folder.index.claim_recent()
                if end > first:
                    v.recent.append((first, end))
            out.append(b"* %d EXISTS\r\n" % exists)
            recent = v.recent_count()
            if recent != before_recent or True:
                out.append(b"* %d RECENT\r\n" % recent)
        for uid in v.take_flags():
            seq = v.seq_of(uid)
            if not seq:
                continue
            f = v.folder.flags.get(uid)
            if f is None:
                continue
            extra = b""
            if self.condstore:
                extra = b" MODSEQ (%d)" % v.folder.modseqs.get(uid, 1)
            out.append(
                b"* %d FETCH (UID %d %s%s)\r\n"
                % (seq, uid, flags_bytes(f, v.is_recent(uid)), extra)
            )
        if out:
            self.send(b"".join(out))

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

    # -- authenticated: folders ------------------------------------------------------------

    def _acct(self) -> Account:
        assert self.account is not None
        return self.account

    def _mailbox_arg(self, tok: object) -> str:
        name = mailbox(tok)
        return _inbox_norm(name)

    def do_NAMESPACE(self, cmd: Command) -> None:
        self.untagged(f'NAMESPACE (("" "{SEPARATOR}")) NIL NIL')
        self.ok(cmd, "NAMESPACE completed")

    def do_ENABLE(self, cmd: Command) -> None:
        if not cmd.args:
            raise _bad("ENABLE expects capability names")
        enabled = []
        for tok in cmd.args:
            name = atom(tok).upper()
            if name == "CONDSTORE" and not self.condstore:
                self.condstore = True
                enabled.append(name)
            elif name == "QRESYNC" and not self.qresync:
                self.qresync = True
                if not self.condstore:
                    self.condstore = True
                enabled.append(name)
        self.untagged("ENABLED" + "".join(" " + e for e in enabled))
        self.ok(cmd, "ENABLE completed")

    def do_CREATE(self, cmd: Command) -> None:
        if len(cmd.args) < 1:
            raise _bad("CREATE expects a mailbox name")
        name = self._mailbox_arg(cmd.args[0])
        self._acct().create(name)
        self.ok(cmd, "CREATE completed")

    def do_DELETE(self, cmd: Command) -> None:
        if len(cmd.args) != 1:
            raise _bad("DELETE expects a mailbox name")
        name = self._mailbox_arg(cmd.args[0])
        if self.selected_name == name:
            self._unselect()
            self.state = _AUTH
        path = self._acct().delete(name)
        self.shared.registry.invalidate_under([path], "Mailbox was deleted")
        self.ok(cmd, "DELETE completed")

    def do_RENAME(self, cmd: Command) -> Generator[Any, Any, None]:
        if len(cmd.args) != 2:
            raise _bad("RENAME expects two mailbox names")
        old = self._mailbox_arg(cmd.args[0])
        new = self._mailbox_arg(cmd.args[1])
        acct = self._acct()
        if old == "INBOX":
            acct.rename(old, new)  # checks
            dest = acct.path(new)
            yield threads.deferToThread(move_inbox_blocking, acct.root, dest)
            self.shared.runtime.changes.notify(acct.root)
        else:
            moves = acct.rename(old, new)
            self.shared.registry.invalidate_under([m[0] for m in moves], "Mailbox was renamed")
        self.ok(cmd, "RENAME completed")

    def do_SUBSCRIBE(self, cmd: Command) -> None:
        if len(cmd.args) != 1:
            raise _bad("SUBSCRIBE expects a mailbox name")
        self._acct().subscribe(self._mailbox_arg(cmd.args[0]))
        self.ok(cmd, "SUBSCRIBE completed")

    def do_UNSUBSCRIBE(self, cmd: Command) -> None:
        if len(cmd.args) != 1:
            raise _bad("UNSUBSCRIBE expects a mailbox name")
        self._acct().unsubscribe(self._mailbox_arg(cmd.args[0]), missing_ok=True)
        self.ok(cmd, "UNSUBSCRIBE completed")

    def do_LSUB(self, cmd: Command) -> None:
        if len(cmd.args) != 2:
            raise _bad("LSUB expects a reference and a pattern")
        ref = astring(cmd.args[0]).decode("utf-8", "replace")
        pat = astring(cmd.args[1]).decode("utf-8", "replace")
        acct = self._acct()
        rx = _pattern_regex(_inbox_norm(ref + pat))
        subs = acct.subscriptions()
        existing = set(acct.names())
        out = []
        for name in subs:
            if rx.match(_inbox_norm(name)):
                attrs = "" if name in existing else "\\Noselect"
                out.append(
                    b"* LSUB ("
                    + attrs.encode()
                    + b') "'
                    + SEPARATOR.encode()
                    + b'" '
                    + quote(name)
                    + b"\r\n"
                )
        if "%" in pat:  # parents of matching subscriptions that the % stops at (RFC 3501 6.3.9)
            seen = {_inbox_norm(n) for n in subs}
            for name in subs:
                parts = name.split(SEPARATOR)
                for i in range(1, len(parts)):
                    parent = SEPARATOR.join(parts[:i])
                    if parent not in seen and rx.match(_inbox_norm(parent)):
                        seen.add(parent)
                        out.append(
                            b'* LSUB (\\Noselect) "'
                            + SEPARATOR.encode()
                            + b'" '
                            + quote(parent)
                            + b"\r\n"
                        )
        self.send(b"".join(out))
        self.ok(cmd, "LSUB completed")

    def do_LIST(self, cmd: Command) -> None:
        """LIST with the extensions of RFC 5258 (selection and return options, several
        patterns, \\NonExistent, \\Subscribed, CHILDINFO), RFC 5819 (RETURN (STATUS ...)) and
        RFC 6154 (SPECIAL-USE)."""
        req = _parse_list(list(cmd.args))
        acct = self._acct()
        if req.patterns == [""] and not req.select:
            # RFC 3501 6.3.8: the hierarchy delimiter and root of the reference
            self.untagged(f'LIST (\\Noselect) "{SEPARATOR}" ""')
            self.ok(cmd, "LIST completed")
            return
        names = acct.names()
        existing = set(names)
        want_subs = "SUBSCRIBED" in req.select or "SUBSCRIBED" in req.returns
        subs = acct.subscriptions() if want_subs else []
        subset = set(subs)
        rxs = [_pattern_regex(_inbox_norm(req.reference + p)) for p in req.patterns]

        def matches(name: str) -> bool:
            norm = _inbox_norm(name)
            return any(rx.match(norm) for rx in rxs)

        criteria = sorted(req.select & {"SUBSCRIBED", "SPECIAL-USE"})

        def selected(name: str) -> bool:
            """Does ``name`` meet the selection criteria (RFC 5258 3)?"""
            if "SUBSCRIBED" in req.select and name not in subset:
                return False
            if "SPECIAL-USE" in req.select and not (name in existing and acct.special_use(name)):
                return False
            return True

        # Every name that could be listed: mailboxes, the parents Maildir++ implies (.a.b
        # without .a), subscriptions, and their parents (for CHILDINFO).
        has_children: set[str] = set()  # names with an existing descendant
        for n in names:
            for parent in _ancestors(n):
                has_children.add(parent)
        universe: set[str] = set(existing) | has_children
        if want_subs:
            universe |= subset
        # RFC 5258 3.5 / example 9: with RECURSIVEMATCH a name gets CHILDINFO when one of its
        # descendants meets the selection criteria but does not match the pattern.
        childinfo: set[str] = set()
        if "RECURSIVEMATCH" in req.select:
            pool = subset if "SUBSCRIBED" in req.select else existing
            for n in pool:
                if not selected(n) or matches(n):
                    continue
                for parent in _ancestors(n):
                    childinfo.add(parent)
            universe |= childinfo
        ordered = sorted(universe - {"INBOX"})
        if "INBOX" in universe:
            ordered.insert(0, "INBOX")
        out: list[bytes] = []
        status_for: list[tuple[int, str]] = []  # (position in out, mailbox)
        for name in ordered:
            if not matches(name):
                continue
            if req.select:
                if not selected(name) and name not in childinfo:
                    continue
            elif name not in existing and name not in has_children:
                continue
            attrs: list[str] = []
            if name not in existing:
                # a parent that only its children imply cannot be selected; a name that
                # names nothing at all is \NonExistent (RFC 5258 3, implies \Noselect)
                attrs.append("\\Noselect" if name in has_children else "\\NonExistent")
            if name in has_children:
                attrs.append("\\HasChildren")
            elif name in existing:
                attrs.append("\\HasNoChildren")
            use = acct.special_use(name) if name in existing else None
            if use:
                attrs.append(use)
            if want_subs and name in subset:
                attrs.append("\\Subscribed")
            line = (
                b"* LIST ("
                + " ".join(attrs).encode()
                + b') "'
                + SEPARATOR.encode()
                + b'" '
                + quote(name)
            )
            if name in childinfo:
                line += b' ("CHILDINFO" (' + " ".join(f'"{c}"' for c in criteria).encode() + b"))"
            out.append(line + b"\r\n")
            if req.status and name in existing:
                status_for.append((len(out), name))
        if not req.status:
            self.send(b"".join(out))
        else:
            # RFC 5819: each mailbox's STATUS right after its LIST response
            start = 0
            for pos, name in status_for:
                self.send(b"".join(out[start:pos]))
                start = pos
                try:
                    self._status(name, req.status)
                except MailboxError:
                    pass  # gone meanwhile: its LIST line stands alone
            self.send(b"".join(out[start:]))
        self.ok(cmd, "LIST completed")

    def do_STATUS(self, cmd: Command) -> None:
        if len(cmd.args) != 2 or not isinstance(cmd.args[1], list):
            raise _bad("STATUS expects a mailbox name and a list of items")
        name = self._mailbox_arg(cmd.args[0])
        items = [atom(t).upper() for t in cmd.args[1]]
        if not self._acct().exists(name):
            raise _no("No such mailbox", "NONEXISTENT")
        self._status(name, items)
        self.ok(cmd, "STATUS completed")

    def _status(self, name: str, items: Sequence[str]) -> None:
        for it in items:
            if it not in _STATUS_ITEMS:
                raise _bad(f"Unknown STATUS item {it}")
        path = self._acct().path(name)
        reg = self.shared.registry
        folder = reg.peek(path)
        values: dict[str, int] = {}
        if folder is not None:
            folder.refresh()
            flags = folder.flags
            values["MESSAGES"] = len(folder.uids)
            values["UNSEEN"] = sum(1 for f in flags.values() if "\\Seen" not in f)
            values["UIDNEXT"] = folder.uidnext
            values["UIDVALIDITY"] = folder.uidvalidity
            values["HIGHESTMODSEQ"] = folder.highestmodseq
            db = folder.index
        else:
            from mailsuite.store.index import FolderIndex

            db = FolderIndex(path)
        try:
            if folder is None:
                db.sync()
                uv, nxt, hms = db.counters()
                total, unseen = db.db.execute(
                    "SELECT count(*), coalesce(sum(instr(flags, '\\Seen') = 0), 0) FROM messages"
                ).fetchone()
                values.update(
                    MESSAGES=total, UNSEEN=unseen, UIDNEXT=nxt, UIDVALIDITY=uv, HIGHESTMODSEQ=hms
                )
            if "RECENT" in items:
                first = int(db._meta("recent") or 1)
                (values["RECENT"],) = db.db.execute(
                    "SELECT count(*) FROM messages WHERE uid >= ?", (first,)
                ).fetchone()
            if "SIZE" in items:
                db._fill_unknown()
                (values["SIZE"],) = db.db.execute(
                    "SELECT coalesce(sum(size), 0) FROM messages"
                ).fetchone()
        finally:
            if folder is None:
                db.close()
        body = " ".join(f"{it} {values[it]}" for it in items)
        self.send(b"* STATUS " + quote(name) + b" (" + body.encode() + b")\r\n")

    # -- APPEND -----------------------------------------------------------------------------

    def do_APPEND(self, cmd: Command) -> Generator[Any, Any, None]:
        args = list(cmd.args)
        if len(args) < 2:
            raise _bad("APPEND expects a mailbox and a message")
        name = self._mailbox_arg(args.pop(0))
        flags: list[str] = []
        idate: float | None = None
        if args and isinstance(args[0], list):
            flags = flag_list(args.pop(0))
        if len(args) == 2:
            idate = parse_date_time(args.pop(0)).timestamp()
        if len(args) != 1 or not isinstance(args[0], bytes) or isinstance(args[0], Atom):
            raise _bad("APPEND expects a literal message")
        data = bytes(args[0])
        if not data:
            raise _no("Empty message", "CANNOT")
        acct = self._acct()
        if not acct.exists(name):
            raise _no("No such mailbox", "TRYCREATE")
        path = acct.path(name)
        # Stored with LF line ends, like delivered mail (Maildir convention).
        stored = data.replace(b"\r\n", b"\n")
        fl = frozenset(f for f in flags if f != "\\Recent")
        uidvalidity, uid = yield threads.deferToThread(append_blocking, path, stored, fl, idate)
        folder = self.shared.registry.peek(path)
        if folder is not None:
            folder.refresh()
        self.shared.runtime.changes.notify(path, folder._hub_changed if folder else None)
        self.ok(cmd, "APPEND completed", f"APPENDUID {uidvalidity} {uid}")

    # -- SELECT / EXAMINE ---------------------------------------------------------------------

    def _unselect(self) -> None:
        if self.view is not None:
            self.view.on_change = None
            self.view.close()
            self.view = None
            self.selected_name = None
        if self.state == _SELECTED:
            self.state = _AUTH

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
        if not readonly:
            first, end = folder.index.claim_recent()
            if end > first:
                v.recent.append((first, end))
        self.view = v
        self.selected_name = name
        self.state = _SELECTED
        v.on_change = self._changed
        keywords = sorted(
            {f for s in set(folder.flags.values()) for f in s.split() if not f.startswith("\\")}
        )
        flags = " ".join(list(SYSTEM_FLAGS) + keywords)
        out = [
            f"* FLAGS ({flags})\r\n",
            f"* OK [PERMANENTFLAGS ({flags} \\*)] Flags permitted\r\n"
            if not readonly
            else "* OK [PERMANENTFLAGS ()] Read-only mailbox\r\n",
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
        idx = v.folder.index
        gone = idx.expunged_since(modseq)
        if known is not None:
            top = max(gone[-1] if gone else 0, v.folder.uidnext)
            ranges = known.resolve(top)
            from mailsuite.imap.sequence import ranges_contain

            gone = [u for u in gone if ranges_contain(ranges, u)]
        out = []
        if gone:
            out.append(b"* VANISHED (EARLIER) " + compress(gone).encode() + b"\r\n")
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

    def do_EXPUNGE(self, cmd: Command) -> None:
        v = self._rw()
        fl = v.folder.flags
        if cmd.uid:
            if len(cmd.args) != 1:
                raise _bad("UID EXPUNGE expects a UID set")
            wanted = set(sequence_set(cmd.args[0]).select_sorted(v.uids))
        else:
            if cmd.args:
                raise _bad("EXPUNGE takes no arguments")
            wanted = None
        doomed = [
            u for u in v.uids if "\\Deleted" in fl.get(u, "") and (wanted is None or u in wanted)
        ]
        if doomed:
            v.folder.expunge(doomed)
        self.ok(cmd, "EXPUNGE completed")

    def _rw(self) -> FolderView:
        v = self.view
        assert v is not None
        if v.readonly:
            raise _no("Mailbox is read-only", "READ-ONLY")
        return v

    # -- message sets ---------------------------------------------------------------------------

    def _targets(self, cmd: Command, tok: object) -> list[tuple[int, int]]:
        """(seq, uid) pairs of a sequence set or UID set, in ascending order."""
        v = self.view
        assert v is not None
        seqset = sequence_set(tok)
        uids = v.uids
        if cmd.uid:
            idx = seqset.select_indices(uids)
            return [(i + 1, uids[i]) for i in idx]
        n = len(uids)
        if seqset.exceeds(n):
            raise _bad("Invalid message sequence number")
        out = []
        for a, b in seqset.resolve(n):
            for s in range(a, b + 1):
                out.append((s, uids[s - 1]))
        return out

    # -- FETCH ----------------------------------------------------------------------------------

    def do_FETCH(self, cmd: Command) -> Generator[Any, Any, None]:
        if len(cmd.args) < 2:
            raise _bad("FETCH expects a message set and items")
        v = self.view
        assert v is not None
        targets = self._targets(cmd, cmd.args[0])
        req = parse_fetch(list(cmd.args[1:]))
        if req.needs_modseq:
            self.condstore = True
        if req.vanished and (not cmd.uid or not self.qresync):
            raise _bad("VANISHED needs UID FETCH with QRESYNC enabled")
        plan = FetchPlan(req, cmd.uid, self.condstore)
        folder = v.folder
        if req.vanished and req.changedsince is not None:
            gone = folder.index.expunged_since(req.changedsince)
            seqset = sequence_set(cmd.args[0])
            if gone:
                from mailsuite.imap.sequence import ranges_contain

                ranges = seqset.resolve(max(gone[-1], folder.uidnext))
                gone = [u for u in gone if ranges_contain(ranges, u)]
            if gone:
                self.send(b"* VANISHED (EARLIER) " + compress(gone).encode() + b"\r\n")
        if req.changedsince is not None:
            cs = req.changedsince
            ms = folder.modseqs
            targets = [(s, u) for s, u in targets if ms.get(u, 0) > cs]
        seen_now: set[int] = set()
        for start in range(0, len(targets), BATCH):
            batch = targets[start : start + BATCH]
            if plan.sets_seen and not v.readonly:
                fl = folder.flags
                changes = [
                    (u, frozenset(fl[u].split()) | {"\\Seen"})
                    for _, u in batch
                    if u in fl and "\\Seen" not in fl[u]
                ]
                if changes:
                    folder.store(v, changes)
                    seen_now.update(u for u, _ in changes)
            details = None
            if plan.need_details:
                details = folder.index.details(
                    [u for _, u in batch], plan.need_size, plan.need_date
                )
            cache: list[tuple[int, str, bytes]] = []
            data = build_batch(
                plan,
                folder.path,
                batch,
                folder.flags,
                folder.modseqs,
                v.is_recent,
                details,
                cache,
                seen_now,
            )
            if cache:
                try:
                    folder.index.store_cached(cache)
                except Exception:  # noqa: BLE001 -- a busy database only costs a recompute
                    log.failure("caching FETCH data failed")
            self.send(data)
            if start + BATCH < len(targets):
                w = self.proto.wait_writable()
                yield w  # None: let the reactor run between batches
        # a \Seen we set is not news to this session
        v.pending_flags -= seen_now
        self.ok(cmd, "FETCH completed" if not cmd.uid else "UID FETCH completed")

    # -- STORE ----------------------------------------------------------------------------------

    def do_STORE(self, cmd: Command) -> None:
        args = list(cmd.args)
        if len(args) < 3:
            raise _bad("STORE expects a message set, an action and flags")
        v = self._rw()
        targets = self._targets(cmd, args.pop(0))
        unchangedsince: int | None = None
        if isinstance(args[0], list):
            mods = args.pop(0)
            if len(mods) != 2 or atom(mods[0]).upper() != "UNCHANGEDSINCE":
                raise _bad("Unknown STORE modifier")
            unchangedsince = number(mods[1])
            self.condstore = True
        if len(args) < 2:
            raise _bad("STORE expects an action and flags")
        action = atom(args[0]).upper()
        silent = action.endswith(".SILENT")
        if silent:
            action = action[: -len(".SILENT")]
        if action not in ("FLAGS", "+FLAGS", "-FLAGS"):
            raise _bad(f"Unknown STORE action {action}")
        flags = set(flag_list(args[1] if len(args) == 2 else list(args[1:])))
        folder = v.folder
        fl = folder.flags
        changes = []
        for _, u in targets:
            cur = fl.get(u)
            if cur is None:
                continue
            old = frozenset(cur.split()) if cur else frozenset()
            if action == "FLAGS":
                new = frozenset(flags)
            elif action == "+FLAGS":
                new = old | flags
            else:
                new = old - flags
            changes.append((u, new))
        done = folder.store(v, changes, unchangedsince)
        done_uids = {u for u, _, _ in done}
        modified = (
            [u for u, _ in changes if u not in done_uids] if unchangedsince is not None else []
        )
        out = []
        if not silent or self.condstore:
            for seq, u in targets:
                if u not in done_uids or u not in fl:
                    continue
                items = [b"UID %d" % u] if cmd.uid else []
                if not silent:
                    items.append(flags_bytes(fl[u], v.is_recent(u)))
                if self.condstore:
                    items.append(b"MODSEQ (%d)" % folder.modseqs.get(u, 1))
                if silent and not unchangedsince:
                    continue
                out.append(b"* %d FETCH (%s)\r\n" % (seq, b" ".join(items)))
        self.send(b"".join(out))
        if modified:
            if cmd.uid:
                mset = compress(modified)
            else:
                mset = compress(v.seq_of(u) for u in modified)
            self.ok(cmd, "Conditional STORE failed for some messages", f"MODIFIED {mset}")
        else:
            self.ok(cmd, "STORE completed")

    # -- SEARCH ---------------------------------------------------------------------------------

    def do_SEARCH(self, cmd: Command) -> Generator[Any, Any, None]:
        v = self.view
        assert v is not None
        args = list(cmd.args)
        returns: set[str] | None = None  # RFC 4731 result options; None: plain SEARCH
        if args and isinstance(args[0], Atom) and args[0].upper() == "RETURN":
            if len(args) < 2 or not isinstance(args[1], list):
                raise _bad("RETURN expects a list of result options")
            returns = set()
            for tok in args[1]:
                opt = atom(tok).upper()
                if opt not in _ESEARCH_OPTIONS:
                    raise _bad(f"Unknown SEARCH result option {opt}")
                returns.add(opt)
            if not returns:  # RFC 4731 3.1: RETURN () means RETURN (ALL)
                returns = {"ALL"}
            args = args[2:]
        prog = parse_search(args)
        if prog.uses_modseq:
            self.condstore = True
        folder = v.folder
        uids = v.uids
        fl = folder.flags
        key = prog.key
        result: list[tuple[int, int]] = []
        fast = None
        if key.op == "ALL":
            fast = lambda f: True  # noqa: E731
        elif key.op == "FLAG" and key.args[0].startswith("\\"):
            flag, present = key.args
            fast = (lambda f: flag in f) if present else (lambda f: flag not in f)
        if fast is not None:
            for i, u in enumerate(uids):
                f = fl.get(u)
                if f is not None and fast(f):
                    result.append((i + 1, u))
        else:
            pred = prog.bind(len(uids), uids[-1] if uids else 0)
            needs = prog.needs
            step = 500 if needs != Needs.NONE else 5000
            need_details = needs != Needs.NONE or _uses_details(key)
            for start in range(0, len(uids), step):
                chunk = uids[start : start + step]
                details = folder.index.details(chunk, True, True) if need_details else {}
                for j, u in enumerate(chunk):
                    if u not in fl:
                        continue
                    m = _SearchMsg(start + j + 1, u, folder, v, details.get(u))
                    if pred(m):
                        result.append((start + j + 1, u))
                if start + step < len(uids):
                    yield None
        nums = [u if cmd.uid else s for s, u in result]
        if returns is not None:
            self.send(_esearch(cmd, returns, nums, prog.uses_modseq, folder.modseqs, result))
        else:
            text = b"* SEARCH" + b"".join(b" %d" % n for n in nums)
            if prog.uses_modseq and result:
                text += b" (MODSEQ %d)" % max(folder.modseqs.get(u, 1) for _, u in result)
            self.send(text + b"\r\n")
        self.ok(cmd, "SEARCH completed" if not cmd.uid else "UID SEARCH completed")

    # -- COPY / MOVE ------------------------------------------------------------------------------

    def do_COPY(self, cmd: Command) -> Generator[Any, Any, None]:
        return self._copy(cmd, move=False)

    def do_MOVE(self, cmd: Command) -> Generator[Any, Any, None]:
        return self._copy(cmd, move=True)

    def _copy(self, cmd: Command, move: bool) -> Generator[Any, Any, None]:
        if len(cmd.args) != 2:
            raise _bad(f"{cmd.command} expects a message set and a mailbox")
        v = self.view
        assert v is not None
        if move and v.readonly:
            raise _no("Mailbox is read-only", "READ-ONLY")
        targets = self._targets(cmd, cmd.args[0])
        name = self._mailbox_arg(cmd.args[1])
        acct = self._acct()
        if not acct.exists(name):
            raise _no("No such mailbox", "TRYCREATE")
        dest = acct.path(name)
        folder = v.folder
        uids = [u for _, u in targets if u in folder.flags]
        if not uids:
            self.ok(cmd, f"{cmd.command} completed (nothing to do)")
            return
        details = folder.index.details(uids)
        items = []
        src_uids = []
        for u in uids:
            row = details.get(u)
            if row is None:
                continue
            items.append(
                (
                    row[0],
                    folder.flag_set(u),
                    row[1],
                    row[2] if row[2] >= 0 else None,
                    row[3],
                    row[4],
                )
            )
            src_uids.append(u)
        uidvalidity, new_uids = yield threads.deferToThread(copy_blocking, folder.path, dest, items)
        # both lists ascend (targets are sorted, new UIDs are assigned in order), so the
        # compressed sets still pair up one to one (RFC 4315 3)
        assert _ascending(src_uids) and _ascending(new_uids)
        copyuid = f"COPYUID {uidvalidity} {compress(src_uids)} {compress(new_uids)}"
        other = self.shared.registry.peek(dest)
        if other is not None and other is not folder:
            other.refresh()
        elif other is folder:
            folder.refresh()
        self.shared.runtime.changes.notify(dest, other._hub_changed if other else None)
        if move:
            self.untagged(f"OK [{copyuid}] Moved")
            folder.expunge(src_uids)
            self.ok(cmd, "MOVE completed")
        else:
            self.ok(cmd, "COPY completed", copyuid)

    # -- IDLE -------------------------------------------------------------------------------------

    def do_IDLE(self, cmd: Command) -> defer.Deferred[None]:
        if cmd.args:
            raise _bad("IDLE takes no arguments")
        from twisted.internet.task import LoopingCall

        poller = None
        if self.view is not None:
            self.flush(allow_expunge=True)
            folder = self.view.folder

            def poll() -> None:
                try:
                    folder.refresh()  # changes reach us through FolderView.on_change
                    if self.view is not None and self.view.invalid is not None:
                        self.flush()
                except Exception:  # noqa: BLE001
                    log.failure("IDLE poll failed")

            poller = LoopingCall(poll)
            poller.clock = self.shared.runtime.reactor
            poller.start(POLL_INTERVAL, now=False)
        self.idling = (cmd.tag, poller)
        d: defer.Deferred[bytes] = self.proto.continuation(b"+ idling\r\n")

        def ended(line: bytes) -> None:
            tag, p = self.idling or (cmd.tag, None)
            self.idling = None
            if p is not None and p.running:
                p.stop()
            if line.strip().upper() != b"DONE":
                self.finish(cmd, "BAD", "Expected DONE")
            else:
                self.ok(cmd, "IDLE terminated")

        return d.addCallback(ended)

    def connection_lost(self) -> None:
        if self.idling is not None:
            _, p = self.idling
            if p is not None and p.running:
                p.stop()
            self.idling = None
        self._unselect()


_STATUS_ITEMS = ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "HIGHESTMODSEQ", "SIZE")
_LIST_SELECT = ("SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE")
_LIST_RETURN = ("SUBSCRIBED", "CHILDREN", "SPECIAL-USE")


@dataclass
class _ListRequest:
    """A parsed LIST command (RFC 5258 2 / 6)."""

    reference: str
    patterns: list[str]
    select: set[str] = field(default_factory=set)
    returns: set[str] = field(default_factory=set)
    status: list[str] = field(default_factory=list)


def _parse_list(args: list) -> _ListRequest:
    """``LIST [(selection options)] reference (pattern | (patterns)) [RETURN (options)]``."""
    select: set[str] = set()
    if args and isinstance(args[0], list):
        select = {atom(t).upper() for t in args.pop(0)}
        unknown = select - set(_LIST_SELECT)
        if unknown:
            raise _bad(f"Unknown LIST selection option {sorted(unknown)[0]}")
        # RFC 5258 3: RECURSIVEMATCH alone (or with only REMOTE) is an error
        if "RECURSIVEMATCH" in select and not select - {"RECURSIVEMATCH", "REMOTE"}:
            raise _bad("RECURSIVEMATCH needs another selection option")
        select.discard("REMOTE")  # no remote mailboxes here (RFC 2193): accepted, no effect
    if len(args) < 2:
        raise _bad("LIST expects a reference and a pattern")
    reference = astring(args[0]).decode("utf-8", "replace")
    pats_tok = args[1]
    if isinstance(pats_tok, list):
        if not pats_tok:
            raise _bad("LIST expects at least one pattern")
        patterns = [astring(t).decode("utf-8", "replace") for t in pats_tok]
    else:
        patterns = [astring(pats_tok).decode("utf-8", "replace")]
    req = _ListRequest(reference, patterns, select)
    rest = args[2:]
    if rest:
        if (
            len(rest) != 2
            or not isinstance(rest[0], Atom)
            or rest[0].upper() != "RETURN"
            or not isinstance(rest[1], list)
        ):
            raise _bad("Invalid LIST return options")
        toks = rest[1]
        i = 0
        while i < len(toks):
            opt = atom(toks[i]).upper()
            if opt == "STATUS":  # RFC 5819
                if i + 1 >= len(toks) or not isinstance(toks[i + 1], list) or not toks[i + 1]:
                    raise _bad("STATUS return option needs a list of items")
                req.status = [atom(t).upper() for t in toks[i + 1]]
                bad = [it for it in req.status if it not in _STATUS_ITEMS]
                if bad:
                    raise _bad(f"Unknown STATUS item {bad[0]}")
                i += 2
                continue
            if opt not in _LIST_RETURN:
                raise _bad(f"Unknown LIST return option {opt}")
            req.returns.add(opt)
            i += 1
    return req


def _ancestors(name: str) -> list[str]:
    """``a.b.c`` -> ``["a", "a.b"]``."""
    parts = name.split(SEPARATOR)
    return [SEPARATOR.join(parts[:i]) for i in range(1, len(parts))]


_ESEARCH_OPTIONS = ("MIN", "MAX", "ALL", "COUNT")


def _esearch(
    cmd: Command,
    returns: set[str],
    nums: Sequence[int],
    uses_modseq: bool,
    modseqs: dict[int, int],
    result: Sequence[tuple[int, int]],
) -> bytes:
    """The ``* ESEARCH`` response of RFC 4731 3.1 (``nums`` ascend).  MIN, MAX and ALL are
    left out when nothing matched; COUNT is always given.  With a MODSEQ search key the
    highest mod-sequence of the matches follows (RFC 7162 3.1.5)."""
    tag = cmd.tag.replace("\\", "\\\\").replace('"', '\\"')
    out = [b'* ESEARCH (TAG "' + tag.encode() + b'")']
    if cmd.uid:
        out.append(b"UID")
    if nums:
        if "MIN" in returns:
            out.append(b"MIN %d" % nums[0])
        if "MAX" in returns:
            out.append(b"MAX %d" % nums[-1])
    if "COUNT" in returns:
        out.append(b"COUNT %d" % len(nums))
    if nums and "ALL" in returns:
        out.append(b"ALL " + compress(nums).encode())
    if uses_modseq and nums:
        out.append(b"MODSEQ %d" % max(modseqs.get(u, 1) for _, u in result))
    return b" ".join(out) + b"\r\n"


def _ascending(values: Sequence[int]) -> bool:
    return all(values[i] < values[i + 1] for i in range(len(values) - 1))


def _uses_details(key: Any) -> bool:
    if key.op in ("AND", "OR", "NOT"):
        return any(_uses_details(k) for k in key.args)
    return key.op in ("LARGER", "SMALLER", "BEFORE", "ON", "SINCE")


class _SearchMsg:
    """The view of one message that ``mailsuite.imap.search`` predicates read."""

    __slots__ = ("seq", "uid", "_folder", "_view", "_row", "_raw")

    def __init__(
        self, seq: int, uid: int, folder: Any, view: FolderView, row: tuple | None
    ) -> None:
        self.seq = seq
        self.uid = uid
        self._folder = folder
        self._view = view
        self._row = row
        self._raw: bytes | None = None

    @property
    def flags(self) -> frozenset[str]:
        return self._folder.flag_set(self.uid)

    @property
    def recent(self) -> bool:
        return self._view.is_recent(self.uid)

    @property
    def modseq(self) -> int:
        return int(self._folder.modseqs.get(self.uid, 1))

    @property
    def size(self) -> int:
        return int(self._row[1]) if self._row else 0

    @property
    def internaldate(self) -> Any:
        from datetime import datetime

        ts = self._row[2] if self._row else 0
        return datetime.fromtimestamp(ts, UTC)

    def raw(self) -> bytes:
        if self._raw is None:
            self._raw = b""
            if self._row:
                try:
                    self._raw = (self._folder.path / self._row[0]).read_bytes()
                except FileNotFoundError:
                    pass
        return self._raw

    def header_bytes(self) -> bytes:
        from mailsuite.imap.search import header_of

        return header_of(self.raw())


# -- the protocol adapter ---------------------------------------------------------------------


@implementer(IPushProducer)
class _Output:
    """Tracks whether the transport wants us to stop writing (for big FETCH responses)."""

    def __init__(self) -> None:
        self.paused = False
        self.waiting: list[defer.Deferred[None]] = []

    def pauseProducing(self) -> None:  # noqa: N802
        self.paused = True

    def resumeProducing(self) -> None:  # noqa: N802
        self.paused = False
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(None)

    def stopProducing(self) -> None:  # noqa: N802
        self.resumeProducing()


class IMAPProtocol(basic.LineReceiver, TimeoutMixin):
    delimiter = b"\r\n"
    MAX_LENGTH = 64 * 1024

    def __init__(self, shared: _Shared, implicit_tls: bool) -> None:
        self.shared = shared
        self.tls = implicit_tls
        self.session: Session | None = None
        self.reader: CommandReader | None = None
        self._literal: bytearray | None = None
        self._literal_size = 0
        self._literal_discard = False
        self._cont: defer.Deferred[bytes] | None = None
        self._busy = False
        self._out: _Output | None = None
        self.peer_ip = ""

    # -- connection ---------------------------------------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802
        peer = self.transport.getPeer()
        self.peer_ip = getattr(peer, "host", "")
        self.reader = CommandReader(max_append_literal=self.shared.max_literal)
        self.session = Session(self.shared, self)
        self._out = _Output()
        self.transport.registerProducer(self._out, True)
        self.setTimeout(min(PREAUTH_TIMEOUT, self.shared.idle_timeout))
        caps = self.session.capabilities()
        self.write(f"* OK [CAPABILITY {caps}] mailsuite IMAP4rev1 ready\r\n".encode())

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.setTimeout(None)
        if self.session is not None:
            try:
                self.session.connection_lost()
            except Exception:  # noqa: BLE001
                log.failure("cleanup failed")
        if self._cont is not None:
            d, self._cont = self._cont, None
            d.cancel()

    def timeoutConnection(self) -> None:  # noqa: N802
        self.write(b"* BYE Autologout; idle for too long\r\n")
        self.transport.loseConnection()

    def authenticated(self) -> None:
        self.setTimeout(self.shared.idle_timeout)

    # -- output ----------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if data and self.transport is not None and not self.transport.disconnecting:
            self.transport.write(data)

    def wait_writable(self) -> defer.Deferred[None] | None:
        if self._out is not None and self._out.paused:
            d: defer.Deferred[None] = defer.Deferred()
            self._out.waiting.append(d)
            return d
        return None

    def close(self) -> None:
        self.transport.loseConnection()

    def start_tls(self) -> None:
        # Anything the client pipelined after STARTTLS is discarded (RFC 3501 6.2.1, the
        # Twisted STARTTLS injection of research section 2.5).
        self.clearLineBuffer()
        self.transport.startTLS(self.shared.runtime.tls)
        self.tls = True
        if self.reader is not None:
            self.reader = CommandReader(max_append_literal=self.shared.max_literal)

    def continuation(self, prompt: bytes) -> defer.Deferred[bytes]:
        """Send ``prompt`` and hand the next line to the returned Deferred (AUTHENTICATE,
        IDLE)."""
        d: defer.Deferred[bytes] = defer.Deferred()
        self._cont = d
        self.write(prompt)
        # input must flow while we wait for the line
        if self.paused:
            self.resumeProducing()
        return d

    # -- input -----------------------------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:  # noqa: N802
        self.resetTimeout()
        if self._cont is not None:
            d, self._cont = self._cont, None
            self.pauseProducing()
            d.callback(line)
            return
        assert self.reader is not None
        try:
            result = self.reader.feed_line(line)
        except Exception:  # noqa: BLE001
            log.failure("command reader failed")
            self.reader = CommandReader(max_append_literal=self.shared.max_literal)
            self.write(b"* BAD Internal error reading the command\r\n")
            return
        self._handle(result)

    def lineLengthExceeded(self, line: bytes) -> None:  # noqa: N802
        self.write(b"* BAD [TOOBIG] Line too long\r\n")
        self.transport.loseConnection()

    def _handle(self, result: Any) -> None:
        if result is None:
            return
        if isinstance(result, NeedLiteral):
            if result.sync:
                self.write(b"+ Ready for literal data\r\n")
            self._literal = bytearray()
            self._literal_size = result.size
            self._literal_discard = False
            if result.size == 0:
                self._literal_done()
            else:
                self.setRawMode()
            return
        if isinstance(result, BadCommand):
            code = f"[{result.code}] " if result.code else ""
            if result.tag is not None and result.code == "TOOBIG" and result.command:
                self.write(f"{result.tag} NO {code}{result.reason}\r\n".encode())
            else:
                self.write(f"{result.tag or '*'} BAD {code}{result.reason}\r\n".encode())
            if result.close:
                self.transport.loseConnection()
                return
            if result.discard:
                self._literal = bytearray()
                self._literal_size = result.discard
                self._literal_discard = True
                self.setRawMode()
            return
        if isinstance(result, Command):
            self._run(result)

    def rawDataReceived(self, data: bytes) -> None:  # noqa: N802
        self.resetTimeout()
        assert self._literal is not None
        need = self._literal_size - len(self._literal)
        self._literal += data[:need]
        rest = data[need:]
        if len(self._literal) >= self._literal_size:
            self.line_mode = 1
            self._literal_done()
            if rest:
                self.setLineMode(rest)

    def _literal_done(self) -> None:
        assert self.reader is not None and self._literal is not None
        data = bytes(self._literal)
        self._literal = None
        self.line_mode = 1
        result = self.reader.feed_literal(data)
        self._handle(result)

    def _run(self, cmd: Command) -> None:
        assert self.session is not None
        try:
            d = self.session.run(cmd)
        except Exception:  # noqa: BLE001
            log.failure("IMAP command crashed")
            self.write(f"{cmd.tag} NO [SERVERBUG] Internal server error, logged\r\n".encode())
            return
        if d is not None and not d.called:
            if self._cont is None:
                self.pauseProducing()

            def resume(_: object) -> None:
                if (
                    self.transport is not None
                    and not self.transport.disconnecting
                    and self._cont is None
                ):
                    self.resumeProducing()

            d.addBoth(lambda r: (resume(r), None)[1])
        elif d is not None:
            d.addErrback(lambda f: log.failure("IMAP command failed", failure=f))


class IMAPFactory(protocol.Factory):
    def __init__(self, runtime: Any, implicit_tls: bool) -> None:
        self.shared = _Shared(runtime)
        self.implicit_tls = implicit_tls

    def buildProtocol(self, addr: Any) -> IMAPProtocol:  # noqa: N802
        p = IMAPProtocol(self.shared, self.implicit_tls)
        p.factory = self
        return p


def imap_factory(runtime: Any, implicit_tls: bool) -> IMAPFactory:
    """The protocol factory for ``[listen] imap`` (143) and ``imaps`` (993, TLS by service.py)."""
    return IMAPFactory(runtime, implicit_tls)


_ = (Callable, Path, time)
