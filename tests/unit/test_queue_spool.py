"""The spool: durable entries, ids, crash leftovers, operator requests."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from mailsuite.queue.spool import (
    DELIVERED,
    PENDING,
    QueueEntry,
    RecipientState,
    Spool,
    SpoolError,
    valid_id,
)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "queue").ensure()


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_enqueue_file_copies_from_the_offset(spool: Spool, tmp_path: Path) -> None:
    src = tmp_path / "incoming"
    src.write_bytes(b"Return-Path: <a@x.test>\nReceived: by us\n\nbody\n")
    qid = spool.enqueue_file(
        src,
        len(b"Return-Path: <a@x.test>\n"),
        "a@x.test",
        ["b@y.test", "c@z.test", "b@y.test"],
        smtputf8=True,
    )
    assert valid_id(qid)
    assert spool.message_path(qid).read_bytes() == b"Received: by us\n\nbody\n"
    entry = spool.load(qid)
    assert entry.sender == "a@x.test" and entry.smtputf8 and not entry.body_8bit
    assert [r.address for r in entry.recipients] == ["b@y.test", "c@z.test"]  # no duplicates
    assert all(r.state == PENDING and r.attempts == 0 for r in entry.recipients)
    assert spool.ids() == [qid]
    assert names(spool.tmp_dir) == []


def test_save_is_a_replacement_and_load_round_trips(spool: Spool) -> None:
    qid = spool.enqueue_bytes(b"Subject: x\n\nhi\n", "", ["b@y.test"])
    entry = spool.load(qid)
    r = entry.recipients[0]
    r.state, r.attempts, r.last_reply, r.in_flight = DELIVERED, 2, "250 2.0.0 ok", False
    spool.save(entry)
    again = spool.load(qid)
    assert again == entry and again.done
    assert names(spool.tmp_dir) == []
    spool.remove(qid)
    assert spool.ids() == []
    with pytest.raises(SpoolError):
        spool.load(qid)


def test_ids_are_sortable_and_never_paths(spool: Spool) -> None:
    ids = [spool.enqueue_bytes(b"x\n", "a@x.test", ["b@y.test"]) for _ in range(5)]
    assert spool.ids() == sorted(ids)
    for bad in ("../../etc/passwd", "abc", "0123456789abcdefg", "", "ABCDEF01/"):
        assert not valid_id(bad)
        with pytest.raises(SpoolError):
            spool.message_path(bad)


def test_concurrent_enqueues_from_threads(spool: Spool) -> None:
    seen: list[str] = []
    spool.on_enqueue = seen.append
    out: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(20):
            qid = spool.enqueue_bytes(b"x\n", "a@x.test", ["b@y.test"])
            with lock:
                out.append(qid)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(out)) == 160 and sorted(out) == spool.ids()
    assert sorted(seen) == sorted(out)


def test_on_enqueue_goes_through_the_reactor_thread(tmp_path: Path) -> None:
    calls = []

    class FakeReactor:
        def callFromThread(self, f, *args):  # noqa: N802
            calls.append((f, args))

    spool = Spool(tmp_path / "q", FakeReactor()).ensure()
    spool.on_enqueue = lambda qid: None
    qid = spool.enqueue_bytes(b"x\n", "a@x.test", ["b@y.test"])
    assert calls == [(spool.on_enqueue, (qid,))]


def test_cleanup_removes_crash_leftovers_only(spool: Spool) -> None:
    kept = spool.enqueue_bytes(b"x\n", "a@x.test", ["b@y.test"])
    (spool.msg_dir / "00000000000ABCDEF01").write_bytes(b"half a message")  # no envelope
    (spool.tmp_dir / "0000000000012345678.msg").write_bytes(b"partial")
    removed = spool.cleanup()
    assert sorted(removed) == ["msg/00000000000ABCDEF01", "tmp/0000000000012345678.msg"]
    assert spool.ids() == [kept] and spool.message_path(kept).exists()


def test_enqueue_needs_a_recipient(spool: Spool) -> None:
    with pytest.raises(ValueError):
        spool.enqueue_bytes(b"x\n", "a@x.test", [])
    assert names(spool.msg_dir) == [] and names(spool.tmp_dir) == []


def test_requests_round_trip_and_half_written_ones_wait(spool: Spool) -> None:
    spool.request("flush", None)
    spool.request("delete", "0123456789ABCDEF")
    (spool.ctl_dir / ".being-written.json").write_text('{"op": "bounce"}')
    (spool.ctl_dir / "junk.json").write_text("not json")
    reqs = spool.take_requests()
    assert [(r.op, r.id) for r in reqs] == [("flush", None), ("delete", "0123456789ABCDEF")]
    assert names(spool.ctl_dir) == [".being-written.json"]
    with pytest.raises(ValueError):
        spool.request("explode", None)


def test_runner_lock_is_exclusive(spool: Spool, tmp_path: Path) -> None:
    assert not spool.runner_active()
    assert spool.acquire_runner_lock()
    other = Spool(spool.root)
    assert other.runner_active() and not other.acquire_runner_lock()
    spool.release_runner_lock()
    assert other.acquire_runner_lock()
    other.release_runner_lock()


def test_entry_done_and_next_attempt() -> None:
    e = QueueEntry(
        "0123456789ABCDEF",
        "a@x.test",
        0.0,
        [
            RecipientState("b@y.test", next_attempt=50),
            RecipientState("c@y.test", next_attempt=20),
            RecipientState("d@y.test", state=DELIVERED),
        ],
    )
    assert e.next_attempt() == 20 and not e.done
    for r in e.recipients:
        r.state = DELIVERED
    assert e.next_attempt() is None and e.done
