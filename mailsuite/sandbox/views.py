"""Views of one captured message, built in the worker thread from its file: Mailpit's
``Message`` object, its header fields, one part, its HTML made safe to show, and the copy that
a release sends.

The HTML view is for the page's sandboxed iframe (and Mailpit's ``/view/{ID}.html``): images
the message carries (``cid:`` references) become ``data:`` URLs so nothing has to be fetched,
links open in a new tab, and :func:`html_policy` gives the Content-Security-Policy that keeps
remote content (images, style sheets, fonts, anything a script could fetch) blocked unless
the reader asks for it.
"""

from __future__ import annotations

import base64
import email.utils
import re
import uuid
from typing import Any

from mailsuite.imap.message import split_header, to_crlf
from mailsuite.sandbox import mime
from mailsuite.sandbox.catalog import Located

#: Inline images put into the HTML as ``data:`` URLs, in total (bigger ones are left out).
MAX_INLINE_DATA = 8 * 1024 * 1024

#: Header fields that only describe the capture (our delivery trace), left out of a release.
_TRACE_FIELDS = ("return-path", "delivered-to")


def raw_crlf(located: Located) -> bytes:
    """The message as received on the wire (CRLF line ends), with our trace fields."""
    return to_crlf(located.path.read_bytes())


def message_json(located: Located) -> dict[str, Any]:
    """Mailpit's ``Message`` (plus ``Inbox``, ``Read``, ``Created``, ``Links``, ``Codes``)."""
    raw = located.path.read_bytes()
    mail = mime.parse(raw)
    s = located.summary
    senders = mail.addresses("From")
    sender: dict[str, str] | None = (
        senders[0]
        if senders
        else ({"Name": mail.decoded("From"), "Address": ""} if mail.header("From") else None)
    )
    return_path = located.return_path or (sender["Address"] if sender else "")
    date_text = mail.header("Date")
    date = s["Created"]
    if date_text:
        try:
            parsed = email.utils.parsedate_to_datetime(date_text)
            date = parsed.isoformat().replace("+00:00", "Z")
        except (TypeError, ValueError, IndexError):
            pass
    unsubscribe = mail.header("List-Unsubscribe") or ""
    return {
        "ID": s["ID"],
        "MessageID": s["MessageID"],
        "From": sender,
        "To": mail.addresses("To"),
        "Cc": mail.addresses("Cc"),
        "Bcc": mail.addresses("Bcc"),
        "ReplyTo": mail.addresses("Reply-To"),
        "ReturnPath": return_path,
        "Subject": s["Subject"],
        "ListUnsubscribe": {
            "Header": unsubscribe,
            "Links": re.findall(r"<([^<>\s]+)>", unsubscribe),
            "Errors": "",
            "HeaderPost": mail.header("List-Unsubscribe-Post") or "",
        },
        "Date": date,
        "Created": s["Created"],
        "Tags": s["Tags"],
        "Username": s["Username"],
        "Text": mail.text,
        "HTML": mail.html,
        "Size": s["Size"],
        "Inline": [p.summary() for p in mail.inline],
        "Attachments": [p.summary() for p in mail.attachments],
        "Inbox": s["Inbox"],
        "Read": True,  # reading it marks it read, as in Mailpit
        "Links": s["Links"],
        "Codes": s["Codes"],
    }


def headers_json(located: Located) -> dict[str, list[str]]:
    """Mailpit's headers object: canonical field name -> values in order, names sorted."""
    out: dict[str, list[str]] = {}
    for name, value in mime.top_fields(located.path.read_bytes()):
        out.setdefault(mime.canonical_key(name), []).append(value)
    return dict(sorted(out.items()))


def part(located: Located, part_id: str) -> mime.Part | None:
    return mime.parse(located.path.read_bytes()).parts.get(part_id)


def text_view(located: Located) -> str | None:
    mail = mime.parse(located.path.read_bytes())
    return mail.text if mail.text or not mail.html else None


def html_view(located: Located) -> str | None:
    """The HTML part for the iframe, or None when the message has none."""
    mail = mime.parse(located.path.read_bytes())
    if not mail.html:
        return None
    budget = [MAX_INLINE_DATA]
    by_cid = {p.content_id.lower(): p for p in (*mail.inline, *mail.attachments) if p.content_id}

    def inline_image(m: re.Match[str]) -> str:
        found = by_cid.get(m.group(2).lower())
        if (
            found is None
            or len(found.content) > budget[0]
            or not found.content_type.startswith("image/")
        ):
            return m.group(1) + "about:blank"
        budget[0] -= len(found.content)
        data = base64.b64encode(found.content).decode("ascii")
        return f"{m.group(1)}data:{found.content_type};base64,{data}"

    markup = re.sub(r"""(=\s*["']?)cid:([^"'\s>]+)""", inline_image, mail.html, flags=re.IGNORECASE)
    # Links open in a new tab (the iframe may not navigate itself away).
    return '<base target="_blank">\n' + markup


def html_policy(remote: bool) -> str:
    """The Content-Security-Policy of the HTML view.  ``sandbox`` (without
    ``allow-scripts`` or ``allow-same-origin``) makes the document an opaque origin that runs
    no script and cannot read the API; without ``remote`` nothing outside the message loads."""
    fetch = " https: http:" if remote else ""
    return (
        "sandbox allow-popups allow-popups-to-escape-sandbox; default-src 'none'; "
        f"img-src data:{fetch}; style-src 'unsafe-inline'{fetch}; font-src data:{fetch}; "
        f"media-src data:{fetch}; form-action 'none'; frame-ancestors 'self'"
    )


def release_copy(located: Located) -> tuple[bytes, str]:
    """The message a release sends (LF line ends, as the queue stores messages) and its
    envelope sender: our capture trace (Return-Path, Delivered-To) and Bcc left out, a new
    Date and Message-ID (Mailpit does the same), sent from Sender: or From:."""
    raw = located.path.read_bytes()
    fields_end, body_start = split_header(raw)
    head = raw[:fields_end]
    kept: list[bytes] = []
    drop = False
    for line in head.split(b"\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            if not drop:
                kept.append(line)
            continue
        name = line.split(b":", 1)[0].strip().lower().decode("latin-1")
        drop = name in (*_TRACE_FIELDS, "bcc", "date", "message-id")
        if not drop:
            kept.append(line)
    mail = mime.parse(raw)
    senders = mail.addresses("Sender") or mail.addresses("From")
    sender = senders[0]["Address"] if senders else ""
    domain = sender.rpartition("@")[2] or "mailsuite.invalid"
    fresh = [
        f"Date: {email.utils.formatdate(localtime=True)}".encode(),
        f"Message-ID: <{uuid.uuid4()}@{domain}>".encode(),
    ]
    return b"\n".join([*kept, *fresh]) + b"\n\n" + raw[body_start:], sender
