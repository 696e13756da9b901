"""Delivery status notifications (RFC 3464) for failed and delayed recipients.

Written here rather than using twisted.mail.bounce: that one has no Reporting-MTA, Action or
Status fields, no Date or MIME-Version, and pastes the whole original message into the report.
"""

from __future__ import annotations

import email.utils
import os
import quopri
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["MAX_HEADER_BYTES", "RecipientStatus", "build_dsn", "read_header_block"]

MAX_HEADER_BYTES = 64 * 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True)
class RecipientStatus:
    """One recipient's line in the report (RFC 3464 2.3).

    ``action`` is "failed" or "delayed"; ``status`` an RFC 3463 code such as "5.1.1";
    ``diagnostic`` the whole Diagnostic-Code value, e.g. ``Reply.diagnostic()`` ->
    "smtp; 550 5.1.1 no such user"; ``remote_mta`` the host name that answered;
    ``original_recipient`` the ORCPT value if the client gave one ("rfc822;a@b").
    """

    recipient: str
    action: str
    status: str
    diagnostic: str | None = None
    remote_mta: str | None = None
    original_recipient: str | None = None
    last_attempt: datetime | None = None
    will_retry_until: datetime | None = None


def _clean(value: str, limit: int = 900) -> str:
    """One header line's worth: no CR/LF/controls (no header injection), bounded length."""
    value = _CONTROL.sub(" ", value).strip()
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _date(when: datetime) -> str:
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return email.utils.format_datetime(when)


def read_header_block(path: str | os.PathLike[str], limit: int = MAX_HEADER_BYTES) -> bytes:
    """The stored message's header section (up to the blank line) as LF-ended bytes.

    Reads at most ``limit`` bytes, cut at a line end; the body is never read into memory.
    """
    with Path(path).open("rb") as f:
        head = f.read(limit + 1)
    head = head.replace(b"\r\n", b"\n")
    end = head.find(b"\n\n")
    if end != -1 and end < limit:
        return head[: end + 1]
    if head.startswith(b"\n"):
        return b""
    if len(head) > limit:
        cut = head.rfind(b"\n", 0, limit)
        return head[: cut + 1] if cut != -1 else b""
    return head if head.endswith(b"\n") or not head else head + b"\n"


def _address_field(kind: str, address: str) -> str:
    # RFC 6533 3: the "utf-8" address type for internationalized addresses.
    return f"{kind}: {'rfc822' if address.isascii() else 'utf-8'}; {_clean(address)}"


def _check_recipients(original_sender: str, recipients: Sequence[RecipientStatus]) -> None:
    """Refuse a report that must never be sent, before any file is read.

    A message with the null sender is itself a bounce (RFC 5321 4.5.5): bouncing it could loop.
    A report with no recipient, or an action other than failed/delayed, is a caller bug that
    would produce a DSN no client can interpret (RFC 3464 2.3.3).
    """
    if not original_sender:
        raise ValueError("no DSN for a message with the null sender (never bounce a bounce)")
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    for r in recipients:
        if r.action not in ("failed", "delayed"):
            raise ValueError(f"action must be failed or delayed, not {r.action!r}")


def _human_part(
    mta: str, recipients: Sequence[RecipientStatus], delayed_only: bool
) -> tuple[str, bytes, str]:
    """The subject, the human-readable first part and its transfer encoding.

    A delay warning reads differently from a failure so that the sender does not resend a
    message that will still be delivered. Non-ASCII text (an internationalized address or
    diagnostic) goes out as quoted-printable so the part stays 7-bit safe for any relay.
    """
    if delayed_only:
        subject = "Delivery delayed: still trying"
        intro = [
            f"This is the mail system at {mta}.",
            "",
            "Your message could not be delivered yet to the recipients below.",
            "The mail system will keep trying; you do not need to resend it.",
        ]
    else:
        subject = "Undelivered Mail Returned to Sender"
        intro = [
            f"This is the mail system at {mta}.",
            "",
            "Your message could not be delivered to one or more recipients.",
            "It has not been delivered to the recipients below.",
        ]
    lines = [*intro, ""]
    for r in recipients:
        lines.append(f"<{_clean(r.recipient)}>: {r.action} ({_clean(r.status, 20)})")
        if r.remote_mta:
            lines.append(f"    host {_clean(r.remote_mta, 200)} said:")
        if r.diagnostic:
            lines.append(f"    {_clean(r.diagnostic)}")
        if r.will_retry_until and r.action == "delayed":
            lines.append(f"    will retry until {_date(r.will_retry_until)}")
    human = "\n".join(lines) + "\n"
    if human.isascii():
        return subject, human.encode("ascii"), "7bit"
    human_body = quopri.encodestring(human.encode("utf-8")).replace(b"\r\n", b"\n")
    return subject, human_body, "quoted-printable"


def _status_part(
    mta: str,
    recipients: Sequence[RecipientStatus],
    arrival_date: datetime,
    envelope_id: str | None,
) -> bytes:
    """The machine-readable delivery-status body (RFC 3464 2.2 per-message, 2.3 per-recipient).

    Kept apart from the human text because mail clients and list managers parse these fields
    to unsubscribe or flag addresses; every value is cleaned so no field can inject a header.
    """
    status_lines = [f"Reporting-MTA: dns; {mta}"]
    if envelope_id:
        status_lines.append(f"Original-Envelope-Id: {_clean(envelope_id, 100)}")
    status_lines.append(f"Arrival-Date: {_date(arrival_date)}")
    for r in recipients:
        status_lines.append("")
        if r.original_recipient:
            status_lines.append(f"Original-Recipient: {_clean(r.original_recipient)}")
        status_lines.append(_address_field("Final-Recipient", r.recipient))
        status_lines.append(f"Action: {r.action}")
        status_lines.append(f"Status: {_clean(r.status, 20)}")
        if r.remote_mta:
            status_lines.append(f"Remote-MTA: dns; {_clean(r.remote_mta, 200)}")
        if r.diagnostic:
            status_lines.append(f"Diagnostic-Code: {_clean(r.diagnostic)}")
        if r.last_attempt:
            status_lines.append(f"Last-Attempt-Date: {_date(r.last_attempt)}")
        if r.will_retry_until and r.action == "delayed":
            status_lines.append(f"Will-Retry-Until: {_date(r.will_retry_until)}")
    return ("\n".join(status_lines) + "\n").encode("utf-8")


def _top_headers(
    mta: str, original_sender: str, subject: str, now: datetime, boundary: str
) -> bytes:
    """The report's own header section and MIME preamble (RFC 3462 multipart/report).

    Auto-Submitted (RFC 3834) keeps vacation responders and other robots from answering it.
    """
    message_id = f"<{now.strftime('%Y%m%d%H%M%S')}.{uuid.uuid4().hex}@{mta}>"
    top = [
        f"From: Mail Delivery System <MAILER-DAEMON@{mta}>",
        f"To: <{_clean(original_sender)}>",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: {message_id}",
        "MIME-Version: 1.0",
        "Auto-Submitted: auto-replied",
        f'Content-Type: multipart/report; report-type=delivery-status;\n boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
    ]
    return "\n".join(top).encode("utf-8") + b"\n"


def _assemble(
    top: bytes,
    boundary: str,
    human: tuple[bytes, str],
    status: tuple[bytes, str],
    headers: tuple[bytes, str],
) -> bytes:
    """The three report parts in RFC 3464 order: notification, delivery report, headers.

    ``human``, ``status`` and ``headers`` are (body, content-transfer-encoding or content
    type) pairs; the order matters because readers take the second part as the report.
    """
    human_body, human_cte = human
    status_body, status_type = status
    headers_part, headers_type = headers
    out = bytearray(top)
    b = boundary.encode("ascii")
    out += b"--" + b + b"\n"
    out += b"Content-Description: Notification\n"
    out += b"Content-Type: text/plain; charset=utf-8\n"
    out += b"Content-Transfer-Encoding: " + human_cte.encode() + b"\n\n"
    out += human_body if human_body.endswith(b"\n") else human_body + b"\n"
    out += b"\n--" + b + b"\n"
    out += b"Content-Description: Delivery report\n"
    out += b"Content-Type: " + status_type.encode() + b"\n\n"
    out += status_body
    out += b"\n--" + b + b"\n"
    out += b"Content-Description: Undelivered message headers\n"
    out += b"Content-Type: " + headers_type.encode() + b"\n\n"
    out += headers_part
    out += b"\n--" + b + b"--\n"
    return bytes(out)


def build_dsn(
    *,
    reporting_mta: str,
    original_sender: str,
    recipients: Sequence[RecipientStatus],
    original_message_path: str | os.PathLike[str],
    arrival_date: datetime,
    envelope_id: str | None = None,
    now: datetime | None = None,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> bytes:
    """A complete DSN message as LF-ended bytes, ready to be spooled.

    The caller must queue it with the **null envelope sender** ``<>`` (RFC 5321 4.5.5, RFC 3464
    2), to ``original_sender``, so that it can itself never bounce. Raises ValueError when
    ``original_sender`` is empty: a bounce is never bounced.

    If every recipient's action is "delayed" this is the delay warning ("Delivery delayed");
    otherwise it is a failure report. Only the original's header section (at most
    ``max_header_bytes``) is returned, as ``text/rfc822-headers``.
    """
    _check_recipients(original_sender, recipients)
    now = now or datetime.now(UTC)
    mta = _clean(reporting_mta, 200)
    delayed_only = all(r.action == "delayed" for r in recipients)
    international = not original_sender.isascii() or any(
        not r.recipient.isascii() for r in recipients
    )

    boundary = f"=_dsn_{uuid.uuid4().hex}"
    headers_part = read_header_block(original_message_path, max_header_bytes)
    while boundary.encode() in headers_part:  # practically never; cheap to be sure
        boundary = f"=_dsn_{uuid.uuid4().hex}"

    subject, human_body, human_cte = _human_part(mta, recipients, delayed_only)
    status_body = _status_part(mta, recipients, arrival_date, envelope_id)
    # RFC 6533: internationalized reports use the "global" types.
    status_type = "message/global-delivery-status" if international else "message/delivery-status"
    headers_type = (
        "message/global-headers"
        if international or not headers_part.isascii()
        else "text/rfc822-headers"
    )
    top = _top_headers(mta, original_sender, subject, now, boundary)
    return _assemble(
        top,
        boundary,
        (human_body, human_cte),
        (status_body, status_type),
        (headers_part, headers_type),
    )
