"""The trace information the SMTP server adds: the transaction id and the Received: field
(RFC 5321 4.4), with every client-supplied part validated or neutralised first (no header
injection through HELO).  Pure functions, no I/O."""

from __future__ import annotations

import itertools
import re
import time
from email.utils import formatdate

from mailsuite.procid import pid

_ids = itertools.count(int(time.time() * 1000) % 1_000_000)
_ID_DIGITS = "0123456789BCDFGHJKLMNPQRSTVWXYZ"
assert len(_ID_DIGITS) == 31
_HELO_ALLOWED = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:[]")
#: a name made of ``_HELO_ALLOWED`` alone (with ``fullmatch``)
_HELO_SAFE = re.compile(r"[a-zA-Z0-9.\-_:\[\]]+")


def new_id() -> str:
    """A short transaction id for logs and the Received field (time, counter, process).
    The base-31 digits by operators, not ``divmod``/``len`` calls: two calls per digit,
    22 of the ~1,360 Python calls a 4 KiB SMTP message cost a worker (bench/smtp_calls.py)."""
    n = (int(time.time()) << 20) | (next(_ids) & 0xFFFFF)
    digits = _ID_DIGITS
    out = ""
    while n:
        out = digits[n % 31] + out
        n //= 31
    return out + f"{pid() % 1000:03d}"


_date: tuple[int, str] = (-1, "")


def received_date(now: float | None = None) -> str:
    """``now`` (default: the current time) as the Received field's date (RFC 5322 3.3, local
    time), made once per second: ``email.utils.formatdate`` builds a datetime and its time
    zone every call, and every message of that second carries the same text anyway."""
    global _date
    second = int(time.time() if now is None else now)
    if _date[0] != second:
        _date = (second, formatdate(second, localtime=True))
    return _date[1]


def clean_helo(name: str) -> str:
    """A HELO argument made safe for a Received field (no spaces, controls or parens).
    A name that is safe already (nearly every one) is checked in one regular-expression
    match instead of character by character."""
    name = name[:255]
    if _HELO_SAFE.fullmatch(name):
        return name
    cleaned = "".join(c if c in _HELO_ALLOWED else "_" for c in name)
    return cleaned or "unknown"


def protocol_name(*, esmtp: bool, smtputf8: bool, tls: bool, authenticated: bool) -> str:
    """The ``with`` keyword: RFC 3848 (ESMTPS, ESMTPA, ESMTPSA), RFC 6531 3.7.3 (UTF8SMTP)."""
    name = "UTF8SMTP" if smtputf8 else "ESMTP" if esmtp else "SMTP"
    if tls:
        name += "S"
    if authenticated:
        name += "A"
    return name


def received_field(
    *,
    helo: str,
    client_ip: str,
    hostname: str,
    protocol: str,
    tls_info: str | None,
    txid: str,
    recipients: list[str],
    date: str,
) -> bytes:
    """RFC 5321 4.4 Received field (LF line ends, as stored).  ``for`` names the recipient
    only when there is exactly one (naming several would disclose the others)."""
    rcpt = f"\n\tfor <{recipients[0]}>" if len(recipients) == 1 else ""
    tls_part = f" ({tls_info})" if tls_info else ""
    header = (
        f"Received: from {helo} ([{client_ip}])\n"
        f"\tby {hostname} (mailsuite) with {protocol}{tls_part}\n"
        f"\tid {txid}{rcpt};\n"
        f"\t{date}\n"
    )
    return header.encode("utf-8")
