"""The queue runner: works the spool, schedules retries, expires entries and sends bounces.

Written here rather than using twisted.mail.relaymanager (see mailsuite.queue.spool).

One :class:`QueueRunner` service per server. At start it takes the spool's runner lock, clears
what a crash left half-written, and schedules every entry at its next-attempt time. An attempt
of one entry:

1. reads the envelope; recipients whose time has come (all pending ones on a flush) are *due*;
2. a message with more Received headers than ``[smtp] max_hops`` is a loop: bounce (5.4.6);
3. groups the due recipients by route (domain, or a configured route such as the smarthost,
   see mailsuite.outbound.routes; local domains apart, they are never sent over the
   network) and, per group, under a limit of ``[relay] max_deliveries``
   groups at once: records the attempt (attempts + 1, ``in_flight``) durably, *then* delivers,
   then records the result. A kill between a remote 250 and that record is the only way a
   recipient gets the message twice (RFC 5321 6.1 accepts that window);
4. files each recipient: 2xx delivered, 5xx failed, 4xx retried after a growing delay
   (mailsuite.queue.schedule) or failed once the entry's lifetime is over;
5. sends the sender one DSN for the new failures (never for the null sender), and once a
   "delayed" DSN when ``[relay] delay_warning`` is reached; DSNs for local senders go straight
   into their Maildir, others are queued with the null sender;
6. removes the entry when nothing is left to do.

Everything that touches one entry runs in a per-entry chain, one step at a time, so a flush or
a delete from ``mailsuite queue`` waits for the attempt in progress instead of racing it.
Operator requests arrive as files in ``queue/ctl`` (polled every second).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailsuite.delivery import deliver_bytes, deliver_file
from mailsuite.outbound.relay import RecipientResult, Relay, domain_of
from mailsuite.outbound.wire import scan_message
from mailsuite.queue.bounce import RecipientStatus, build_dsn, read_header_block
from mailsuite.queue.schedule import RetrySchedule
from mailsuite.queue.spool import (
    DELIVERED,
    FAILED,
    QueueEntry,
    RecipientState,
    Spool,
    SpoolError,
)
from mailsuite.smtp.replies import Reply
from mailsuite.store.quota import QuotaExceeded
from mailsuite.store.space import is_disk_full, log_failure

__all__ = ["QueueRunner", "make_spool", "queue_service"]

log = Logger(namespace="mailsuite.queue")

#: How long stopService waits for deliveries in progress before letting the process go.
STOP_GRACE = 10.0


def make_spool(data_dir: Path, reactor: Any = None) -> Spool:
    return Spool(data_dir / "queue", reactor).ensure()


def _count_received(header_block: bytes) -> int:
    return sum(1 for line in header_block.split(b"\n") if line[:9].lower() == b"received:")


@dataclass
class _Tracked:
    """What the runner keeps in memory per entry: its timer and its chain of steps."""

    timer: Any = None
    chain: Deferred[Any] = field(default_factory=lambda: defer.succeed(None))
    steps: int = 0  # steps queued or running in the chain


class QueueRunner(service.Service):
    """Works a :class:`Spool`. ``clock`` is the reactor (or a ``task.Clock`` in unit tests);
    ``blocking(f, *args)`` runs blocking file work (default: the reactor's thread pool)."""

    name = "queue"

    def __init__(
        self,
        runtime: Any,
        spool: Spool,
        relay: Relay,
        *,
        clock: Any = None,
        blocking: Callable[..., Deferred[Any]] | None = None,
        poll_interval: float = 1.0,
    ) -> None:
        self.runtime = runtime
        self.config = runtime.config
        self.spool = spool
        self.relay = relay
        self.clock = clock if clock is not None else runtime.reactor
        self.schedule = RetrySchedule.from_config(self.config.relay)
        self.poll_interval = poll_interval
        if blocking is None:
            reactor = runtime.reactor

            def blocking(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
                return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

        self._blocking = blocking
        self._groups = defer.DeferredSemaphore(self.config.relay.max_deliveries)
        self._tracked: dict[str, _Tracked] = {}
        self._save_locks: dict[str, defer.DeferredLock] = {}
        self._poll: task.LoopingCall | None = None
        self._stopping = False

    # -- service life ---------------------------------------------------------------------

    def startService(self) -> None:
        if not self.spool.acquire_runner_lock():
            raise RuntimeError(
                f"{self.spool.root} is in use by another running mailsuite (runner.lock)"
            )
        service.Service.startService(self)
        self._stopping = False
        self.spool.now = self.clock.seconds
        removed = self.spool.cleanup()
        if removed:
            log.info(
                "queue: removed {n} leftovers of an interrupted write: {names}",
                n=len(removed),
                names=", ".join(removed[:10]),
            )
        self.spool.on_enqueue = self.enqueued
        ids = self.spool.ids()
        for queue_id in ids:
            try:
                entry = self.spool.load(queue_id)
            except SpoolError as e:
                log.error("queue: {error}", error=str(e))
                continue
            in_flight = [r.address for r in entry.recipients if r.in_flight]
            if in_flight:
                # Killed during an attempt: the remote may have it; RFC 5321 6.1 says try again.
                log.warn(
                    "queue: {id}: attempt interrupted for {rcpts}; trying again",
                    id=queue_id,
                    rcpts=", ".join(in_flight),
                )
            self._schedule(queue_id, entry.next_attempt() if entry.pending else 0.0)
        if ids:
            log.info("queue: {n} entries loaded", n=len(ids))
        self._poll = task.LoopingCall(self._check_requests)
        self._poll.clock = self.clock
        self._poll.start(self.poll_interval, now=True).addErrback(
            lambda f: log.failure("queue: control poll stopped", f)
        )

    def stopService(self) -> Deferred[None]:
        service.Service.stopService(self)
        self._stopping = True
        self.spool.on_enqueue = None
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        busy = []
        for tracked in self._tracked.values():
            if tracked.timer is not None and tracked.timer.active():
                tracked.timer.cancel()
            tracked.timer = None
            if tracked.steps:
                busy.append(tracked.chain)
        out: Deferred[None] = Deferred()

        def finish(_: Any = None) -> None:
            if not out.called:
                self.spool.release_runner_lock()
                out.callback(None)

        # Let attempts in progress record their results (fewer duplicates after a restart),
        # but do not hold the shutdown hostage to a slow server.
        defer.DeferredList(busy, consumeErrors=True).addBoth(finish)
        timeout = self.clock.callLater(STOP_GRACE, finish)
        out.addBoth(lambda _: timeout.cancel() if timeout.active() else None)
        return out

    # -- scheduling -----------------------------------------------------------------------

    def enqueued(self, queue_id: str) -> None:
        """A new entry was written (called in the reactor thread): try it now."""
        if self.running and not self._stopping:
            self._schedule(queue_id, 0.0)

    def _schedule(self, queue_id: str, when: float | None) -> None:
        """(Re)arm the entry's timer; ``when`` None means nothing to do until told."""
        tracked = self._tracked.setdefault(queue_id, _Tracked())
        if tracked.timer is not None and tracked.timer.active():
            tracked.timer.cancel()
        tracked.timer = None
        if when is None or self._stopping:
            return
        delay = max(0.0, when - self.clock.seconds())
        tracked.timer = self.clock.callLater(delay, self._due, queue_id)

    def _due(self, queue_id: str) -> None:
        tracked = self._tracked.get(queue_id)
        if tracked is not None:
            tracked.timer = None
        self._step(queue_id, lambda: self._attempt(queue_id, force=False))

    def _step(self, queue_id: str, make: Callable[[], Any]) -> Deferred[Any]:
        """Run ``make()`` (a coroutine factory) after the entry's previous steps."""
        tracked = self._tracked.setdefault(queue_id, _Tracked())
        tracked.steps += 1
        result: Deferred[Any] = Deferred()

        def run(_: Any) -> Deferred[Any]:
            return defer.ensureDeferred(make())

        def failed(f: Any) -> None:
            if is_disk_full(f.value):  # no bug: one line, not a traceback
                log.warn("queue: {id}: step failed (will retry): the disk is full", id=queue_id)
            else:
                log.failure("queue: {id}: step failed (will retry)", f, id=queue_id)
            if not self._stopping and queue_id in self._tracked:
                self._schedule(queue_id, self.clock.seconds() + self.schedule.initial)

        def after(_: Any) -> None:
            tracked.steps -= 1
            result.callback(None)

        tracked.chain.addCallback(run)
        tracked.chain.addErrback(failed)
        tracked.chain.addBoth(after)
        return result

    def _forget(self, queue_id: str) -> None:
        tracked = self._tracked.pop(queue_id, None)
        if tracked is not None and tracked.timer is not None and tracked.timer.active():
            tracked.timer.cancel()
        self._save_locks.pop(queue_id, None)

    # -- one attempt ----------------------------------------------------------------------

    async def _save(self, entry: QueueEntry) -> None:
        """Durably write a snapshot; saves of one entry are written in the order asked."""
        lock = self._save_locks.setdefault(entry.id, defer.DeferredLock())
        snapshot = copy.deepcopy(entry)
        await lock.run(self._blocking, self.spool.save, snapshot)

    async def _attempt(self, queue_id: str, force: bool) -> None:
        try:
            entry = self.spool.load(queue_id)
        except SpoolError:
            self._forget(queue_id)
            return
        now = self.clock.seconds()
        due = [r for r in entry.pending if force or r.next_attempt <= now + 0.5]
        if due and not self._stopping:
            path = self.spool.message_path(queue_id)
            header = await self._blocking(read_header_block, path)
            hops = _count_received(header)
            if hops > self.config.smtp.max_hops:
                # RFC 5321 6.3: a loop; do not pass it on.
                reply = Reply(
                    554, "5.4.6", f"routing loop detected ({hops} Received headers)", remote=False
                )
                for r in due:
                    self._file(entry, r, RecipientResult(r.address, reply), now)
                await self._save(entry)
            else:
                await self._deliver(entry, due, path)
        await self._report(entry)
        if entry.done:
            await self._blocking(self.spool.remove, queue_id)
            log.info("queue: {id}: done, removed", id=queue_id)
            self._forget(queue_id)
            return
        self._schedule(queue_id, entry.next_attempt())

    async def _deliver(self, entry: QueueEntry, due: list[RecipientState], path: Path) -> None:
        info = await self._blocking(scan_message, path)
        directory = self.runtime.directory
        groups: dict[str | None, list[RecipientState]] = {}
        for r in due:
            key = (
                None
                if directory.is_local_domain(domain_of(r.address))
                else self.relay.route_key(r.address)
            )
            groups.setdefault(key, []).append(r)

        async def one_group(key: str | None, rcpts: list[RecipientState]) -> None:
            if self._stopping:
                return
            start = self.clock.seconds()
            for r in rcpts:  # record the attempt before making it
                r.attempts += 1
                r.last_attempt = start
                r.in_flight = True
            await self._save(entry)
            try:
                if key is None:
                    results = await self._deliver_locally(entry, rcpts, path)
                else:
                    results = await self.relay.send(
                        key,
                        entry.sender,
                        [r.address for r in rcpts],
                        path,
                        info,
                        smtputf8=entry.smtputf8,
                        body_8bit=entry.body_8bit,
                        scratch_dir=self.spool.tmp_dir,
                    )
            except Exception as e:  # a bug must not lose the entry: retry
                log_failure(log, e, "queue: {id}: delivery to {key} failed", id=entry.id, key=key)
                reply = (
                    Reply(452, "4.3.1", "the disk is full", remote=False)
                    if is_disk_full(e)
                    else Reply(451, "4.3.0", f"internal error: {e}", remote=False)
                )
                results = {r.address: RecipientResult(r.address, reply) for r in rcpts}
            end = self.clock.seconds()
            for r in rcpts:
                result = results.get(r.address) or RecipientResult(
                    r.address, Reply(451, "4.3.0", "no result", remote=False)
                )
                self._file(entry, r, result, end)
                if key is not None:
                    self._count_attempt(result.reply)
            await self._save(entry)

        def limited(key: str | None, rcpts: list[RecipientState]) -> Deferred[None]:
            return self._groups.run(lambda: defer.ensureDeferred(one_group(key, rcpts)))

        outcomes = await defer.DeferredList(
            [limited(k, v) for k, v in groups.items()], consumeErrors=True
        )
        for ok, value in outcomes:
            if not ok:
                log.failure("queue: {id}: group failed", value, id=entry.id)

    def _count_attempt(self, reply: Reply) -> None:
        """One remote attempt for ``/metrics``: delivered, deferred or failed."""
        metrics = getattr(self.runtime, "metrics", None)
        if metrics is not None:
            outcome = "delivered" if reply.positive else "failed" if reply.permanent else "deferred"
            metrics.outbound_attempts.labels(outcome).inc()

    def _file(
        self, entry: QueueEntry, r: RecipientState, result: RecipientResult, now: float
    ) -> None:
        """Record one recipient's result and decide: delivered, failed, or when to retry."""
        reply = result.reply
        r.in_flight = False
        r.last_reply = str(reply)
        r.last_status = reply.status
        r.last_host = result.host
        r.diagnostic = reply.diagnostic()
        if reply.positive:
            r.state = DELIVERED
            log.info(
                "queue: {id}: delivered to {rcpt} via {host}: {reply}",
                id=entry.id,
                rcpt=r.address,
                host=result.host or "local",
                reply=str(reply),
            )
        elif reply.permanent:
            r.state = FAILED
            log.info(
                "queue: {id}: failed for {rcpt}: {reply}",
                id=entry.id,
                rcpt=r.address,
                reply=str(reply),
            )
        elif self.schedule.expired(now, entry.created):
            r.state = FAILED
            r.last_reply = f"{reply} (gave up: queue lifetime expired)"
            log.info(
                "queue: {id}: expired for {rcpt}: {reply}",
                id=entry.id,
                rcpt=r.address,
                reply=str(reply),
            )
        else:
            r.next_attempt = self.schedule.next_attempt(now, r.attempts, entry.created)
            log.info(
                "queue: {id}: deferred {rcpt} until {when}: {reply}",
                id=entry.id,
                rcpt=r.address,
                reply=str(reply),
                when=datetime.fromtimestamp(r.next_attempt, UTC).isoformat(),
            )

    # -- local recipients -----------------------------------------------------------------

    async def _deliver_locally(
        self, entry: QueueEntry, rcpts: list[RecipientState], path: Path
    ) -> dict[str, RecipientResult]:
        """A queued recipient in a local domain (the domain became local after it was queued,
        or an operator moved it): into the Maildir through local delivery (its Sieve script
        included), never over the network."""
        directory = self.runtime.directory
        out: dict[str, RecipientResult] = {}
        for r in rcpts:
            resolution = directory.resolve(r.address)
            if resolution.unknown:
                out[r.address] = RecipientResult(
                    r.address, Reply(550, "5.1.1", "no such local user", remote=False)
                )
                continue
            try:
                await deliver_file(
                    self.runtime,
                    entry.sender,
                    resolution.local,
                    path,
                    remote=resolution.remote,
                    smtputf8=entry.smtputf8,
                    body_8bit=entry.body_8bit,
                    blocking=self._blocking,
                )
            except QuotaExceeded:
                # Temporary (RFC 3463 4.2.2): retried as space frees, bounced when the
                # queue lifetime ends -- as Postfix does on Dovecot LMTP's 452 4.2.2.
                out[r.address] = RecipientResult(
                    r.address,
                    Reply(452, "4.2.2", "mailbox full: the recipient is over quota", remote=False),
                )
                continue
            out[r.address] = RecipientResult(
                r.address, Reply(250, "2.0.0", "delivered locally", remote=False), "local"
            )
        return out

    # -- bounces --------------------------------------------------------------------------

    async def _report(self, entry: QueueEntry) -> None:
        """Send the DSNs that are due, then record that they were sent."""
        now = self.clock.seconds()
        failed = [r for r in entry.recipients if r.state == FAILED and not r.reported]
        if failed:
            if entry.sender:
                statuses = [self._status(r, "failed") for r in failed]
                await self._send_dsn(entry, statuses)
                log.info(
                    "queue: {id}: bounce sent to {sender} for {rcpts}",
                    id=entry.id,
                    sender=entry.sender,
                    rcpts=", ".join(r.address for r in failed),
                )
            else:
                log.info(
                    "queue: {id}: null sender: no bounce for {rcpts}",
                    id=entry.id,
                    rcpts=", ".join(r.address for r in failed),
                )
            for r in failed:
                r.reported = True
            await self._save(entry)
        pending = entry.pending
        if (
            pending
            and entry.sender
            and not entry.warned
            and self.schedule.warning_due(now, entry.created)
        ):
            until = datetime.fromtimestamp(self.schedule.expires(entry.created), UTC)
            statuses = [self._status(r, "delayed", until) for r in pending]
            await self._send_dsn(entry, statuses)
            entry.warned = True
            await self._save(entry)
            log.info(
                "queue: {id}: delay warning sent to {sender}", id=entry.id, sender=entry.sender
            )

    @staticmethod
    def _status(r: RecipientState, action: str, until: datetime | None = None) -> RecipientStatus:
        status = r.last_status or ("5.0.0" if action == "failed" else "4.0.0")
        if action == "failed" and status.startswith("2"):
            status = "5.0.0"
        remote_mta = r.last_host if r.last_host and r.last_host != "local" else None
        return RecipientStatus(
            recipient=r.address,
            action=action,
            status=status,
            diagnostic=r.diagnostic,
            remote_mta=remote_mta,
            last_attempt=(datetime.fromtimestamp(r.last_attempt, UTC) if r.last_attempt else None),
            will_retry_until=until,
        )

    async def _send_dsn(self, entry: QueueEntry, statuses: list[RecipientStatus]) -> None:
        """Build the DSN and hand it to the sender: through local delivery, or the queue
        (with the null sender, RFC 3461 6.1)."""
        sender = entry.sender
        data = await self._blocking(
            partial(
                build_dsn,
                reporting_mta=self.config.hostname,
                original_sender=sender,
                recipients=statuses,
                original_message_path=self.spool.message_path(entry.id),
                arrival_date=datetime.fromtimestamp(entry.created, UTC),
                now=datetime.fromtimestamp(self.clock.seconds(), UTC),
            )
        )
        smtputf8 = not sender.isascii()
        directory = self.runtime.directory
        if not directory.is_local_domain(domain_of(sender)):
            await self._blocking(
                partial(self.spool.enqueue_bytes, data, "", [sender], smtputf8=smtputf8)
            )
            return
        resolution = directory.resolve(sender)
        if resolution.unknown:
            log.warn(
                "queue: {id}: bounce dropped: the local sender {sender} does not exist",
                id=entry.id,
                sender=sender,
            )
            return
        try:
            await deliver_bytes(
                self.runtime,
                "",
                resolution.local,
                data,
                remote=resolution.remote,
                smtputf8=smtputf8,
                blocking=self._blocking,
            )
        except QuotaExceeded:
            # The sender's mailbox is full: the bounce waits in the queue like any local
            # delivery over quota (deferred 4.2.2; null sender, so never bounced itself).
            log.info(
                "queue: {id}: the sender {sender} is over quota: bounce queued",
                id=entry.id,
                sender=sender,
            )
            await self._blocking(
                partial(self.spool.enqueue_bytes, data, "", [sender], smtputf8=smtputf8)
            )

    # -- operator requests ----------------------------------------------------------------

    def _check_requests(self) -> None:
        try:
            requests = self.spool.take_requests()
        except OSError:
            log.failure("queue: reading control requests failed")
            return
        for req in requests:
            ids = [req.id] if req.id is not None else self.spool.ids()
            log.info("queue: operator request {op} {target}", op=req.op, target=req.id or "(all)")
            for queue_id in ids:
                self.control(req.op, queue_id)

    def control(self, op: str, queue_id: str) -> Deferred[Any]:
        """flush: try every pending recipient now; delete: drop the entry without a word;
        bounce: fail every pending recipient (DSN to the sender) and drop the entry."""
        tracked = self._tracked.get(queue_id)
        if tracked is not None and tracked.timer is not None and tracked.timer.active():
            tracked.timer.cancel()
            tracked.timer = None
        if op == "flush":
            return self._step(queue_id, lambda: self._attempt(queue_id, force=True))
        if op == "delete":
            return self._step(queue_id, lambda: self._delete(queue_id))
        if op == "bounce":
            return self._step(queue_id, lambda: self._bounce(queue_id))
        log.warn("queue: unknown operator request {op}", op=op)
        return defer.succeed(None)

    async def _delete(self, queue_id: str) -> None:
        try:
            self.spool.load(queue_id)
        except SpoolError:
            self._forget(queue_id)
            return
        await self._blocking(self.spool.remove, queue_id)
        self._forget(queue_id)
        log.info("queue: {id}: deleted by the operator", id=queue_id)

    async def _bounce(self, queue_id: str) -> None:
        try:
            entry = self.spool.load(queue_id)
        except SpoolError:
            self._forget(queue_id)
            return
        now = self.clock.seconds()
        reply = Reply(550, "5.0.0", "returned to the sender by the postmaster", remote=False)
        for r in entry.pending:
            previous = r.last_reply
            self._file(entry, r, RecipientResult(r.address, reply), now)
            if previous:
                r.diagnostic = f"{reply.diagnostic()} (last attempt: {previous})"
        await self._save(entry)
        await self._report(entry)
        await self._blocking(self.spool.remove, queue_id)
        self._forget(queue_id)
        log.info("queue: {id}: bounced by the operator", id=queue_id)


def queue_service(runtime: Any) -> QueueRunner:
    """The runner for ``runtime`` (whose ``queue`` must be the spool; see build_runtime)."""
    spool = runtime.queue
    if spool is None:
        spool = runtime.queue = make_spool(runtime.config.data_dir, runtime.reactor)
    mail_auth = getattr(runtime, "mail_auth", None)
    relay = Relay(
        runtime.config,
        runtime.reactor,
        resolver=getattr(runtime, "resolver", None),
        resign=mail_auth.signer.resign if mail_auth is not None else None,
    )
    return QueueRunner(runtime, spool, relay)
