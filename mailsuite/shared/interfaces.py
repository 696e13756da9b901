"""The shared state of a mail server, one small interface per piece (issue 15).

Each has today's implementation behind it -- one machine, files and SQLite -- and is the seam
where a several-machine implementation goes (docs/scale-out.md: PostgreSQL for the
directory, counters, notifications, queue claims and index; S3-compatible storage for the
message files).  Code that shares state across processes or machines should go through
these names, and a new implementation must keep the rules in each docstring.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from mailsuite.connection_limits import ConnectionCounts as ConnectionCounts
from mailsuite.store.events import FolderWatcher as FolderWatcher

__all__ = [
    "AccountDirectory",
    "ConnectionCounts",
    "FolderWatcher",
    "LoginThrottle",
    "MailIndex",
    "QueueClaim",
]


@runtime_checkable
class AccountDirectory(Protocol):
    """Who is local and how to reach them.  Local: :class:`mailsuite.directory.Directory`
    (a JSON file re-read when it changes; every worker reads the same file)."""

    def is_local_domain(self, domain: str) -> bool: ...
    def password_hash(self, user: str) -> str | None: ...
    def mailbox_root(self, user: str) -> Path: ...
    def may_send_as(self, user: str, address: str) -> bool: ...
    def resolve(self, address: str) -> Any: ...


@runtime_checkable
class LoginThrottle(Protocol):
    """Failed logins per address and per account.  Every process (and node) must see every
    other's failures and running checks, or an attacker gets one allowance each.  Local:
    :class:`mailsuite.auth.FailureLog` (one process); workers:
    :class:`mailsuite.shared.counters.SharedFailureLog`."""

    def record(self, ip: str, user: str) -> None: ...
    def blocked(self, ip: str, user: str, in_flight: int = 0) -> bool: ...
    def delay(self, ip: str) -> float: ...
    def clear(self, ip: str) -> None: ...
    def check_started(self, ip: str) -> None: ...
    def check_finished(self, ip: str) -> None: ...
    def try_start(self, ip: str, user: str, in_flight: int = 0) -> bool: ...
    def finish(self, ip: str, user: str, failed: bool) -> None: ...


@runtime_checkable
class QueueClaim(Protocol):
    """Who works the outbound queue.  An entry must be attempted by one runner at a time
    (an attempt is recorded before it is made, so a crash means "try again", never "send
    twice at once").  Local: :class:`mailsuite.queue.spool.Spool` -- one runner per data
    folder holds ``runner.lock`` (flock) for every entry; several nodes claim entry by entry
    instead (``SELECT ... FOR UPDATE SKIP LOCKED``, docs/scale-out.md)."""

    def acquire_runner_lock(self) -> bool: ...
    def release_runner_lock(self) -> None: ...
    def runner_active(self) -> bool: ...


@runtime_checkable
class MailIndex(Protocol):
    """One folder's UIDs, flags and modseqs: UIDs only grow and are never reused, a change
    bumps the folder's modseq, UIDVALIDITY changes only when the index is lost.  Local:
    :class:`mailsuite.store.index.FolderIndex` (SQLite beside the Maildir, a lock for UID
    assignment, safe for several processes)."""

    def sync(self) -> Any: ...
    def counters(self) -> tuple[int, int, int]: ...
    def state(self) -> tuple[list[int], list[str], list[int]]: ...
    def changes_since(self, modseq: int) -> tuple[list[tuple[int, str, int]], list[int]]: ...
    def store_flags(
        self, changes: Sequence[tuple[int, frozenset[str]]], unchangedsince: int | None = None
    ) -> list[tuple[int, str, int]]: ...
    def expunge(self, uids: Iterable[int]) -> list[int]: ...
    def close(self) -> None: ...
