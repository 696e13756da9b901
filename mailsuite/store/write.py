"""The one way a message file enters a folder: a draft in ``tmp/``, fsynced, then placed.

Every writer of mail goes through here: local delivery (SMTP, DSNs, local retries, Sieve's
``fileinto``; see :mod:`mailsuite.delivery`), IMAP APPEND and ``mailsuite import``.  Our own
code (twisted.mail's maildir never fsyncs, see README).

It is two steps, so a caller can do its own work between them -- delivery runs the recipient's
Sieve script after the fsync and before the rename; an import writes a batch in parallel
threads and places it in one index transaction:

1. a :class:`Draft`: the message in a folder's ``tmp/``, written and fsynced.  Made by
   :func:`write_tmp` (chunks), :func:`copy_tmp` (new header lines + another file from an
   offset: the copy for a further recipient) or, for a message that arrives in pieces, by
   :func:`open_tmp` then :func:`seal` (the SMTP streaming path);
2. :func:`place`: rename drafts into a folder (DESIGN.md's durability rule: write in
   ``tmp/``, fsync the file, rename, fsync the directory; only then may a protocol answer
   250 / OK).  Without flags a draft goes to ``new/`` and the index is not touched (it finds
   the file through ``new/``'s mtime, cheaply); with flags, or when the caller needs the UID
   (APPEND), it goes to ``cur/`` with its ``:2,`` letters through
   :meth:`FolderIndex.add_files <mailsuite.store.index.FolderIndex.add_files>`, which gives
   keyword letters and UIDs under the folder's lock.  Either way the user's quota usage is
   counted (:func:`mailsuite.store.quota.charge`), never by walking the tree.

A draft may be placed into another folder of the same user than the one whose ``tmp/`` holds
it (one file system: the rename is atomic).  :func:`place` returns the folders it changed; the
caller tells their sessions (:meth:`ChangeHub.notify <mailsuite.store.events.ChangeHub.notify>`,
in the reactor thread), which is the last step of a write.

Names carry the sizes (``<unique>,S=<size>,W=<CRLF size>``), as Dovecot writes them, so IMAP
and POP3 need not read a file to know its RFC822.SIZE.  Everything here blocks: call it from a
thread, never from the reactor.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from mailsuite.store.index import FolderIndex, NewFile
from mailsuite.store.maildir import ensure_folder, fsync_dir, unique_name
from mailsuite.store.quota import charge

__all__ = [
    "Draft",
    "Placement",
    "append_message",
    "copy_tmp",
    "create_tmp",
    "discard",
    "open_tmp",
    "place",
    "seal",
    "write_all",
    "write_message",
    "write_tmp",
]

_COPY_CHUNK = 1024 * 1024
_IOV_MAX = 1024


class Draft(NamedTuple):
    """A message written and fsynced in a folder's ``tmp/``, not yet visible to anyone."""

    path: Path
    unique: str  # its Maildir unique name (the file's name)
    size: int  # bytes on disk (``,S=``)
    wsize: int  # size once every LF is CRLF (``,W=``, RFC822.SIZE)

    @property
    def final_name(self) -> str:
        """The name it gets in ``new/`` (``cur/`` adds the ``:2,`` info)."""
        return f"{self.unique},S={self.size},W={self.wsize}"


@dataclass(frozen=True)
class Placement:
    """One draft to place, with the flags it starts with (``\\Seen``, keywords ...) and an
    internal date (None: the time of placing)."""

    draft: Draft
    flags: frozenset[str] = frozenset()
    internaldate: float | None = None


#: Creates are serialised in this process: threads creating files in one ``tmp/`` contend for
#: its directory lock, and the kernel spins for it (an inode allocation can take long after
#: many deletions: ext4 skips recently deleted inodes), burning a CPU.  A waiter on this lock
#: sleeps instead.
_create_lock = threading.Lock()


def open_tmp(folder: Path, name: str | None = None, *, make: bool = False) -> tuple[int, Path]:
    """Create a new file in ``folder/tmp`` exclusively, for writing; returns (fd, path).

    ``make``: a missing folder is made (``cur/new/tmp``; delivery to a user whose INBOX does
    not exist yet), only when the create finds it missing (not one ``mkdir`` per message);
    otherwise a missing folder raises FileNotFoundError (APPEND to a folder deleted meanwhile
    must not bring it back).  ``name``: a :func:`~mailsuite.store.maildir.unique_name` made
    earlier (an import names a batch in source order before writing it in parallel)."""
    path = folder.joinpath("tmp", name or unique_name())
    return create_tmp(path, folder, make=make), path


def create_tmp(path: Path | str, folder: Path, *, make: bool = False) -> int:
    """:func:`open_tmp` for a ``path`` in ``folder/tmp`` the caller named already (the SMTP
    path keeps its own: no second path object per message); returns the descriptor."""
    with _create_lock:
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileNotFoundError:
            if not make:
                raise
    ensure_folder(folder)
    with _create_lock:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)


def write_all(fd: int, chunks: Iterable[bytes]) -> int:
    """Write every chunk, in order, with as few system calls as possible (no join copy);
    returns the number of bytes written (all of them: a short write is continued)."""
    pending = [c for c in chunks if c]
    total = sum(map(len, pending))
    while pending:
        n = os.writev(fd, pending[:_IOV_MAX])
        while n:
            first = len(pending[0])
            if n >= first:
                n -= first
                pending.pop(0)
            else:
                pending[0] = pending[0][n:]
                n = 0
    return total


def seal(fd: int, path: Path, crlf_extra: int) -> Draft:
    """Finish a draft written through :func:`open_tmp`: fsync and close ``fd``.
    ``crlf_extra`` is what CRLF line ends add to its size: the number of LF bytes written, as
    stored text is LF-only.  The descriptor is closed whatever happens."""
    try:
        os.fsync(fd)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    return Draft(path, path.name, size, size + crlf_extra)


class _CRLFCount:
    """Counts what CRLF line ends would add to chunks written in turn (a CR LF pair split
    across two chunks is one line end, not two)."""

    def __init__(self) -> None:
        self.extra = 0
        self._after_cr = False

    def feed(self, chunk: bytes) -> None:
        self.extra += chunk.count(b"\n") - chunk.count(b"\r\n")
        if self._after_cr and chunk[:1] == b"\n":
            self.extra -= 1
        self._after_cr = chunk[-1:] == b"\r"


def write_tmp(
    folder: Path, chunks: Iterable[bytes], name: str | None = None, *, make: bool = False
) -> Draft:
    """Write ``chunks`` as a new draft in ``folder/tmp`` and fsync it (``name``, ``make``: see
    :func:`open_tmp`)."""
    fd, path = open_tmp(folder, name, make=make)
    count = _CRLFCount()
    try:
        for chunk in chunks:
            if chunk:
                count.feed(chunk)
                write_all(fd, (chunk,))
    except BaseException:
        _close_quietly(fd)
        discard(path)
        raise
    return _sealed(fd, path, count.extra)


def copy_tmp(
    folder: Path,
    head: bytes,
    src: Path,
    offset: int,
    *,
    crlf_extra: int | None = None,
    make: bool = False,
) -> Draft:
    """A new draft in ``folder/tmp``: ``head`` then ``src`` from ``offset`` (the copy for a
    further recipient: its own trace lines over the shared rest).  ``crlf_extra``: what CRLF
    line ends add to the draft's size (its number of LF bytes, for LF-only text) when the
    caller knows it; otherwise it is counted while copying."""
    fd, path = open_tmp(folder, make=make)
    count = _CRLFCount()
    try:
        if head:
            count.feed(head)
            write_all(fd, (head,))
        with src.open("rb") as f:
            f.seek(offset)
            while chunk := f.read(_COPY_CHUNK):
                if crlf_extra is None:
                    count.feed(chunk)
                write_all(fd, (chunk,))
    except BaseException:
        _close_quietly(fd)
        discard(path)
        raise
    return _sealed(fd, path, count.extra if crlf_extra is None else crlf_extra)


def _sealed(fd: int, path: Path, crlf_extra: int) -> Draft:
    """:func:`seal`, removing the file if that fails (the descriptor is closed either way)."""
    try:
        return seal(fd, path, crlf_extra)
    except BaseException:
        discard(path)
        raise


def place(
    folder: Path,
    items: Sequence[Placement],
    *,
    uids: bool = False,
    index: FolderIndex | None = None,
    unlimited: bool = False,
) -> list[int]:
    """Make drafts part of ``folder`` durably (see the module docstring); returns their UIDs
    in order when they went through the index (flags, ``uids=True`` or an open ``index`` of
    the folder given), else an empty list.  On failure the drafts not placed are removed.
    ``unlimited``: the caller found the user without a quota file just before (delivery, in
    the same job): drafts renamed into ``new/`` are not counted (no look for the file)."""
    if not items:
        return []
    if index is not None or uids or any(p.flags for p in items):
        own = index is None
        idx = FolderIndex(folder) if index is None else index
        try:
            return idx.add_files(
                [
                    NewFile(
                        p.draft.path,
                        p.draft.unique,
                        p.flags,
                        p.draft.size,
                        p.draft.wsize,
                        p.internaldate,
                    )
                    for p in items
                ]
            )
        except BaseException:
            for p in items:
                discard(p.draft.path)
            raise
        finally:
            if own:
                idx.close()
    # plain strings: a message's path objects were a tenth of its delivery's Python time
    new = f"{os.fspath(folder)}/new"
    done = 0
    try:
        for p in items:
            dest = f"{new}/{p.draft.final_name}"
            os.rename(p.draft.path, dest)  # noqa: PTH104 (see above)
            if p.internaldate is not None:
                os.utime(dest, (p.internaldate, p.internaldate))
            done += 1
    finally:
        for p in items[done:]:
            discard(p.draft.path)
        if done:
            fsync_dir(new)
            if not unlimited:
                charge(folder, sum(p.draft.size for p in items[:done]), done)
    return []


def append_message(
    folder: Path, chunks: Iterable[bytes], flags: frozenset[str], internaldate: float | None
) -> tuple[int, int]:
    """Write one message into ``folder`` through its index (IMAP APPEND); returns
    (uidvalidity, uid).  On any failure -- a full disk while writing, opening the index or
    recording the message -- nothing of it is left in ``tmp/``, ``new/`` or ``cur/`` (the
    client is told NO and must not find it later)."""
    draft = write_tmp(folder, chunks)
    try:
        index = FolderIndex(folder)
    except BaseException:
        discard(draft.path)
        raise
    try:
        (uid,) = place(folder, [Placement(draft, flags, internaldate)], index=index)
        return index.uidvalidity, uid
    finally:
        index.close()


def write_message(folder: Path, chunks: Iterable[bytes]) -> str:
    """Durably write one message (LF line ends) into ``folder/new``; returns its file name.
    The folder's sessions are not told: for tools and tests (a program other than the server
    delivering), which the server finds through the directory's mtime."""
    draft = write_tmp(folder, chunks)
    place(folder, [Placement(draft)])
    return draft.final_name


def discard(path: Path) -> None:
    """Remove a draft (or any file) that is not wanted any more; a missing file is fine."""
    with contextlib.suppress(OSError):
        path.unlink()


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
