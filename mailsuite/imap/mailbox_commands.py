"""The IMAP commands that work on mailboxes rather than messages: LIST (with the
LIST-EXTENDED, LIST-STATUS and SPECIAL-USE extensions) and LSUB, CREATE, DELETE, RENAME,
SUBSCRIBE, UNSUBSCRIBE, STATUS and APPEND.

They are a mixin of ``session.Session``, kept apart from its state machine because they work
on the account's folders by name and never on the selected mailbox's messages; LIST brings its
own request parsing (``_parse_list``) and wildcard matching (``_pattern_regex``).  RENAME of
INBOX and APPEND await their file work in a worker thread (``shared.run_blocking``); LIST and
LSUB await room in the output between pieces of a long answer (``send_paced``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from mailsuite.imap.parser import Atom, Command, Token, astring, atom, flag_list, parse_date_time
from mailsuite.imap.session_base import (
    _AUTH,
    SessionBase,
    _bad,
    _inbox_norm,
    _no,
    quote,
)
from mailsuite.store.index import FolderIndex
from mailsuite.store.mailbox import SEPARATOR, MailboxError, append_blocking, move_inbox_blocking

_STATUS_ITEMS = ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "HIGHESTMODSEQ", "SIZE")
_LIST_SELECT = ("SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE")
_LIST_RETURN = ("SUBSCRIBED", "CHILDREN", "SPECIAL-USE")


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


class MailboxCommands(SessionBase):
    """CREATE, DELETE, RENAME, SUBSCRIBE, UNSUBSCRIBE, LSUB, LIST, STATUS and APPEND."""

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

    async def do_RENAME(self, cmd: Command) -> None:
        if len(cmd.args) != 2:
            raise _bad("RENAME expects two mailbox names")
        old = self._mailbox_arg(cmd.args[0])
        new = self._mailbox_arg(cmd.args[1])
        acct = self._acct()
        if old == "INBOX":
            acct.rename(old, new)  # checks, and makes the superior names new needs
            dest = acct.path(new)
            await self.shared.run_blocking(move_inbox_blocking, acct.root, dest)
            self.shared.changes.notify(acct.root)
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

    async def do_LSUB(self, cmd: Command) -> None:
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
        await self.send_paced(out)
        self.ok(cmd, "LSUB completed")

    async def do_LIST(self, cmd: Command) -> None:
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
            return "SPECIAL-USE" not in req.select or (
                name in existing and bool(acct.special_use(name))
            )

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
            await self.send_paced(out)
        else:
            # RFC 5819: each mailbox's STATUS right after its LIST response
            start = 0
            for pos, name in status_for:
                await self.send_paced(out[start:pos])
                start = pos
                with contextlib.suppress(MailboxError):  # gone: its LIST line stands alone
                    self._status(name, req.status)
            await self.send_paced(out[start:])
        self.ok(cmd, "LIST completed")

    def do_STATUS(self, cmd: Command) -> None:
        if len(cmd.args) != 2 or not isinstance(cmd.args[1], list):
            raise _bad("STATUS expects a mailbox name and a list of items")
        name = self._mailbox_arg(cmd.args[0])
        items = [atom(t).upper() for t in cmd.args[1]]
        if not self._acct().exists(name):
            raise _no("No such mailbox", "NONEXISTENT")
        if "HIGHESTMODSEQ" in items:  # a CONDSTORE enabling command (RFC 7162 3.1)
            self.enable_condstore()
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
            db = FolderIndex(path)
        try:
            if folder is None:
                db.sync()
                uv, nxt, hms = db.counters()
                total, unseen = db.status_counts()
                values.update(
                    MESSAGES=total, UNSEEN=unseen, UIDNEXT=nxt, UIDVALIDITY=uv, HIGHESTMODSEQ=hms
                )
            if "RECENT" in items:
                values["RECENT"] = db.recent_count()
            if "SIZE" in items:
                values["SIZE"] = db.total_size()
        finally:
            if folder is None:
                db.close()
        body = " ".join(f"{it} {values[it]}" for it in items)
        self.send(b"* STATUS " + quote(name) + b" (" + body.encode() + b")\r\n")

    # -- APPEND -----------------------------------------------------------------------------

    async def do_APPEND(self, cmd: Command) -> None:
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
        uidvalidity, uid = await self.shared.run_blocking(append_blocking, path, stored, fl, idate)
        folder = self.shared.registry.peek(path)
        if folder is not None:
            folder.refresh()
        self.shared.changes.notify(path, folder._hub_changed if folder else None)
        self.ok(cmd, "APPEND completed", f"APPENDUID {uidvalidity} {uid}")


@dataclass
class _ListRequest:
    """A parsed LIST command (RFC 5258 2 / 6)."""

    reference: str
    patterns: list[str]
    select: set[str] = field(default_factory=set)
    returns: set[str] = field(default_factory=set)
    status: list[str] = field(default_factory=list)


def _parse_list(args: list[Token]) -> _ListRequest:
    """``LIST [(selection options)] reference (pattern | (patterns)) [RETURN (options)]``."""
    select: set[str] = set()
    options = args[0] if args else None
    if isinstance(options, list):
        args.pop(0)
        select = {atom(t).upper() for t in options}
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
                items = toks[i + 1] if i + 1 < len(toks) else None
                if not isinstance(items, list) or not items:
                    raise _bad("STATUS return option needs a list of items")
                req.status = [atom(t).upper() for t in items]
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
