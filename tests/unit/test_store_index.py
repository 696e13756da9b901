"""The folder index and the shared folder model, without sockets."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from mailsuite.store.index import FolderIndex, NewFile, crlf_size
from mailsuite.store.mailbox import Account, FolderRegistry, MailboxError, append_blocking
from mailsuite.store.maildir import ensure_folder, write_message, write_tmp


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


def test_keywords_survive_rebuild_and_other_tools_flags(tmp_path: Path) -> None:
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
    time.sleep(1.1)
    idx = FolderIndex(box)
    idx.sync()
    assert idx.uidvalidity != uv
    assert idx.get(1).flags == {"$Label1", "\\Flagged"}
    # another program (mutt) marks it seen by renaming
    old = box / idx.get(1).name
    os.rename(old, str(old).replace(":2,Fa", ":2,FSa"))
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
    uv, uid = append_blocking(box, b"Subject: x\n\ny\n", frozenset({"\\Draft"}), 1_000_000_000.0)
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
