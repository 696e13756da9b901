"""ChangeHub keys folders by resolved path (a folder reached through a symlink is the same
folder) and remembers the resolution instead of walking the path on every notify."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailsuite.store.events import ChangeHub


def test_a_folder_through_a_symlink_is_the_same_folder(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    alias = tmp_path / "alias"
    alias.symlink_to(real)
    hub = ChangeHub()
    heard: list[Path] = []
    hub.subscribe(alias, heard.append)
    hub.notify(real)
    hub.notify(alias)
    assert heard == [real, alias]


def test_notify_resolves_a_path_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = ChangeHub()
    heard: list[Path] = []
    hub.subscribe(tmp_path, heard.append)
    calls = []
    resolve = Path.resolve
    monkeypatch.setattr(Path, "resolve", lambda self: calls.append(self) or resolve(self))
    for _ in range(100):
        hub.notify(tmp_path)
    assert len(heard) == 100 and calls == []  # resolved at subscribe, remembered since
