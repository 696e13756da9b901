"""The first index of a folder written by another program (the batched path of a folder with
no rows) gives every message the UID, flags and size the general path gives."""

from __future__ import annotations

import os
import time
from pathlib import Path

from mailsuite.store.index import FolderIndex, crlf_size
from mailsuite.store.index_scan import _delivery_key, delivery_order
from mailsuite.store.maildir import ensure_folder, write_keywords


def _names(n: int) -> list[tuple[str, str]]:
    """(sub, file name) in many of the forms other programs write."""
    t = 1_700_000_000
    out = []
    for i in range(n):
        form = i % 6
        if form == 0:  # ours: sizes and a counter
            name = f"{t + i % 7}.M{i}P99Q{i}.host,S=30,W=31:2,S"
        elif form == 1:  # a generator's: ,S= only
            name = f"{t + i % 7}.M{i:06d}P4242.gen,S=30:2,"
        elif form == 2:  # no sizes, keyword letter a and \Flagged
            name = f"{t + i % 7}.M{i}P7.mx:2,Fa"
        elif form == 3:  # Dovecot's V/I form: not the plain pattern
            name = f"{t + i % 7}.M{i}P8V0000000000000801I{i:016x}_0.mx,S=30:2,RS"
        elif form == 4:  # Postfix's
            name = f"{t + i % 7}.V801I{i:x}M{i}.mx"
        else:  # odd: no dots at all
            name = f"odd{i}"
        out.append(("new" if form in (4, 5) else "cur", name))
    return out


def _write(box: Path, names: list[tuple[str, str]]) -> None:
    for i, (sub, name) in enumerate(names):
        (box / sub / name).write_bytes(b"Subject: %d\n\nline\nline\n" % i)
    write_keywords(box, {"a": "$Label1"})


def test_first_index_matches_the_general_path(tmp_path: Path) -> None:
    names = _names(600)
    box = ensure_folder(tmp_path / "box")
    _write(box, names)
    idx = FolderIndex(box)
    res = idx.sync()
    msgs = idx.messages()
    assert len(res.added) == len(msgs) == len(names)
    # UIDs follow delivery order, as the per-name path numbered them
    bases = sorted((n.split(":", 1)[0] for _, n in names), key=delivery_order)
    assert [m.base for m in msgs] == bases
    assert [m.uid for m in msgs] == list(range(1, len(names) + 1))
    by_base = {n.split(":", 1)[0]: (sub, n) for sub, n in names}
    for m in msgs:
        sub, name = by_base[m.base]
        assert m.name == f"{sub}/{name}"
        info = name.partition(":2,")[2]
        want = {"S": "\\Seen", "F": "\\Flagged", "R": "\\Answered", "a": "$Label1"}
        assert m.flags == {want[c] for c in info}
        assert m.size == (31 if ",W=31" in name else crlf_size(box / m.name))
    # and a second folder indexed in two steps (rows present: the general path) agrees
    box2 = ensure_folder(tmp_path / "box2")
    _write(box2, names[:1])
    idx2 = FolderIndex(box2)
    idx2.sync()
    _write(box2, names)
    idx2.sync(force=True)
    rest = sorted((n.split(":", 1)[0] for _, n in names[1:]), key=delivery_order)
    assert [m.base for m in idx2.messages()] == [names[0][1].split(":", 1)[0], *rest]
    assert {m.base: m.flags for m in idx2.messages()} == {m.base: m.flags for m in msgs}


def test_delivery_key_equals_delivery_order() -> None:
    for _, name in _names(60):
        base = name.split(":", 1)[0]
        assert _delivery_key(base) == delivery_order(base)
    for base in ("1.M2P3Q4.h", "1.M2P3.h", "1.M2P3", "1.M2P3Q4x.h", "1.P3M2.h", "x.M1P2.h"):
        assert _delivery_key(base) == delivery_order(base)


def test_a_file_moved_back_to_new_is_not_indexed_twice(tmp_path: Path) -> None:
    """Only new/ listed (cur/'s mtime kept) and no row under new/: the file's base is known
    under cur/, so it is the same message, not a new one."""
    box = ensure_folder(tmp_path / "box")
    (box / "cur" / "100.M1P1.h:2,S").write_bytes(b"Subject: a\n\nx\n")
    (box / "cur" / "101.M1P1.h:2,").write_bytes(b"Subject: b\n\nx\n")
    past = time.time() - 10
    for sub in ("new", "cur"):
        os.utime(box / sub, (past, past))
    idx = FolderIndex(box)
    idx.sync()
    before = {m.base: m.uid for m in idx.messages()}
    cur_stamp = (box / "cur").stat().st_mtime_ns
    (box / "cur" / "100.M1P1.h:2,S").rename(box / "new" / "100.M1P1.h")
    os.utime(box / "cur", ns=(cur_stamp, cur_stamp))  # only new/ looks changed
    idx.sync()
    after = {m.base: m.uid for m in idx.messages()}
    assert after == before
