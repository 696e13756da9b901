"""The POP3 maildrop: a locked snapshot of a user's INBOX on the shared folder model.

Written for mailsuite, over :class:`mailsuite.store.mailbox.Folder` -- the open folder IMAP
sessions use (one per process, through the runtime's registry), not twisted.mail's
``IMailboxPOP3`` -- so both protocols see the same messages, UIDs, flags and deletions:

* **Lock** (RFC 1939 section 8, RFC 2449 [IN-USE]): an exclusive, non-blocking ``flock`` on
  ``mailsuite-pop3.lock`` in the Maildir root, held for the session's life.  ``flock`` locks
  belong to the open file, so a second session in the same process is refused just as one
  in another process is.  The kernel drops it if the process dies.
* **Snapshot**: the messages of INBOX at login, in UID order, numbered from 1, leaving out
  those an IMAP client flagged ``\\Deleted`` (on their way out: a POP3 client must not
  download them again).  Messages delivered later are not seen until the next session (RFC
  1939 section 5 keeps message numbers fixed for a session); one an IMAP session expunges
  meanwhile answers ``-ERR`` when retrieved.
* **UIDL**: ``<UIDVALIDITY hex>.<UID hex>``: stable across sessions, restarts, flag changes
  and file renames, never reused while the index lives; a rebuilt index gets a new
  UIDVALIDITY, so clients then download again rather than miss mail.
* **Deletion**: DELE only marks; :meth:`Maildrop.commit` (QUIT in the UPDATE state) expunges
  through the shared folder, so IMAP sessions of this process hear ``* n EXPUNGE`` at once
  (others find it through the directory).  Nothing else removes mail, so a dropped
  connection deletes nothing.  ``\\Seen`` set on RETR reaches IMAP sessions as a flag
  change the same way, a moment later (the RETRs of that moment in one change, see
  :meth:`Maildrop.mark_seen`), and also when the connection ends without QUIT.

Opening is two steps.  :func:`claim` (blocking: the POP3 server runs it in a worker thread)
takes the lock, checks the login delay and, for a folder this process has not open, opens
its index (built when missing, synced with the directory, waiting for the folder lock when
another process changes the folder): a cold or locked INBOX then holds only this login, not
every session of the process.  :class:`Maildrop` is then made from the claim in the reactor
thread, as IMAP's SELECT hands its worker-opened index to the registry (which is not
thread-safe); committing expunges a few files there, like IMAP's EXPUNGE.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from mailsuite.pop3.policy import Expiry, LoginTooSoon, MaildropInUse, MessageGone
from mailsuite.store.folder_writer import FolderWriter
from mailsuite.store.index import FolderIndex, Message
from mailsuite.store.mailbox import FolderRegistry, opened_index
from mailsuite.store.maildir import ensure_folder
from mailsuite.store.space import DiskFull

LOCK_NAME = "mailsuite-pop3.lock"
LOGIN_STAMP_NAME = "mailsuite-pop3-login"
RETRIEVED_NAME = "mailsuite-pop3-retrieved.json"
__all__ = ["Claim", "Expiry", "LoginTooSoon", "Maildrop", "MaildropInUse", "MessageGone", "claim"]

SEEN = "\\Seen"
#: \Seen changes collected before they are stored without waiting (Maildrop.mark_seen)
SEEN_BATCH = 256
DELETED = "\\Deleted"


@dataclass
class Claim:
    """What :func:`claim` took for a session before its :class:`Maildrop` is made: the
    maildrop lock's descriptor and, for a folder that was not open, its opened index."""

    root: Path
    lock_fd: int | None
    index: FolderIndex | None
    #: the folder's messages as listed in the worker thread (sizes known), or None
    listed: list[Message] | None = None

    def release(self) -> None:
        """Give up the claim unused (the client went away while it was taken): the index
        closed, the lock released."""
        index, self.index = self.index, None
        try:
            if index is not None:
                index.close()
        finally:
            if self.lock_fd is not None:
                fd, self.lock_fd = self.lock_fd, None
                os.close(fd)  # closing the only descriptor releases the flock


def claim(
    root: Path,
    *,
    login_delay: int | None = None,
    open_index: bool = False,
    writer: FolderWriter | None = None,
    now: Callable[[], float] = time.time,
) -> Claim:
    """Take the maildrop of ``root`` for a session: the POP3 lock (raises
    :class:`MaildropInUse` at once when another session holds it), the login delay
    (:class:`LoginTooSoon`, RFC 2449 6.8) and, with ``open_index`` (the folder is not open in
    the process's registry), the folder's index opened and synced (:func:`opened_index`).
    The messages are listed here too, with the sizes the snapshot needs (files another
    program wrote are read for them: 100,000 took seconds; making 100,000 rows into
    messages, most of a second), through the new index or the open folder's ``writer``;
    the snapshot keeps those the folder still has when the maildrop is made.  Blocking: the
    server runs it in a worker thread; nothing is left held when it raises."""
    ensure_folder(root)
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MaildropInUse(str(root)) from None
    try:
        if login_delay:
            _check_login_delay(root, login_delay, now)
        index = opened_index(root) if open_index else None
    except BaseException:
        os.close(fd)
        raise
    listed: list[Message] | None = None
    try:
        if index is not None:
            listed = index.messages()
        elif writer is not None:
            listed = writer.messages()
    except BaseException:
        Claim(root, fd, index).release()
        raise
    return Claim(root, fd, index, listed)


def _check_login_delay(root: Path, delay: int, now: Callable[[], float]) -> None:
    """Refuse a login less than ``delay`` seconds after the last one (RFC 2449 6.8), else
    record this one."""
    stamp = root / LOGIN_STAMP_NAME
    try:
        last = stamp.stat().st_mtime
    except FileNotFoundError:
        last = None
    t = now()
    if last is not None and 0 <= t - last < delay:
        raise LoginTooSoon(f"{delay - int(t - last)} s")
    stamp.touch()
    os.utime(stamp, (t, t))


class Maildrop:
    """One session's locked view of INBOX.  Message numbers are 1-based.  ``folders``: the
    process's open folders (the runtime's registry, shared with IMAP); a private one when
    not given (tools and tests).  ``claimed``: what :func:`claim` took for it (in a worker
    thread), owned by the maildrop from here on, released if making it fails; without it
    the maildrop is claimed here (tools and tests: blocking)."""

    def __init__(
        self,
        root: Path,
        *,
        folders: FolderRegistry | None = None,
        login_delay: int | None = None,
        expiry: Expiry | None = None,
        now: Callable[[], float] = time.time,
        claimed: Claim | None = None,
    ) -> None:
        self.root = root
        self.now = now
        self.expiry = expiry
        if claimed is None:
            claimed = claim(root, login_delay=login_delay, now=now)
        self._lock_fd: int | None = claimed.lock_fd
        index, claimed.index, claimed.lock_fd = claimed.index, None, None
        listed, claimed.listed = claimed.listed, None
        try:
            if folders is None:
                folders = FolderRegistry()
                folders.keep_idle = 0  # nobody else uses it: close the folder with the session
            try:
                # (the registry closes ``index`` when the folder was opened meanwhile)
                self.folder = folders.get(root, index)
            except BaseException:
                if index is not None:
                    index.close()
                raise
            self.view = self.folder.view(readonly=False)
            try:
                self.messages: list[Message] = self._snapshot(listed)
            except BaseException:
                self.view.close()
                raise
        except BaseException:
            self._unlock()
            raise
        self.uidvalidity = self.folder.uidvalidity
        # The folder, open for the session: messages are opened relative to it (``openat``),
        # so the kernel looks up one name per RETR instead of walking the whole path.
        self._dir_fd: int | None = None
        try:
            self._dir_fd = os.open(self.folder.index.folder, os.O_RDONLY | os.O_DIRECTORY)
        except BaseException:
            self.close()
            raise
        self.deleted: set[int] = set()  # message numbers marked by DELE
        self.retrieved: set[int] = set()  # message numbers sent in full by RETR
        self.seen_pending: set[int] = set()  # retrieved, \Seen not stored yet (mark_seen)
        self.total_size = sum(m.size for m in self.messages)

    def _snapshot(self, listed: list[Message] | None = None) -> list[Message]:
        """The folder's messages as this session numbers them (see the module docstring):
        of ``listed`` (the claim's list, made in a worker thread) or else of the index's
        list, those the folder has now and no IMAP client flagged \\Deleted."""
        flags = self.folder.flags
        # a flag text with \Deleted is looked for once per distinct text (a folder has few)
        hidden = {f for f in set(flags.values()) if DELETED in f.split()}
        uids = self.view.uids
        shown = set(uids) if not hidden else {u for u in uids if flags.get(u, "") not in hidden}
        if listed is None:
            listed = self.folder.index.messages()
        return [m for m in listed if m.uid in shown]

    # -- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.messages)

    def valid(self, number: int) -> bool:
        """A message number that exists in the snapshot and is not marked deleted."""
        return 1 <= number <= len(self.messages) and number not in self.deleted

    def message(self, number: int) -> Message:
        return self.messages[number - 1]

    def stat(self) -> tuple[int, int]:
        """(count, octets) of the messages not marked deleted (RFC 1939 STAT)."""
        count = len(self.messages) - len(self.deleted)
        octets = self.total_size - sum(self.messages[n - 1].size for n in self.deleted)
        return count, octets

    def uidl(self, number: int) -> str:
        # RFC 1939 7: 1 to 70 characters in 0x21..0x7E, unique within the maildrop and
        # persistent across sessions.
        return f"{self.uidvalidity:x}.{self.message(number).uid:x}"

    def uidl_listing(self) -> str:
        """``n uidl`` lines (CRLF ends) of every live message, for UIDL without an argument:
        the same text as :meth:`uidl` per number, made in one pass (no method call per message)."""
        prefix = f"{self.uidvalidity:x}."
        deleted = self.deleted
        return "".join(
            [
                f"{n} {prefix}{m.uid:x}\r\n"
                for n, m in enumerate(self.messages, 1)
                if n not in deleted
            ]
        )

    def live(self) -> list[int]:
        return [n for n in range(1, len(self.messages) + 1) if n not in self.deleted]

    def open_file(self, number: int) -> BinaryIO:
        """Open a message's file, following a rename (flag change over IMAP, our own \\Seen)."""
        msg = self.message(number)
        index = self.folder.index
        try:
            return index.path(msg).open("rb")
        except FileNotFoundError:
            pass
        self.folder.refresh()  # renamed or expunged by another session or program
        fresh = index.get(msg.uid)
        if fresh is None:
            raise MessageGone(msg.uid)
        self.messages[number - 1] = fresh
        try:
            return index.path(fresh).open("rb")
        except FileNotFoundError:
            raise MessageGone(msg.uid) from None

    def read(self, number: int) -> bytes:
        """A message's bytes in one ``read`` (RETR of all but big messages): the file by
        the name the index has, with the size the index has as the read size, and
        :meth:`open_file` (which follows renames) only when that name is gone."""
        msg = self.messages[number - 1]
        if self._dir_fd is not None:
            try:
                fd = os.open(msg.name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._dir_fd)
            except FileNotFoundError:
                pass
            else:
                return _read_fd(fd, msg.size)
        with self.open_file(number) as f:
            return f.read()

    def read_top(self, number: int, body_lines: int) -> bytes:
        """Headers, blank line and the first ``body_lines`` body lines (RFC 1939 TOP) of a
        message not too big to read at once (the session streams bigger ones with
        :meth:`open_top`): read as RETR reads it (:meth:`read`, one ``read``), then cut."""
        return TopCut(body_lines).feed(self.read(number))

    def open_top(self, number: int, body_lines: int) -> TopReader:
        """:meth:`read_top` as a file to stream (TOP of a big message)."""
        return TopReader(self.open_file(number), body_lines)

    # -- changing --------------------------------------------------------------------------

    def mark_seen(self, number: int) -> None:
        """Set \\Seen on a retrieved message (the ``mark_seen_on_retr`` option), soon:
        the message joins :attr:`seen_pending`, which :meth:`flush_seen` stores in one flag
        change (the I/O side calls it within a moment, before the UPDATE state and when
        the connection ends), and at once when :data:`SEEN_BATCH` wait.  Storing a flag is
        an index transaction and a file rename under the folder lock: one per RETR made
        a first download several times slower than a repeated one; Dovecot, too, sets the
        flags of a POP3 session's messages together."""
        if SEEN in self.messages[number - 1].flags:
            return
        self.seen_pending.add(number)
        if len(self.seen_pending) >= SEEN_BATCH:
            self.flush_seen()

    def flush_seen(self) -> None:
        """Store \\Seen on the messages :meth:`mark_seen` collected, in one change; IMAP
        sessions with the folder open see it.  A full disk leaves them unseen (the messages
        were sent all the same)."""
        if not self.seen_pending:
            return
        numbers, self.seen_pending = sorted(self.seen_pending), set()
        msgs = [self.messages[n - 1] for n in numbers]
        try:
            stored = self.folder.store(self.view, [(m.uid, m.flags | {SEEN}) for m in msgs])
        except DiskFull:
            return
        if stored:
            rows = self.folder.index.get_many([m.uid for m in msgs])
            for n, m in zip(numbers, msgs, strict=True):
                updated = rows.get(m.uid)
                if updated is not None:
                    self.messages[n - 1] = updated

    def note_retrieved(self, number: int) -> None:
        self.retrieved.add(number)

    def _expired_numbers(self) -> set[int]:
        """Messages the EXPIRE policy removes at this UPDATE; records first retrievals."""
        if self.expiry is None or self.expiry.days is None:
            return set()
        if self.expiry.days == 0:
            return set(self.retrieved)
        path = self.root / RETRIEVED_NAME
        try:
            state = json.loads(path.read_text())
            if state.get("uidvalidity") != self.uidvalidity:
                state = {}
        except (OSError, ValueError):
            state = {}
        first: dict[str, float] = dict(state.get("first_retrieved", {}))
        now = self.now()
        for n in self.retrieved:
            first.setdefault(str(self.message(n).uid), now)
        horizon = now - self.expiry.days * 86400
        expired = {
            n
            for n in range(1, len(self.messages) + 1)
            if first.get(str(self.messages[n - 1].uid), now) <= horizon
        }
        live_uids = {str(m.uid) for m in self.messages}
        first = {u: t for u, t in first.items() if u in live_uids}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"uidvalidity": self.uidvalidity, "first_retrieved": first}))
        tmp.replace(path)
        return expired

    def commit(self) -> list[int]:
        """The UPDATE state (RFC 1939 6): expunge the messages marked deleted (and expired
        ones) through the shared folder.  Returns the expunged UIDs; raises if the store
        fails (answer -ERR)."""
        self.flush_seen()  # (what the session retrieved is \\Seen before it goes)
        numbers = set(self.deleted) | self._expired_numbers()
        uids = [self.messages[n - 1].uid for n in sorted(numbers)]
        return self.folder.expunge(uids) if uids else []

    def close(self) -> None:
        try:
            self.view.close()
        finally:
            if self._dir_fd is not None:
                fd, self._dir_fd = self._dir_fd, None
                os.close(fd)
            self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            os.close(fd)  # closing the only descriptor releases the flock


def read_whole(path: str, size: int, dir_fd: int | None = None) -> bytes:
    """The whole file at ``path`` (relative to the directory open as ``dir_fd``, if given),
    expected to hold about ``size`` bytes: one ``open``, one ``read`` of ``size + 1`` (a
    short read of a regular file is its end) and ``close``, without a buffered file
    object's ``fstat``/``lseek``/``isatty`` calls.  Reads on when the file is larger than
    expected."""
    return _read_fd(os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd), size)


def _read_fd(fd: int, size: int) -> bytes:
    """:func:`read_whole` of a file open as ``fd``, which it closes."""
    try:
        data = os.read(fd, size + 1)
        if len(data) <= size:
            return data
        chunks = [data]
        while chunk := os.read(fd, max(size, 65536)):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class TopCut:
    """RFC 1939 7 TOP: of a message's stored bytes, fed in blocks of any size, the header
    section, the blank line ending it and the first ``body_lines`` lines of the body (the
    last one as stored, with or without its line end); a message without a blank line is
    all header.  Lines end at LF (a CR before it is part of the line end, a bare CR is
    content, as :mod:`mailsuite.dotstuff` treats them); the caller dot-stuffs what it gets.

    Each block is searched with ``bytes.find``/``count`` (no Python step per line): the
    blank line is the first LF followed by LF or CRLF, found across block ends by searching
    each block behind the last two bytes of the one before; body lines are counted by their
    LFs.  Nothing is kept but those two bytes, so a big message is cut as it streams."""

    __slots__ = ("_carry", "_in_body", "_remaining", "done")

    def __init__(self, body_lines: int) -> None:
        self._remaining = body_lines
        self._in_body = False
        #: the end of the bytes before the block (a LF at first: the message starts a line)
        self._carry = b"\n"
        #: everything wanted is cut: feed nothing more
        self.done = False

    def feed(self, data: bytes) -> bytes:
        """What of ``data`` (the next block) belongs to the top; sets :attr:`done` once the
        top is complete (then the rest of the message need not be read)."""
        if self.done:
            return b""
        start = 0
        if not self._in_body:
            seen = self._carry + data
            lf_lf, lf_crlf = seen.find(b"\n\n"), seen.find(b"\n\r\n")
            if lf_lf < 0 and lf_crlf < 0:
                self._carry = seen[-2:]
                return data
            if lf_crlf < 0 or 0 <= lf_lf < lf_crlf:
                start = lf_lf + 2 - len(self._carry)
            else:
                start = lf_crlf + 3 - len(self._carry)
            self._in_body = True
        remaining = self._remaining
        if remaining > data.count(b"\n", start):  # (none of the block is cut)
            self._remaining = remaining - data.count(b"\n", start)
            return data
        end = start
        for _ in range(remaining):  # at most the block's lines, and only once
            end = data.index(b"\n", end) + 1
        self._remaining = 0
        self.done = True
        return data[:end]


class TopReader:
    """:class:`TopCut` over a message file, read in blocks of the reader's size: TOP of a
    big message (or with a big line count) is streamed like RETR, never read whole."""

    def __init__(self, file: BinaryIO, body_lines: int) -> None:
        self._file = file
        self._cut = TopCut(body_lines)

    def read(self, size: int = -1) -> bytes:
        """The next piece of the top (at most ``size`` bytes); empty at its end."""
        cut = self._cut
        while not cut.done:
            data = self._file.read(size)
            if not data:
                break
            top = cut.feed(data)
            if top:
                return top
        return b""

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TopReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
