"""The IMAP commands that work on mailboxes rather than messages: LIST (with the
LIST-EXTENDED, LIST-STATUS and SPECIAL-USE extensions) and LSUB, CREATE, DELETE, RENAME,
SUBSCRIBE, UNSUBSCRIBE, STATUS and APPEND.

They are a mixin of ``session.Session``, kept apart from its state machine because they work
on the account's folders by name and never on the selected mailbox's messages; LIST brings its
own request parsing (``_parse_list``) and wildcard matching (``_pattern_regex``).  RENAME of
INBOX and APPEND await their file work in a worker thread (``shared.run_blocking``), as STATUS
(and LIST's RETURN (STATUS)) awaits the counts of a folder not open here; LIST and LSUB await
room in the output between pieces of a long answer (``send_paced``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailsuite.imap.interface import ConnectionGone
from mailsuite.imap.parser import Atom, Command, Token, astring, atom, flag_list, parse_date_time
from mailsuite.imap.session_base import (
    _AUTH,
    SessionBase,
    _bad,
    _inbox_norm,
    _no,
    quote,
)
from mailsuite.store.folder_copy import append_blocking, move_inbox_blocking
from mailsuite.store.mailbox import SEPARATOR, Account, MailboxError, opened_index

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
        view = _list_view(req, acct)
        out: list[bytes] = []
        status_for: list[tuple[int, str]] = []  # (position in out, mailbox)
        for name in view.ordered():
            line = _list_line(view, name)
            if line is None:
                continue
            out.append(line)
            if req.status and name in view.existing:
                status_for.append((len(out), name))
        await self._send_list(out, status_for, req.status)
        self.ok(cmd, "LIST completed")

    async def _send_list(
        self, out: list[bytes], status_for: list[tuple[int, str]], status: list[str]
    ) -> None:
        """Send the LIST lines, each listed mailbox's STATUS right after its own line.

        RFC 5819 puts the STATUS response after the mailbox's LIST response; sending is paced
        so a long answer never piles up in memory ahead of a slow client.
        """
        if not status:
            await self.send_paced(out)
            return
        start = 0
        for pos, name in status_for:
            await self.send_paced(out[start:pos])
            start = pos
            with contextlib.suppress(MailboxError):  # gone: its LIST line stands alone
                await self._status(name, status)
        await self.send_paced(out[start:])

    def do_STATUS(self, cmd: Command) -> Coroutine[Any, Any, None] | None:
        """STATUS (RFC 3501 6.3.10, RFC 7162 3.1 HIGHESTMODSEQ, RFC 8438 SIZE): answered at
        once for a folder open here; else a coroutine that counts in a worker thread."""
        if len(cmd.args) != 2 or not isinstance(cmd.args[1], list):
            raise _bad("STATUS expects a mailbox name and a list of items")
        name = self._mailbox_arg(cmd.args[0])
        items = [atom(t).upper() for t in cmd.args[1]]
        if not self._acct().exists(name):
            raise _no("No such mailbox", "NONEXISTENT")
        if "HIGHESTMODSEQ" in items:  # a CONDSTORE enabling command (RFC 7162 3.1)
            self.enable_condstore()
        if self._status_open(name, items):
            self.ok(cmd, "STATUS completed")
            return None
        return self._status_cold_then_ok(cmd, name, items)

    async def _status_cold_then_ok(self, cmd: Command, name: str, items: list[str]) -> None:
        await self._status(name, items)
        self.ok(cmd, "STATUS completed")

    async def _status(self, name: str, items: Sequence[str]) -> None:
        """Send ``* STATUS`` for ``name``: from the open folder when this process has it
        open, else counted in a worker thread (:func:`_cold_status`)."""
        if self._status_open(name, items):
            return
        values = await self.shared.run_blocking(
            _cold_status, self._acct().path(name), "RECENT" in items, "SIZE" in items
        )
        if self.proto.gone():  # nobody to answer (the index was closed in the thread)
            raise ConnectionGone
        self._send_status(name, items, values)

    def _status_open(self, name: str, items: Sequence[str]) -> bool:
        """Answer STATUS from the folder open (or kept warm) in this process's registry:
        its state is in memory, brought up to date without waiting for the folder lock
        (:meth:`~mailsuite.store.mailbox.Folder.refresh`).  False when it is not open: the
        counts need the index opened, maybe built, or the folder lock another process holds
        -- work for a worker thread, so every other session of the process goes on."""
        for it in items:
            if it not in _STATUS_ITEMS:
                raise _bad(f"Unknown STATUS item {it}")
        folder = self.shared.registry.peek(self._acct().path(name))
        if folder is None:
            return False
        flags = folder.flags
        values = {
            "MESSAGES": len(folder.uids),
            "UNSEEN": sum(1 for f in flags.values() if "\\Seen" not in f),
            "UIDNEXT": folder.uidnext,
            "UIDVALIDITY": folder.uidvalidity,
            "HIGHESTMODSEQ": folder.highestmodseq,
        }
        if "RECENT" in items:
            values["RECENT"] = folder.index.recent_count()
        if "SIZE" in items:
            values["SIZE"] = folder.index.total_size()
        self._send_status(name, items, values)
        return True

    def _send_status(self, name: str, items: Sequence[str], values: dict[str, int]) -> None:
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
        known = self.shared.registry.find(path)
        writer = known.writer if known is not None and not known.closed else None
        uidvalidity, uid = await self.shared.run_blocking(
            append_blocking, path, stored, fl, idate, writer
        )
        folder = self.shared.registry.peek(path)  # (brought up to date: the new message)
        self.shared.changes.notify(path, folder._hub_changed if folder else None)
        self.ok(cmd, "APPEND completed", f"APPENDUID {uidvalidity} {uid}")


def _cold_status(path: Path, recent: bool, size: bool) -> dict[str, int]:
    """STATUS values of a folder not open in this process, from its index opened, synced
    with the directory and closed again (:func:`~mailsuite.store.mailbox.opened_index`: built
    when missing, waiting for the folder lock while another process changes the folder).
    Blocking: run in a worker thread."""
    index = opened_index(path)
    try:
        uidvalidity, uidnext, highestmodseq = index.counters()
        total, unseen = index.status_counts()
        values = {
            "MESSAGES": total,
            "UNSEEN": unseen,
            "UIDNEXT": uidnext,
            "UIDVALIDITY": uidvalidity,
            "HIGHESTMODSEQ": highestmodseq,
        }
        if recent:
            values["RECENT"] = index.recent_count()
        if size:
            values["SIZE"] = index.total_size()
        return values
    finally:
        index.close()


@dataclass
class _ListRequest:
    """A parsed LIST command (RFC 5258 2 / 6)."""

    reference: str
    patterns: list[str]
    select: set[str] = field(default_factory=set)
    returns: set[str] = field(default_factory=set)
    status: list[str] = field(default_factory=list)


@dataclass
class _ListView:
    """What one LIST answer is drawn from: the account's names and the request's criteria.

    Computed once per command so every candidate name is judged against the same snapshot
    of the account's folders and subscriptions.
    """

    req: _ListRequest
    acct: Account
    existing: set[str]
    subset: set[str]  # the subscriptions, when the request needs them
    want_subs: bool
    rxs: list[re.Pattern[str]]
    has_children: set[str] = field(default_factory=set)  # names with an existing descendant
    childinfo: set[str] = field(default_factory=set)
    universe: set[str] = field(default_factory=set)

    def matches(self, name: str) -> bool:
        """Does ``name`` match one of the patterns (after the reference)?"""
        norm = _inbox_norm(name)
        return any(rx.match(norm) for rx in self.rxs)

    def selected(self, name: str) -> bool:
        """Does ``name`` meet the selection criteria (RFC 5258 3)?"""
        if "SUBSCRIBED" in self.req.select and name not in self.subset:
            return False
        return "SPECIAL-USE" not in self.req.select or (
            name in self.existing and bool(self.acct.special_use(name))
        )

    def ordered(self) -> list[str]:
        """Every candidate name, INBOX first (clients show it on top), the rest sorted."""
        ordered = sorted(self.universe - {"INBOX"})
        if "INBOX" in self.universe:
            ordered.insert(0, "INBOX")
        return ordered


def _list_view(req: _ListRequest, acct: Account) -> _ListView:
    """Gather every name that could be listed: mailboxes, the parents Maildir++ implies
    (.a.b without .a), subscriptions, and the parents that get CHILDINFO.

    RFC 5258 3.5 / example 9: with RECURSIVEMATCH a name gets CHILDINFO when one of its
    descendants meets the selection criteria but does not match the pattern.
    """
    names = acct.names()
    want_subs = "SUBSCRIBED" in req.select or "SUBSCRIBED" in req.returns
    subs = acct.subscriptions() if want_subs else []
    view = _ListView(
        req=req,
        acct=acct,
        existing=set(names),
        subset=set(subs),
        want_subs=want_subs,
        rxs=[_pattern_regex(_inbox_norm(req.reference + p)) for p in req.patterns],
    )
    for n in names:
        for parent in _ancestors(n):
            view.has_children.add(parent)
    view.universe = set(view.existing) | view.has_children
    if want_subs:
        view.universe |= view.subset
    if "RECURSIVEMATCH" in req.select:
        pool = view.subset if "SUBSCRIBED" in req.select else view.existing
        for n in pool:
            if not view.selected(n) or view.matches(n):
                continue
            for parent in _ancestors(n):
                view.childinfo.add(parent)
        view.universe |= view.childinfo
    return view


def _list_line(view: _ListView, name: str) -> bytes | None:
    """The ``* LIST`` line for ``name``, or None when the request does not list it.

    Attributes follow RFC 5258 3 (\\NonExistent, \\Subscribed, CHILDINFO), RFC 3348
    (\\HasChildren) and RFC 6154 (the special-use attribute).
    """
    req = view.req
    if not view.matches(name):
        return None
    if req.select:
        if not view.selected(name) and name not in view.childinfo:
            return None
    elif name not in view.existing and name not in view.has_children:
        return None
    attrs: list[str] = []
    if name not in view.existing:
        # a parent that only its children imply cannot be selected; a name that
        # names nothing at all is \NonExistent (RFC 5258 3, implies \Noselect)
        attrs.append("\\Noselect" if name in view.has_children else "\\NonExistent")
    if name in view.has_children:
        attrs.append("\\HasChildren")
    elif name in view.existing:
        attrs.append("\\HasNoChildren")
    use = view.acct.special_use(name) if name in view.existing else None
    if use:
        attrs.append(use)
    if view.want_subs and name in view.subset:
        attrs.append("\\Subscribed")
    line = (
        b"* LIST (" + " ".join(attrs).encode() + b') "' + SEPARATOR.encode() + b'" ' + quote(name)
    )
    if name in view.childinfo:
        criteria = sorted(req.select & {"SUBSCRIBED", "SPECIAL-USE"})
        line += b' ("CHILDINFO" (' + " ".join(f'"{c}"' for c in criteria).encode() + b"))"
    return line + b"\r\n"


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
