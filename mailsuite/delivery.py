"""Local delivery (the MDA role): the one way a message enters a user's mailbox.

Three callers, one path: the SMTP server (:class:`IncomingMessage`, the message streamed to
disk as it arrives), the queue runner (:func:`deliver_file`: local retries, and a queued
recipient whose domain became local) and DSNs to local senders (:func:`deliver_bytes`).  The
store write itself is :mod:`mailsuite.store.write` (drafts in ``tmp/``, fsync, rename, fsync the
directory); IMAP APPEND and ``mailsuite import`` use that directly, as they put a message in a
folder rather than deliver it to a person.

A message is written once, into one file: in the first local recipient's ``tmp/`` (the common
single-recipient case then needs no copy at all) or in ``<data_dir>/spool/incoming`` when every
recipient is remote.  The file starts with the trace lines (:func:`trace_head`: Return-Path,
Delivered-To, then Received, the order Postfix writes), so finishing is one job in a worker
thread (:mod:`mailsuite.delivery_fanout`): fsync, the header edit the end-of-data checks asked
for, each recipient's Sieve script, the copies, the queue entries, the renames into place and
the directory fsyncs; then, in the reactor thread, the folders' sessions are told and the
replies a script asked for (vacation, rejection notices) are signed and queued.  Only when all
of that succeeded does the SMTP server answer 250.

If anything fails the whole transaction gets a temporary failure and nothing half-done is left
in a mailbox: drafts are removed and the client tries again later (at-least-once, never lost).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsuite.delivery_fanout import DeliveryError, Fanout, Outgoing, trace_head
from mailsuite.directory import LocalBox
from mailsuite.smtp.headers import HeaderEdit
from mailsuite.smtp.replies import Reply
from mailsuite.store.maildir import unique_name
from mailsuite.store.write import Draft, copy_tmp, create_tmp, discard, write_all, write_tmp

__all__ = [
    "JUNK",
    "DeliveryError",
    "DeliveryResult",
    "Envelope",
    "HeaderEdit",
    "IncomingMessage",
    "deliver_bytes",
    "deliver_file",
    "trace_head",
]

log = Logger(namespace="mailsuite.delivery")

#: bytes buffered in memory before they are handed to a write job
_FLUSH_AT = 256 * 1024
#: bytes handed to write jobs and not yet written above which the server stops reading
_MAX_BACKLOG = 1024 * 1024

#: The folder a quarantine verdict delivers to (the \\Junk special-use folder every user has,
#: :data:`mailsuite.directory.SPECIAL_FOLDERS`; made again if the user deleted it).
JUNK = "Junk"

#: ``blocking(f, *args)``: run blocking ``f`` off the reactor thread, fire with its result
Blocking = Callable[..., defer.Deferred[Any]]


@dataclass
class Envelope:
    """One transaction's envelope as accepted: sender, routed recipients, options.  Each
    :class:`LocalBox` carries the RCPT address that led to it (``rcpt``), which Sieve's
    ``envelope "to"`` and subaddress tests see."""

    sender: str  # "" for the null sender
    local: list[LocalBox] = field(default_factory=list)
    remote: list[str] = field(default_factory=list)
    smtputf8: bool = False
    body_8bit: bool = False


@dataclass(frozen=True)
class DeliveryResult:
    """What a finished delivery tells its caller.

    ``reply``: answer this instead of 250 -- a Sieve ``reject`` by the transaction's only
    recipient, made at SMTP time (RFC 5429 2.1); nothing was stored or queued.  ``folders``:
    the folders a copy went to."""

    reply: Reply | None = None
    folders: tuple[Path, ...] = ()


def _thread_pool(runtime: Any) -> Blocking:
    """Where the file work runs: the runtime's :class:`~mailsuite.disk_jobs.DiskJobs`, or the
    reactor's thread pool for a runtime without them (tests build their own)."""
    disk_jobs = getattr(runtime, "disk_jobs", None)
    if disk_jobs is not None:
        return disk_jobs().run  # type: ignore[no-any-return]
    reactor = runtime.reactor

    def blocking(f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return blocking


class IncomingMessage:
    """The message of one SMTP transaction while its DATA arrives, then its delivery.

    The reactor thread only decodes and buffers: no file system call is made on it (a file
    create in ``tmp/`` can wait for a journal commit of the other sessions' fsyncs, which
    stalled every session).  A message that fits in ``_FLUSH_AT`` is created, written,
    fsynced and delivered in one thread-pool job at the end; a bigger one has its file created
    and its chunks written by chained jobs (one at a time, in order) while it arrives, with
    :attr:`backlog` telling the server when to stop reading (bounded memory).

    The API the SMTP server uses: :meth:`check` at DATA, :meth:`write` / :meth:`write_body`
    (and :attr:`backlog` / :meth:`when_drained`) while data arrives, :meth:`contents` for
    checks that read the whole message, then :meth:`finish` or :meth:`abort`.  ``blocking``
    runs the file work (default: the reactor's thread pool; tests pass a synchronous one).
    """

    def __init__(
        self, runtime: Any, envelope: Envelope, received: bytes, *, blocking: Blocking | None = None
    ) -> None:
        self.runtime = runtime
        self.envelope = envelope
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._newlines = 0  # stored text is LF-only, so CRLF size = size + newlines
        if envelope.local:
            first = envelope.local[0]
            self._folder: Path | None = first.root
            #: the folder's ``tmp/`` as a string (:meth:`check` asks at every DATA)
            self._tmp = f"{os.fspath(first.root)}/tmp"
            self.path = first.root.joinpath("tmp", unique_name())
            head = trace_head(envelope.sender, first.user)
        else:
            self._folder = None
            self._tmp = ""
            self.path = runtime.config.data_dir.joinpath("spool", "incoming", unique_name())
            head = trace_head(envelope.sender, None)
        self._fd: int | None = None  # opened by the first thread-pool job
        #: bytes in the file so far (the write jobs run one at a time, in order): its size
        #: without an ``fstat`` at the end
        self._written = 0
        self._io: defer.Deferred[None] | None = None  # chain of write jobs, None: no file yet
        self._io_error: BaseException | None = None
        #: bytes handed to write jobs and not yet written
        self.backlog = 0
        self._drained: list[defer.Deferred[None]] = []
        #: where the Received header starts: copies and the queue take the file from here
        self.received_offset = len(head)
        self._trace = head + received  # our lines above the client's header section
        self.write(self._trace)
        self.size = 0  # body bytes only
        self._blocking = blocking or _thread_pool(runtime)

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
            lambda _: None if self._io_error else self._blocking(self._write_blocking, data)
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
            st = os.stat(self._tmp)  # noqa: PTH116 (a string: no path object per message)
        except FileNotFoundError:
            return  # created with the file
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", self._tmp)

    def _open_blocking(self) -> int:
        if self._folder is not None:
            fd = create_tmp(self.path, self._folder, make=True)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._fd = fd
        return fd

    def _write_blocking(self, data: list[bytes]) -> None:
        fd = self._fd if self._fd is not None else self._open_blocking()
        self._written += write_all(fd, data)

    def held(self) -> bytes | None:
        """The message as received (after our trace lines) when none of it is on disk yet
        (a small message: see the class docstring), else None (:meth:`contents` reads it)."""
        if self._io is not None:
            return None
        return b"".join(self._pending)[len(self._trace) :]

    def contents(self) -> defer.Deferred[bytes]:
        """The message as received (after our trace lines), once every write landed: for
        checks at the end of the data (DKIM verification reads the whole message)."""
        held = self.held()
        if held is not None:
            return defer.succeed(held)
        self._flush()
        result: defer.Deferred[bytes] = defer.Deferred()
        io = self._io
        assert io is not None

        def read(_: object) -> defer.Deferred[None]:
            job = self._blocking(self._read_blocking)
            job.chainDeferred(result)
            return job.addBoth(lambda _: None)  # the write chain goes on unchanged

        io.addCallback(read)
        return result

    def _read_blocking(self) -> bytes:
        if self._io_error is not None:
            error = self._io_error
            raise DeliveryError(f"writing the message failed: {error}") from error
        with self.path.open("rb") as f:
            f.seek(len(self._trace))
            return f.read()

    def abort(self) -> None:
        """Drop the message (client went away, or refused at the end)."""
        self._pending.clear()
        self._pending_size = 0
        if self._io is None:
            return  # no file was ever created
        self._io.addCallback(lambda _: self._blocking(self._abort_blocking))
        self._io.addErrback(lambda f: log.failure("removing {path} failed", f, path=self.path))

    def _abort_blocking(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        discard(self.path)

    def finish(
        self, *, head_edit: HeaderEdit | None = None, folder: str | None = None
    ) -> defer.Deferred[DeliveryResult]:
        """Make the message durable for every recipient; fires when it is safe to answer
        (250, or the :attr:`DeliveryResult.reply` given).

        ``head_edit``: replace the top of the client's header section, just below our trace
        lines (:func:`mailsuite.smtp.headers.header_edit`: Authentication-Results added,
        forged ones removed; DKIM-Signature fields prepended with ``HeaderEdit(0, fields)``)
        -- done in memory while nothing is on disk yet, else by one rewrite at the end; no
        copy at all without one.  ``folder``: store every
        local copy in this folder of each recipient (``"Junk"`` for a quarantine verdict),
        made if missing, without running the recipients' scripts."""
        tail = self._take_pending()
        if head_edit is not None and self._io is None:
            tail = self._edit_in_memory(tail, head_edit)
            head_edit = None
        if self._io is None:
            d = self._blocking(self._finish_blocking, tail, head_edit, folder)
        else:

            def after_writes(_: object) -> defer.Deferred[Outgoing]:
                if self._io_error is not None:
                    error = self._io_error

                    def failed(_: object) -> Outgoing:
                        raise DeliveryError(f"writing the message failed: {error}") from error

                    # the file is gone before the client hears 4xx (nothing half-written stays)
                    removed = self._blocking(self._abort_blocking)
                    removed.addErrback(
                        lambda f: log.failure("removing {path} failed", f, path=self.path)
                    )
                    return removed.addCallback(failed)
                return self._blocking(self._finish_blocking, tail, head_edit, folder)

            d = self._io.addCallback(after_writes)
            self._io = None
        return d.addCallback(_after, self.runtime, self._blocking)

    def _edit_in_memory(self, pending: list[bytes], edit: HeaderEdit) -> list[bytes]:
        start = len(self._trace)
        data = b"".join(pending)
        old = data[start : start + edit.old_length]
        self._newlines += edit.new.count(b"\n") - old.count(b"\n")
        return [self._trace, edit.new, data[start + edit.old_length :]]

    def _finish_blocking(
        self, tail: list[bytes], edit: HeaderEdit | None, folder: str | None
    ) -> Outgoing:
        # nothing written before (no write job, no rewrite): the file will be ``tail`` alone
        contents = tail if self._fd is None and edit is None else None
        try:
            fd = self._fd if self._fd is not None else self._open_blocking()
            self._fd = None
            try:
                total = self._written + write_all(fd, tail)
                os.fsync(fd)
            finally:
                os.close(fd)
            if edit is not None:
                total = self._rewrite_head(edit)
        except BaseException:
            discard(self.path)
            raise
        fanout = Fanout(
            self.runtime,
            self.envelope,
            self.path,
            total,
            self._newlines,
            received_offset=self.received_offset,
            can_refuse=True,
            folder=folder,
            contents=contents,
        )
        return fanout.run()

    def _rewrite_head(self, edit: HeaderEdit) -> int:
        """A new header section for a message already on disk: one rewrite, beside it."""
        start = len(self._trace)
        with self.path.open("rb") as f:
            f.seek(start)
            dropped = f.read(edit.old_length)
        new = self.path.with_name(unique_name())
        fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                write_all(fd, (self._trace, edit.new))
                with self.path.open("rb") as f:
                    f.seek(start + edit.old_length)
                    while chunk := f.read(1024 * 1024):
                        write_all(fd, (chunk,))
                os.fsync(fd)
                total = os.fstat(fd).st_size
            finally:
                os.close(fd)
        except BaseException:
            discard(new)
            raise
        discard(self.path)
        self.path = new
        self._newlines += edit.new.count(b"\n") - dropped.count(b"\n")
        return total


def _after(
    out: Outgoing, runtime: Any, blocking: Blocking
) -> DeliveryResult | defer.Deferred[DeliveryResult]:
    """The reactor-thread end of a delivery: tell the folders' sessions, log, then sign and
    queue the replies the scripts asked for (already recorded, so sent once: a failure here
    is logged, never a reason to deliver the message again).  The result itself when there
    is nothing to send (the usual case: no Deferred to chain per message)."""
    for folder in out.folders:
        runtime.changes.notify(folder)
    metrics = getattr(runtime, "metrics", None)
    if metrics is not None and out.delivered:
        metrics.local_deliveries.inc(out.delivered)
        metrics.stored_bytes.inc(out.stored_bytes)
    for line in out.log:
        log.info("delivery: {line}", line=line)
    result = DeliveryResult(out.reply, out.folders)
    if not out.replies:
        return result

    async def send_all() -> DeliveryResult:
        for reply in out.replies:
            try:
                await _send_reply(runtime, blocking, reply.sender, reply.recipient, reply.data)
            except Exception:  # the message itself is delivered
                log.failure("delivery: queueing a reply to {rcpt} failed", rcpt=reply.recipient)
        return result

    return defer.ensureDeferred(send_all())


async def _send_reply(
    runtime: Any, blocking: Blocking, sender: str, recipient: str, data: bytes
) -> None:
    """Sign (like other outgoing mail: DKIM for the From domain when it has a key) and queue."""
    queue = _queue_of(runtime)
    signature = b""
    mail_auth = getattr(runtime, "mail_auth", None)
    if mail_auth is not None:
        try:
            signature = await mail_auth.sign(data)
        except Exception:  # unsigned is better than not sent
            log.failure("delivery: signing a reply to {rcpt} failed", rcpt=recipient)
    await blocking(
        partial(
            queue.enqueue_bytes,
            signature + data,
            sender,
            [recipient],
            smtputf8=not recipient.isascii(),
        )
    )


def deliver_file(
    runtime: Any,
    sender: str,
    local: Sequence[LocalBox],
    source: Path,
    offset: int = 0,
    *,
    remote: Sequence[str] = (),
    smtputf8: bool = False,
    body_8bit: bool = False,
    blocking: Blocking | None = None,
) -> defer.Deferred[DeliveryResult]:
    """Deliver ``source[offset:]`` (a queued message: it starts at its Received lines) from
    ``sender`` to local mailboxes, and queue it for ``remote`` addresses (an alias that
    points outside).  The recipients' scripts run; a ``reject`` becomes a rejection notice
    (there is no SMTP dialogue to refuse in).  ``blocking``: where file work runs (default:
    the reactor's thread pool)."""
    run = blocking or _thread_pool(runtime)
    env = Envelope(sender, list(local), list(remote), smtputf8, body_8bit)

    def in_thread() -> Outgoing:
        if not env.local:
            _queue_of(runtime).enqueue_file(
                source, offset, sender, env.remote, smtputf8=smtputf8, body_8bit=body_8bit
            )
            return Outgoing()
        head = trace_head(sender, env.local[0].user)
        draft = copy_tmp(env.local[0].root, head, source, offset, make=True)
        return _fan_out(runtime, env, draft, len(head))

    return run(in_thread).addCallback(_after, runtime, run)


def deliver_bytes(
    runtime: Any,
    sender: str,
    local: Sequence[LocalBox],
    data: bytes,
    *,
    remote: Sequence[str] = (),
    smtputf8: bool = False,
    blocking: Blocking | None = None,
) -> defer.Deferred[DeliveryResult]:
    """:func:`deliver_file` for a message held in memory (a DSN to a local sender)."""
    run = blocking or _thread_pool(runtime)
    env = Envelope(sender, list(local), list(remote), smtputf8)

    def in_thread() -> Outgoing:
        if not env.local:
            _queue_of(runtime).enqueue_bytes(data, sender, env.remote, smtputf8=smtputf8)
            return Outgoing()
        head = trace_head(sender, env.local[0].user)
        draft = write_tmp(env.local[0].root, (head, data), make=True)
        return _fan_out(runtime, env, draft, len(head))

    return run(in_thread).addCallback(_after, runtime, run)


def _fan_out(runtime: Any, env: Envelope, draft: Draft, received_offset: int) -> Outgoing:
    fanout = Fanout(
        runtime,
        env,
        draft.path,
        draft.size,
        draft.wsize - draft.size,
        received_offset=received_offset,
        can_refuse=False,
    )
    return fanout.run()


def _queue_of(runtime: Any) -> Any:
    queue = runtime.queue
    if queue is None:
        raise DeliveryError("remote delivery is not available")
    return queue
