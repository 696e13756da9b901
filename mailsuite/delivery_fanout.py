"""One durable message file to each of its recipients: Sieve, copies, queue entries, renames.

The worker-thread half of :mod:`mailsuite.delivery`.  Given the message file -- fsynced, in the
first local recipient's ``tmp/`` (or the incoming spool when every recipient is remote), starting
with that recipient's trace lines (:func:`trace_head`) -- :meth:`Fanout.run`:

0. checks each local recipient's storage quota (:mod:`mailsuite.store.quota`) before any
   script runs, so a refused message never redirects or answers: when every recipient is
   over, it refuses (``552 5.2.2`` in the SMTP dialogue, :class:`QuotaExceeded` otherwise:
   the queue retries on 4.2.2); when some are, they get a queued local delivery instead;
1. runs each local recipient's active Sieve script (``runtime.sieve``, RFC 5228; see
   :mod:`mailsuite.sieve.apply` for how each action is applied).  The first recipient's script
   reads the file itself; a further recipient's reads the shared part below the first one's
   Delivered-To line, so a message that was here before is still recognised (redirect loops).
   A script that fails is the implicit keep (the engine never raises; a fault of ours here is
   logged and kept all the same): mail is never lost to a filter;
2. refuses at SMTP time (RFC 5429 2.1: 550 5.7.1) when the only recipient's script rejects and
   the caller is still in the SMTP dialogue -- nothing is stored or queued;
3. writes a draft for every further store -- each recipient's Keep/FileInto folders (or every
   recipient's Junk folder under a quarantine verdict), the first store of the first recipient
   being the file itself (no copy in the common case);
4. queues the message for the remote recipients and the redirects (RFC 5228 4.2: with the
   original envelope sender, and the recipient's Delivered-To line so a loop is seen), and
   builds the rejection notices (RFC 5429 2.2: to the sender, null reverse-path);
5. places every draft (:func:`mailsuite.store.write.place`: rename into ``new/``, or ``cur/``
   with the script's flags through the index; fsync the directories).

Every copy and queue entry is made before any rename, so a failure leaves no recipient with a
copy while the client is told to try again (a failure among the renames themselves can, and a
retry then duplicates: at-least-once, never lost).  The replies to send (vacation, rejection
notices) are handed back: signing them waits on the mail-auth workers, which the reactor
thread drives (:func:`mailsuite.delivery._after`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailsuite.directory import LocalBox
from mailsuite.sieve.actions import Discard, Redirect, Reject
from mailsuite.sieve.apply import destinations, prepare_folder, rejection_message, smtp_reply
from mailsuite.sieve.engine import SieveOutcome
from mailsuite.sieve.interpreter import SieveEnvelope
from mailsuite.smtp import replies as R
from mailsuite.smtp.replies import Reply
from mailsuite.store.quota import QuotaExceeded, root_of, usage
from mailsuite.store.write import Draft, Placement, copy_tmp, discard, place

__all__ = ["DeliveryError", "Fanout", "Outgoing", "QueuedReply", "QuotaExceeded", "trace_head"]

#: the most of the original header section a rejection notice quotes
_NOTICE_HEAD_MAX = 64 * 1024


class DeliveryError(Exception):
    """Delivery failed for a reason worth a temporary failure (logged with details)."""


def trace_head(sender: str, user: str | None) -> bytes:
    """Our first lines of a stored message: ``Return-Path`` (RFC 5321 4.4) and, for a local
    mailbox, ``Delivered-To`` (what loop detection and Sieve's redirect check read)."""
    head = f"Return-Path: <{sender}>\n"
    if user is not None:
        head += f"Delivered-To: {user}\n"
    return head.encode()


@dataclass(frozen=True)
class QueuedReply:
    """A message a delivery sends on its own: a vacation reply, a rejection notice."""

    sender: str
    recipient: str
    data: bytes


@dataclass
class Outgoing:
    """What the worker thread hands back to the reactor thread (see the module docstring)."""

    reply: Reply | None = None
    folders: tuple[Path, ...] = ()
    replies: list[QueuedReply] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    #: local recipients that got the message, and the bytes of their copies (the metrics)
    delivered: int = 0
    stored_bytes: int = 0


class Fanout:
    """One message file to its recipients (see the module docstring).  ``size`` and
    ``crlf_extra`` are the file's size and what CRLF line ends add to it; the part every copy
    shares starts at ``received_offset`` (after the first recipient's trace lines)."""

    def __init__(
        self,
        runtime: Any,
        envelope: Any,  # mailsuite.delivery.Envelope
        path: Path,
        size: int,
        crlf_extra: int,
        *,
        received_offset: int,
        can_refuse: bool,
        folder: str | None = None,
        contents: list[bytes] | None = None,
    ) -> None:
        self.runtime = runtime
        self.env = envelope
        self.path = path
        self.size = size
        self.crlf_extra = crlf_extra
        self.received_offset = received_offset
        self.can_refuse = can_refuse
        self.folder = folder
        #: the file's bytes in pieces when the caller wrote it from memory: the scripts read
        #: their message from here rather than from the file (joined on first use)
        self._contents = contents
        self._return_path = len(trace_head(envelope.sender, None))
        self._drafts: list[Path] = []
        self._full: list[LocalBox] = []  # recipients over quota, queued (see _enqueue)
        self._out = Outgoing()
        #: the Maildir roots found without a quota file (no limit) at the quota check: their
        #: copies are placed without a second look for it (see :meth:`_place`)
        self._unlimited: set[Path] = set()

    def run(self) -> Outgoing:
        """Blocking; see the module docstring.  On failure nothing is left behind but what
        was already renamed into place, and it raises (the caller answers 451)."""
        try:
            return self._run()
        except BaseException:
            for draft in self._drafts:
                discard(draft)
            discard(self.path)
            raise

    def _run(self) -> Outgoing:
        env = self.env
        out = self._out
        boxes = list(enumerate(env.local))
        full: list[LocalBox] = []
        for box in env.local:
            u = usage(box.root)
            if u is None:
                self._unlimited.add(box.root)
            elif not u.fits(self.size):
                full.append(box)
        if full:
            users = ", ".join(box.user for box in full)
            if len(full) == len(env.local) and not env.remote:
                discard(self.path)
                if not self.can_refuse:
                    raise QuotaExceeded(f"{users}: over quota")
                out.reply = R.MAILBOX_FULL
                out.log.append(f"{users}: over quota, message refused")
                return out
            self._full = full
            boxes = [(i, box) for i, box in boxes if box not in full]
            out.log.append(f"{users}: over quota, queued to retry (4.2.2)")
        sieve = getattr(self.runtime, "sieve", None) if self.folder is None else None
        outcomes = {i: self._evaluate(sieve, i, box) for i, box in boxes}
        if self.can_refuse and len(env.local) == 1 and not env.remote and boxes:
            refusal = _reject_of(outcomes[0])
            if refusal is not None:
                discard(self.path)
                out.reply = smtp_reply(refusal)
                out.log.append(f"{env.local[0].user}: rejected at SMTP time by the Sieve script")
                self._note(env.local[0], outcomes[0])
                return out
        plan: list[tuple[Path, Placement]] = []
        redirects: list[tuple[int, LocalBox, list[str]]] = []
        first_used = False
        for i, box in boxes:
            outcome = outcomes[i]
            targets = self._targets(box, outcome)
            if targets:
                out.delivered += 1
            if outcome is not None:
                addresses = [a.address for a in outcome.actions if isinstance(a, Redirect)]
                if addresses:
                    redirects.append((i, box, addresses))
                self._reject_later(box, outcome)
                self._note(box, outcome)
            for folder, flags in targets:
                if i == 0 and not first_used:
                    draft = Draft(self.path, self.path.name, self.size, self.size + self.crlf_extra)
                    first_used = True
                else:
                    draft = copy_tmp(
                        folder,
                        trace_head(env.sender, box.user),
                        self.path,
                        self.received_offset,
                        crlf_extra=self.crlf_extra,
                        make=True,
                    )
                    self._drafts.append(draft.path)
                plan.append((folder, Placement(draft, flags)))
        self._enqueue(redirects)
        out.folders = tuple(self._place(plan))
        if not first_used:
            discard(self.path)  # every copy, queue entry and notice has what it needs
        return out

    # -- Sieve ------------------------------------------------------------------------------

    def _evaluate(self, sieve: Any, i: int, box: LocalBox) -> SieveOutcome | None:
        """The recipient's script's outcome, None without a script engine (or a quarantine
        verdict, which skips scripts: no forwarding or auto-reply of suspect mail)."""
        if sieve is None:
            return None
        envelope = SieveEnvelope(self.env.sender, box.rcpt or box.user, box.user)
        if i == 0:
            offset, first = self._return_path, True
            size = self.size + self.crlf_extra
        else:
            offset, first = self.received_offset, False
            own = len(trace_head(self.env.sender, box.user))
            size = self.size - self.received_offset + own + self.crlf_extra
        try:
            outcome: SieveOutcome = sieve.evaluate(
                self.path,
                envelope,
                offset=offset,
                size=size,
                delivered_to_added=first,
                root=box.root,
                contents=self._joined if self._contents is not None else None,
            )
        except Exception as e:  # a fault of ours costs a keep, never the message
            self._out.log.append(f"{box.user}: Sieve failed ({type(e).__name__}: {e}); kept")
            return None
        return outcome

    def _joined(self) -> bytes:
        pieces = self._contents
        assert pieces is not None
        if len(pieces) != 1:
            self._contents = pieces = [b"".join(pieces)]
        return pieces[0]

    def _targets(
        self, box: LocalBox, outcome: SieveOutcome | None
    ) -> list[tuple[Path, frozenset[str]]]:
        """(folder, flags) for each copy this recipient gets."""
        if self.folder is not None:
            folder, note = prepare_folder(box.root, self.folder, True)
            if note:
                self._out.log.append(f"{box.user}: {note}")
            return [(folder, frozenset())]
        if outcome is None:
            return [(box.root, frozenset())]
        targets, notes = destinations(outcome.actions, box.root)
        self._out.log.extend(f"{box.user}: {n}" for n in notes)
        return targets

    def _note(self, box: LocalBox, outcome: SieveOutcome | None) -> None:
        if outcome is None:
            return
        log = self._out.log
        if outcome.error:
            log.append(
                f"{box.user}: script {outcome.script!r} failed, message kept: {outcome.error}"
            )
        log.extend(f"{box.user}: {n}" for n in outcome.notes)
        if any(isinstance(a, Discard) for a in outcome.actions):
            log.append(f"{box.user}: discarded by script {outcome.script!r}")
        if outcome.vacation is not None:
            v = outcome.vacation
            self._out.replies.append(QueuedReply(v.sender, v.recipient, v.message))
            log.append(f"{box.user}: vacation reply to {v.recipient}")

    def _reject_later(self, box: LocalBox, outcome: SieveOutcome) -> None:
        """RFC 5429 2.2: a reject that cannot be an SMTP reply becomes a notice to the sender
        (never to the null sender)."""
        refusal = _reject_of(outcome)
        if refusal is None:
            return
        sender = self.env.sender
        if not sender:
            self._out.log.append(
                f"{box.user}: rejected by the Sieve script; null sender, no notice"
            )
            return
        envelope = SieveEnvelope(sender, box.rcpt or box.user, box.user)
        notice = rejection_message(
            refusal, envelope, self._original_head(), self.runtime.config.hostname
        )
        self._out.replies.append(QueuedReply("", sender, notice))
        self._out.log.append(f"{box.user}: rejected by the Sieve script; notice to {sender}")

    def _original_head(self) -> bytes:
        """The header section as received (from our Received line down), bounded."""
        with self.path.open("rb") as f:
            f.seek(self.received_offset)
            data = f.read(_NOTICE_HEAD_MAX)
        end = data.find(b"\n\n")
        return data[: end + 1] if end >= 0 else data

    # -- queue and store --------------------------------------------------------------------

    def _enqueue(self, redirects: list[tuple[int, LocalBox, list[str]]]) -> None:
        env = self.env
        if not env.remote and not redirects and not self._full:
            return
        queue = getattr(self.runtime, "queue", None)
        if queue is None:
            raise DeliveryError("remote delivery is not available")
        if self._full:
            # Over quota among other recipients: RFC 5321 has one reply after the data, so
            # the others get the message now and these a queued local delivery, retried
            # while their mailbox is full (4.2.2) and bounced when the queue gives up --
            # what Postfix does when Dovecot's LMTP answers 452 4.2.2 for one of several.
            queue.enqueue_file(
                self.path,
                self.received_offset,
                env.sender,
                [self._retry_address(box) for box in self._full],
                smtputf8=env.smtputf8,
                body_8bit=env.body_8bit,
            )
        if env.remote:
            queue.enqueue_file(
                self.path,
                self.received_offset,
                env.sender,
                env.remote,
                smtputf8=env.smtputf8,
                body_8bit=env.body_8bit,
            )
        for i, box, addresses in redirects:
            # the first recipient's Delivered-To is in the file; the others' goes on top
            if i == 0:
                offset, head = self._return_path, b""
            else:
                offset = self.received_offset
                head = trace_head(env.sender, box.user)[self._return_path :]
            queue.enqueue_file(
                self.path,
                offset,
                env.sender,
                addresses,
                head=head,
                smtputf8=env.smtputf8,
                body_8bit=env.body_8bit,
            )
            self._out.log.append(f"{box.user}: redirected to {', '.join(addresses)}")

    def _retry_address(self, box: LocalBox) -> str:
        """The address a queued retry for ``box`` is delivered to: the one the sender wrote
        (``bob+news``, so Sieve's subaddress and envelope tests still see it) when it leads
        to this mailbox alone; the mailbox itself when it was an alias of several, which
        must not fan out again to the others who already have the message."""
        if box.rcpt and box.rcpt != box.user:
            again = self.runtime.directory.resolve(box.rcpt)
            if not again.remote and [b.user for b in again.local] == [box.user]:
                return box.rcpt
        return box.user

    def _place(self, plan: list[tuple[Path, Placement]]) -> list[Path]:
        """Every draft into its folder, one :func:`place` (one directory fsync) per folder.

        A user whose quota file was missing at this job's quota check has no limit, and
        :func:`place` is told so (``unlimited``) rather than looking for the file again (a
        system call, in a thread that waits for the GIL after each).  A limit set in between
        (``mailsuite user quota``, which counts the tree itself) may miss this message: the
        same drift as when its count lands between that count's walk and its file's write
        (:mod:`mailsuite.store.quota`: a recount repairs it); no mail depends on it."""
        by_folder: dict[Path, list[Placement]] = {}
        for folder, placement in plan:
            by_folder.setdefault(folder, []).append(placement)
        unlimited = self._unlimited
        for folder, items in by_folder.items():
            place(folder, items, unlimited=folder in unlimited or root_of(folder) in unlimited)
            self._out.stored_bytes += sum(p.draft.size for p in items)
        return list(by_folder)


def _reject_of(outcome: SieveOutcome | None) -> Reject | None:
    if outcome is None:
        return None
    for action in outcome.actions:
        if isinstance(action, Reject):
            return action
    return None
