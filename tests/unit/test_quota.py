"""The quota counter (mailsuite.store.quota) without a server: sizes, the Maildir++ file, the
write path and expunge keeping it, compaction under concurrent writers, the RCPT-time cache."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailsuite.store import quota
from mailsuite.store.folder_copy import append_blocking, copy_blocking
from mailsuite.store.index import FolderIndex
from mailsuite.store.mailbox import MailboxError
from mailsuite.store.maildir import ensure_folder
from mailsuite.store.write import Placement, place, write_tmp


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = ensure_folder(tmp_path / "alice")
    ensure_folder(r / ".Work")
    ensure_folder(r / ".Trash")
    return r


def test_sizes() -> None:
    assert quota.parse_size("20K") == 20 * 1024
    assert quota.parse_size("1G") == 1024**3
    assert quota.parse_size(" 512mb ") == 512 * 1024**2
    assert quota.parse_size("0") == 0
    for bad in ("", "-1K", "1.5G", "lots", "1P"):
        with pytest.raises(ValueError, match="500M, 2G, 20K or 0"):
            quota.parse_size(bad)
    assert quota.format_size(quota.parse_size("3M")) == "3M"
    assert quota.format_size(1500) == "1500"


@given(st.integers(min_value=0, max_value=2**50), st.sampled_from(["", "K", "M", "G", "T"]))
def test_size_round_trip(n: int, unit: str) -> None:
    value = quota.parse_size(f"{n}{unit}")
    assert quota.parse_size(quota.format_size(value)) == value


def test_nothing_is_counted_without_a_limit(root: Path) -> None:
    place(root, [Placement(write_tmp(root, [b"Subject: x\n\nbody\n"]))])
    assert quota.usage(root) is None
    assert not (root / quota.FILE_NAME).exists()
    assert not quota.would_exceed(root, 10**12)


def test_writes_copies_expunges_and_deletes_are_counted(root: Path) -> None:
    place(root, [Placement(write_tmp(root, [b"a" * 100]))])
    u = quota.recount(root, 10_000)
    assert (u.bytes, u.messages) == (100, 1)
    place(root, [Placement(write_tmp(root, [b"b" * 200]))])  # new/, no index
    append_blocking(root / ".Work", b"c" * 300, frozenset({"\\Seen"}), None)  # cur/, index
    assert quota.usage(root) == quota.Usage(10_000, 600, 3)
    index = FolderIndex(root / ".Work")
    index.sync()
    msg = index.messages()[0]
    index.close()
    copy_blocking(root / ".Work", root, [(msg.name, frozenset(), msg.size, 0.0, None, None)])
    assert quota.usage(root) == quota.Usage(10_000, 900, 4)
    index = FolderIndex(root)
    index.sync()
    index.expunge([m.uid for m in index.messages()])
    index.close()
    assert quota.usage(root) == quota.Usage(10_000, 300, 1)
    assert quota.recount(root, 10_000) == quota.Usage(10_000, 300, 1)


def test_refusals_over_the_limit(root: Path) -> None:
    quota.recount(root, 1000)
    append_blocking(root, b"x" * 600, frozenset(), None)
    with pytest.raises(MailboxError) as e:
        append_blocking(root / ".Work", b"y" * 600, frozenset(), None)
    assert e.value.code == "OVERQUOTA"
    assert quota.usage(root) == quota.Usage(1000, 600, 1)
    index = FolderIndex(root)
    index.sync()
    msg = index.messages()[0]
    index.close()
    item = [(msg.name, frozenset(), msg.size, 0.0, None, None)]
    with pytest.raises(MailboxError):
        copy_blocking(root, root / ".Work", item)
    copy_blocking(root, root / ".Trash", item)  # deleting by moving to Trash always works


def test_compaction_keeps_every_change_of_concurrent_writers(root: Path) -> None:
    quota.recount(root, 10**9)
    threads = [
        threading.Thread(target=lambda: [quota.charge(root, 10, 1) for _ in range(400)])
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert quota.usage(root) == quota.Usage(10**9, 16_000, 1600)
    assert (root / quota.FILE_NAME).stat().st_size <= quota.COMPACT_AT + 64


def test_an_interrupted_line_is_skipped(root: Path) -> None:
    (root / quota.FILE_NAME).write_text("5000S\n100 1\n40")
    assert quota.usage(root) == quota.Usage(5000, 100, 1)


def test_the_cache_reads_again_only_when_the_file_changed(root: Path) -> None:
    cache = quota.UsageCache()
    assert cache.get(root) is None and not cache.over([root])
    quota.recount(root, 100)
    assert not cache.over([root])
    quota.charge(root, 150, 1)
    assert cache.over([root])
    other = ensure_folder(root.parent / "bob")
    assert not cache.over([root, other])  # bob has no limit: not every box is full
    assert not cache.over([])


def test_a_damaged_line_is_skipped_and_the_rest_counted(root: Path) -> None:
    (root / quota.FILE_NAME).write_text("5000S\n100 1\ngarbage\n-50 -1\n7 x\n20 1\n")
    assert quota.usage(root) == quota.Usage(5000, 70, 1)
    (root / quota.FILE_NAME).write_text("5000S,10C\n")
    assert quota.usage(root) == quota.Usage(5000, 0, 0, 10)


def test_a_message_count_limit(root: Path) -> None:
    quota.recount(root, 0, 2)
    assert (root / quota.FILE_NAME).read_text().splitlines()[0] == "0S,2C"
    append_blocking(root, b"a", frozenset(), None)
    append_blocking(root, b"b", frozenset(), None)
    assert quota.usage(root) == quota.Usage(0, 2, 2, 2)
    assert quota.usage(root).over  # type: ignore[union-attr]
    with pytest.raises(MailboxError):
        append_blocking(root, b"c", frozenset(), None)
    assert quota.ensure(root, 0, 0) is None and not (root / quota.FILE_NAME).exists()
