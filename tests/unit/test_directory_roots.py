"""Directory.mailbox_root remembers each address's root (every RCPT asks): the same answer as
computing it, bad names still refused every time, and a new mail_dir is honoured."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailsuite import directory
from mailsuite.directory import Directory


def test_roots_are_remembered_and_stay_correct(tmp_path: Path) -> None:
    d = Directory(tmp_path / "directory.json", tmp_path / "mail", ("example.test",))
    first = d.mailbox_root("Alice@Example.TEST")
    assert first == tmp_path / "mail" / "example.test" / "alice"
    assert d.mailbox_root("Alice@Example.TEST") is first  # remembered, not built again
    assert d.mailbox_root("bob@example.test") == tmp_path / "mail" / "example.test" / "bob"
    for bad in ("../x@example.test", "a/b@example.test", "no-at-sign"):
        for _ in range(2):  # refused again, never remembered
            with pytest.raises(ValueError):
                d.mailbox_root(bad)
    d.mail_dir = tmp_path / "other"
    assert d.mailbox_root("Alice@Example.TEST") == tmp_path / "other" / "example.test" / "alice"


def test_the_remembered_roots_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(directory, "MAX_CACHED_ROOTS", 3)
    d = Directory(tmp_path / "directory.json", tmp_path / "mail", ("example.test",))
    for i in range(10):
        assert d.mailbox_root(f"u{i}@example.test") == tmp_path / "mail" / "example.test" / f"u{i}"
        assert len(d._roots) <= 3
