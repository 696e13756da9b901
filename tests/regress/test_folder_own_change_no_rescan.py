"""A folder's own flag change must not make it refresh itself (issue 15).

``ChangeHub.notify(folder, source)`` tells every listener but ``source``; ``Folder.store``
passes ``self._hub_changed``, a bound method made anew on every access, and the hub compared
with ``is``, so the folder always heard its own change and scheduled a refresh.  A store
renames files, so that refresh listed the whole directory again: one listing of ``cur/`` per
POP3 RETR that sets \\Seen (1,000 first downloads: 1,000 listings of 1,000 names, ~10 s) and
per IMAP STORE.  The existing tests only checked that *other* views hear a change."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mailsuite.store.events import ChangeHub
from mailsuite.store.mailbox import FolderRegistry
from mailsuite.store.maildir import ensure_folder
from mailsuite.store.write import write_message


class Listener:
    def __init__(self) -> None:
        self.heard: list[Path] = []

    def changed(self, folder: Path) -> None:
        self.heard.append(folder)


def test_the_source_is_not_told_even_as_a_fresh_bound_method(tmp_path: Path) -> None:
    hub = ChangeHub()
    me, other = Listener(), Listener()
    hub.subscribe(tmp_path, me.changed)
    hub.subscribe(tmp_path, other.changed)
    hub.notify(tmp_path, me.changed)  # a bound method made anew, as Folder.store passes it
    assert me.heard == [] and other.heard == [tmp_path]


def test_a_store_does_not_schedule_a_refresh_of_the_folder_itself(tmp_path: Path) -> None:
    box = ensure_folder(tmp_path / "u")
    for i in range(3):
        write_message(box, [b"Subject: %d\n\nx\n" % i])
    soon: list[Callable[[], None]] = []
    registry = FolderRegistry(ChangeHub(), soon.append)
    folder = registry.get(box)
    view, other = folder.view(False), folder.view(False)
    folder.store(view, [(1, frozenset({"\\Seen"}))])
    assert soon == []  # nothing to refresh: the store told the views itself
    assert other.take_flags() == [1]
