"""ENVELOPE (RFC 3501 7.4.2): header fields to the wire form, and IMAP strings.  Our own code.

Apart from :mod:`mailsuite.imap.message` because a first ``FETCH 1:* ENVELOPE`` of a big folder
runs it once per message: the fields come from one regex search of the header (not a parse of
every field), and address lists in their plain forms skip the RFC 5322 tokenizer
(:func:`mailsuite.imap.address.simple_address_list`); both give what the full parse gives.
"""

from __future__ import annotations

import functools
import re

from mailsuite.imap.address import parse_address_list, simple_address_list

# -- strings on the wire --------------------------------------------------------------------


#: what a quoted string may carry: 7-bit, no NUL, CR or LF (RFC 3501 9, ``QUOTED-CHAR``)
_QUOTABLE = re.compile(rb"[\x01-\x09\x0b\x0c\x0e-\x7f]*")
#: the same without ``"`` and ``\``: quoted as it is, nothing to escape (the common case)
_QUOTABLE_AS_IS = re.compile(rb"[\x01-\x09\x0b\x0c\x0e-\x21\x23-\x5b\x5d-\x7f]*")


def nstring(value: bytes | None) -> bytes:
    """NIL, a quoted string, or a literal when CR/LF/NUL/8-bit make quoting impossible."""
    if value is None:
        return b"NIL"
    if _QUOTABLE_AS_IS.fullmatch(value):
        return b'"%s"' % value
    if _QUOTABLE.fullmatch(value):
        return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    value = value.replace(b"\x00", b"")
    return b"{%d}\r\n" % len(value) + value


def trim(value: bytes | None) -> bytes | None:
    return None if value is None else value.strip(b" \t")


# -- RFC 5322 addresses for ENVELOPE ----------------------------------------------------------


def latin1(text: str | None) -> bytes | None:
    return None if text is None else text.encode("latin-1", "replace")


def _addr(name: str | None, route: str | None, mailbox: str, host: str) -> bytes:
    return b"(%s %s %s %s)" % (
        nstring(latin1(name) if name else None),
        nstring(latin1(route) if route else None),
        nstring(latin1(mailbox if mailbox else "MISSING_MAILBOX")),
        nstring(latin1(host if host else "MISSING_DOMAIN")),
    )


def _address_list(value: bytes | None) -> bytes:
    """ENVELOPE's list of address structures for a field (RFC 3501 7.4.2), or NIL."""
    if value is None:
        return b"NIL"
    return _address_list_of(value)


@functools.lru_cache(maxsize=4096)
def _address_list_of(value: bytes) -> bytes:
    """:func:`_address_list` of a value, remembered: a folder's From, To and Cc values repeat
    (the user's own address, correspondents, lists), and a first FETCH ENVELOPE of a big
    folder asks for each several times.  At most 4,096 values (a few hundred KiB)."""
    simple = simple_address_list(value)
    if simple is not None:  # the common case, without the tokenizer (same answer)
        if not simple:
            return b"NIL"
        return (
            b"("
            + b"".join(
                b"(%s NIL %s %s)" % (nstring(name), nstring(mailbox), nstring(host))
                for name, mailbox, host in simple
            )
            + b")"
        )
    return _address_list_parsed(value)


def _address_list_parsed(value: bytes) -> bytes:
    """:func:`_address_list` through the full RFC 5322 parser (any value)."""
    out: list[bytes] = []
    for a in parse_address_list(value.decode("latin-1")):
        if a.is_group_end:
            out.append(b"(NIL NIL NIL NIL)")
        elif a.is_group_start:
            out.append(b"(NIL NIL %s NIL)" % nstring(latin1(a.mailbox)))
        elif a.null and not a.name:
            out.append(b'(NIL NIL "" "")')
        else:
            out.append(_addr(a.name, a.route, a.mailbox or "", a.host or ""))
    if not out:
        return b"NIL"
    return b"(" + b"".join(out) + b")"


#: the header fields ENVELOPE is made of, at the start of a line, with their folded lines
_ENVELOPE_FIELD = re.compile(
    rb"^(date|subject|from|sender|reply-to|to|cc|bcc|in-reply-to|message-id)[ \t]*:"
    rb"(.*(?:\n[ \t].*)*)",
    re.MULTILINE | re.IGNORECASE,
)
_LINE_END = re.compile(rb"\r?\n")
#: the field names as most mail spells them, to their key (others are lowered and decoded)
_SPELLED = (b"Date", b"Subject", b"From", b"Sender", b"Reply-To", b"To", b"Cc", b"Bcc")
_NAMES = {
    spelled: spelled.lower().decode("ascii")
    for name in (*_SPELLED, b"In-Reply-To", b"Message-ID", b"Message-Id")
    for spelled in (name, name.lower())
}


def envelope_fields(raw: bytes, fields_end: int) -> dict[str, bytes]:
    """The first value of each ENVELOPE field in ``raw[:fields_end]``, unfolded exactly as
    :func:`_parse_fields` unfolds it, found by one regex search instead of a Python loop over
    every header line (a first FETCH ENVELOPE runs this for each message of the folder)."""
    out: dict[str, bytes] = {}
    for field, value in _ENVELOPE_FIELD.findall(raw, 0, fields_end):
        name = _NAMES.get(field) or field.lower().decode("ascii")
        if name not in out:
            if value.endswith(b"\r"):
                value = value[:-1]
            out[name] = _LINE_END.sub(b"", value) if b"\n" in value else value
    return out


def envelope_from(first: dict[str, bytes]) -> bytes:
    """ENVELOPE (RFC 3501 7.4.2) from the first value of each header field, by name."""
    get = first.get

    from_ = get("from")
    sender = get("sender")
    reply_to = get("reply-to")
    from_list = _address_list(from_)
    # RFC 3501 7.4.2: absent or empty Sender/Reply-To take the From value.
    sender_list = _address_list(sender) if sender and sender.strip() else b"NIL"
    reply_list = _address_list(reply_to) if reply_to and reply_to.strip() else b"NIL"
    if sender_list == b"NIL":
        sender_list = from_list
    if reply_list == b"NIL":
        reply_list = from_list
    return b"(%s %s %s %s %s %s %s %s %s %s)" % (
        nstring(trim(get("date"))),
        nstring(trim(get("subject"))),
        from_list,
        sender_list,
        reply_list,
        _address_list(get("to")),
        _address_list(get("cc")),
        _address_list(get("bcc")),
        nstring(trim(get("in-reply-to"))),
        nstring(trim(get("message-id"))),
    )
