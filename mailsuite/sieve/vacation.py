"""Vacation (RFC 5230, RFC 6131) under RFC 3834's rules: whether to answer, the
per-user memory of whom we answered, and the reply itself.

* :func:`decide` is pure: given the request, the message and the envelope, it says whether a
  reply may go out and from which of the user's addresses (or why not).
* :class:`VacationStore` remembers "replied to sender S for handle H until T" in
  ``sieve/vacation.json`` under the user's mail folder: written atomically (temp file,
  fsync, rename, fsync of the folder) under an ``flock`` so two deliveries at once cannot
  both answer, pruned of expired entries and bounded in size, so it survives restarts and
  cannot grow without end.
* :func:`build_reply` makes the reply message (LF line ends, like everything spooled).
  Queueing it -- through the outbound queue, with the null reverse-path RFC 3834 3.3 asks
  for -- is the caller's job.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import quopri
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from email.header import Header
from email.utils import format_datetime, getaddresses
from pathlib import Path

from mailsuite.sieve.actions import VacationRequest
from mailsuite.sieve.interpreter import SieveEnvelope
from mailsuite.sieve.message import MessageView
from mailsuite.store.maildir import fsync_dir

#: Entries kept per user (the oldest expiries are dropped first when there are more).
MAX_ENTRIES = 10_000

#: RFC 5230 4.6 / RFC 3834 2: senders that are programs, never people.
_ROBOT_LOCALS = ("mailer-daemon", "listserv", "majordomo", "postmaster")
_LIST_HEADERS = (
    "list-id",
    "list-help",
    "list-unsubscribe",
    "list-subscribe",
    "list-post",
    "list-owner",
    "list-archive",
)
_RECIPIENT_HEADERS = ("to", "cc", "bcc", "resent-to", "resent-cc", "resent-bcc")


@dataclass(frozen=True)
class Decision:
    reply: bool
    why: str  # why not (for the log), or "" when replying
    from_addr: str = ""  # which of the user's addresses the message was sent to


def _addr_key(address: str) -> str:
    return address.strip().strip("<>").lower()


def decide(
    request: VacationRequest,
    message: MessageView,
    envelope: SieveEnvelope,
    own_addresses: Iterable[str] = (),
) -> Decision:
    """RFC 5230 4.5 (personal messages), 4.6 (automated senders, lists) and RFC 3834 2:
    the suppression rules, in order."""
    sender = _addr_key(envelope.sender)
    if not sender:
        return Decision(False, "null sender")
    local = sender.rpartition("@")[0]
    if (
        local in _ROBOT_LOCALS
        or local.startswith("owner-")
        or local.endswith("-request")
        or local.endswith("-bounces")
    ):
        return Decision(False, f"sender {sender} is a mailing list or mailer")
    mine = {_addr_key(a) for a in own_addresses if a}
    mine |= {_addr_key(envelope.user), _addr_key(envelope.recipient)}
    mine |= {_addr_key(a) for a in request.addresses}
    if sender in mine:
        return Decision(False, "sender is the user's own address")
    for value in message.header("auto-submitted"):
        if value.split(";", 1)[0].strip().lower() != "no":  # RFC 3834 5
            return Decision(False, "message is Auto-Submitted")
    for value in message.header("precedence"):
        if value.strip().lower() in ("bulk", "list", "junk"):
            return Decision(False, f"Precedence: {value.strip()}")
    for name in _LIST_HEADERS:
        if message.exists(name):
            return Decision(False, f"mailing list message ({name})")
    found = ""
    for name in _RECIPIENT_HEADERS:
        for _, addr in getaddresses(message.raw(name)):
            if _addr_key(addr) in mine:
                found = addr
                break
        if found:
            break
    if not found:
        # RFC 5230 4.5: reply only to mail that names the user in To/Cc/Bcc (not to Bcc'd
        # list traffic or spam that does not)
        return Decision(False, "none of the user's addresses is in To/Cc/Bcc")
    return Decision(True, "", found)


class VacationStore:
    """``replied to sender S for handle H`` until a time, persistent and bounded."""

    def __init__(self, path: Path, max_entries: int = MAX_ENTRIES) -> None:
        self.path = path
        self.max_entries = max_entries

    @staticmethod
    def _key(sender: str, handle: str) -> str:
        raw = f"{handle}\0{_addr_key(sender)}".encode("utf-8", "replace")
        return hashlib.sha256(raw).hexdigest()[:40]

    def _load(self) -> dict[str, float]:
        try:
            data = json.loads(self.path.read_text("utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}  # a damaged file costs at most one extra reply per sender
        if not isinstance(data, dict):
            return {}
        return {
            k: float(v)
            for k, v in data.items()
            if isinstance(k, str) and isinstance(v, (int, float))
        }

    def _save(self, entries: dict[str, float]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(entries, f, separators=(",", ":"))
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        fsync_dir(self.path.parent)

    def replied(self, sender: str, handle: str, now: float) -> bool:
        """Whether a reply to ``sender`` for ``handle`` is still within its period."""
        return self._load().get(self._key(sender, handle), 0.0) > now

    def claim(self, sender: str, handle: str, seconds: int, now: float) -> bool:
        """Atomically: if no reply is on record, record one for ``seconds`` and return True
        (the caller then sends it); else False.  Recording first means a crash between the
        two costs a reply, never a duplicate."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(f".{self.path.name}.lock")
        with lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = {k: v for k, v in self._load().items() if v > now}
            key = self._key(sender, handle)
            if key in entries:
                return False
            entries[key] = now + seconds
            if len(entries) > self.max_entries:
                keep = sorted(entries.items(), key=lambda kv: kv[1])[-self.max_entries :]
                entries = dict(keep)
            self._save(entries)
            return True


def _subject(original: list[str]) -> str:
    """RFC 5230 5.2 (no ``:subject``): "Auto: " and the original subject."""
    subject = original[0] if original else ""
    return f"Auto: {subject}".rstrip() if subject else "Auto: (no subject)"


def _header(name: str, value: str) -> bytes:
    """One header field; non-ASCII text as RFC 2047 words, no line breaks (no injection)."""
    value = " ".join(value.split())
    if value.isascii():
        return f"{name}: {value}\n".encode("ascii")
    encoded = Header(value, "utf-8", header_name=name).encode(linesep="\n")
    return f"{name}: {encoded}\n".encode("ascii")


def build_reply(
    request: VacationRequest,
    message: MessageView,
    envelope: SieveEnvelope,
    decision: Decision,
    hostname: str,
    now: datetime,
) -> bytes:
    """The response (RFC 5230 5, RFC 3834 3): to the envelope sender (5.4), from the address the
    message was sent to (or ``:from``), ``Auto-Submitted: auto-replied``, threaded with
    In-Reply-To/References."""
    from_addr = request.from_addr or decision.from_addr or envelope.user
    subject = request.subject
    if subject is None:
        subject = _subject(message.header("subject"))
    out = bytearray()
    out += _header("Date", format_datetime(now))
    out += _header("From", from_addr)
    out += _header("To", f"<{envelope.sender}>")
    out += _header("Subject", subject)
    out += _header("Message-ID", f"<{uuid.uuid4().hex}@{hostname}>")
    original_id = (message.raw("message-id") or [""])[0].strip()
    if original_id:
        out += _header("In-Reply-To", original_id)
        refs = " ".join([*(message.raw("references") or [""])[0].split(), original_id])
        out += _header("References", refs.strip())
    out += _header("Auto-Submitted", "auto-replied")  # RFC 5230 5.5, RFC 3834 5
    out += b"MIME-Version: 1.0\n"
    reason = request.reason.replace("\r\n", "\n")
    if request.mime:
        # RFC 5230 4.4 :mime: the reason is a MIME entity (its own headers and body)
        body = reason if reason.endswith("\n") else reason + "\n"
        return bytes(out) + body.encode("utf-8")
    text = reason if reason.endswith("\n") else reason + "\n"
    if text.isascii():
        out += b"Content-Type: text/plain; charset=us-ascii\nContent-Transfer-Encoding: 7bit\n\n"
        return bytes(out) + text.encode("ascii")
    out += (
        b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: quoted-printable\n\n"
    )
    return bytes(out) + quopri.encodestring(text.encode("utf-8")).replace(b"\r\n", b"\n")
