"""``mailsuite export``: a user's mail as a Maildir++ tree another server or client can read.

The layout Courier, Dovecot, mutt and getmail share: INBOX at the root, each folder a ``.Name``
directory (modified UTF-7, hierarchy ``.``) holding an empty ``maildirfolder`` file, messages
in ``cur/`` with their flags in the ``:2,`` info (or in ``new/`` when no session has seen them),
keywords as letters named by the folder's ``dovecot-keywords``, internal dates as the files'
mtimes, and the ``subscriptions`` file.  Each folder also gets a ``dovecot-uidlist`` (version
3) with our UIDVALIDITY and UIDs, so Dovecot keeps them and its clients need not download
everything again.  ``mailsuite import`` reads the tree back.

A consistent copy while the server runs: the index is synced first; a message whose file is
renamed meanwhile (a flag change) is looked up again, one that is deleted is left out.  Files
are written without fsync (it is a copy; ``sync`` before removing the source).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from mailsuite.store.index import FolderIndex, Message
from mailsuite.store.mailbox import Account
from mailsuite.store.maildir import (
    KEYWORD_LETTERS,
    ensure_folder,
    info_for,
    write_keywords,
)
from mailsuite.transfer.progress import Progress
from mailsuite.transfer.sources import SourceError


@dataclass
class ExportResult:
    messages: int = 0
    folders: list[str] = field(default_factory=list)
    vanished: int = 0  # deleted while the export ran


def _folder_messages(path: Path) -> tuple[FolderIndex, list[Message]]:
    index = FolderIndex(path)
    index.sync()
    return index, index.messages()


def export_account(root: Path, dest: Path, progress: Progress) -> ExportResult:
    """Copy every folder of the mailbox at ``root`` into a new Maildir++ tree at ``dest``."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise SourceError(f"{dest} exists and is not an empty folder")
    account = Account(root)
    folders = []
    for name in account.names():
        path = account.path(name)
        index, messages = _folder_messages(path)
        folders.append((name, path, index, messages))
    progress.total_messages = sum(len(f[3]) for f in folders)
    progress.total_bytes = sum(max(m.size, 0) for f in folders for m in f[3])
    result = ExportResult()
    try:
        for name, path, index, messages in folders:
            out = dest if name == "INBOX" else dest / f".{name}"
            ensure_folder(out)
            if name != "INBOX":
                (out / "maildirfolder").touch()
            _export_folder(path, index, messages, out, progress, result)
            result.folders.append(name)
    finally:
        for _, _, index, _ in folders:
            index.close()
    subscriptions = account.subscriptions()
    if subscriptions:
        (dest / "subscriptions").write_text("".join(s + "\n" for s in subscriptions), "utf-8")
    return result


def _export_folder(
    path: Path,
    index: FolderIndex,
    messages: list[Message],
    out: Path,
    progress: Progress,
    result: ExportResult,
) -> None:
    keywords = sorted({f for m in messages for f in m.flags if not f.startswith("\\")})
    letters = {kw: KEYWORD_LETTERS[i] for i, kw in enumerate(keywords[: len(KEYWORD_LETTERS)])}
    if letters:
        write_keywords(out, {letter: kw for kw, letter in letters.items()})
    uidlist = [f"3 V{index.uidvalidity} N{index.uidnext}\n"]
    for msg in messages:
        current: Message | None = msg
        copied = False
        for _ in range(2):  # a flag change may rename the file under us: look it up again
            if current is None:
                break
            flags = current.flags - {"\\Recent"}
            seen_by_a_session = current.name.startswith("cur/") or bool(flags)
            final = current.base + (info_for(flags, letters) if seen_by_a_session else "")
            target = out / ("cur" if seen_by_a_session else "new") / final
            try:
                shutil.copyfile(path / current.name, target)
            except FileNotFoundError:
                index.sync()
                current = index.get(msg.uid)
                continue
            os.utime(target, (current.internaldate, current.internaldate))
            copied = True
            break
        if copied and current is not None:
            uidlist.append(f"{current.uid} :{current.base}\n")
            result.messages += 1
        else:
            result.vanished += 1
        progress.advance(1, max(msg.size, 0))
    (out / "dovecot-uidlist").write_text("".join(uidlist), "ascii")
