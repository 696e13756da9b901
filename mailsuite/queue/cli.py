"""``mailsuite queue list | show ID | flush [ID] | delete ID | bounce ID``.

Reading is done straight from the spool. Changing is asked of the running server (a request
file in ``queue/ctl``, picked up within a second) so that the one process that delivers is
also the one that changes entries; ``flush`` then follows the entries and prints progress.
When no server runs (nobody holds ``queue/runner.lock``), ``delete`` acts directly and
``bounce`` waits as a request for the next start.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime

from mailsuite.config import Config
from mailsuite.queue.bounce import read_header_block
from mailsuite.queue.spool import (
    DELIVERED,
    FAILED,
    PENDING,
    QueueEntry,
    RecipientState,
    Spool,
    SpoolError,
    valid_id,
)

__all__ = ["add_arguments", "run"]

PICKUP_WAIT = 10.0  # seconds to wait for a running server to take a request
NOT_RUNNING = (
    "no running server holds this queue, so nothing is delivered; start it "
    "(twistd -n mailsuite --config FILE) and it tries every entry"
)


def _error(text: str) -> None:
    print(f"mailsuite queue: {text}", file=sys.stderr)


def add_arguments(p: argparse.ArgumentParser) -> None:
    qs = p.add_subparsers(dest="action", required=True)
    qs.add_parser("list", help="every entry: id, age, sender, recipients and their state")
    show = qs.add_parser("show", help="one entry in detail, with the last replies")
    show.add_argument("id")
    flush = qs.add_parser("flush", help="try now (every entry, or one)")
    flush.add_argument("id", nargs="?")
    flush.add_argument("--no-wait", action="store_true", help="do not follow the attempts")
    flush.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="how long to follow the attempts (seconds, default 300)",
    )
    qs.add_parser("delete", help="drop an entry without telling the sender").add_argument("id")
    qs.add_parser("bounce", help="return an entry to its sender now (DSN)").add_argument("id")


def _spool(cfg: Config) -> Spool:
    return Spool(cfg.data_dir / "queue").ensure()


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _rcpt_state(r: RecipientState, now: float) -> str:
    if r.state == PENDING:
        if r.in_flight:
            return f"sending (try {r.attempts})"
        if r.next_attempt <= now:
            return f"due now (tried {r.attempts})" if r.attempts else "due now"
        return f"retry in {_age(r.next_attempt - now)} (tried {r.attempts})"
    if r.state == FAILED:
        return "failed" + ("" if r.reported else ", bounce pending")
    return r.state


def _short(text: str | None, width: int) -> str:
    if not text:
        return ""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _rcpt_line(r: RecipientState, now: float) -> str:
    reason = _short(r.last_reply, 60) if r.state != DELIVERED else ""
    line = f"  {_rcpt_state(r, now):26} {r.address}"
    return f"{line}\n  {'':26} last reply: {reason}" if reason else line


def _size(spool: Spool, entry: QueueEntry) -> str:
    try:
        n = spool.message_path(entry.id).stat().st_size
    except OSError:
        return "?"
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} B"


def cmd_list(spool: Spool) -> int:
    now = time.time()
    entries = list(spool.entries())
    if entries:
        print(f"{'ID':19}  {'AGE':>4}  {'SIZE':>9}  SENDER")
    for entry in entries:
        sender = f"<{entry.sender}>" if entry.sender else "<> (a bounce)"
        print(f"{entry.id:19}  {_age(now - entry.created):>4}  {_size(spool, entry):>9}  {sender}")
        for r in entry.recipients:
            print(_rcpt_line(r, now))
    if not entries:
        print("the queue is empty")
    else:
        rcpts = sum(len(e.pending) for e in entries)
        print(
            f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, "
            f"{rcpts} recipient{'' if rcpts == 1 else 's'} pending "
            "(details: mailsuite queue show ID)"
        )
    if not spool.runner_active():
        print(f"note: {NOT_RUNNING}")
    return 0


def cmd_show(spool: Spool, queue_id: str, lifetime: float) -> int:
    entry = spool.load(queue_id)
    now = time.time()
    print(f"id:        {entry.id}")
    print(f"sender:    <{entry.sender}>")
    print(f"queued:    {_when(entry.created)} ({_age(now - entry.created)} ago)")
    expires = entry.created + lifetime
    if entry.pending:
        print(f"gives up:  {_when(expires)} (in {_age(expires - now)})")
    print(f"size:      {_size(spool, entry)}")
    opts = [
        name for name, on in (("SMTPUTF8", entry.smtputf8), ("8BITMIME", entry.body_8bit)) if on
    ]
    print(f"options:   {' '.join(opts) or '-'}")
    print(f"delay warning sent: {'yes' if entry.warned else 'no'}")
    for r in entry.recipients:
        print(f"recipient: {r.address}")
        print(f"    state:        {r.state}{' (attempt in progress)' if r.in_flight else ''}")
        print(f"    attempts:     {r.attempts}")
        print(f"    last attempt: {_when(r.last_attempt)}")
        if r.state == PENDING:
            when = "now" if r.next_attempt <= now else f"in {_age(r.next_attempt - now)}"
            print(f"    next attempt: {_when(r.next_attempt)} ({when})")
        if r.last_reply:
            host = f" (from {r.last_host})" if r.last_host else ""
            print(f"    last reply:   {r.last_reply}{host}")
    try:
        header = read_header_block(spool.message_path(queue_id), 16384)
    except OSError:
        header = b""
    wanted = (b"from:", b"to:", b"subject:", b"date:", b"message-id:")
    lines = [
        ln
        for ln in header.decode("utf-8", "replace").split("\n")
        if ln.lower().encode()[:12].startswith(wanted)
    ]
    if lines:
        print("headers:")
        for line in lines:
            print(f"    {line[:200]}")
    return 0


def _wait_pickup(spool: Spool, name: str) -> bool:
    deadline = time.monotonic() + PICKUP_WAIT
    while time.monotonic() < deadline:
        if not spool.pending_request(name):
            return True
        time.sleep(0.1)
    return False


def _summary(entry: QueueEntry) -> str:
    counts = {s: 0 for s in (DELIVERED, PENDING, FAILED)}
    for r in entry.recipients:
        counts[r.state] = counts.get(r.state, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n)


def cmd_flush(spool: Spool, queue_id: str | None, wait: bool, timeout: float) -> int:
    if not spool.runner_active():
        _error(NOT_RUNNING)
        return 1
    if queue_id is not None:
        spool.load(queue_id)  # exists?
    targets = [queue_id] if queue_id else spool.ids()
    asked = time.time()
    name = spool.request("flush", queue_id)
    if not _wait_pickup(spool, name):
        _error(
            f"the server did not take the request within {PICKUP_WAIT:.0f} s (is it "
            "stuck? see its log); the request stays and is done when it gets to it"
        )
        return 1
    print(f"flushing {len(targets)} entr{'y' if len(targets) == 1 else 'ies'}")
    if not wait or not targets:
        return 0
    remaining = set(targets)
    deadline = time.monotonic() + timeout
    last_note = time.monotonic()
    while remaining and time.monotonic() < deadline:
        for tid in sorted(remaining):
            try:
                entry = spool.load(tid)
            except SpoolError:
                print(f"{tid}: done (left the queue)")
                remaining.discard(tid)
                continue
            tried = [
                r
                for r in entry.recipients
                if r.state != PENDING
                or (not r.in_flight and r.last_attempt is not None and r.last_attempt >= asked - 1)
            ]
            if len(tried) == len(entry.recipients):
                print(f"{tid}: {_summary(entry)}")
                remaining.discard(tid)
        if remaining and time.monotonic() - last_note >= 5:
            done = len(targets) - len(remaining)
            print(f"... {done}/{len(targets)} entries attempted, still working")
            last_note = time.monotonic()
        if remaining:
            time.sleep(0.2)
    if remaining:
        print(
            f"{len(remaining)} entries still in progress after {timeout:.0f} s "
            "(see 'mailsuite queue list')"
        )
    return 0


def cmd_change(spool: Spool, op: str, queue_id: str) -> int:
    spool.load(queue_id)  # exists?
    if not spool.runner_active():
        if op == "delete" and spool.acquire_runner_lock():
            try:
                spool.remove(queue_id)
            finally:
                spool.release_runner_lock()
            print(f"{queue_id}: deleted")
            return 0
        spool.request(op, queue_id)
        done = "deleted" if op == "delete" else "bounced to the sender"
        print(
            f"{queue_id}: no server is running; the entry will be {done} when it starts "
            "(twistd -n mailsuite --config FILE)"
        )
        return 0
    name = spool.request(op, queue_id)
    if not _wait_pickup(spool, name):
        _error(
            f"{queue_id}: the server did not take the request within {PICKUP_WAIT:.0f} s "
            "(is it stuck? see its log); the request stays and is done when it gets to it"
        )
        return 1
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not spool.envelope_path(queue_id).exists():
            print(f"{queue_id}: {'deleted' if op == 'delete' else 'bounced to the sender'}")
            return 0
        time.sleep(0.1)
    print(f"{queue_id}: requested; the server is still busy with it")
    return 0


def run(cfg: Config, args: argparse.Namespace) -> int:
    spool = _spool(cfg)
    queue_id = getattr(args, "id", None)
    if queue_id is not None:
        queue_id = queue_id.upper()
        if not valid_id(queue_id):
            _error(
                f"{args.id!r} is not a queue id: ids are hex, as 'mailsuite queue list' shows them"
            )
            return 2
    try:
        if args.action == "list":
            return cmd_list(spool)
        if args.action == "show":
            assert queue_id is not None
            return cmd_show(spool, queue_id, cfg.relay.lifetime)
        if args.action == "flush":
            return cmd_flush(spool, queue_id, not args.no_wait, args.timeout)
        assert queue_id is not None
        return cmd_change(spool, args.action, queue_id)
    except SpoolError as e:
        _error(f"{e}; it may have been delivered or removed meanwhile (see 'mailsuite queue list')")
        return 1
