"""What every IMAP command needs, whichever group it belongs to.

``SessionBase`` holds one connection's state (login, selected folder, enabled extensions) and
the ways a command answers: tagged and untagged lines, the unsolicited EXISTS / EXPUNGE /
FETCH FLAGS updates ``flush`` sends where RFC 3501 7.4.1 / 5.2 allows, and ``_Reply`` (raised
through ``_no`` / ``_bad``) to end a command early.  The command groups
(``mailbox_commands``, ``message_commands``) and ``session.Session`` build on it, so each
can be read on its own.  What the session needs from outside -- the connection, the store,
logins, threads and timers -- comes through :mod:`mailsuite.imap.interface`; nothing here
imports Twisted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from mailsuite.imap.fetch_response import flags_bytes
from mailsuite.imap.interface import Connection, Services
from mailsuite.imap.parser import Command, mailbox
from mailsuite.imap.sequence import SequenceSet, compress, ranges_contain
from mailsuite.pacing import paced
from mailsuite.store.mailbox import SEPARATOR, Account, Folder, FolderView
from mailsuite.store.space import log_failure

_NOT_AUTH, _AUTH, _SELECTED, _LOGOUT = "not authenticated", "authenticated", "selected", "logout"
SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")


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


def vanished_earlier(folder: Folder, modseq: int, within: SequenceSet | None) -> bytes:
    """RFC 7162 3.2.5.1 / 3.2.6: ``* VANISHED (EARLIER)`` for the UIDs expunged since
    ``modseq`` (limited to the UID set ``within``), or nothing when there are none."""
    gone = folder.index.expunged_since(modseq)
    if gone and within is not None:
        ranges = within.resolve(max(gone[-1], folder.uidnext))
        gone = [u for u in gone if ranges_contain(ranges, u)]
    if not gone:
        return b""
    return b"* VANISHED (EARLIER) " + compress(gone).encode() + b"\r\n"


def flags_announcement(keywords: frozenset[str] | set[str], readonly: bool) -> bytes:
    """``* FLAGS`` and ``* OK [PERMANENTFLAGS]`` for a mailbox whose keywords are ``keywords``
    (RFC 3501 7.2.6, 7.1: sent at SELECT and again whenever a new keyword appears)."""
    flags = " ".join(list(SYSTEM_FLAGS) + sorted(keywords))
    permanent = (
        f"* OK [PERMANENTFLAGS ({flags} \\*)] Flags permitted\r\n"
        if not readonly
        else "* OK [PERMANENTFLAGS ()] Read-only mailbox\r\n"
    )
    return f"* FLAGS ({flags})\r\n{permanent}".encode()


def _inbox_norm(name: str) -> str:
    if name.upper() == "INBOX":
        return "INBOX"
    if name.upper().startswith("INBOX" + SEPARATOR):
        return "INBOX" + name[5:]
    return name


# -- the session's state and output -----------------------------------------------------------


class SessionBase:
    """One IMAP connection's state and response writing: ``proto`` is the connection the
    session writes to, ``shared`` what all sessions of the listener share (both
    :mod:`mailsuite.imap.interface`)."""

    def __init__(self, shared: Services, proto: Connection) -> None:
        self.shared = shared
        self.proto = proto
        self.log = shared.log
        self.state = _NOT_AUTH
        self.user: str | None = None
        self.account: Account | None = None
        self.view: FolderView | None = None
        self.selected_name: str | None = None
        self.condstore = False
        self.qresync = False
        #: in IDLE: (tag, the function that stops watching the folder, if one is selected)
        self.idling: tuple[str, Callable[[], None] | None] | None = None

    # -- output -----------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.proto.write(data)

    async def send_paced(self, pieces: Iterable[bytes]) -> None:
        """Send ``pieces`` as the client reads them: a command that writes a lot awaits
        this, so it waits whenever the output is full (:func:`mailsuite.pacing.paced`).
        Returns early when the connection is gone (check ``proto.gone()``)."""
        await paced(self.proto.writable, self.proto.gone, self.send, pieces)

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
            except Exception:
                self.log.failure("flushing updates failed")
        self.tagged(cmd.tag, status, text, code)

    def ok(self, cmd: Command, text: str, code: str | None = None) -> None:
        self.finish(cmd, "OK", text, code)

    # -- changes made in a worker thread ------------------------------------------------------

    async def expunge_off_loop(self, folder: Folder, uids: list[int]) -> None:
        """Expunge ``uids`` in a worker thread (unlinks and a directory ``fsync``: never on
        the event loop's thread, which serves every other session meanwhile), then bring the
        folder in step, so this session's ``* n EXPUNGE`` go out before its tagged reply and
        every other view has them pending.  Until the worker is done the other sessions see
        the folder as it was: their syncs do not wait for the lock the worker holds."""
        done = await self.shared.run_blocking(folder.writer.expunge, uids)
        folder.expunged(done)

    # -- unsolicited updates ------------------------------------------------------------------

    def flush(self, allow_expunge: bool = True, refresh: bool = True) -> None:
        v = self.view
        if v is None:
            return
        if refresh and v.invalid is None:
            try:
                v.folder.refresh()
            except Exception as e:
                log_failure(self.log, e, "refresh failed")
        if v.invalid is not None:
            reason = v.invalid
            self.untagged("BYE " + reason)
            self._unselect()
            self.proto.close()
            return
        out: list[bytes] = []
        news = self.keyword_news()
        if news:
            out.append(news)
        if allow_expunge and v.pending_expunged:
            if self.qresync:
                gone = sorted(v.pending_expunged)
                v.take_expunges()
                out.append(b"* VANISHED " + compress(gone).encode() + b"\r\n")
            else:
                for seq in v.take_expunges():
                    out.append(b"* %d EXPUNGE\r\n" % seq)
        exists = v.take_added() if (allow_expunge or not v.pending_expunged) else None
        if exists is not None:
            if not v.readonly:
                # not waiting for a writer's lock (an empty claim leaves them for later)
                first, end = v.folder.index.claim_recent(wait=False)
                if end > first:
                    v.recent.append((first, end))
            else:  # read-only: what nobody has claimed yet, left unclaimed (RFC 3501 6.3.2)
                first, end = v.folder.index.recent_range()
                v.recent[:] = [(first, end)] if end > first else []
            out.append(b"* %d EXISTS\r\n" % exists)
            # RFC 3501 7.3.2: RECENT must follow any change; sent with every EXISTS, as
            # Dovecot does, so clients never hold a stale count.
            out.append(b"* %d RECENT\r\n" % v.recent_count())
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
        if not (v.pending_added or v.pending_expunged or v.pending_flags):
            v.synced_modseq = v.folder.highestmodseq
        if out:
            self.send(b"".join(out))

    def enable_condstore(self) -> None:
        """A CONDSTORE enabling command ran (RFC 7162 3.1: FETCH or SEARCH with MODSEQ,
        CHANGEDSINCE, UNCHANGEDSINCE, STATUS HIGHESTMODSEQ, ENABLE CONDSTORE).  The first one
        with a mailbox selected tells its HIGHESTMODSEQ with an untagged OK, since the client
        may not have cared for the one in the SELECT response."""
        if self.condstore:
            return
        self.condstore = True
        v = self.view
        if v is None or self.state != _SELECTED:
            return
        pending = v.pending_added or v.pending_expunged or v.pending_flags
        # never more than what this session has been told of: changes still waiting to be
        # announced here must stay above the value a client may resynchronise from
        modseq = v.synced_modseq if pending else v.folder.highestmodseq
        self.untagged(f"OK [HIGHESTMODSEQ {modseq}] Highest")

    def keyword_news(self) -> bytes:
        """FLAGS and PERMANENTFLAGS again if the selected mailbox has keywords this session
        has not been told of (RFC 3501 7.2.6: a STORE of a new keyword, here or in another
        session, changes the list of flags "applicable for this mailbox"); else b""."""
        v = self.view
        if v is None or v.folder.keywords <= v.keywords:
            return b""
        v.keywords = frozenset(v.folder.keywords)
        return flags_announcement(v.keywords, v.readonly)

    # -- helpers for commands -------------------------------------------------------------------

    def _unselect(self) -> None:
        if self.view is not None:
            self.view.on_change = None
            self.view.close()
            self.view = None
            self.selected_name = None
        if self.state == _SELECTED:
            self.state = _AUTH

    def _acct(self) -> Account:
        assert self.account is not None
        return self.account

    def _mailbox_arg(self, tok: object) -> str:
        name = mailbox(tok)
        return _inbox_norm(name)
