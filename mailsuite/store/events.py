"""In-process change notifications for mailbox folders.

Delivery, IMAP and POP3 sessions in this process tell each other "folder X changed" through
one :class:`ChangeHub`, so an IDLE client hears about new mail at once.  Changes made by
other processes (another worker, mutt, ``mailsuite import``) are not seen here; the folders
sessions wait on (IDLE) are watched through inotify instead
(:mod:`mailsuite.shared.folder_watch`, polling where it is unavailable), and the refresh
that follows reads the directory mtimes, which :meth:`mailsuite.store.index.FolderIndex.sync`
makes cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from mailsuite.corelog import Log, StdLog

Listener = Callable[[Path], None]


class FolderWatcher(Protocol):
    """Being told when a folder changes on disk, whoever changed it (another worker, mutt):
    the seam :mod:`mailsuite.shared.folder_watch` fills with inotify or polling."""

    def watch(self, folder: Path, changed: Callable[[], None]) -> Callable[[], None]:
        """Call ``changed()`` (in the reactor thread) soon after ``folder`` changes on disk,
        until the returned function is called."""
        ...


class ChangeHub:
    """Publish/subscribe keyed by the folder's resolved path.  Call from the reactor thread."""

    def __init__(self, log: Log | None = None) -> None:
        #: where a failing listener is logged (the runtime passes a Twisted logger; the store
        #: imports no Twisted, see mailsuite.corelog)
        self.log: Log = log if log is not None else StdLog("mailsuite.store")
        self._listeners: dict[Path, set[Listener]] = {}
        self._everything: set[Listener] = set()
        #: folder path as given -> resolved key: ``Path.resolve`` walks every component with
        #: an ``lstat`` (a third of an IMAP APPEND's reactor time in the stress benchmark of
        #: issue 15); folder paths are fixed below the data directory, so once is enough
        self._keys: dict[Path, Path] = {}

    def _key(self, folder: Path) -> Path:
        key = self._keys.get(folder)
        if key is None:
            if len(self._keys) >= 10_000:  # bounded: a server with many users' folders
                self._keys.clear()
            key = self._keys[folder] = folder.resolve()
        return key

    def subscribe(self, folder: Path, listener: Listener) -> Callable[[], None]:
        """Register ``listener``; returns a function that unregisters it."""
        key = self._key(folder)
        self._listeners.setdefault(key, set()).add(listener)

        def unsubscribe() -> None:
            group = self._listeners.get(key)
            if group is not None:
                group.discard(listener)
                if not group:
                    del self._listeners[key]

        return unsubscribe

    def subscribe_all(self, listener: Listener) -> Callable[[], None]:
        """Register ``listener`` for changes of every folder (the sandbox's catalog, which
        follows inboxes that appear while it runs); returns the function that unregisters it."""
        self._everything.add(listener)
        return lambda: self._everything.discard(listener)

    def notify(self, folder: Path, source: object = None) -> None:
        """Tell every listener of ``folder`` (except ``source``) that it changed."""
        listeners = list(self._listeners.get(self._key(folder), ()))
        listeners.extend(self._everything)
        for listener in listeners:
            if listener == source:  # a bound method is a new object each time: not "is"
                continue
            try:
                listener(folder)
            except Exception:
                self.log.failure("change listener for {folder} failed", folder=folder)
