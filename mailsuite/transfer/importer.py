r"""``mailsuite import``: put the messages of a :class:`~mailsuite.transfer.sources.Source` into
a user's folders, through the store's one write path (:mod:`mailsuite.store.write`, as IMAP
APPEND and delivery: drafts written with :func:`~mailsuite.store.write.write_tmp`, then
:func:`~mailsuite.store.write.place`\ d through the folder's index), with flags and internal
dates kept and UIDs given in source order.

Speed: each message is fsynced (as APPEND does), which costs a disk flush; the messages of a
batch are written at once by a few threads so the file system can commit their flushes
together, and while one batch is written the previous one is indexed (one transaction) and the
next one read.  The messages of a batch are named before they are written, in order, so a
rebuilt index numbers them in the same order.

Resuming: each destination folder keeps ``mailsuite-imported``, one line per imported message:
a key (a hash of the message and how many identical ones came before it in this import) and its
file's unique name.  The lines of a batch are written and fsynced before the batch is added,
and a ``.`` line follows once it is in; after a crash between the two, the lines of the open
batch count as imported exactly when their files are in the folder.  So running an import again
adds only what is missing, without duplicates and without losing what the crash interrupted.

Quota: a user with a limit (:mod:`mailsuite.store.quota`) is held to it as APPEND is, message
by message against the usage plus what is written but not yet counted; the import stops before
the first message that does not fit, with everything before it in (:class:`ImportOverQuota`),
so raising the limit and running the same command again imports the rest.  An administrator
moving a whole account can pass ``check_quota=False`` (``--ignore-quota``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mailsuite.store import quota
from mailsuite.store.index import FolderIndex
from mailsuite.store.mailbox import Account, MailboxError
from mailsuite.store.maildir import ensure_folder, fsync_dir, unique_name
from mailsuite.store.write import Draft, Placement, discard, place, write_tmp
from mailsuite.transfer.progress import Progress
from mailsuite.transfer.sources import Source, SourceError, SourceMessage

JOURNAL = "mailsuite-imported"
BATCH_MESSAGES = 256
BATCH_BYTES = 32 * 1024 * 1024
WRITERS = 8  # threads writing (and fsyncing) messages at once


class ImportJournal:
    """The record of what one destination folder received from imports (module docstring)."""

    def __init__(self, folder: Path, index: FolderIndex) -> None:
        self.path = folder / JOURNAL
        self.done: set[str] = set()
        pending: dict[str, str] = {}
        try:
            with self.path.open(encoding="ascii", errors="replace") as f:
                for line in f:
                    line = line.rstrip("\n")
                    if line == ".":
                        self.done.update(pending)
                        pending = {}
                    elif line:
                        key, _, unique = line.partition(" ")
                        pending[key] = unique
        except FileNotFoundError:
            pass
        if pending:
            self._recover(pending, index)
        # open for the import's whole life (a line per batch), closed by close()
        self._file = self.path.open("a", encoding="ascii")

    def _recover(self, pending: dict[str, str], index: FolderIndex) -> None:
        """An import stopped between writing a batch's lines and its ``.``: the messages whose
        files made it into the folder are imported; rewrite the record to say just that."""
        index.sync(force=True)
        present = {m.base.split(",", 1)[0] for m in index.messages()}
        self.done.update(k for k, unique in pending.items() if unique in present)
        tmp = self.path.with_name(JOURNAL + ".tmp")
        with tmp.open("w", encoding="ascii") as f:
            f.writelines(f"{key}\n" for key in sorted(self.done))
            f.write(".\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)
        fsync_dir(self.path.parent)

    def pending(self, entries: Iterable[tuple[str, str]]) -> None:
        """Record (key, unique name) of a batch about to be added; durable on return."""
        self._file.writelines(f"{key} {unique}\n" for key, unique in entries)
        self._file.flush()
        os.fsync(self._file.fileno())

    def committed(self, keys: Iterable[str]) -> None:
        self._file.write(".\n")
        self._file.flush()
        self.done.update(keys)

    def close(self) -> None:
        self._file.close()


@dataclass
class _Target:
    """A destination folder while messages go into it."""

    name: str
    path: Path
    index: FolderIndex
    journal: ImportJournal
    occurrences: dict[str, int] = field(default_factory=dict)
    batch: list[tuple[str, SourceMessage]] = field(default_factory=list)
    batch_bytes: int = 0

    def key(self, msg: SourceMessage) -> str:
        digest = hashlib.sha256(msg.data).hexdigest()[:32]
        n = self.occurrences.get(digest, 0)
        self.occurrences[digest] = n + 1
        return f"{digest}#{n}"

    def close(self) -> None:
        self.journal.close()
        self.index.close()


class ImportOverQuota(Exception):
    """The next message would take the user over their limit; ``result`` says what went in."""

    def __init__(self, result: ImportResult, usage: quota.Usage, size: int) -> None:
        super().__init__("over quota")
        self.result = result
        self.usage = usage
        self.size = size


@dataclass
class ImportResult:
    imported: int = 0
    skipped: int = 0  # imported by an earlier run
    folders: list[str] = field(default_factory=list)  # destination folders, INBOX first
    created: list[str] = field(default_factory=list)  # folders that had to be made


class Importer:
    """Imports into the mailbox rooted at ``root`` (a user's INBOX directory).

    ``folder``: where the source's INBOX goes (default INBOX); its other folders go below it
    (``F.Sent``) or, without ``folder``, keep their names."""

    def __init__(
        self,
        root: Path,
        progress: Progress,
        folder: str | None = None,
        *,
        check_quota: bool = True,
    ) -> None:
        self.account = Account(root)
        self.progress = progress
        self.check_quota = check_quota
        self._usage: quota.Usage | None = None  # as counted after the last placed batch
        self._uncounted = (0, 0)  # bytes, messages read into batches but not yet placed
        self.prefix = folder.strip(".") if folder else None
        if self.prefix is not None:
            self._check(self.prefix)

    def _check(self, name: str) -> None:
        try:
            self.account.path(name)
        except MailboxError as e:
            raise SourceError(f"cannot import into folder {name!r}: {e}") from None

    def destination(self, source_folder: str) -> str:
        if source_folder == "INBOX":
            return self.prefix or "INBOX"
        return f"{self.prefix}.{source_folder}" if self.prefix else source_folder

    def run(self, source: Source) -> ImportResult:
        result = ImportResult()
        ensure_folder(self.account.root)
        for folder in source.folders():  # all of them first: empty folders are kept too
            name = self.destination(folder)
            self._check(name)
            if not self.account.exists(name):
                self.account.create(name)
                self.account.subscribe(name)
                result.created.append(name)
            result.folders.append(name)
        target: _Target | None = None
        self._writing: _Writing | None = None
        with ThreadPoolExecutor(WRITERS, thread_name_prefix="import") as pool:
            try:
                for msg in source.messages():
                    name = self.destination(msg.folder)
                    if target is None or target.name != name:
                        if target is not None:
                            self._flush(target, pool, result)
                            self._finish(result)
                            target.close()
                            target = None
                        target = self._open(name)
                    key = target.key(msg)
                    if key in target.journal.done:
                        result.skipped += 1
                        self.progress.advance(1, msg.source_size, skipped=1)
                        continue
                    if not self._fits(len(msg.data)):
                        # count afresh with nothing in flight before giving up
                        self._flush(target, pool, result)
                        self._finish(result)
                        if not self._fits(len(msg.data)) and self._usage is not None:
                            raise ImportOverQuota(result, self._usage, len(msg.data))
                    nbytes, count = self._uncounted
                    self._uncounted = (nbytes + len(msg.data), count + 1)
                    target.batch.append((key, msg))
                    target.batch_bytes += len(msg.data)
                    if len(target.batch) >= BATCH_MESSAGES or target.batch_bytes >= BATCH_BYTES:
                        self._flush(target, pool, result)
                if target is not None:
                    self._flush(target, pool, result)
                self._finish(result)
            finally:
                self._abandon()
                if target is not None:
                    target.close()
        return result

    def _fits(self, size: int) -> bool:
        """Whether one more message of ``size`` bytes stays within the user's limits, counting
        what earlier batches wrote and the batches not yet placed (see the module docstring)."""
        if not self.check_quota:
            return True
        if self._usage is None:
            self._usage = quota.usage(self.account.root)
        if self._usage is None:
            return True  # no limit
        nbytes, count = self._uncounted
        return self._usage.fits(nbytes + size, count + 1)

    def _open(self, name: str) -> _Target:
        path = self.account.path(name)
        index = FolderIndex(path)
        return _Target(name, path, index, ImportJournal(path, index))

    def _flush(self, target: _Target, pool: ThreadPoolExecutor, result: ImportResult) -> None:
        """Start writing the batch (in parallel threads), then finish the previous one while
        these are written: reading, writing and indexing overlap."""
        batch = target.batch
        if not batch:
            return
        target.batch = []
        target.batch_bytes = 0
        names = [unique_name() for _ in batch]  # in source order: see the module docstring
        futures = [
            pool.submit(write_tmp, target.path, [msg.data], unique)
            for (_, msg), unique in zip(batch, names, strict=True)
        ]
        self._finish(result)
        self._writing = _Writing(target, batch, names, futures)

    def _finish(self, result: ImportResult) -> None:
        """Wait for the batch being written, record it, index it (one transaction)."""
        writing, self._writing = self._writing, None
        if writing is None:
            return
        target, batch = writing.target, writing.batch
        written = writing.wait()
        target.journal.pending(
            (key, unique) for (key, _), unique in zip(batch, writing.names, strict=True)
        )
        drafts = [
            Placement(draft, msg.flags - {"\\Recent"}, msg.internaldate)
            for draft, (_, msg) in zip(written, batch, strict=True)
        ]
        place(target.path, drafts, index=target.index)  # removes the drafts if it fails
        target.journal.committed(key for key, _ in batch)
        nbytes, count = self._uncounted
        self._uncounted = (nbytes - sum(len(msg.data) for _, msg in batch), count - len(batch))
        self._usage = None  # place() counted the batch: read the quota file again
        result.imported += len(batch)
        self.progress.advance(len(batch), sum(msg.source_size for _, msg in batch))

    def _abandon(self) -> None:
        """After a failure: remove what the batch in flight wrote (never indexed)."""
        writing, self._writing = self._writing, None
        if writing is not None:
            try:
                writing.wait()
            except BaseException:  # wait() removed the files it could
                return
            for draft in writing.written:
                discard(draft.path)


@dataclass
class _Writing:
    """A batch whose files are being written by the pool."""

    target: _Target
    batch: list[tuple[str, SourceMessage]]
    names: list[str]
    futures: list[Future[Draft]]
    written: list[Draft] = field(default_factory=list)

    def wait(self) -> list[Draft]:
        """The written files in order; on any failure, the others are removed and it raises."""
        error: BaseException | None = None
        for future in self.futures:
            try:
                self.written.append(future.result())
            except BaseException as e:  # collected, re-raised below
                error = error or e
        if error is not None:
            for draft in self.written:
                discard(draft.path)
            self.written = []
            raise error
        return self.written
