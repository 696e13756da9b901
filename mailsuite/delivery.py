"""Local delivery (the MDA role) and hand-off of remote recipients to the outbound queue.

A message being received is written once, as it arrives, into one temporary file: in the
first local recipient's ``tmp/`` (the common single-recipient case then needs no copy at
all) or in ``<data_dir>/spool/incoming`` when every recipient is remote.  The file starts
with the trace headers (Return-Path, Delivered-To, Received: the order Postfix writes) so
that finishing is: fsync, extra copies for further local recipients, the queue entry for
remote ones, rename into ``new/``, fsync the directories.  All file system work blocks, so
it runs in the reactor's thread pool (never on the reactor thread); the SMTP server answers
250 only when it has succeeded.

If anything fails the whole transaction gets a temporary failure and nothing half-done is
left in ``new/``: temp files are removed and the client tries again later (at-least-once,
never lost).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsuite.directory import LocalBox
from mailsuite.store.maildir import ensure_folder, folder_path, fsync_dir, unique_name

log = Logger(namespace="mailsuite.delivery")

#: bytes buffered in memory before they are handed to a write job
_FLUSH_AT = 256 * 1024
#: bytes handed to write jobs and not yet written above which the server stops reading
_MAX_BACKLOG = 1024 * 1024


@dataclass
class Envelope:
    """One SMTP transaction's envelope as accepted: sender, routed recipients, options."""

    sender: str  # "" for the null sender
    local: list[LocalBox] = field(default_factory=list)
    remote: list[str] = field(default_factory=list)
    smtputf8: bool = False
    body_8bit: bool = False


class DeliveryError(Exception):
    """Delivery failed for a reason worth a temporary failure (logged with details)."""


class IncomingMessage:
    """The message of one transaction while its DATA arrives, then its delivery.

    The reactor thread only decodes and buffers: no file system call is made on it (a file
    create in ``tmp/`` can wait for a journal commit of the other sessions' fsyncs, which
    stalled every session).  A message that fits in ``_FLUSH_AT`` is created, written,
    fsynced and renamed in one thread-pool job at the end; a bigger one has its file created
    and its chunks written by chained jobs (one at a time, in order) while it arrives, with
    :attr:`backlog` telling the server when to stop reading (bounded memory).
    """

    def __init__(self, runtime: Any, envelope: Envelope, received: bytes) -> None:
        self.runtime = runtime
        self.envelope = envelope
        #: deliver the local copies into each recipient's Junk folder (a policy verdict)
        self.junk = False
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._newlines = 0  # stored text is LF-only, so CRLF size = size + newlines
        return_path = f"Return-Path: <{envelope.sender}>\n".encode()
        if envelope.local:
            first = envelope.local[0]
            self._folder: Path | None = first.root
            directory = first.root / "tmp"
            self._delivered_first = self._delivered_to(first)
        else:
            self._folder = None
            directory = runtime.config.data_dir / "spool" / "incoming"
            self._delivered_first = b""
        self.path = directory / unique_name()
        self._fd: int | None = None  # opened by the first thread-pool job
        self._io: defer.Deferred[None] | None = None  # chain of write jobs, None: no file yet
        self._io_error: BaseException | None = None
        #: bytes handed to write jobs and not yet written
        self.backlog = 0
        self._drained: list[defer.Deferred[None]] = []
        self._return_path = return_path
        head = return_path + self._delivered_first
        #: where the Received header starts: copies and the queue take the file from here
        self.received_offset = len(head)
        self._trace = head + received
        self._head_edit: tuple[int, bytes] | None = None  # see replace_head
        self.write(self._trace)
        self.size = 0  # body bytes only

    def _delivered_to(self, box: LocalBox) -> bytes:
        return f"Delivered-To: {box.user}\n".encode()

    def write(self, data: bytes, newlines: int | None = None) -> None:
        """Buffer ``data``; ``newlines`` is its number of LF bytes when the caller knows it."""
        if not data:
            return
        self._pending.append(data)
        self._pending_size += len(data)
        self._newlines += data.count(b"\n") if newlines is None else newlines
        if self._pending_size >= _FLUSH_AT:
            self._flush()

    def write_body(self, data: bytes, newlines: int | None = None) -> None:
        self.size += len(data)
        self.write(data, newlines)

    def replace_head(self, old_length: int, new: bytes) -> None:
        """Replace the first ``old_length`` bytes of the message (after our trace fields,
        i.e. the top of its header section) with ``new``: header fields the end-of-data
        checks add (Authentication-Results) or take out.  Before :meth:`finish` only.
        While nothing was written yet (a message under ``_FLUSH_AT``) this is done in
        memory; otherwise the file is rewritten once at the end (in the thread)."""
        if self._io is None:
            start = len(self._trace)
            data = b"".join(self._pending)
            old = data[start : start + old_length]
            self._pending = [self._trace, new, data[start + old_length :]]
            self._pending_size += len(new) - len(old)
            self._newlines += new.count(b"\n") - old.count(b"\n")
        else:
            self._head_edit = (old_length, new)

    def contents(self) -> defer.Deferred[bytes]:
        """The message as received (after our trace fields), once every write landed:
        for checks at the end of the data (DKIM verification reads the whole message)."""
        if self._io is None:
            return defer.succeed(b"".join(self._pending)[len(self._trace) :])
        self._flush()
        result: defer.Deferred[bytes] = defer.Deferred()

        def read(_: object) -> defer.Deferred[None]:
            job = self._in_thread(self._read_blocking)
            job.chainDeferred(result)
            return job.addBoth(lambda _: None)  # the write chain goes on unchanged

        self._io.addCallback(read)
        return result

    def _read_blocking(self) -> bytes:
        if self._io_error is not None:
            raise DeliveryError(f"writing the message failed: {self._io_error}")
        with open(self.path, "rb") as f:
            f.seek(len(self._trace))
            return f.read()

    def _take_pending(self) -> list[bytes]:
        data = self._pending
        self._pending = []
        self._pending_size = 0
        return data

    def _flush(self) -> None:
        """Hand the buffered bytes to a write job chained after the previous ones."""
        data = self._take_pending()
        if self._io_error is not None:
            return  # the message has failed already; finish() reports it
        size = sum(map(len, data))
        self.backlog += size
        if self._io is None:
            self._io = defer.succeed(None)
        self._io.addCallback(
            lambda _: None if self._io_error else self._in_thread(self._write_blocking, data)
        )

        def written(result: object) -> None:
            self.backlog -= size
            if isinstance(result, Failure) and self._io_error is None:
                self._io_error = result.value
            if self.backlog <= _MAX_BACKLOG and self._drained:
                waiting, self._drained = self._drained, []
                for d in waiting:
                    d.callback(None)
            return None  # errors are kept in _io_error; the chain stays usable for abort

        self._io.addBoth(written)

    def when_drained(self) -> defer.Deferred[None]:
        """Fires once :attr:`backlog` is back under the limit (at once if it is)."""
        if self.backlog <= _MAX_BACKLOG:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._drained.append(d)
        return d

    def check(self) -> None:
        """Raise OSError when the first recipient's ``tmp/`` is unusable (not a directory),
        so the server refuses at DATA rather than after the data.  One ``stat``, no file
        is created here: that happens in a thread-pool job (see the class docstring)."""
        if self._folder is None:
            return
        try:
            st = os.stat(self.path.parent)
        except FileNotFoundError:
            return  # created with the file
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(self.path.parent))

    def _in_thread(self, f: Any, *args: Any) -> defer.Deferred[Any]:
        reactor = self.runtime.reactor
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    def _open_blocking(self) -> int:
        if self._folder is not None:
            fd = _create_in(self._folder, self.path)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._fd = fd
        return fd

    def _write_blocking(self, data: list[bytes]) -> None:
        fd = self._fd if self._fd is not None else self._open_blocking()
        _write_all(fd, data)

    def abort(self) -> None:
        """Drop the message (client went away, or refused at the end)."""
        self._pending.clear()
        self._pending_size = 0
        if self._io is None:
            return  # no file was ever created
        self._io.addCallback(lambda _: self._in_thread(self._abort_blocking))
        self._io.addErrback(lambda f: log.failure("removing {path} failed", f, path=self.path))

    def _abort_blocking(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def finish(self) -> defer.Deferred[None]:
        """Make the message durable for every recipient; fires when it is safe to say 250."""
        tail = self._take_pending()
        if self._io is None:
            d = self._in_thread(self._finish_blocking, tail)
        else:

            def after_writes(_: object) -> defer.Deferred[list[Path]]:
                if self._io_error is not None:
                    self._abort_blocking_later()
                    raise DeliveryError(f"writing the message failed: {self._io_error}")
                return self._in_thread(self._finish_blocking, tail)

            d = self._io.addCallback(after_writes)
            self._io = None

        def delivered(folders: list[Path]) -> None:
            for folder in folders:
                self.runtime.changes.notify(folder)

        return d.addCallback(delivered)

    def _abort_blocking_later(self) -> None:
        self._in_thread(self._abort_blocking).addErrback(
            lambda f: log.failure("removing {path} failed", f, path=self.path)
        )

    def _finish_blocking(self, tail: list[bytes]) -> list[Path]:
        created: list[Path] = []
        try:
            total = self._complete_file(tail)
            renames = self._local_copies(total, created)
            self._enqueue_remote()
            for src, dst in renames:
                os.rename(src, dst)
            folders = sorted({dst.parent.parent for _, dst in renames})
            for folder in folders:
                fsync_dir(folder / "new")
            if not self.envelope.local:
                os.unlink(self.path)  # the queue holds its own durable copy now
            return folders
        except BaseException:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            for path in [self.path, *created]:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            raise

    def _complete_file(self, tail: list[bytes]) -> int:
        """Write the rest, add late header fields, fsync; the file's size."""
        fd = self._fd if self._fd is not None else self._open_blocking()
        if tail:
            _write_all(fd, tail)
        if self._head_edit is not None:
            # A new head for a message already (partly) on disk: one rewrite, next to it.
            self._fd = None
            os.close(fd)
            old_length, head = self._head_edit
            with open(self.path, "rb") as f:
                f.seek(len(self._trace))
                dropped = f.read(old_length)
            new = self.path.with_name(unique_name())
            try:
                total = _copy_with_head(
                    self.path, len(self._trace) + old_length, self._trace + head, new, None
                )
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(new)
                raise
            self._newlines += head.count(b"\n") - dropped.count(b"\n")
            os.unlink(self.path)
            self.path = new
            return total
        os.fsync(fd)
        total = os.fstat(fd).st_size
        self._fd = None
        os.close(fd)
        return total

    def _destination(self, box: LocalBox) -> Path:
        """The folder a local copy goes to: the INBOX, or Junk when a check said so."""
        if not self.junk:
            return box.root
        return ensure_folder(folder_path(box.root, "Junk"))

    def _local_copies(self, total: int, created: list[Path]) -> list[tuple[Path, Path]]:
        """The file for the first local recipient, copies for the others (in ``created``):
        (temporary path, final path) pairs, not renamed yet."""
        env = self.envelope
        if not env.local:
            return []
        first = env.local[0]
        renames = [
            (self.path, self._destination(first) / "new" / self._final_name(self.path, total))
        ]
        rest_offset = len(self._return_path) + len(self._delivered_first)
        for box in env.local[1:]:
            tmp = box.root / "tmp" / unique_name()
            head = self._return_path + self._delivered_to(box)
            size = _copy_with_head(self.path, rest_offset, head, tmp, box.root)
            created.append(tmp)
            renames.append((tmp, self._destination(box) / "new" / self._final_name(tmp, size)))
        return renames

    def _enqueue_remote(self) -> None:
        env = self.envelope
        if not env.remote:
            return
        queue = self.runtime.queue
        if queue is None:
            raise DeliveryError("remote delivery is not available")
        queue.enqueue_file(
            self.path,
            self.received_offset,
            env.sender,
            env.remote,
            smtputf8=env.smtputf8,
            body_8bit=env.body_8bit,
        )

    def _final_name(self, tmp: Path, size: int) -> str:
        """``<unique>,S=<size>,W=<crlf size>``: sizes in the name spare IMAP/POP3 a read.

        Every copy has the same number of lines (only the Delivered-To value differs)."""
        return f"{tmp.name},S={size},W={size + self._newlines}"


#: Creates are serialised in this process: threads creating files in one ``tmp/`` contend
#: for its directory lock, and the kernel spins for it (an inode allocation can take long
#: after many deletions: ext4 skips recently deleted inodes), burning a CPU.  A waiter on
#: this lock sleeps instead.
_create_lock = threading.Lock()


def _create_in(folder: Path, path: Path) -> int:
    """Create ``path`` (in ``folder/tmp``) exclusively; the folder's ``cur/new/tmp`` are
    made only when the create finds them missing (not one mkdir per message)."""
    with _create_lock:
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileNotFoundError:
            pass
    ensure_folder(folder)
    with _create_lock:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)


def _write_all(fd: int, chunks: list[bytes]) -> None:
    """Write every chunk, in order, with as few system calls as possible (no join copy)."""
    chunks = [c for c in chunks if c]
    while chunks:
        n = os.writev(fd, chunks[:1024])  # IOV_MAX
        while n:
            first = len(chunks[0])
            if n >= first:
                n -= first
                chunks.pop(0)
            else:
                chunks[0] = chunks[0][n:]
                n = 0


def _copy_with_head(src: Path, offset: int, head: bytes, dst: Path, folder: Path | None) -> int:
    """Write ``head`` + ``src[offset:]`` to ``dst`` durably; returns the size written.
    ``folder``: the Maildir folder ``dst`` is in (made if missing), None for a plain
    directory that exists."""
    if folder is not None:
        fd = _create_in(folder, dst)
    else:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, head)
        with open(src, "rb") as f:
            f.seek(offset)
            while True:
                chunk = f.read(1024 * 1024)
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)
