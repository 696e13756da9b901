"""How local delivery applies a :class:`~.engine.SieveOutcome`, with the blocking helpers.

For each local recipient, after the message file is durable and before it is renamed into
place, delivery calls ``SieveFilter.evaluate(path, SieveEnvelope(sender, rcpt, user),
offset=<after Return-Path>, size=<CRLF size>)`` in its thread and then, per action:

``Keep(flags)``
    store in INBOX (``root``); with flags, through :func:`store_message` (``cur/`` with the
    ``:2,`` letters and ``dovecot-keywords`` via the index, RFC 5232), without, exactly as
    today (``new/``).
``FileInto(mailbox, flags, create)``
    :func:`prepare_folder` gives the folder: created (and subscribed) with ``create``
    (RFC 5490 3.2), else an existing one; a missing or invalid folder falls back to INBOX
    with a line in the user's sieve log (never a lost message).  Then as Keep.
``Redirect(address, copy)``
    queue ``path[return_path_end:]`` -- with our ``Delivered-To`` line, which is how a
    message that comes back is recognised (``evaluate`` drops redirects when it sees the
    user's Delivered-To twice) -- for ``address`` with the *original* envelope sender
    (RFC 5228 4.2), through the outbound queue (``runtime.queue.enqueue_file``).
``Discard``
    store nothing for this recipient (log it).
``Reject(reason, extended)``
    RFC 5429 2.1/2.2: when this recipient is the transaction's only one and the script ran
    before the final reply, answer :func:`smtp_reply` (550 5.7.1 with the reason) instead
    of 250; otherwise (several recipients, or after 250) queue :func:`rejection_message`
    to the envelope sender with the null reverse-path -- unless the sender is null.
``outcome.vacation``
    signed like other outgoing mail, then queued: ``sig = await
    runtime.mail_auth.sign(reply.message)`` (DKIM-Signature fields for the From domain, b""
    without a key) and ``queue.enqueue_bytes(sig + reply.message, reply.sender,
    [reply.recipient])`` -- already recorded in the user's vacation store, so queue it once.
    The rejection MDN of ``Reject`` goes the same way.
``outcome.error`` / ``outcome.notes``
    log them (the user's sieve log already has the error).

Every store for one recipient happens before the 250 (or before the queue entry is marked
done), so a crash repeats the delivery rather than losing it.
"""

from __future__ import annotations

import contextlib
import email.utils
import quopri
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from mailsuite.sieve.actions import Action, FileInto, Keep, Reject
from mailsuite.sieve.interpreter import SieveEnvelope
from mailsuite.sieve.storage import ScriptStore
from mailsuite.smtp.replies import Reply
from mailsuite.store import mailbox_names
from mailsuite.store.mailbox import Account, MailboxError
from mailsuite.store.maildir import FolderNameError
from mailsuite.store.write import Placement, copy_tmp, place


def folder_for(root: Path, mailbox: str) -> Path:
    """The directory of the folder a script names (UTF-8, hierarchy ``.`` or ``/``);
    ValueError when the name is not usable."""
    if mailbox.upper() == "INBOX":
        return root
    name = ".".join(part for part in mailbox.replace("/", ".").split("."))
    try:
        return Account(root).path(mailbox_names.encode(name))
    except (MailboxError, FolderNameError) as e:
        raise ValueError(str(e)) from None


def prepare_folder(root: Path, mailbox: str, create: bool) -> tuple[Path, str | None]:
    """(folder to store in, note for the log or None).  Falls back to INBOX, never fails."""
    try:
        path = folder_for(root, mailbox)
    except ValueError as e:
        return root, f"fileinto {mailbox!r}: {e}; delivered to INBOX"
    if (path / "cur").is_dir():
        return path, None
    if not create:
        return root, f"fileinto {mailbox!r}: no such folder; delivered to INBOX"
    account = Account(root)
    wire = mailbox_names.encode(".".join(mailbox.replace("/", ".").split(".")))
    try:
        account.create(wire)
    except MailboxError as e:
        if not (path / "cur").is_dir():
            return root, f"fileinto {mailbox!r}: cannot create it ({e}); delivered to INBOX"
    with contextlib.suppress(MailboxError, OSError):
        account.subscribe(wire)
    return path, None


def store_message(src: Path, offset: int, head: bytes, folder: Path, flags: frozenset[str]) -> None:
    """Durably store ``head`` + ``src[offset:]`` in ``folder`` with ``flags`` through the
    store's one write path (flags go through the folder index, which assigns keyword letters
    under its lock, RFC 5232).  Blocking."""
    draft = copy_tmp(folder, head, src, offset)
    place(folder, [Placement(draft, flags)])


def destinations(
    actions: Sequence[Action], root: Path
) -> tuple[list[tuple[Path, frozenset[str]]], list[str]]:
    """Where the Keep/FileInto actions of an outcome for one recipient store the message:
    (folder, flags) pairs, one per folder (a fall-back to INBOX next to a keep is still one
    copy), folders made by ``:create`` already made; and notes for the log -- also appended
    to the user's sieve log, so a fall-back to INBOX is explained where the user looks.
    Blocking (may create a folder)."""
    out: list[tuple[Path, frozenset[str]]] = []
    notes: list[str] = []
    for action in actions:
        if isinstance(action, Keep):
            folder, flags = root, action.flags
        elif isinstance(action, FileInto):
            folder, note = prepare_folder(root, action.mailbox, action.create)
            if note:
                notes.append(note)
                with contextlib.suppress(OSError):
                    ScriptStore(root).append_log(note)
            flags = action.flags
        else:
            continue
        if all(folder != f for f, _ in out):
            out.append((folder, flags))
    return out, notes


def store_all(
    actions: tuple[Action, ...] | list[Action], root: Path, src: Path, offset: int, head: bytes
) -> tuple[list[Path], list[str]]:
    """Every Keep/FileInto of an outcome for one recipient, each a durable copy of ``head`` +
    ``src[offset:]``; returns (folders written, notes: see :func:`destinations`).  Blocking.
    Delivery (:mod:`mailsuite.delivery`) plans with :func:`destinations` itself, so that its
    own file becomes the first copy instead of being copied."""
    targets, notes = destinations(actions, root)
    for folder, flags in targets:
        store_message(src, offset, head, folder, flags)
    return [f for f, _ in targets], notes


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def smtp_reply(reject: Reject) -> Reply:
    """RFC 5429 2.1: refuse in the SMTP dialogue (550 5.7.1, the script's reason)."""
    reason = _one_line(reject.reason).encode("ascii", "replace").decode("ascii")
    return Reply(550, "5.7.1", reason or "Message rejected by the recipient's filter")


def rejection_message(
    reject: Reject,
    envelope: SieveEnvelope,
    original_head: bytes,
    hostname: str,
    now: datetime | None = None,
) -> bytes:
    """RFC 5429 2.2: the rejection as an MDN (RFC 3798) with disposition "deleted", sent to
    the envelope sender with the null reverse-path.  ``original_head`` is the original's
    header section (LF line ends); LF-ended bytes ready for the queue."""
    when = email.utils.format_datetime(now or datetime.now(UTC))
    boundary = f"rejection-{uuid.uuid4().hex}"
    reason = reject.reason.replace("\r\n", "\n")
    if not reason.endswith("\n"):
        reason += "\n"
    human = quopri.encodestring(reason.encode("utf-8")).replace(b"\r\n", b"\n")
    original_id = ""
    for line in original_head.split(b"\n"):
        if line[:11].lower() == b"message-id:":
            original_id = _one_line(line[11:].decode("utf-8", "replace"))
    head = [
        f"Date: {when}",
        f"From: Mail Delivery Subsystem <MAILER-DAEMON@{hostname}>",
        f"To: <{envelope.sender}>",
        f"Subject: Rejected: message to {envelope.recipient}",
        f"Message-ID: <{uuid.uuid4().hex}@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f"Content-Type: multipart/report; report-type=disposition-notification;\n"
        f' boundary="{boundary}"',
    ]
    if original_id:
        head.append(f"In-Reply-To: {original_id}")
    report = [
        f"Reporting-UA: {hostname}; mailsuite",
        f"Final-Recipient: rfc822; {envelope.user}",
        f"Original-Recipient: rfc822; {envelope.recipient}",
        "Disposition: automatic-action/MDN-sent-automatically; deleted",
    ]
    if original_id:
        report.append(f"Original-Message-ID: {original_id}")
    b = boundary.encode()
    out = bytearray(("\n".join(head) + "\n\n").encode("utf-8"))
    out += b"This is a MIME-encapsulated message.\n\n--" + b + b"\n"
    out += (
        b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: quoted-printable\n\n"
    )
    out += human if human.endswith(b"\n") else human + b"\n"
    out += b"\n--" + b + b"\nContent-Type: message/disposition-notification\n\n"
    out += ("\n".join(report) + "\n").encode("utf-8")
    out += b"\n--" + b + b"\nContent-Type: text/rfc822-headers\n\n"
    out += original_head if original_head.endswith(b"\n") else original_head + b"\n"
    out += b"\n--" + b + b"--\n"
    return bytes(out)
