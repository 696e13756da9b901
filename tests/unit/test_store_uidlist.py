"""A first SELECT answered before the index is built (index_build.prepare / told / finish,
store.uidlist): what it tells equals what the built folder says; the UIDs told are durable,
so a build killed after the answer leaves a uidlist from which the next opener builds the
same UIDs under the same UIDVALIDITY; what changed meanwhile reaches the session that was
told as pending changes."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

from hypothesis import HealthCheck, given, settings

from mailsuite.store import index_build
from mailsuite.store.index import INDEX_NAME, FolderIndex, NewFile
from mailsuite.store.index_scan import _delivery_key
from mailsuite.store.index_schema import Early, EarlyAnswer
from mailsuite.store.mailbox import FolderRegistry
from mailsuite.store.maildir import ensure_folder
from mailsuite.store.uidlist import UIDLIST_NAME, read_uidlist, write_uidlist
from tests.unit.test_store_index_build import _dump, _listing, _names, _write

ROOT = Path(__file__).resolve().parents[2]


def _open_early(box: Path, claim: bool) -> tuple[FolderIndex, list[Early]]:
    """Open ``box`` answering early, as IMAP SELECT (``claim``) or EXAMINE does."""
    told: list[Early] = []

    def report(early: Early) -> None:
        # the answer goes out while the lock is held and the index is not there yet
        assert not (box / INDEX_NAME).exists()
        assert read_uidlist(box) is not None
        told.append(early)

    return FolderIndex(box, EarlyAnswer(report, claim)), told


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_listing())
def test_what_is_told_early_equals_what_the_built_folder_says(
    listing: tuple[list[str], list[str]],
) -> None:
    """For any listing (keywords, names without an info suffix, a base in both new/ and
    cur/): EXISTS, the first unseen, the keywords, UIDVALIDITY, UIDNEXT and HIGHESTMODSEQ told
    from the listing are the folder's once built; the index equals one built without an
    early answer; the uidlist is gone."""
    new, cur = listing
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(index_build, "UIDLIST_MIN", 0):
        box = ensure_folder(Path(tmp) / "early")
        _write(box, new, cur)
        idx, told = _open_early(box, claim=False)
        (early,) = told
        folder = FolderRegistry().get(box, idx)
        flags = [folder.flags[u] for u in folder.uids]
        first_unseen = next((i + 1 for i, f in enumerate(flags) if "\\Seen" not in f), 0)
        assert (early.exists, early.first_unseen, early.keywords) == (
            len(folder.uids),
            first_unseen,
            frozenset(folder.keywords),
        )
        assert (early.uidvalidity, early.uidnext, early.modseq) == (
            folder.uidvalidity,
            folder.uidnext,
            folder.highestmodseq,
        )
        assert folder.uids == list(range(1, early.exists + 1))
        assert not (box / UIDLIST_NAME).exists()
        v = folder.view_as_told(False, early)
        assert not (v.pending_added or v.pending_expunged or v.pending_flags)
        assert v.recent_count() == early.exists
        folder.index.close()
        plain = ensure_folder(Path(tmp) / "plain")
        _write(plain, new, cur)
        FolderIndex(plain).close()
        assert _dump(box) == _dump(plain)


def test_select_claims_recent_in_the_build_and_examine_does_not(tmp_path: Path) -> None:
    for claim in (True, False):
        box = ensure_folder(tmp_path / f"box{claim}")
        _write(box, [], _names(1500))
        idx, told = _open_early(box, claim)
        assert told[0].exists == 1500
        assert idx.recent_range() == ((1501, 1501) if claim else (1, 1501))
        idx.close()


def test_a_small_folder_or_a_name_with_a_newline_is_built_before_answering(
    tmp_path: Path,
) -> None:
    """Below UIDLIST_MIN the build costs less than the uidlist; a name with a newline cannot
    be written one a line: both are built first, as before (no early answer)."""
    small = ensure_folder(tmp_path / "small")
    _write(small, [], _names(index_build.UIDLIST_MIN - 1))
    idx, told = _open_early(small, True)
    assert not told and idx.uidnext == index_build.UIDLIST_MIN
    idx.close()
    odd = ensure_folder(tmp_path / "odd")
    _write(odd, ["1.M1P1.h\nx"], _names(index_build.UIDLIST_MIN))
    idx, told = _open_early(odd, True)
    assert not told and idx.uidnext == index_build.UIDLIST_MIN + 2
    idx.close()


def _bases(idx: FolderIndex) -> dict[str, int]:
    return {m.base: m.uid for m in idx.messages()}


def test_a_uidlist_without_an_index_keeps_its_uids_and_uidvalidity(tmp_path: Path) -> None:
    """What a build killed after the answer leaves (the uidlist, no index): the next open
    builds the index with the uidlist's UIDVALIDITY and UIDs, and its first sync brings it in
    step with the directory as it is now: a file renamed (flags) or moved to cur/ keeps its
    UID, a removed one is expunged, a new one comes after."""
    box = ensure_folder(tmp_path / "box")
    names = _names(1200)
    _write(box, ["1800000000.M1P9.h,S=20"], names)
    prep = index_build.prepare(box, _delivery_key, uidlist=True)  # then "killed"
    assert prep is not None and prep.durable
    assert not (box / INDEX_NAME).exists()
    told_uids = {n[4:].split(":")[0]: i + 1 for i, n in enumerate(prep.ordered.rels())}
    # another program changes the folder before anyone opens it again
    (box / "cur" / names[0]).rename(box / "cur" / (names[0].split(":")[0] + ":2,FS"))
    (box / "new" / "1800000000.M1P9.h,S=20").rename(box / "cur" / "1800000000.M1P9.h,S=20:2,")
    (box / "cur" / names[5]).unlink()
    (box / "new" / "1900000000.M1P9.h").write_bytes(b"Subject: late\n\nx\n")
    idx = FolderIndex(box)
    idx.sync()
    assert idx.uidvalidity == prep.uidvalidity
    gone = told_uids.pop(names[5].split(":")[0])
    assert idx.expunged_since(0) == [gone]  # (QRESYNC's VANISHED has it)
    assert _bases(idx) == {**told_uids, "1900000000.M1P9.h": 1202}
    assert idx.get(1) is not None and idx.get(1).flags == {"\\Flagged", "\\Seen"}
    assert not (box / UIDLIST_NAME).exists()
    idx.close()


_KILLED_AFTER_ANSWER = """
import os, signal, sys
from pathlib import Path
from mailsuite.store.index import FolderIndex
from mailsuite.store.index_schema import EarlyAnswer
def report(early):
    print(early.uidvalidity, early.exists, flush=True)  # the answer a client got
    os.kill(os.getpid(), signal.SIGKILL)  # kill -9 at the start of the build
FolderIndex(Path(sys.argv[1]), EarlyAnswer(report, True))
"""


def test_kill_9_after_the_answer_then_the_next_open_has_the_uids_told(tmp_path: Path) -> None:
    box = ensure_folder(tmp_path / "box")
    _write(box, [], _names(2000))
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_AFTER_ANSWER, str(box)],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == -9
    uidvalidity, exists = map(int, child.stdout.split())
    assert not (box / INDEX_NAME).exists() and (box / UIDLIST_NAME).exists()
    idx = FolderIndex(box)
    idx.sync()
    assert (idx.uidvalidity, idx.uidnext) == (uidvalidity, exists + 1)
    assert [m.base for m in idx.messages()] == [n.split(":")[0] for n in _names(2000)]
    assert not (box / UIDLIST_NAME).exists()
    idx.close()


def test_a_damaged_uidlist_is_no_promise(tmp_path: Path) -> None:
    box = ensure_folder(tmp_path / "box")
    _write(box, [], _names(10))
    for text in (b"garbage\n", b"mailsuite-uidlist 1 7 3 -\ncur/a\ncur/b\n", b""):
        (box / UIDLIST_NAME).write_bytes(text)
        assert read_uidlist(box) is None
    idx = FolderIndex(box)
    assert idx.uidvalidity != 7 and idx.uidnext == 11
    idx.close()


def test_a_uidlist_beside_an_index_is_removed_at_open(tmp_path: Path) -> None:
    """A build killed between renaming the index into place and removing its uidlist: the
    index wins, and the uidlist must go before the index could ever be removed."""
    box = ensure_folder(tmp_path / "box")
    _write(box, [], _names(10))
    idx = FolderIndex(box)
    uidvalidity = idx.uidvalidity
    idx.close()
    write_uidlist(box, 7, ["cur/x"], "", "cur/x")
    idx = FolderIndex(box)
    assert idx.uidvalidity == uidvalidity
    assert not (box / UIDLIST_NAME).exists()
    idx.close()


def test_changes_between_the_answer_and_the_folder_are_pending_for_the_view(
    tmp_path: Path,
) -> None:
    """Once the build lets go of the lock, another session or process may change the
    folder before this session's folder is made: its view keeps the sequence numbers told
    and has those changes to announce."""
    box = ensure_folder(tmp_path / "box")
    _write(box, [], _names(1200))
    idx, told = _open_early(box, claim=True)
    other = FolderIndex(box)
    other.store_flags([(2, frozenset({"\\Flagged"}))])
    other.expunge([3])
    draft = box / "tmp" / "draft"
    draft.write_bytes(b"Subject: new\n\nx\n")
    other.add_files([NewFile(draft, "1900000000.M1P1.h", frozenset(), 16, 17)])
    other.close()
    folder = FolderRegistry().get(box, idx)
    v = folder.view_as_told(False, told[0])
    assert v.uids == list(range(1, 1201))
    assert (v.pending_expunged, v.pending_added, v.pending_flags) == ({3}, True, {2})
    assert v.take_expunges() == [3] and v.take_added() == 1200
    assert v.recent_count() == 1199  # UIDs 1-1200 less the expunged; 1201 is not ours
    folder.index.close()


def test_uidlist_round_trip_keeps_odd_names(tmp_path: Path) -> None:
    names = ["cur/1.M1P1.h:2,S", "new/2.M2P1.\udcff", "cur/3 x:2,"]
    write_uidlist(tmp_path, 42, names, "", "\n".join(names))
    got = read_uidlist(tmp_path)
    assert got is not None and (got.uidvalidity, got.names, got.prefix) == (42, names, "")
    bare = ["1.M1P1.h:2,S", "2.M2P1.h:2,"]
    write_uidlist(tmp_path, 43, bare, "cur/", "\n".join(bare))
    got = read_uidlist(tmp_path)
    assert got is not None and (got.names, got.prefix) == (bare, "cur/")
