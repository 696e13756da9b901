"""Being told when a mail folder changes on disk, whoever changed it.

Sessions of one process hear each other through :class:`mailsuite.store.events.ChangeHub`.
A change made by another process -- another worker of this server (``[server] workers``),
``mailsuite import``, mutt, Dovecot on the same Maildir -- shows on disk only: a file renamed
into ``new/`` or ``cur/`` (a delivery, a flag change: Maildir keeps flags in the name), or
unlinked (an expunge).  :class:`InotifyWatcher` asks the kernel for exactly those events
(``twisted.internet.inotify``), so an IDLE client in one worker hears of a delivery made in
another within milliseconds; :class:`PollingWatcher` checks every half second where inotify
is not available (not Linux, or the instance limit reached).

The interface is :class:`FolderWatcher`: ``watch(folder, changed)`` returns the function
that stops watching.  The store's :class:`mailsuite.store.mailbox.FolderRegistry` holds one
watch per open folder however many sessions wait on it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.filepath import FilePath

from mailsuite.store.events import FolderWatcher

log = Logger(namespace="mailsuite.store")

#: Seconds between directory checks when the kernel cannot tell us (the old IDLE interval).
POLL_INTERVAL = 0.5


class PollingWatcher:
    """Calls ``changed`` every ``interval`` seconds; the caller's refresh finds out what
    changed through the directories' mtimes (cheap: see FolderIndex.sync)."""

    def __init__(self, reactor: Any, interval: float = POLL_INTERVAL) -> None:
        self.reactor = reactor
        self.interval = interval

    def watch(self, folder: Path, changed: Callable[[], None]) -> Callable[[], None]:
        poller = LoopingCall(changed)
        poller.clock = self.reactor
        poller.start(self.interval, now=False)

        def stop() -> None:
            if poller.running:
                poller.stop()

        return stop


#: The kernel events that mean a Maildir folder's messages changed (inotify(7)).
def _mask() -> int:
    from twisted.internet import inotify

    return (
        inotify.IN_MOVED_TO
        | inotify.IN_MOVED_FROM
        | inotify.IN_CREATE
        | inotify.IN_DELETE
        | inotify.IN_CLOSE_WRITE
    )


class InotifyWatcher:
    """inotify on each watched folder's ``new/`` and ``cur/``; several events in one reactor
    turn (a delivery renames, the index then renames again) make one ``changed`` call."""

    def __init__(self, reactor: Any, fallback: FolderWatcher) -> None:
        from twisted.internet import inotify

        self.reactor = reactor
        self.fallback = fallback
        self.notifier = inotify.INotify(reactor)
        self.notifier.startReading()
        self.mask = _mask()
        #: directory (bytes path) -> the folder's callbacks
        self._listeners: dict[bytes, set[Callable[[], None]]] = {}
        self._pending: set[Callable[[], None]] = set()
        self._scheduled = False

    def close(self) -> None:
        self.notifier.connectionLost(None)

    def watch(self, folder: Path, changed: Callable[[], None]) -> Callable[[], None]:
        dirs = [FilePath(str(folder / sub)).asBytesMode() for sub in ("new", "cur")]
        try:
            for d in dirs:
                if d.path not in self._listeners:
                    self.notifier.watch(d, mask=self.mask, callbacks=[self._event])
                    self._listeners[d.path] = set()
        except Exception as e:
            log.warn(
                "inotify on {folder} failed ({error}); polling it instead",
                folder=str(folder),
                error=str(e),
            )
            for d in dirs:
                self._release(d, None)
            return self.fallback.watch(folder, changed)
        for d in dirs:
            self._listeners[d.path].add(changed)
        done = False

        def stop() -> None:
            nonlocal done
            if not done:
                done = True
                for d in dirs:
                    self._release(d, changed)

        return stop

    def _release(self, d: FilePath[bytes], changed: Callable[[], None] | None) -> None:
        group = self._listeners.get(d.path)
        if group is None:
            return
        if changed is not None:
            group.discard(changed)
        if not group:
            del self._listeners[d.path]
            # KeyError: the directory went away and the kernel dropped the watch
            with contextlib.suppress(KeyError):
                self.notifier.ignore(d)

    def _event(self, _ignored: object, path: FilePath[Any], mask: int) -> None:
        parent = path.parent().asBytesMode().path
        group = self._listeners.get(parent) or self._listeners.get(path.asBytesMode().path)
        if not group:
            return
        self._pending.update(group)
        if not self._scheduled:
            self._scheduled = True
            self.reactor.callLater(0, self._deliver)

    def _deliver(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, set()
        for changed in pending:
            try:
                changed()
            except Exception:
                log.failure("folder change listener failed")


def folder_watcher(reactor: Any) -> FolderWatcher:
    """inotify where the kernel has it, polling otherwise."""
    polling = PollingWatcher(reactor)
    try:
        return InotifyWatcher(reactor, polling)
    except Exception as e:
        log.info(
            "inotify unavailable ({error}): folders are polled every {n} s",
            error=str(e),
            n=POLL_INTERVAL,
        )
        return polling
