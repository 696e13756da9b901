"""The folder index and the shared folder model, without sockets."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from mailsuite.store.events import ChangeHub
from mailsuite.store.folder_copy import append_blocking
from mailsuite.store.index import FolderIndex, NewFile, crlf_size
from mailsuite.store.index_scan import _trusted
from mailsuite.store.mailbox import Account, FolderRegistry, MailboxError
from mailsuite.store.maildir import ensure_folder
from mailsuite.store.write import append_message, write_message, write_tmp
from tests.harness import wait_until


def folder(tmp_path: Path) -> Path:
    return ensure_folder(tmp_path / "box")


def test_uids_persist_and_grow(tmp_path: Path) -> None:
    box = folder(tmp_path)
    for i in range(3):
        write_message(box, [b"Subject: %d\n\nx\n" % i])
    idx = FolderIndex(box)
    res = idx.sync()
    assert res.added == (1, 2, 3)
    idx.store_flags([(2, frozenset({"\\Seen", "$Work"}))])
    idx.expunge([1])
    idx.close()
    idx = FolderIndex(box)
    assert [m.uid for m in idx.messages()] == [2, 3]
    assert idx.get(2).flags == {"\\Seen", "$Work"}
    assert idx.uidnext == 4
    write_message(box, [b"Subject: new\n\nx\n"])
    assert idx.sync(force=True).added == (4,)
    assert idx.expunged_since(1) == [1]


def test_keywords_survive_rebuild_and_other_tools_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the clock stands still: the rebuilt index must get a new UIDVALIDITY within the same
    # second (the per-user counter, RFC 3501 2.3.1.1), without the test waiting for a tick
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now)
    box = folder(tmp_path)
    write_message(box, [b"Subject: a\n\nx\n"])
    idx = FolderIndex(box)
    idx.sync()
    idx.store_flags([(1, frozenset({"$Label1", "\\Flagged"}))])
    name = idx.get(1).name
    assert name.startswith("cur/") and name.endswith(":2,Fa")
    assert (box / "dovecot-keywords").read_text() == "0 $Label1\n"
    uv = idx.uidvalidity
    idx.close()
    for p in box.glob("mailsuite-index.sqlite*"):
        p.unlink()
    idx = FolderIndex(box)
    idx.sync()
    assert idx.uidvalidity != uv
    assert idx.get(1).flags == {"$Label1", "\\Flagged"}
    # another program (mutt) marks it seen by renaming
    old = box / idx.get(1).name
    old.rename(str(old).replace(":2,Fa", ":2,FSa"))
    res = idx.sync(force=True)
    assert res.flag_changes == (1,)
    assert "\\Seen" in idx.get(1).flags


def test_sizes_are_lazy_and_crlf(tmp_path: Path) -> None:
    box = folder(tmp_path)
    (box / "cur" / "123.M1P1.host:2,S").write_bytes(b"Subject: x\n\nab\n")
    idx = FolderIndex(box)
    idx.sync()
    assert idx.db.execute("SELECT size FROM messages").fetchone()[0] == -1
    msg = idx.messages()[0]
    assert msg.size == len(b"Subject: x\r\n\r\nab\r\n")
    assert msg.flags == {"\\Seen"}


def test_append_and_recent_claimed_once(tmp_path: Path) -> None:
    box = folder(tmp_path)
    _uv, uid = append_blocking(box, b"Subject: x\n\ny\n", frozenset({"\\Draft"}), 1_000_000_000.0)
    assert uid == 1
    idx = FolderIndex(box)
    m = idx.get(1)
    assert m.flags == {"\\Draft"} and m.internaldate == 1_000_000_000.0
    assert idx.claim_recent() == (1, 2)
    assert idx.claim_recent() == (2, 2)


def test_add_files_links_for_copy(tmp_path: Path) -> None:
    src = folder(tmp_path)
    dst = ensure_folder(tmp_path / "dst")
    tmp, unique, size, wsize = write_tmp(src, [b"Subject: x\n\ny\n"])
    a = FolderIndex(src)
    (uid,) = a.add_files([NewFile(tmp, unique, frozenset(), size, wsize)])
    b = FolderIndex(dst)
    path = src / a.get(uid).name
    (uid2,) = b.add_files([NewFile(path, "copy1", frozenset({"\\Seen"}), size, wsize)])
    assert (dst / b.get(uid2).name).read_bytes() == b"Subject: x\n\ny\n"


def test_folder_views_see_each_others_changes(tmp_path: Path) -> None:
    box = folder(tmp_path)
    for i in range(3):
        write_message(box, [b"Subject: %d\n\nx\n" % i])
    reg = FolderRegistry()
    f = reg.get(box)
    v1, v2 = f.view(False), f.view(False)
    f.store(v1, [(2, frozenset({"\\Seen"}))])
    assert v2.take_flags() == [2] and v1.take_flags() == []
    f.expunge([1])
    assert v2.uids == [1, 2, 3]  # not announced to v2 yet
    assert v1.take_expunges() == [1] and v2.take_expunges() == [1] and v2.uids == [2, 3]
    write_message(box, [b"Subject: late\n\nx\n"])
    f.refresh()
    assert v2.take_added() == 3


def test_account_names_refuse_escape(tmp_path: Path) -> None:
    acct = Account(ensure_folder(tmp_path / "u"))
    acct.create("Work.Sub")
    assert "Work.Sub" in acct.names()
    for bad in ("../x", "a/b", "~x", "a..b", ".x", "&Jjo"):
        with pytest.raises(MailboxError):
            acct.create(bad)
    acct.rename("Work.Sub", "Other")
    assert "Other" in acct.names() and "Work.Sub" not in acct.names()


@pytest.mark.parametrize(
    "chunks",
    [
        [b"Subject: a\r", b"\nbody\r\n"],  # CR/LF split across chunks
        [b"a\r", b"\n", b"\r", b"\nb\n"],
        [b"a\r", b"", b"\nb"],  # an empty chunk between the halves
        [b"a\r", b"\r\n", b"\n"],  # bare CR, then CRLF, then bare LF
        [b"x\n\r", b"\r\n"],
    ],
)
def test_write_message_w_size_ignores_chunk_boundaries(tmp_path: Path, chunks: list[bytes]) -> None:
    # ,W= is what POP3 LIST and IMAP RFC822.SIZE report; it must match the bytes RETR sends
    ensure_folder(tmp_path)
    name = write_message(tmp_path, chunks)
    data = b"".join(chunks)
    w = int(name.rsplit(",W=", 1)[1])
    assert w == crlf_size(tmp_path / "new" / name)
    assert w == len(data) + data.count(b"\n") - data.count(b"\r\n")


def _listings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record which subdirectories the index lists."""
    from mailsuite.store.index_scan import IndexScan

    seen: list[str] = []
    real = IndexScan._list_subs

    def spy(self, subs):  # type: ignore[no-untyped-def]
        seen.extend(subs)
        return real(self, subs)

    monkeypatch.setattr(IndexScan, "_list_subs", spy)
    return seen


def test_sync_lists_only_changed_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mailsuite.store.index_scan as scan_mod

    box = folder(tmp_path)
    for i in range(5):
        (box / "cur" / f"{100 + i}.M{i}P1.host:2,").write_bytes(b"Subject: x\n\nb\n")
    idx = FolderIndex(box)
    assert len(idx.sync().added) == 5
    _wait_trusted(box)  # past the trust window of a fine-grained file system
    idx.sync()  # the first listing was too young to trust; this one records the stamps
    seen = _listings(monkeypatch)
    idx.sync()  # stamps recorded and trusted: nothing listed
    assert seen == []
    # a delivery by another program: only new/ is listed
    write_message(box, [b"Subject: new\n\nx\n"])
    _wait_trusted(box)
    res = idx.sync()
    assert res.added == (6,) and seen == ["new"]
    seen.clear()
    assert not idx.sync() and seen == []
    # another program moves the new message to cur/ and flags another: both listed once,
    # the move is a rename (same UID), not an expunge and a new message
    (new_file,) = list((box / "new").iterdir())
    new_file.rename(box / "cur" / (new_file.name + ":2,S"))
    first = sorted((box / "cur").glob("100.*"))[0]
    first.rename(str(first) + "F")
    _wait_trusted(box)
    seen.clear()
    res = idx.sync()
    assert res.added == () and res.expunged == ()
    assert sorted(res.flag_changes) == [1, 6]
    assert idx.get(6).flags == {"\\Seen"} and idx.get(1).flags == {"\\Flagged"}
    assert sorted(seen) == ["cur", "new"]
    seen.clear()
    # our own STORE renames in cur/: the index holds it all, so nothing is listed while the
    # mtime it left is provisional; then only cur/ is listed once more, nothing reported
    idx.store_flags([(2, frozenset({"\\Answered"}))])
    _wait_trusted(box)
    assert not idx.sync() and seen == []
    monkeypatch.setattr(scan_mod, "_RECHECK_NS", 0)
    assert not idx.sync() and seen == ["cur"]
    seen.clear()
    assert not idx.sync() and seen == []  # listed past the trust window: trusted now
    monkeypatch.undo()
    seen = _listings(monkeypatch)
    # another program deletes a file: expunged
    next(p for p in (box / "cur").iterdir() if p.name.startswith("103.")).unlink()
    _wait_trusted(box)
    seen.clear()
    assert idx.sync().expunged == (4,) and seen == ["cur"]
    # a second process's index sees all of it (its name cache is reloaded: names_gen)
    other = FolderIndex(box)
    assert [m.uid for m in other.messages()] == [1, 2, 3, 5, 6]
    idx.store_flags([(3, frozenset({"\\Seen"}))])
    _wait_trusted(box)
    assert other.sync().flag_changes == () and other.get(3).flags == {"\\Seen"}


def _settled_index(tmp_path: Path, n: int = 5) -> tuple[Path, FolderIndex]:
    """A folder of ``n`` messages whose index has listed it past the trust window."""
    box = folder(tmp_path)
    for i in range(n):
        (box / "cur" / f"{100 + i}.M{i}P1.host:2,").write_bytes(b"Subject: x\n\nb\n")
    idx = FolderIndex(box)
    idx.sync()
    _wait_trusted(box)
    idx.sync()
    return box, idx


def test_own_changes_leave_a_provisional_mtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: our own flag changes, expunges and new files do not make the next sync list
    the directory again (under load every IMAP command paid for a read of cur/), yet another
    program's change in the same clock tick is found within the recheck time, and at once by
    a watcher's ``verify``."""
    import mailsuite.store.index_scan as scan_mod

    box, idx = _settled_index(tmp_path)
    seen = _listings(monkeypatch)
    idx.store_flags([(1, frozenset({"\\Seen"})), (2, frozenset({"\\Flagged"}))])
    idx.expunge([3])
    append_message(box, [b"Subject: appended\n\nx\n"], frozenset(), None)  # add_files
    assert not idx.sync() and seen == []
    # another program renames a file right after ours: the mtime may not show it (same tick);
    # here it does not, by putting our provisional mtime back on the directory
    cur = box / "cur"
    st = cur.stat()
    first = sorted(cur.glob("104.*"))[0]
    first.rename(str(first) + "T")
    os.utime(cur, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert not idx.sync() and seen == []  # hidden for now ...
    # ... but a watcher's tick lists what our changes left provisional (new/ got a file)
    assert idx.sync(verify=True).flag_changes == (5,) and sorted(seen) == ["cur", "new"]
    assert idx.get(5).flags == {"\\Deleted"}
    # without a watcher: found once the provisional mtime is older than the recheck time
    _wait_trusted(box)
    idx.sync()
    seen.clear()
    idx.store_flags([(1, frozenset())])
    st = cur.stat()
    first = sorted(cur.glob("104.*"))[0]
    first.rename(str(first).rstrip("T"))
    os.utime(cur, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert not idx.sync() and seen == []
    monkeypatch.setattr(scan_mod, "_RECHECK_NS", 0)
    assert idx.sync().flag_changes == (5,) and seen == ["cur"]


def test_own_change_after_another_programs_lists_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change of ours that finds the directory changed since the index last listed it (by
    a program that does not take our lock) does not cover it: the next sync lists it and
    finds the other program's change."""
    box, idx = _settled_index(tmp_path)
    seen = _listings(monkeypatch)
    cur = box / "cur"
    first = sorted(cur.glob("104.*"))[0]
    first.rename(str(first) + "F")  # mutt flags a message ...
    idx.store_flags([(1, frozenset({"\\Seen"}))])  # ... then we store, before any sync
    assert idx.sync().flag_changes == (5,) and seen == ["cur"]
    assert idx.get(5).flags == {"\\Flagged"} and idx.get(1).flags == {"\\Seen"}


def test_young_listing_is_listed_again_even_after_own_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing too young to trust is due again at the next sync (as before issue 15); an own
    change after it makes the mtime provisional, with the recheck deadline counted from then."""
    import mailsuite.store.index_scan as scan_mod

    box, idx = _settled_index(tmp_path)
    monkeypatch.setattr(scan_mod, "_TRUST_AFTER_FINE_NS", 10**12)
    (box / "cur" / "200.M9P1.host:2,").write_bytes(b"Subject: y\n\nb\n")
    assert idx.sync().added == (6,)
    seen = _listings(monkeypatch)
    assert not idx.sync() and seen == ["cur"]  # young: listed again
    seen.clear()
    idx.store_flags([(6, frozenset({"\\Seen"}))])
    assert not idx.sync() and seen == []  # ours, provisional
    meta = dict(idx.db.execute("SELECT key, value FROM meta WHERE key LIKE 'since_%'"))
    assert meta["since_cur"] > 0


def _wait_trusted(box: Path) -> None:
    """Wait until the mtimes of ``box``'s new/ and cur/ are older than the index's trust
    window (a few clock ticks where the file system keeps fine times), so the next listing
    records them as trusted."""

    def trusted() -> bool:
        now = time.time_ns()
        return all(_trusted((box / d).stat().st_mtime_ns, now) for d in ("new", "cur"))

    wait_until(
        trusted, 5, f"the mtimes of {box}/new and cur to leave the trust window", interval=0.005
    )


def test_young_mtime_is_listed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mailsuite.store.index_scan as index_mod

    # whole-second mtimes (coarse file systems) wait a full second, finer ones 30 ms
    assert not index_mod._trusted(5 * 10**9, 5 * 10**9 + 900_000_000)
    assert index_mod._trusted(5 * 10**9 + 1, 5 * 10**9 + 40_000_000 + 1)
    box = folder(tmp_path)
    for sub in ("new", "cur"):
        os.utime(box / sub, (time.time() - 10, time.time() - 10))
    idx = FolderIndex(box)
    idx.sync()
    # a change that lands within the trust window is not trusted: the next sync lists again
    monkeypatch.setattr(index_mod, "_TRUST_AFTER_FINE_NS", 10**12)
    write_message(box, [b"Subject: a\n\nx\n"])
    assert idx.sync().added == (1,)
    seen = _listings(monkeypatch)
    assert not idx.sync() and seen == ["new"]


def test_uids_follow_delivery_order_when_microseconds_differ_in_length(tmp_path: Path) -> None:
    """Regression: names were compared as text, so "M99999" sorted after "M100234" and a
    rebuilt index numbered messages of the same second out of arrival order."""
    folder = ensure_folder(tmp_path / "box")
    arrival = ["1795933428.M99999P7Q1.h", "1795933428.M100234P7Q2.h", "1795933428.M100234P7Q10.h"]
    for i, name in enumerate(reversed(arrival)):  # create them in the wrong order on purpose
        (folder / "new" / name).write_bytes(b"Subject: %d\n\nx\n" % i)
    idx = FolderIndex(folder)
    idx.sync(force=True)
    assert [m.name.split("/", 1)[1] for m in idx.messages()] == arrival


def test_one_poller_per_folder_however_many_sessions_idle(tmp_path: Path) -> None:
    """Many IDLE sessions on one folder share one directory poller (idle stays cheap)."""
    root = tmp_path / "box"
    ensure_folder(root)
    reg = FolderRegistry()
    folder = reg.get(root)
    started: list[object] = []
    stopped: list[object] = []

    def start_poll(tick):  # type: ignore[no-untyped-def]
        started.append(tick)
        return lambda: stopped.append(tick)

    unwatch = [reg.watch(folder, start_poll) for _ in range(1000)]
    assert len(started) == 1
    # the poller finds a message another program delivered
    write_message(root, [b"Subject: x\n\ny\n"])
    started[0]()
    assert len(folder.uids) == 1
    for u in unwatch[:-1]:
        u()
        u()  # idempotent
    assert stopped == []
    unwatch[-1]()
    assert stopped == started
    assert len({id(x) for x in started}) == 1
    reg.watch(folder, start_poll)()  # a new watcher starts a new poller
    assert len(started) == 2


def test_a_folder_is_not_told_of_its_own_change(tmp_path: Path) -> None:
    """Issue 15: ``ChangeHub.notify(path, source)`` skipped ``source`` by identity, and a bound
    method is a new object at each attribute access, so every STORE, EXPUNGE and APPEND of a
    folder came back to that folder as one more refresh on the next reactor turn."""
    root = ensure_folder(tmp_path / "box")
    hub = ChangeHub()
    refreshes: list[object] = []
    reg = FolderRegistry(hub, call_soon=refreshes.append)
    folder = reg.get(root)
    other: list[Path] = []
    hub.subscribe(root, other.append)
    hub.notify(root, folder._hub_changed)
    assert refreshes == [] and other == [root]
    hub.notify(root)  # from elsewhere (a delivery): the folder hears it
    assert len(refreshes) == 1


def test_index_opened_again_without_the_schema_script(tmp_path: Path) -> None:
    """Opening a current index skips the lock and the schema script; an index an older version
    left (another cache version, a missing index) still goes through them."""
    box = folder(tmp_path)
    idx = FolderIndex(box)
    assert idx._current()
    idx.db.execute("UPDATE meta SET value = 1 WHERE key = 'cache_version'")
    assert not idx._current()
    assert FolderIndex(box)._current()  # migrated on open
    idx.db.execute("DROP INDEX messages_in_new")
    assert not idx._current()
    again = FolderIndex(box)
    assert again._current() and again.db.execute(
        "SELECT count(*) FROM sqlite_master WHERE name = 'messages_in_new'"
    ).fetchone() == (1,)


def test_a_warm_folder_whose_index_file_was_replaced_is_opened_anew(tmp_path: Path) -> None:
    """Regression: a folder kept warm after its last session (or still selected) kept reading
    its deleted index file after ``mailsuite reindex`` replaced a damaged one (or an
    administrator removed it): the next SELECT got the old UIDVALIDITY and UIDs, while every
    other process used the new file."""
    box = folder(tmp_path)
    for i in range(3):
        write_message(box, [b"Subject: %d\n\nx\n" % i])
    reg = FolderRegistry()
    first = reg.get(box)
    kept = first.view(readonly=False)
    old_uv = first.uidvalidity
    for p in box.glob("mailsuite-index.sqlite*"):
        p.unlink()
    other = FolderIndex(box)  # another process opens the folder: a new index, built now
    assert other.uidvalidity != old_uv
    second = reg.get(box)
    assert second is not first
    assert second.uidvalidity == other.uidvalidity and second.uids == [1, 2, 3]
    assert kept.invalid  # the session that had it selected is told
    kept.close()
    second.view(readonly=True).close()  # now kept warm: still the new file
    assert reg.get(box) is second
