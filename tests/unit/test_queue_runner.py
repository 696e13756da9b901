"""The queue runner on a task.Clock with a scripted relay: retries, expiry, DSNs, loops,
the attempt record, restarts and operator requests. No sockets, no threads."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, task

from mailsuite.config import parse_config
from mailsuite.directory import Directory
from mailsuite.outbound.mx import DNS_DEADLINE
from mailsuite.outbound.relay import RecipientResult, Relay, domain_of
from mailsuite.queue.runner import QueueRunner
from mailsuite.queue.spool import DELIVERED, FAILED, PENDING, Spool
from mailsuite.smtp.replies import Reply
from mailsuite.store.events import ChangeHub
from mailsuite.testing.dns import MemoryAuthority

SENDER = "alice@example.test"
MESSAGE = b"Received: from a by b\nFrom: <alice@example.test>\nSubject: hi\n\nbody\n"

OK = Reply(250, "2.0.0", "queued as 1")
LATER = Reply(451, "4.3.0", "try later")
NEVER = Reply(550, "5.1.1", "no such user")


class ScriptedRelay:
    """Plays the Relay: answers from ``replies`` (address -> list of replies, used in turn)."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.replies: dict[str, list[Reply]] = {}
        self.calls: list[tuple[str, str, list[str]]] = []
        self.on_send: Any = None

    def route_key(self, address: str) -> str:
        return domain_of(address)

    def send(
        self, route: str, sender: str, rcpts: list[str], path: Path, info: Any, **kwargs: Any
    ) -> defer.Deferred[dict[str, RecipientResult]]:
        self.calls.append((route, sender, list(rcpts)))
        if self.on_send is not None:
            self.on_send(rcpts)
        out = {}
        for r in rcpts:
            script = self.replies.get(r) or [OK]
            reply = script.pop(0) if len(script) > 1 else script[0]
            out[r] = RecipientResult(r, reply, "mx." + domain_of(r))
        return defer.succeed(out)


class Runtime:
    def __init__(self, tmp: Path, extra: dict[str, Any]) -> None:
        data = {
            "server": {"hostname": "mx.example.test", "data_dir": str(tmp / "data")},
            "domains": {"local": ["example.test"]},
            "relay": {
                "retry_initial": 60,
                "retry_max": 240,
                "lifetime": 3600,
                "delay_warning": 0,
                **extra,
            },
        }
        self.config = parse_config(data, None, tmp)
        self.config.mail_dir.mkdir(parents=True)
        self.reactor = self
        self.directory = Directory(
            self.config.directory_file, self.config.mail_dir, self.config.local_domains
        )
        self.directory.add_user(SENDER, "x")
        self.changes = ChangeHub()

    def callFromThread(self, f: Any, *args: Any) -> None:  # noqa: N802
        f(*args)

    def inbox(self, user: str = SENDER) -> list[bytes]:
        box = self.directory.mailbox_root(user) / "new"
        return [p.read_bytes() for p in sorted(box.iterdir())] if box.exists() else []


def sync(f: Any, *args: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(f, *args)


class Harness:
    def __init__(self, tmp: Path, **relay: Any) -> None:
        self.runtime = Runtime(tmp, relay)
        self.clock = task.Clock()
        self.clock.advance(time.time())
        self.spool = Spool(self.runtime.config.data_dir / "queue").ensure()
        self.spool.now = self.clock.seconds
        self.relay = ScriptedRelay(self.spool)
        self.runner = self.make_runner()

    def make_runner(self) -> QueueRunner:
        return QueueRunner(
            self.runtime,
            self.spool,
            self.relay,  # type: ignore[arg-type]
            clock=self.clock,
            blocking=sync,
        )

    def enqueue(self, rcpts: list[str], sender: str = SENDER, message: bytes = MESSAGE) -> str:
        return self.spool.enqueue_bytes(message, sender, rcpts)

    def advance(self, seconds: float, step: float = 1.0) -> None:
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end:
            self.clock.advance(min(step, end - self.clock.seconds()))


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def test_delivers_and_removes(h: Harness) -> None:
    h.runner.startService()
    qid = h.enqueue(["bob@remote.test", "carol@other.test"])
    h.advance(1)
    assert sorted(c[0] for c in h.relay.calls) == ["other.test", "remote.test"]  # by domain
    assert h.spool.ids() == []
    assert not h.spool.message_path(qid).exists()


def test_attempt_is_recorded_before_it_is_made(h: Harness) -> None:
    seen = []

    def check(rcpts: list[str]) -> None:
        entry = h.spool.load(h.spool.ids()[0])
        seen.append([(r.attempts, r.in_flight) for r in entry.recipients])

    h.relay.on_send = check
    h.runner.startService()
    h.enqueue(["bob@remote.test"])
    h.advance(1)
    assert seen == [[(1, True)]]


def test_temporary_failure_then_success_with_growing_delays(h: Harness) -> None:
    h.relay.replies["bob@remote.test"] = [LATER, LATER, OK]
    h.runner.startService()
    qid = h.enqueue(["bob@remote.test"])
    h.advance(0.5)
    entry = h.spool.load(qid)
    r = entry.recipients[0]
    assert r.state == PENDING and r.attempts == 1 and "4.3.0" in (r.last_reply or "")
    assert r.next_attempt == pytest.approx(h.clock.seconds() + 60, abs=1)
    h.advance(59)
    assert len(h.relay.calls) == 1
    h.advance(2)
    assert len(h.relay.calls) == 2
    assert h.spool.load(qid).recipients[0].next_attempt == pytest.approx(
        h.clock.seconds() + 120, abs=2
    )  # doubled
    h.advance(121)
    assert len(h.relay.calls) == 3 and h.spool.ids() == []
    assert h.runtime.inbox() == []  # no bounce


def test_permanent_failure_bounces_to_local_sender_at_once(h: Harness) -> None:
    h.relay.replies["bad@remote.test"] = [NEVER]
    h.runner.startService()
    h.enqueue(["bad@remote.test", "good@remote.test"])
    h.advance(1)
    assert h.relay.calls == [("remote.test", SENDER, ["bad@remote.test", "good@remote.test"])]
    (dsn,) = h.runtime.inbox()
    assert dsn.startswith(b"Return-Path: <>\nDelivered-To: alice@example.test\n")
    assert b"multipart/report" in dsn and b"Final-Recipient: rfc822; bad@remote.test" in dsn
    assert b"Status: 5.1.1" in dsn and b"Diagnostic-Code: smtp; 550 5.1.1 no such user" in dsn
    assert b"Final-Recipient: rfc822; good@remote.test" not in dsn
    assert b"Subject: hi" in dsn  # original headers
    assert h.spool.ids() == []


def test_bounce_to_remote_sender_is_queued_with_null_sender(h: Harness) -> None:
    h.relay.replies["bad@remote.test"] = [NEVER]
    h.runner.startService()
    h.enqueue(["bad@remote.test"], sender="zed@far.test")
    h.advance(1)
    # the DSN itself was queued and delivered to the sender's domain with MAIL FROM:<>
    assert h.relay.calls[-1] == ("far.test", "", ["zed@far.test"])
    assert h.spool.ids() == []


def test_never_a_bounce_for_the_null_sender(h: Harness) -> None:
    h.relay.replies["bad@remote.test"] = [NEVER]
    h.runner.startService()
    h.enqueue(["bad@remote.test"], sender="")
    h.advance(1)
    assert len(h.relay.calls) == 1 and h.spool.ids() == []
    assert h.runtime.inbox() == []


def test_expiry_bounces_with_the_last_reply(h: Harness) -> None:
    h.relay.replies["slow@remote.test"] = [LATER]
    h.runner.startService()
    h.enqueue(["slow@remote.test"])
    h.advance(3600 + 300, step=10)
    attempts = len(h.relay.calls)
    assert 8 <= attempts <= 20  # 60, 120, 240, 240, ... within the hour, plus a last try
    (dsn,) = h.runtime.inbox()
    assert b"Action: failed" in dsn and b"Status: 4.3.0" in dsn and b"try later" in dsn
    assert h.spool.ids() == []


def test_delay_warning_once(tmp_path: Path) -> None:
    h = Harness(tmp_path, delay_warning=300)
    h.relay.replies["slow@remote.test"] = [LATER] * 10 + [OK]
    h.runner.startService()
    h.enqueue(["slow@remote.test"])
    h.advance(2000, step=10)
    (warning,) = h.runtime.inbox()
    assert b"Action: delayed" in warning and b"Will-Retry-Until:" in warning
    assert b"Subject: Delivery delayed" in warning


def test_loop_is_bounced_without_sending(h: Harness) -> None:
    looped = b"".join(b"Received: from hop%d\n" % i for i in range(51)) + b"Subject: l\n\nx\n"
    h.runner.startService()
    h.enqueue(["bob@remote.test"], message=looped)
    h.advance(1)
    assert h.relay.calls == []
    (dsn,) = h.runtime.inbox()
    assert b"Status: 5.4.6" in dsn


def test_local_domain_recipient_never_goes_out(h: Harness) -> None:
    h.runtime.directory.add_user("bob@example.test", "x")
    h.runner.startService()
    h.enqueue(["bob@example.test", "nobody@example.test"], sender="zed@far.test")
    h.advance(1)
    assert all(route != "example.test" for route, _, _ in h.relay.calls)
    (msg,) = h.runtime.inbox("bob@example.test")
    assert msg.startswith(b"Return-Path: <zed@far.test>\nDelivered-To: bob@example.test\n")
    # the unknown local one bounced to the remote sender, through the queue
    assert h.relay.calls == [("far.test", "", ["zed@far.test"])]


def test_restart_retries_an_interrupted_attempt_and_not_delivered_ones(h: Harness) -> None:
    h.relay.replies["later@remote.test"] = [LATER]
    h.runner.startService()
    qid = h.enqueue(["done@remote.test", "later@remote.test"])
    h.advance(1)
    # simulate kill -9 in the middle of the next attempt: in_flight recorded, no result
    entry = h.spool.load(qid)
    entry.recipients[1].in_flight = True
    entry.recipients[1].attempts += 1
    h.spool.save(entry)
    h.runner.stopService()
    h.spool.release_runner_lock()
    h.relay.calls.clear()
    h.relay.replies.clear()
    runner = h.make_runner()
    runner.startService()
    h.advance(240, step=5)
    assert h.relay.calls == [("remote.test", SENDER, ["later@remote.test"])]
    assert h.spool.ids() == []
    runner.stopService()


def test_second_runner_refuses_to_start(h: Harness) -> None:
    h.runner.startService()
    other = QueueRunner(
        h.runtime,
        Spool(h.spool.root),
        h.relay,  # type: ignore[arg-type]
        clock=h.clock,
        blocking=sync,
    )
    with pytest.raises(RuntimeError, match=r"runner\.lock"):
        other.startService()


def test_operator_flush_delete_and_bounce(h: Harness) -> None:
    h.relay.replies["a@remote.test"] = [LATER, OK]
    h.relay.replies["b@remote.test"] = [LATER]
    h.relay.replies["c@remote.test"] = [LATER]
    h.runner.startService()
    qa, qb, qc = (h.enqueue([f"{x}@remote.test"]) for x in "abc")
    h.advance(1)
    assert len(h.relay.calls) == 3
    h.spool.request("flush", qa)
    h.spool.request("delete", qb)
    h.spool.request("bounce", qc)
    h.advance(1.5)
    assert len(h.relay.calls) == 4 and h.relay.calls[-1][2] == ["a@remote.test"]
    assert h.spool.ids() == []
    (dsn,) = h.runtime.inbox()  # only the bounced one; delete is silent
    assert b"Final-Recipient: rfc822; c@remote.test" in dsn
    assert b"returned to the sender by the postmaster" in dsn
    assert qb not in dsn.decode()


def test_states_on_disk_after_mixed_results(h: Harness) -> None:
    h.relay.replies.update({"n@r.test": [NEVER], "l@r.test": [LATER]})
    h.runner.startService()
    qid = h.enqueue(["y@r.test", "n@r.test", "l@r.test"])
    h.advance(0.5)
    states = {r.address: (r.state, r.reported, r.last_host) for r in h.spool.load(qid).recipients}
    assert states == {
        "y@r.test": (DELIVERED, False, "mx.r.test"),
        "n@r.test": (FAILED, True, "mx.r.test"),
        "l@r.test": (PENDING, False, "mx.r.test"),
    }


def test_dns_timeout_keeps_the_entry_queued_with_4_4_3_and_retries(tmp_path: Path) -> None:
    """A resolver that never answers (the loopback DNS's ``timeout`` mode) is a temporary
    failure: the real Relay gives up on the lookup after its deadline, the entry stays with a
    4.4.3 reason, is tried again on schedule, and nothing is bounced or sent."""
    h = Harness(tmp_path)
    authority = MemoryAuthority({"origin": "test", "names": {"slow.test": "timeout"}})
    sent: list[Any] = []
    relay = Relay(
        h.runtime.config, h.clock, resolver=authority, deliver_fn=lambda *a, **kw: sent.append(a)
    )
    runner = QueueRunner(h.runtime, h.spool, relay, clock=h.clock, blocking=sync)
    runner.startService()
    qid = h.spool.enqueue_bytes(MESSAGE, SENDER, ["bob@slow.test"])
    h.advance(DNS_DEADLINE - 1)
    r = h.spool.load(qid).recipients[0]
    assert r.in_flight and r.attempts == 1  # still waiting for the DNS answer
    h.advance(2)
    r = h.spool.load(qid).recipients[0]
    assert r.state == PENDING and not r.in_flight and r.attempts == 1
    assert r.last_status == "4.4.3" and "timeout" in (r.last_reply or "")
    assert r.next_attempt == pytest.approx(h.clock.seconds() + 60, abs=2)
    h.advance(60 + DNS_DEADLINE + 2)
    r = h.spool.load(qid).recipients[0]
    assert r.attempts == 2 and r.state == PENDING and r.last_status == "4.4.3"
    assert sent == [] and h.runtime.inbox() == []  # never connected, never bounced
    assert len(authority.pending) >= 2  # the unanswered queries of both attempts
    runner.stopService()


def test_a_full_disk_at_local_delivery_is_retried_without_a_traceback(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queued local recipient whose mailbox's disk is full: 452 4.3.1, kept and retried,
    logged in one line (a full disk is no bug: no traceback, issue 10)."""
    import errno

    from twisted.logger import globalLogPublisher

    from mailsuite.queue import runner as runner_module

    h.runtime.directory.add_user("bob@example.test", "x")

    async def no_space(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runner_module, "deliver_file", no_space)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        h.runner.startService()
        qid = h.enqueue(["bob@example.test"], sender="zed@far.test")
        h.advance(1)
    finally:
        globalLogPublisher.removeObserver(events.append)
    r = h.spool.load(qid).recipients[0]
    assert r.state == PENDING and r.attempts == 1
    assert (r.last_reply or "").startswith("452 4.3.1"), r.last_reply
    assert [e for e in events if "log_failure" in e] == []
    assert any("disk is full" in str(e.get("log_format", "")) for e in events)


def test_local_recipient_over_quota_is_deferred_with_4_2_2_until_there_is_room(
    h: Harness,
) -> None:
    from mailsuite.store import quota

    h.runtime.directory.add_user("bob@example.test", "x")
    bob = h.runtime.directory.mailbox_root("bob@example.test")
    quota.recount(bob, 10)  # 10 bytes: nothing fits
    h.runner.startService()
    qid = h.enqueue(["bob@example.test"], sender="zed@far.test")
    h.advance(1)
    r = h.spool.load(qid).recipients[0]
    assert r.state == PENDING and "452 4.2.2" in (r.last_reply or "")
    assert h.runtime.inbox("bob@example.test") == [] and h.relay.calls == []
    quota.recount(bob, 1024 * 1024)  # room again
    h.advance(61)
    assert len(h.runtime.inbox("bob@example.test")) == 1 and h.spool.ids() == []
    assert quota.usage(bob).messages == 1  # type: ignore[union-attr]


def test_a_bounce_to_a_local_sender_over_quota_waits_in_the_queue(h: Harness) -> None:
    from mailsuite.store import quota

    quota.recount(h.runtime.directory.mailbox_root(SENDER), 10)
    h.relay.replies["bad@remote.test"] = [NEVER]
    h.runner.startService()
    h.enqueue(["bad@remote.test"])
    h.advance(1)
    assert h.runtime.inbox() == []
    (qid,) = h.spool.ids()  # the bounce, queued with the null sender, deferred 4.2.2
    entry = h.spool.load(qid)
    assert entry.sender == "" and entry.recipients[0].address == SENDER
    assert "4.2.2" in (entry.recipients[0].last_reply or "")
