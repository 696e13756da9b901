"""The sandbox's running part: the catalog's worker thread, events and waiters.

Every catalog call runs in one worker thread of its own (so calls never overlap and the
reactor never waits on SQLite or a disk), in the order they were made; a request syncs the
inboxes it reads first, so it sees every delivery that was answered before it.  Deliveries
are announced by the store's change hub (:class:`mailsuite.store.events.ChangeHub`).  What a
sync or an API call changed is published here: to IMAP and POP3 sessions through the hub, to
event-stream subscribers (the web page, tools) as ``new``, ``deleted`` and ``read`` events,
and to waiters of ``/api/v1/wait``.

The catalog's work (parsing each message) runs beside the SMTP server in the same process, so
it is done when needed: at once while someone watches (an event stream is open or a waiter
waits), otherwise in one batch when a burst of deliveries pauses (at most 10 s late, which also
bounds how long ``[sandbox] max_messages`` may be exceeded), or when an API request reads the
inbox.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mailsuite.sandbox.catalog import Catalog, Changes
from mailsuite.sandbox.inboxes import SandboxDirectory, name_of_folder

log = Logger(namespace="mailsuite.sandbox")

#: While nobody watches, the catalog syncs an inbox once deliveries have paused this long
#: (seconds), and at the latest MAX_LAG after the first unsynced one.  Listings, searches
#: and waits sync what they read themselves, so they never see less.
IDLE_SYNC = 0.5
MAX_LAG = 10.0

#: An event: (type, data, inbox); types are "new", "deleted" and "read".
Event = tuple[str, dict[str, Any], str]


@dataclass
class Stats:
    """Counters for ``/api/v1/info`` (Mailpit's ``RuntimeStats``)."""

    started: float = field(default_factory=time.time)
    accepted: int = 0  # messages captured over SMTP
    accepted_size: int = 0
    rejected: int = 0  # transactions refused by a fault recipient or the size limit
    deleted: int = 0


@dataclass
class Waiter:
    """One ``/api/v1/wait`` request: answered with the first matching summary."""

    inbox: str | None
    search: str | None
    tz: str | None
    answer: Callable[[dict[str, Any]], None]
    done: bool = False


class Sandbox(service.Service):
    """The sandbox: catalog, worker thread, event subscribers, waiters and counters."""

    def __init__(self, runtime: Any, directory: SandboxDirectory) -> None:
        config = runtime.config
        self.runtime = runtime
        self.reactor = runtime.reactor
        self.config = config
        self.directory = directory
        self.catalog = Catalog(config.data_dir, directory, config.sandbox.max_messages)
        self.stats = Stats()
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name="sandbox-catalog")
        self.subscribers: set[Callable[[Event], None]] = set()
        self.waiters: list[Waiter] = []
        self._dirty: set[str] = set()  # inboxes changed since their last sync was queued
        self._flush_call: Any = None  # the pending call of _flush
        self._dirty_since: float | None = None  # when the oldest unsynced change came
        self._syncing = False  # a change-triggered sync is queued or running
        self._listener = self._folder_changed  # one bound method: the hub compares by identity
        self._unsubscribe: Callable[[], None] | None = None

    # -- life cycle ------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.pool.start()
        self._unsubscribe = self.runtime.changes.subscribe_all(self._listener)
        self.sync(None).addErrback(lambda f: log.failure("sandbox: first sync failed", f))

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        d = self.run(self.catalog.close)

        def stop(_: object) -> None:
            self.pool.stop()

        return d.addBoth(stop)

    def run(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """Call ``f(*args)`` in the worker thread, after every call made before; what it
        changed in the catalog (found by a sync or done) is published before its result is
        given back."""
        catalog = self.catalog

        def in_thread() -> tuple[Any, Changes]:
            try:
                return f(*args), catalog.take_changes()
            except BaseException:
                self.reactor.callFromThread(self.publish, catalog.take_changes())
                raise

        def published(pair: tuple[Any, Changes]) -> Any:
            result, changes = pair
            self.publish(changes)
            return result

        d = threads.deferToThreadPool(self.reactor, self.pool, in_thread)
        return d.addCallback(published)

    # -- following deliveries --------------------------------------------------------------

    def _folder_changed(self, folder: Path) -> None:
        if folder.parent != self.config.mail_dir:
            return  # another folder of an inbox (made over IMAP): not in the API
        self._dirty.add(name_of_folder(folder.name))
        self._flush_soon()

    @property
    def watched(self) -> bool:
        """Someone waits for events: the page, a tool on the event stream, a waiter."""
        return bool(self.subscribers or self.waiters)

    def _flush_soon(self) -> None:
        """Sync the changed inboxes: at once while someone is watching; otherwise once
        deliveries have paused for :data:`IDLE_SYNC` seconds (at most :data:`MAX_LAG` after
        the first change), so a burst is synced in one go after it and capturing does not
        share the process with parsing.  One change-triggered sync at a time: changes made
        while it runs are synced right after it."""
        if self._syncing or not self._dirty:
            return
        now = self.reactor.seconds()
        if self._dirty_since is None:
            self._dirty_since = now
        when = now if self.watched else min(now + IDLE_SYNC, self._dirty_since + MAX_LAG)
        call = self._flush_call
        if call is not None and call.active():
            call.reset(max(0.0, when - now))
            return
        self._flush_call = self.reactor.callLater(max(0.0, when - now), self._flush)

    def _flush(self) -> None:
        names, self._dirty = sorted(self._dirty), set()
        self._dirty_since = None
        if not names:
            return
        self._syncing = True

        def done(result: object) -> object:
            self._syncing = False
            self._flush_soon()
            return result

        self.sync(names).addBoth(done).addErrback(
            lambda f: log.failure("sandbox: sync of {inboxes} failed", f, inboxes=names)
        )

    def sync(self, inboxes: list[str] | None) -> defer.Deferred[None]:
        """Sync ``inboxes`` (None: all) in the worker thread (what changed is published)."""
        return self.run(self.catalog.sync, inboxes)

    # -- publishing ------------------------------------------------------------------------

    def publish(self, changes: Changes) -> None:
        """Tell IMAP/POP3 sessions, event subscribers and waiters what ``changes`` holds."""
        if not changes:
            return
        for folder in changes.folders:
            self.runtime.changes.notify(folder, self._listener)
        self.stats.deleted += len(changes.deleted)
        events: list[Event] = [("new", s, s["Inbox"]) for s in changes.new]
        events += [("deleted", {"ID": mid}, inbox) for mid, inbox in changes.deleted]
        events += [("read", {"ID": mid, "Read": read}, inbox) for mid, inbox, read in changes.read]
        for event in events:
            for subscriber in list(self.subscribers):
                try:
                    subscriber(event)
                except Exception:
                    log.failure("sandbox: event subscriber failed")
        if changes.new:
            self._wake(changes.new)

    def subscribe(self, subscriber: Callable[[Event], None]) -> Callable[[], None]:
        self.subscribers.add(subscriber)
        self._flush_soon()  # someone watches now: what is pending goes out at once
        return lambda: self.subscribers.discard(subscriber)

    # -- waiters ---------------------------------------------------------------------------

    def wait(self, waiter: Waiter) -> Callable[[], None]:
        """Answer ``waiter`` with the newest message that matches now, or with the first that
        arrives; returns the function that withdraws it (timeout, client gone)."""
        self.waiters.append(waiter)
        self._flush_soon()

        def withdraw() -> None:
            waiter.done = True
            if waiter in self.waiters:
                self.waiters.remove(waiter)

        # Registered first, looked up second: a message that arrives in between is seen by
        # one or the other (both run in the worker thread, in order).
        d = self.run(self.catalog.listing, waiter.inbox, waiter.search, 0, 1, waiter.tz)

        def found(listing: dict[str, Any]) -> None:
            if listing["messages"]:
                self._answer(waiter, listing["messages"][0])

        d.addCallback(found).addErrback(lambda f: log.failure("sandbox: wait lookup failed", f))
        return withdraw

    def _answer(self, waiter: Waiter, summary: dict[str, Any]) -> None:
        if waiter.done:
            return
        waiter.done = True
        if waiter in self.waiters:
            self.waiters.remove(waiter)
        waiter.answer(summary)

    def _wake(self, new: list[dict[str, Any]]) -> None:
        ids = [s["ID"] for s in new]
        for waiter in list(self.waiters):
            if waiter.done:
                continue
            candidates = [s for s in new if waiter.inbox in (None, s["Inbox"])]
            if not candidates:
                continue
            if not waiter.search:
                self._answer(waiter, candidates[-1])
                continue
            d = self.run(self.catalog.matching, ids, waiter.inbox, waiter.search, waiter.tz)

            def matched(summary: dict[str, Any] | None, waiter: Waiter = waiter) -> None:
                if summary is not None:
                    self._answer(waiter, summary)

            d.addCallback(matched).addErrback(
                lambda f: log.failure("sandbox: wait match failed", f)
            )

    # -- capture counters (the SMTP side) --------------------------------------------------

    def captured(self, size: int) -> None:
        self.stats.accepted += 1
        self.stats.accepted_size += size

    def refused(self) -> None:
        self.stats.rejected += 1
