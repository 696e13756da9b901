"""Local delivery (the MDA role) and hand-off of remote recipients to the outbound queue.

A message being received is written once, as it arrives, into one temporary file: in the
first local recipient's ``tmp/`` (the common single-recipient case then needs no copy at
all) or in ``<data_dir>/spool/incoming`` when every recipient is remote.  The file starts
with the trace headers (Return-Path, Delivered-To, Received: the order Postfix writes) so
that finishing is: fsync, extra copies for further local recipients, the queue entry for
remote ones, rename into ``new/``, fsync the directories.  That work blocks, so it runs in
the reactor's thread pool; the SMTP server answers 250 only when it has succeeded.

If anything fails the whole transaction gets a temporary failure and nothing half-done is
left in ``new/``: temp files are removed and the client tries again later (at-least-once,
never lost).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger

from mailsuite.directory import LocalBox
from mailsuite.store.maildir import ensure_folder, fsync_dir, unique_name

log = Logger(namespace="mailsuite.delivery")

_FLUSH_AT = 256 * 1024


@dataclass
class Envelope:
    """One SMTP transaction's envelope as accepted: sender, routed recipients, options."""

    sender: str  # "" for the null sender
    local: list[LocalBox] = field(default_factory=list)
    remote: list[str] = field(default_factory=list)
    smtputf8: bool = False
    body_8bit: bool = False
    #: the original RCPT address of each local box (for Delivered-To), keyed by box user
    delivered_to: dict[str, str] = field(default_factory=dict)


class DeliveryError(Exception):
    """Delivery failed for a reason worth a temporary failure (logged with details)."""


class IncomingMessage:
    """The message of one transaction while its DATA arrives, then its delivery."""

    def __init__(self, runtime: Any, envelope: Envelope, received: bytes) -> None:
        self.runtime = runtime
        self.envelope = envelope
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._newlines = 0  # stored text is LF-only, so CRLF size = size + newlines
        return_path = f"Return-Path: <{envelope.sender}>\n".encode()
        self._received = received
        if envelope.local:
            first = envelope.local[0]
            ensure_folder(first.root)
            directory = first.root / "tmp"
            self._delivered_first = self._delivered_to(first)
        else:
            directory = runtime.config.data_dir / "spool" / "incoming"
            directory.mkdir(parents=True, exist_ok=True)
            self._delivered_first = b""
        self.path = directory / unique_name()
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._return_path = return_path
        head = return_path + self._delivered_first
        #: where the Received header starts: copies and the queue take the file from here
        self.received_offset = len(head)
        self.write(head + received)
        self.size = 0  # body bytes only

    def _delivered_to(self, box: LocalBox) -> bytes:
        return f"Delivered-To: {box.user}\n".encode()

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._pending.append(data)
        self._pending_size += len(data)
        self._newlines += data.count(b"\n")
        if self._pending_size >= _FLUSH_AT:
            self._flush()

    def write_body(self, data: bytes) -> None:
        self.size += len(data)
        self.write(data)

    def _flush(self) -> None:
        if self._fd is None or not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def abort(self) -> None:
        """Drop the message (client went away, or refused at the end)."""
        self._pending.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def finish(self) -> defer.Deferred[None]:
        """Make the message durable for every recipient; fires when it is safe to say 250."""
        try:
            self._flush()
        except OSError as e:
            self.abort()
            return defer.fail(DeliveryError(f"writing the message failed: {e}"))
        reactor = self.runtime.reactor
        d = threads.deferToThreadPool(reactor, reactor.getThreadPool(), self._finish_blocking)

        def delivered(folders: list[Path]) -> None:
            for folder in folders:
                self.runtime.changes.notify(folder)

        return d.addCallback(delivered)

    def _finish_blocking(self) -> list[Path]:
        fd = self._fd
        assert fd is not None
        self._fd = None
        created: list[Path] = []
        try:
            os.fsync(fd)
            total = os.fstat(fd).st_size
            os.close(fd)
            fd = -1
            env = self.envelope
            renames: list[tuple[Path, Path]] = []
            if env.local:
                first = env.local[0]
                renames.append((self.path, first.root / "new" / self._final_name(self.path, total)))
                rest_offset = len(self._return_path) + len(self._delivered_first)
                for box in env.local[1:]:
                    ensure_folder(box.root)
                    tmp = box.root / "tmp" / unique_name()
                    head = self._return_path + self._delivered_to(box)
                    size = _copy_with_head(self.path, rest_offset, head, tmp)
                    created.append(tmp)
                    renames.append((tmp, box.root / "new" / self._final_name(tmp, size)))
            if env.remote:
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
            for src, dst in renames:
                os.rename(src, dst)
            folders = sorted({dst.parent.parent for _, dst in renames})
            for folder in folders:
                fsync_dir(folder / "new")
            if not env.local:
                os.unlink(self.path)  # the queue holds its own durable copy now
            return folders
        except BaseException:
            if fd >= 0:
                os.close(fd)
            for path in [self.path, *created]:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            raise

    def _final_name(self, tmp: Path, size: int) -> str:
        """``<unique>,S=<size>,W=<crlf size>``: sizes in the name spare IMAP/POP3 a read.

        Every copy has the same number of lines (only the Delivered-To value differs)."""
        return f"{tmp.name},S={size},W={size + self._newlines}"


def _copy_with_head(src: Path, offset: int, head: bytes, dst: Path) -> int:
    """Write ``head`` + ``src[offset:]`` to ``dst`` durably; returns the size written."""
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
