"""The durable outbound queue on disk: one message file and one envelope file per entry.

Layout under ``<data_dir>/queue/``::

    msg/<id>          the message (LF line ends, starting with our Received header), written once
    env/<id>.json     the envelope: sender, options, and per-recipient state (see QueueEntry)
    tmp/              files being written; anything left here after a crash is garbage
    ctl/              requests from the ``mailsuite queue`` command for the running server
    runner.lock       held (flock) by the server process whose runner works this queue

Every write is: temp file, fsync, rename, fsync the directory (DESIGN.md, "durability first").
An entry exists once its envelope exists; the message is written first, so an envelope never
points at a missing message. A message without an envelope is what a crash left half-done
before the client was answered 250: :meth:`Spool.cleanup` removes it.

Written here rather than using twisted.mail.relaymanager's queue: that pickles one recipient per
entry, never fsyncs and keeps retry state only in memory (research/twisted-mail.md 4.1).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mailsuite.store.maildir import fsync_dir

__all__ = [
    "DELIVERED",
    "FAILED",
    "PENDING",
    "ControlRequest",
    "QueueEntry",
    "RecipientState",
    "Spool",
    "SpoolError",
    "valid_id",
]

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"

_ID_CHARS = set("0123456789ABCDEF")
_COPY_CHUNK = 1024 * 1024


class SpoolError(Exception):
    """An entry that does not exist or cannot be read."""


def valid_id(queue_id: str) -> bool:
    """Queue ids are upper-case hex (safe as file names, never a path)."""
    return 8 <= len(queue_id) <= 40 and set(queue_id) <= _ID_CHARS


def new_id(now: float | None = None) -> str:
    """Sortable by creation time (11 hex digits of microseconds), then 8 random hex digits."""
    micros = int((time.time() if now is None else now) * 1_000_000)
    return f"{micros:011X}{secrets.token_hex(4).upper()}"


@dataclass
class RecipientState:
    """One recipient of an entry.

    ``state``: pending (to be tried), delivered (a server said 250), failed (bounced: 5xx, expiry,
    or an operator's ``queue bounce``). ``attempts`` counts attempts started; ``in_flight`` is set
    before an attempt starts and cleared with its result, so after a crash it says "this may have
    reached the remote server" (the RFC 5321 6.1 window). ``reported`` is True once the sender has
    been sent the failure DSN for this recipient (or none was due, for the null sender).
    """

    address: str
    state: str = PENDING
    attempts: int = 0
    next_attempt: float = 0.0
    last_attempt: float | None = None
    last_reply: str | None = None
    last_status: str | None = None
    last_host: str | None = None
    diagnostic: str | None = None
    in_flight: bool = False
    reported: bool = False

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> RecipientState:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in raw.items() if k in known})


@dataclass
class QueueEntry:
    """The envelope of one queued message."""

    id: str
    sender: str  # "" is the null sender (a DSN): it is never bounced
    created: float
    recipients: list[RecipientState]
    smtputf8: bool = False
    body_8bit: bool = False
    warned: bool = False  # the delay warning was sent
    version: int = 1

    @property
    def pending(self) -> list[RecipientState]:
        return [r for r in self.recipients if r.state == PENDING]

    @property
    def done(self) -> bool:
        """Nothing left to try and every failure reported: the entry can go."""
        return all(
            r.state == DELIVERED or (r.state == FAILED and r.reported) for r in self.recipients
        )

    def next_attempt(self) -> float | None:
        times = [r.next_attempt for r in self.pending]
        return min(times) if times else None

    def recipient(self, address: str) -> RecipientState | None:
        for r in self.recipients:
            if r.address == address:
                return r
        return None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> QueueEntry:
        return cls(
            id=str(raw["id"]),
            sender=str(raw["sender"]),
            created=float(raw["created"]),
            recipients=[RecipientState.from_json(r) for r in raw["recipients"]],
            smtputf8=bool(raw.get("smtputf8", False)),
            body_8bit=bool(raw.get("body_8bit", False)),
            warned=bool(raw.get("warned", False)),
            version=int(raw.get("version", 1)),
        )


@dataclass(frozen=True)
class ControlRequest:
    """An operator's request: ``op`` is flush, delete or bounce; ``id`` None = every entry."""

    op: str
    id: str | None
    name: str = field(default="", compare=False)  # the ctl file it came from


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class Spool:
    """The queue directory. ``enqueue_*`` are thread-safe and blocking (they fsync).

    ``on_enqueue(id)`` is called after every enqueue: through ``reactor.callFromThread`` when a
    reactor is given (the runner sets it to wake up), directly otherwise.
    """

    def __init__(self, root: Path, reactor: Any = None) -> None:
        self.root = root
        self.msg_dir = root / "msg"
        self.env_dir = root / "env"
        self.tmp_dir = root / "tmp"
        self.ctl_dir = root / "ctl"
        self.reactor = reactor
        self.on_enqueue: Callable[[str], None] | None = None
        #: the clock for ``created`` times (the runner sets its reactor's ``seconds``)
        self.now: Callable[[], float] = time.time
        self._lock_file: Any = None
        self._mutex = threading.Lock()

    def ensure(self) -> Spool:
        for d in (self.root, self.msg_dir, self.env_dir, self.tmp_dir, self.ctl_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self

    # -- paths ----------------------------------------------------------------------------

    def message_path(self, queue_id: str) -> Path:
        self._check(queue_id)
        return self.msg_dir / queue_id

    def envelope_path(self, queue_id: str) -> Path:
        self._check(queue_id)
        return self.env_dir / f"{queue_id}.json"

    @staticmethod
    def _check(queue_id: str) -> None:
        if not valid_id(queue_id):
            raise SpoolError(f"{queue_id!r} is not a queue id")

    # -- adding ---------------------------------------------------------------------------

    def enqueue_file(
        self,
        path: str | os.PathLike[str],
        offset: int,
        sender: str,
        recipients: Iterable[str],
        *,
        head: bytes = b"",
        smtputf8: bool = False,
        body_8bit: bool = False,
    ) -> str:
        """Queue ``head`` + ``path[offset:]`` for ``recipients``; durable when it returns.
        Returns the id."""

        def copy(fd: int) -> None:
            if head:
                _write_all(fd, head)
            with Path(path).open("rb") as f:
                f.seek(offset)
                while chunk := f.read(_COPY_CHUNK):
                    _write_all(fd, chunk)

        return self._enqueue(copy, sender, recipients, smtputf8, body_8bit)

    def enqueue_bytes(
        self,
        data: bytes,
        sender: str,
        recipients: Iterable[str],
        *,
        smtputf8: bool = False,
        body_8bit: bool = False,
    ) -> str:
        """Queue a message held in memory (a DSN); durable when it returns."""
        return self._enqueue(
            lambda fd: _write_all(fd, data), sender, recipients, smtputf8, body_8bit
        )

    def _enqueue(
        self,
        write: Callable[[int], None],
        sender: str,
        recipients: Iterable[str],
        smtputf8: bool,
        body_8bit: bool,
    ) -> str:
        rcpts = list(dict.fromkeys(recipients))
        if not rcpts:
            raise ValueError("a queue entry needs at least one recipient")
        now = self.now()
        queue_id = new_id()
        tmp = self.tmp_dir / f"{queue_id}.msg"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                write(fd)
                os.fsync(fd)
            finally:
                os.close(fd)
            tmp.rename(self.msg_dir / queue_id)
            fsync_dir(self.msg_dir)
        except BaseException:
            _unlink(tmp)
            raise
        entry = QueueEntry(
            id=queue_id,
            sender=sender,
            created=now,
            smtputf8=smtputf8,
            body_8bit=body_8bit,
            recipients=[RecipientState(address=r, next_attempt=now) for r in rcpts],
        )
        try:
            self.save(entry)
        except BaseException:
            _unlink(self.msg_dir / queue_id)
            raise
        self._announce(queue_id)
        return queue_id

    def _announce(self, queue_id: str) -> None:
        callback = self.on_enqueue
        if callback is None:
            return
        if self.reactor is not None:
            self.reactor.callFromThread(callback, queue_id)
        else:
            callback(queue_id)

    # -- reading and updating -------------------------------------------------------------

    def save(self, entry: QueueEntry) -> None:
        """Replace the envelope atomically and durably (blocking)."""
        data = json.dumps(entry.to_json(), indent=1, ensure_ascii=False).encode("utf-8")
        tmp = self.tmp_dir / f"{entry.id}.{secrets.token_hex(4)}.env"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                _write_all(fd, data + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            tmp.rename(self.envelope_path(entry.id))
        except BaseException:
            _unlink(tmp)
            raise
        fsync_dir(self.env_dir)

    def load(self, queue_id: str) -> QueueEntry:
        path = self.envelope_path(queue_id)
        try:
            raw = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            raise SpoolError(f"no queue entry {queue_id}") from None
        except (OSError, ValueError) as e:
            raise SpoolError(f"queue entry {queue_id} is unreadable: {e}") from None
        try:
            entry = QueueEntry.from_json(raw)
        except (KeyError, TypeError, ValueError) as e:
            raise SpoolError(f"queue entry {queue_id} is malformed: {e}") from None
        if entry.id != queue_id:
            raise SpoolError(f"queue entry {queue_id} names itself {entry.id}")
        return entry

    def ids(self) -> list[str]:
        """Every entry id, oldest first."""
        out = []
        for name in _names(self.env_dir):
            if name.endswith(".json") and valid_id(name[:-5]):
                out.append(name[:-5])
        return sorted(out)

    def entries(self) -> Iterator[QueueEntry]:
        for queue_id in self.ids():
            try:
                yield self.load(queue_id)
            except SpoolError:
                continue  # removed meanwhile

    def remove(self, queue_id: str) -> None:
        """Envelope first (the entry is gone), then the message (blocking)."""
        _unlink(self.envelope_path(queue_id))
        fsync_dir(self.env_dir)
        _unlink(self.message_path(queue_id))
        fsync_dir(self.msg_dir)

    def cleanup(self) -> list[str]:
        """Remove what a crash left: temp files, messages without an envelope. Returns the
        names removed. Only the runner calls this, at start, holding the runner lock."""
        removed = []
        for name in _names(self.tmp_dir):
            _unlink(self.tmp_dir / name)
            removed.append(f"tmp/{name}")
        envelopes = set(self.ids())
        for name in _names(self.msg_dir):
            if name not in envelopes:
                _unlink(self.msg_dir / name)
                removed.append(f"msg/{name}")
        for queue_id in envelopes:
            if not (self.msg_dir / queue_id).exists():
                # Cannot happen by our write order; keep the evidence out of the live queue.
                self.envelope_path(queue_id).rename(self.root / f"{queue_id}.orphan.json")
                removed.append(f"env/{queue_id}.json")
        return removed

    # -- the runner lock and operator requests ----------------------------------------------

    def acquire_runner_lock(self) -> bool:
        """Take the lock a running server holds; False when another process holds it."""
        with self._mutex:
            if self._lock_file is not None:
                return True
            f = (self.root / "runner.lock").open("a")  # kept open while held
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                return False
            self._lock_file = f
            return True

    def release_runner_lock(self) -> None:
        with self._mutex:
            if self._lock_file is not None:
                self._lock_file.close()
                self._lock_file = None

    def runner_active(self) -> bool:
        """True when some process (the server) holds the runner lock."""
        try:
            f = (self.root / "runner.lock").open("a")
        except OSError:
            return False
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False

    def request(self, op: str, queue_id: str | None) -> str:
        """Leave a request for the runner; returns the request's file name."""
        if op not in ("flush", "delete", "bounce"):
            raise ValueError(f"unknown queue operation {op!r}")
        if queue_id is not None:
            self._check(queue_id)
        name = f"{new_id()}.json"
        data = json.dumps({"op": op, "id": queue_id}).encode()
        tmp = self.ctl_dir / ("." + name)  # dot files are not read: renamed when whole
        tmp.write_bytes(data)
        tmp.rename(self.ctl_dir / name)
        return name

    def pending_request(self, name: str) -> bool:
        return (self.ctl_dir / name).exists()

    def take_requests(self) -> list[ControlRequest]:
        """Read and remove the waiting requests, oldest first."""
        out = []
        for name in sorted(_names(self.ctl_dir)):
            if name.startswith("."):
                continue
            path = self.ctl_dir / name
            try:
                raw = json.loads(path.read_text("utf-8"))
                op, queue_id = str(raw["op"]), raw.get("id")
                if queue_id is not None and not valid_id(str(queue_id)):
                    raise ValueError("bad id")
                out.append(ControlRequest(op, None if queue_id is None else str(queue_id), name))
            except (OSError, ValueError, KeyError, TypeError):
                pass
            _unlink(path)
        return out


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _names(folder: Path) -> list[str]:
    """The names of the entries in ``folder``."""
    return [entry.name for entry in folder.iterdir()]
