"""The POP3 maildrop over a real Maildir in tmp_path: lock, snapshot, UIDL, EXPIRE n days."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailsuite.pop3.maildrop import (
    SEEN_BATCH,
    Expiry,
    LoginTooSoon,
    Maildrop,
    MaildropInUse,
    claim,
)
from mailsuite.store.index import FolderIndex
from mailsuite.store.mailbox import FolderRegistry
from mailsuite.store.maildir import ensure_folder
from mailsuite.store.write import write_message
from tests.store_helpers import box
from tests.unit.test_pop3_top import top_by_lines


def test_lock_snapshot_and_uidl(tmp_path: Path) -> None:
    root = box(tmp_path, 2)
    md = Maildrop(root)
    with pytest.raises(MaildropInUse):
        Maildrop(root)
    write_message(root, [b"Subject: late\n\nx\n"])  # not in this session's snapshot
    assert len(md) == 2 and md.stat() == (2, 2 * len(b"Subject: 0\r\n\r\nbody\r\n"))
    uidls = [md.uidl(1), md.uidl(2)]
    md.close()
    md = Maildrop(root)
    assert len(md) == 3 and [md.uidl(1), md.uidl(2)] == uidls
    md.close()


def test_a_claim_holds_the_lock_until_the_maildrop_or_its_release(tmp_path: Path) -> None:
    """:func:`claim` (a worker thread's half of a login) takes the lock and opens the index;
    the maildrop made from it owns both; a claim released unused (the client went away)
    or refused (in use, too soon) leaves nothing held."""
    root = box(tmp_path, 2)
    folders = FolderRegistry()
    c = claim(root, open_index=True)
    assert c.index is not None and c.index.counters()[1] == 3  # opened and synced: UIDNEXT
    with pytest.raises(MaildropInUse):
        claim(root)
    c.release()
    c.release()  # (idempotent)
    md = Maildrop(root, folders=folders, claimed=claim(root, open_index=True))
    assert len(md) == 2 and folders.has(root)
    with pytest.raises(MaildropInUse):
        claim(root, open_index=True)
    md.close()
    clock = [5_000.0]
    claim(root, login_delay=60, now=lambda: clock[0]).release()
    with pytest.raises(LoginTooSoon):
        claim(root, login_delay=60, open_index=True, now=lambda: clock[0])
    claim(root).release()  # the refused claims let go of the lock
    # the folder open in the registry meanwhile: the claim's index is closed, the open one used
    c = claim(root, open_index=True)
    index = c.index
    assert index is not None
    md = Maildrop(root, folders=folders, claimed=c)
    assert md.folder.index is not index and len(md) == 2
    md.close()
    # listed in the thread (through the open folder's writer): a message expunged before the
    # maildrop is made is left out, one delivered meanwhile waits for the next session
    c = claim(root, writer=folders.get(root).writer)
    listed = c.listed
    assert listed is not None and len(listed) == 2
    folders.get(root).expunge([listed[0].uid])
    write_message(root, [b"Subject: late\n\nx\n"])
    md = Maildrop(root, folders=folders, claimed=c)
    assert [m.uid for m in md.messages] == [listed[1].uid]
    md.close()
    # mail another program put in new/ since is listed by the next claim of the warm folder
    (root / "new" / "1700000000.M1P1.other").write_bytes(b"Subject: other\n\nx\n")
    known = folders.find(root)  # (as the server finds it: not refreshed)
    assert known is not None
    md = Maildrop(root, folders=folders, claimed=claim(root, writer=known.writer))
    assert len(md) == 3 and md.message(3).size == len(b"Subject: other\r\n\r\nx\r\n")
    md.close()


def test_expire_days_deletes_only_long_retrieved(tmp_path: Path) -> None:
    root = box(tmp_path, 3)
    clock = [1_000_000.0]
    md = Maildrop(root, expiry=Expiry(2), now=lambda: clock[0])
    md.note_retrieved(1)
    assert md.commit() == []  # first retrieval recorded, nothing old enough yet
    md.close()
    clock[0] += 86400  # one day later message 2 is retrieved
    md = Maildrop(root, expiry=Expiry(2), now=lambda: clock[0])
    md.note_retrieved(2)
    assert md.commit() == []
    md.close()
    clock[0] += 86400 + 1  # two days after message 1's first retrieval
    md = Maildrop(root, expiry=Expiry(2), now=lambda: clock[0])
    uid1 = md.message(1).uid
    assert md.commit() == [uid1]
    md.close()
    md = Maildrop(root)
    assert len(md) == 2
    md.close()


def test_login_delay(tmp_path: Path) -> None:
    root = box(tmp_path, 0)
    clock = [5_000.0]
    Maildrop(root, login_delay=60, now=lambda: clock[0]).close()
    clock[0] += 30
    with pytest.raises(LoginTooSoon):
        Maildrop(root, login_delay=60, now=lambda: clock[0])
    clock[0] += 31
    Maildrop(root, login_delay=60, now=lambda: clock[0]).close()


@pytest.mark.parametrize("piece", [1, 3, 7, 64, 100_000])
@pytest.mark.parametrize("lines", [0, 1, 2, 5, 10**9])
def test_top_read_in_pieces_is_top(tmp_path: Path, piece: int, lines: int) -> None:
    """TOP of a big message is streamed in pieces (a long line split across them counts once)."""
    data = b"Subject: x\nX-Long: " + b"y" * 50 + b"\n\nbody 1\n" + b"z" * 40 + b"\nthree\nfour"
    root = ensure_folder(tmp_path / "box")
    write_message(root, [data])
    md = Maildrop(root)
    try:
        with md.open_top(1, lines) as top:
            got = b""
            while chunk := top.read(piece):
                got += chunk
        assert got == top_by_lines(data, lines) == md.read_top(1, lines)
    finally:
        md.close()


def stored_flags(root: Path) -> list[frozenset[str]]:
    index = FolderIndex(root)
    try:
        index.sync(force=True)
        return [m.flags for m in index.messages()]
    finally:
        index.close()


def test_seen_is_stored_in_one_change_and_before_the_update_state(tmp_path: Path) -> None:
    root = box(tmp_path, 3)
    md = Maildrop(root)
    md.mark_seen(1)
    md.mark_seen(3)
    assert md.seen_pending == {1, 3} and stored_flags(root) == [frozenset()] * 3
    changes: list[object] = []
    store = md.folder.store
    md.folder.store = lambda view, c, *a: changes.append(c) or store(view, c, *a)  # type: ignore[method-assign]
    md.flush_seen()
    assert len(changes) == 1  # one flag change for both
    seen = frozenset({"\\Seen"})
    assert stored_flags(root) == [seen, frozenset(), seen] and not md.seen_pending
    assert md.read(1).startswith(b"Subject: 0")  # the renamed file is found at once
    md.mark_seen(1)  # already \Seen: nothing to do
    md.mark_seen(2)
    assert md.seen_pending == {2}
    assert md.commit() == []  # QUIT: stored before the UPDATE state
    assert stored_flags(root) == [seen] * 3
    md.close()


def test_a_full_batch_of_seen_is_stored_at_once(tmp_path: Path) -> None:
    root = box(tmp_path, SEEN_BATCH)
    md = Maildrop(root)
    for n in range(1, SEEN_BATCH):
        md.mark_seen(n)
    assert len(md.seen_pending) == SEEN_BATCH - 1
    md.mark_seen(SEEN_BATCH)
    assert not md.seen_pending
    assert stored_flags(root) == [frozenset({"\\Seen"})] * SEEN_BATCH
    md.close()


def test_uidl_listing_is_the_per_number_uidls_of_live_messages(tmp_path: Path) -> None:
    root = box(tmp_path, 4)
    md = Maildrop(root)
    try:
        whole = "".join(f"{n} {md.uidl(n)}\r\n" for n in range(1, 5))
        assert md.uidl_listing() == whole
        md.deleted.update({1, 3})  # DELE 1, DELE 3: left out, the others keep their numbers
        assert md.uidl_listing() == f"2 {md.uidl(2)}\r\n4 {md.uidl(4)}\r\n"
    finally:
        md.close()


def test_messages_flagged_deleted_are_not_in_the_maildrop(tmp_path: Path) -> None:
    """A message another client flagged \\Deleted (IMAP, not expunged yet) is not offered;
    the others keep delivery order (one check per distinct flag text)."""
    root = box(tmp_path, 4)
    index = FolderIndex(root)
    index.sync(force=True)
    index.store_flags(
        [(2, frozenset({"\\Deleted"})), (3, frozenset({"\\Seen", "\\Deleted", "$Work"}))]
    )
    index.store_flags([(4, frozenset({"\\Seen"}))])
    index.close()
    md = Maildrop(root)
    try:
        assert [md.message(n).uid for n in range(1, len(md) + 1)] == [1, 4]
        assert md.read(2).startswith(b"Subject: 3")
    finally:
        md.close()
