"""The IMAP commands' file work, run in a worker thread: APPEND, COPY (and MOVE's copy), RENAME
of INBOX.  Our own code.  Each opens its own index handle of the folder it writes to, and
refuses what would go over the user's quota (RFC 9208 4.3) before writing anything.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

from mailsuite.store.folder_writer import FolderWriter
from mailsuite.store.index import FolderIndex, NewFile
from mailsuite.store.mailbox import MailboxError
from mailsuite.store.maildir import ensure_folder, unique_name
from mailsuite.store.quota import root_of, would_exceed
from mailsuite.store.write import append_message

#: RFC 9208 4.3's response code for a refusal over the quota.
OVERQUOTA = "OVERQUOTA"
#: The Trash folder's directory (a MOVE/COPY into it is never refused for the quota).
_TRASH = ".Trash"


def append_blocking(
    path: Path,
    data: bytes,
    flags: frozenset[str],
    internaldate: float | None,
    writer: FolderWriter | None = None,
) -> tuple[int, int]:
    """Durably add one message to the folder at ``path`` (IMAP APPEND) through the store's
    one write path; returns (uidvalidity, uid).  Opens its own index handle, or uses the
    open folder's ``writer`` when there is one: call it from a thread.  Over the user's
    quota: MailboxError with OVERQUOTA (RFC 9208 4.3), nothing written; on a full disk
    (:mod:`mailsuite.store.space`) nothing is left either."""
    if would_exceed(root_of(path), len(data)):
        raise MailboxError("Quota exceeded: delete some messages first", OVERQUOTA)
    if writer is not None:  # the folder is open here: its worker-thread handle
        return writer.append(data, flags, internaldate)
    return append_message(path, [data], flags, internaldate)


#: one message for :func:`copy_blocking`: relative name, flags, size with CRLF line ends (-1:
#: unknown), internal date (None: the file's), cached envelope and body structure
CopyItem = tuple[str, frozenset[str], int, float | None, bytes | None, bytes | None]


def copy_blocking(
    src: Path,
    dest: Path,
    items: Sequence[CopyItem],
    *,
    check_quota: bool = True,
) -> tuple[int, list[int]]:
    """Hard-link messages (relative name, flags, crlf size, internal date, envelope,
    bodystructure) of folder ``src`` into folder ``dest``; returns (dest uidvalidity, new UIDs).
    Call it from a thread.

    A copy counts towards the user's quota like a new message (as Dovecot counts it, hard
    link or not): over it, MailboxError with OVERQUOTA (RFC 9208 4.3) and nothing copied --
    except into Trash, so that a client that deletes by moving to Trash can always delete
    (what Dovecot's ``quota_rule = Trash:ignore`` is for).  ``check_quota`` False: a move
    the caller makes (RENAME INBOX), which leaves the usage as it was."""
    if check_quota and dest.name != _TRASH:
        adding = 0
        for rel, *_ in items:
            with contextlib.suppress(FileNotFoundError):
                adding += (src / rel).stat().st_size
        if would_exceed(root_of(dest), adding, len(items)):
            raise MailboxError("Quota exceeded: delete some messages first", OVERQUOTA)
    index = FolderIndex(dest)
    try:
        files = []
        for rel, flags, wsize, idate, env, bs in items:
            source = src / rel
            try:
                size = source.stat().st_size
            except FileNotFoundError:
                raise MailboxError("A message was expunged meanwhile", "EXPUNGEISSUED") from None
            if wsize < 0:
                from mailsuite.store.index import crlf_size

                wsize = crlf_size(source)
            flags = frozenset(f for f in flags if f != "\\Recent")
            files.append(NewFile(source, unique_name(), flags, size, wsize, idate, env, bs))
        return index.uidvalidity, index.add_files(files)
    finally:
        index.close()


def move_inbox_blocking(root: Path, dest: Path) -> None:
    """RENAME INBOX: move every INBOX message into the (new) folder ``dest``."""
    ensure_folder(dest)
    src = FolderIndex(root)
    try:
        src.sync()
        msgs = src.messages()
        items = [(m.name, m.flags, m.size, m.internaldate, None, None) for m in msgs]
    finally:
        src.close()
    copy_blocking(root, dest, items, check_quota=False)  # a move: the usage stays
    src = FolderIndex(root)
    try:
        src.expunge([m.uid for m in msgs])
    finally:
        src.close()
