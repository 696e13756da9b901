"""Disk space (mailsuite.store.space) and the index on a full disk, with the full disk made
by a fake: what is recognised as full, SMTP's threshold, the reserve, and index changes that
either happen whole or leave the folder as it was."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

import pytest

from mailsuite.store import quota, space
from mailsuite.store.folder_copy import append_blocking
from mailsuite.store.index import FolderIndex
from mailsuite.store.maildir import ensure_folder
from mailsuite.store.space import (
    RESERVE_NAME,
    DiskFull,
    FreeSpace,
    ensure_reserve,
    is_disk_full,
    release_reserve,
    retry_on_full,
)
from mailsuite.store.write import write_message

FULL = sqlite3.OperationalError("database or disk is full")


def test_what_counts_as_a_full_disk(tmp_path: Path) -> None:
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(FULL)
    assert is_disk_full(DiskFull())
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(sqlite3.OperationalError("no such table: x"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("writing the message failed") from e
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)  # found through the cause


def test_free_space_threshold(tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    default = FreeSpace(tmp_path, None, 10)
    assert default.threshold(total) == max(20, total // 100)
    assert FreeSpace(tmp_path, None, total).threshold(total) == 2 * total
    assert FreeSpace(tmp_path, None, total).too_low()  # 2 x a huge message
    assert not FreeSpace(tmp_path, 0, total).too_low()  # 0: never refuse
    exact = FreeSpace(tmp_path, free // 2, 10)
    assert not exact.too_low()
    assert exact.too_low(declared_size=free)  # a declared SIZE counts (RFC 1870)


def test_reserve_is_made_and_found_from_below(tmp_path: Path) -> None:
    mail = tmp_path / "mail"
    folder = ensure_folder(mail / "example.test" / "joe" / ".Sent")
    assert ensure_reserve(mail, 4096)
    assert (mail / RESERVE_NAME).stat().st_size == 4096
    assert (mail / RESERVE_NAME).stat().st_blocks * 512 >= 4096  # really allocated
    assert ensure_reserve(mail, 4096)  # already there
    assert release_reserve(folder)
    assert not (mail / RESERVE_NAME).exists()
    assert not release_reserve(folder)


def test_retry_on_full_releases_the_reserve_once(tmp_path: Path) -> None:
    (tmp_path / RESERVE_NAME).write_bytes(b"x" * 10)
    calls = []

    def once_full() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise FULL
        return "done"

    assert retry_on_full(tmp_path, once_full) == "done"
    assert len(calls) == 2 and not (tmp_path / RESERVE_NAME).exists()

    def always_full() -> str:
        raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / RESERVE_NAME).write_bytes(b"x")
    with pytest.raises(DiskFull):
        retry_on_full(tmp_path, always_full)

    def other() -> str:
        raise OSError(errno.EACCES, "Permission denied")

    with pytest.raises(PermissionError):
        retry_on_full(tmp_path, other)


def _full_commits(index: FolderIndex, monkeypatch: pytest.MonkeyPatch, times: int) -> list[int]:
    """Make the next ``times`` COMMITs of ``index`` fail as on a full disk."""
    failures = [times]
    real = index.db

    class DB:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def execute(self, sql: str, *args: object) -> object:
            if sql == "COMMIT" and failures[0] > 0:
                failures[0] -= 1
                raise FULL
            return real.execute(sql, *args)

    monkeypatch.setattr(index, "db", DB())
    return failures


def test_a_flag_change_the_index_cannot_record_is_undone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = ensure_folder(tmp_path / "mail" / "joe")
    write_message(folder, [b"Subject: a\n\nx\n"])
    index = FolderIndex(folder)
    index.sync(force=True)
    before = _names(folder, "new") + _names(folder, "cur")
    _full_commits(index, monkeypatch, 2)  # fails, and fails again after the retry
    with pytest.raises(DiskFull):
        index.store_flags([(1, frozenset({"\\Deleted"}))])
    # the files say what the index says: nothing changed
    assert _names(folder, "new") + _names(folder, "cur") == before
    assert index.get(1).flags == frozenset()  # type: ignore[union-attr]
    index.close()


def test_a_full_disk_releases_the_reserve_and_deleting_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mail = tmp_path / "mail"
    folder = ensure_folder(mail / "example.test" / "joe")
    for i in range(3):
        write_message(folder, [b"Subject: %d\n\nx\n" % i])
    assert ensure_reserve(mail, 4096)
    index = FolderIndex(folder)
    index.sync(force=True)
    left = _full_commits(index, monkeypatch, 1)
    done = index.store_flags([(1, frozenset({"\\Deleted"})), (2, frozenset({"\\Seen"}))])
    assert [u for u, _, _ in done] == [1, 2] and left == [0]
    assert not (mail / RESERVE_NAME).exists()  # used up: the change went through
    assert index.get(1).flags == {"\\Deleted"}  # type: ignore[union-attr]
    assert index.expunge([1]) == [1]
    assert len(_names(folder, "cur")) + len(_names(folder, "new")) == 2
    index.close()
    assert FolderIndex(folder).get(2).flags == {"\\Seen"}  # type: ignore[union-attr]


def test_an_expunge_retried_on_a_full_disk_counts_once_against_the_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An expunge whose COMMIT fails on a full disk runs again once the reserve is released
    (frees_space); the files its first try removed leave the user's quota usage, once (the
    retry finds them gone), so the count stays what a recount finds."""
    mail = tmp_path / "mail"
    folder = ensure_folder(mail / "example.test" / "joe")
    for i in range(3):
        write_message(folder, [b"Subject: %d\n\nx\n" % i])
    assert ensure_reserve(mail, 4096)
    index = FolderIndex(folder)
    index.sync(force=True)
    before = quota.recount(folder, 1024 * 1024)
    left = _full_commits(index, monkeypatch, 1)
    assert index.expunge([1]) == [1] and left == [0]
    index.close()
    after = quota.usage(folder)
    assert after is not None and after.messages == before.messages - 1 == 2
    assert after == quota.recount(folder, 1024 * 1024)


def test_append_on_a_full_disk_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither a file in tmp/ nor one in new/ (that would turn up as a message the client
    was told was not stored), nor an index row."""
    folder = ensure_folder(tmp_path / "box")
    real_record = FolderIndex._record_new

    def full(self: FolderIndex, *args: object) -> object:
        raise FULL

    monkeypatch.setattr(FolderIndex, "_record_new", full)
    with pytest.raises(sqlite3.OperationalError):
        append_blocking(folder, b"Subject: x\n\nbody\n", frozenset({"\\Seen"}), None)
    for sub in ("tmp", "new", "cur"):
        assert _names(folder, sub) == [], sub
    monkeypatch.setattr(FolderIndex, "_record_new", real_record)
    index = FolderIndex(folder)
    index.sync(force=True)
    assert index.messages() == []
    index.close()

    def no_space(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(space, "free_bytes", lambda path: 0)
    monkeypatch.setattr(os, "fsync", no_space)  # the message itself cannot be written
    with pytest.raises(OSError):
        append_blocking(folder, b"Subject: y\n\nbody\n", frozenset(), None)
    assert _names(folder, "tmp") == []


def test_append_whose_index_cannot_open_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The draft is written, then the index cannot be opened (a full disk with no reserve
    left: SQLite cannot make its -wal/-shm files): the draft goes too."""
    folder = ensure_folder(tmp_path / "box")

    def full_open(self: FolderIndex) -> sqlite3.Connection:
        raise FULL

    monkeypatch.setattr(FolderIndex, "_open", full_open)
    monkeypatch.setattr(space, "free_bytes", lambda path: 0)
    with pytest.raises(DiskFull):
        append_blocking(folder, b"Subject: z\n\nbody\n", frozenset({"\\Seen"}), None)
    for sub in ("tmp", "new", "cur"):
        assert _names(folder, sub) == [], sub


def _names(folder: Path, sub: str) -> list[str]:
    """The file names in ``folder/sub``, sorted."""
    return sorted(p.name for p in (folder / sub).iterdir())
