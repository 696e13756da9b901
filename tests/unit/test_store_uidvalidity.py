"""UIDVALIDITY is never reused for a user's folders (RFC 3501 2.3.1.1, issue 9).

The clock is frozen in these tests: what made the bug was two incarnations of a name within
one second, and a frozen clock makes that certain instead of likely, with no sleep.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from mailsuite.store.index import FolderIndex
from mailsuite.store.mailbox import Account
from mailsuite.store.maildir import ensure_folder
from mailsuite.store.uidvalidity import COUNTER_NAME, account_root, next_uidvalidity

NOW = 1_800_000_000.0


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time", lambda: NOW)


def _uidvalidity(path: Path) -> int:
    index = FolderIndex(path)
    try:
        return index.uidvalidity
    finally:
        index.close()


def test_delete_and_create_again_in_the_same_second_gets_a_greater_value(
    tmp_path: Path, frozen: None
) -> None:
    acct = Account(ensure_folder(tmp_path / "u"))
    seen = []
    for _ in range(3):
        acct.create("Box")
        seen.append(_uidvalidity(acct.path("Box")))
        acct.delete("Box")
    assert seen[0] >= int(NOW)
    assert seen == sorted(set(seen)), seen  # strictly greater each time


def test_every_folder_of_a_user_draws_from_one_counter(tmp_path: Path, frozen: None) -> None:
    acct = Account(ensure_folder(tmp_path / "u"))
    values = [_uidvalidity(acct.root)]
    for name in ("A", "B", "A.Child"):
        acct.create(name)
        values.append(_uidvalidity(acct.path(name)))
    assert values == sorted(set(values))
    assert int((acct.root / COUNTER_NAME).read_text()) == values[-1]


def test_a_rebuilt_index_gets_a_new_value(tmp_path: Path, frozen: None) -> None:
    acct = Account(ensure_folder(tmp_path / "u"))
    acct.create("Box")
    for path in (acct.root, acct.path("Box")):
        before = _uidvalidity(path)
        for f in path.glob("mailsuite-index.sqlite*"):
            f.unlink()
        assert _uidvalidity(path) > before


def test_a_folder_marker_from_before_the_counter_is_respected(tmp_path: Path) -> None:
    root = ensure_folder(tmp_path / "u")
    box = ensure_folder(root / ".Old")
    (box / COUNTER_NAME).write_text("3000000000\n")  # what the per-folder marker held
    assert next_uidvalidity(box, clock=lambda: NOW) == 3_000_000_001
    assert next_uidvalidity(root, clock=lambda: NOW) == 3_000_000_002


def test_the_clock_going_back_does_not_repeat_a_value(tmp_path: Path) -> None:
    root = ensure_folder(tmp_path / "u")
    first = next_uidvalidity(root, clock=lambda: NOW)
    assert next_uidvalidity(root, clock=lambda: NOW - 3600) == first + 1
    assert next_uidvalidity(root, clock=lambda: NOW + 10) == int(NOW) + 10


def test_a_damaged_counter_file_falls_back_to_the_clock(tmp_path: Path) -> None:
    root = ensure_folder(tmp_path / "u")
    (root / COUNTER_NAME).write_bytes(b"\xffgarbage")
    assert next_uidvalidity(root, clock=lambda: NOW) == int(NOW)
    assert (root / COUNTER_NAME).read_text() == f"{int(NOW)}\n"


def test_account_root_of_maildirplusplus_folders(tmp_path: Path) -> None:
    assert account_root(tmp_path / "u") == tmp_path / "u"
    assert account_root(tmp_path / "u" / ".Sent") == tmp_path / "u"


def _draw(root: str, name: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    folder = ensure_folder(Path(root) / f".{name}")
    out.put([next_uidvalidity(folder, clock=lambda: NOW) for _ in range(20)])


def test_several_processes_never_get_the_same_value(tmp_path: Path) -> None:
    root = ensure_folder(tmp_path / "u")
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
    procs = [ctx.Process(target=_draw, args=(str(root), f"F{i}", out)) for i in range(4)]
    for p in procs:
        p.start()
    values = [v for _ in procs for v in out.get(timeout=60)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(values) == 80 and len(set(values)) == 80
    assert int((root / COUNTER_NAME).read_text()) == max(values)
