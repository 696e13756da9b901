"""Mailbox names on the wire and on disk: modified UTF-7 (RFC 3501 section 5.1.3).

The store owns this encoding: Maildir++ folder directories carry it (``.Entw&APw-rfe``), and
IMAP, Sieve's ``fileinto`` and ``mailsuite import`` all name folders through it.  Our own code,
no Twisted.

``encode`` turns a Unicode mailbox name into its wire/disk form; ``decode`` is strict and raises
``ValueError`` on anything an RFC 3501 encoder could not have produced, so every valid encoded
name has exactly one decoded form and ``encode(decode(x)) == x``.
"""

from __future__ import annotations

import binascii

__all__ = ["decode", "encode"]

_B64 = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,")


def _direct(ch: str) -> bool:
    """Printable US-ASCII other than '&' is represented as itself (RFC 3501 5.1.3)."""
    return "\x20" <= ch <= "\x7e" and ch != "&"


def _b64(chunk: str) -> str:
    data = chunk.encode("utf-16-be")
    return binascii.b2a_base64(data, newline=False).decode("ascii").rstrip("=").replace("/", ",")


def encode(name: str) -> str:
    """Encode a Unicode mailbox name to modified UTF-7."""
    out: list[str] = []
    pending: list[str] = []
    for ch in name:
        if _direct(ch):
            if pending:
                out.append("&" + _b64("".join(pending)) + "-")
                pending.clear()
            out.append(ch)
        elif ch == "&":
            if pending:
                out.append("&" + _b64("".join(pending)) + "-")
                pending.clear()
            out.append("&-")
        else:
            pending.append(ch)
    if pending:
        out.append("&" + _b64("".join(pending)) + "-")
    return "".join(out)


def decode(encoded: str | bytes) -> str:
    """Decode a modified UTF-7 mailbox name; raise ValueError if it is not canonical and valid."""
    if isinstance(encoded, str):
        try:
            data = encoded.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError("mailbox name contains non-ASCII characters") from None
    else:
        data = bytes(encoded)
    out: list[str] = []
    i = 0
    n = len(data)
    last_shift_end = -1
    while i < n:
        c = data[i]
        if c < 0x20 or c > 0x7E:
            raise ValueError(f"invalid octet 0x{c:02x} in mailbox name")
        if c != 0x26:  # '&'
            out.append(chr(c))
            i += 1
            continue
        end = data.find(b"-", i + 1)
        if end < 0:
            raise ValueError("unterminated '&' shift sequence")
        body = data[i + 1 : end]
        if not body:
            out.append("&")
            i = end + 1
            continue
        if last_shift_end == i:
            raise ValueError("adjacent encoded sequences must be merged")
        if any(b not in _B64 for b in body):
            raise ValueError("invalid character in encoded sequence")
        if len(body) % 4 == 1:
            raise ValueError("truncated encoded sequence")
        padded = body.replace(b",", b"/") + b"=" * (-len(body) % 4)
        raw = binascii.a2b_base64(padded)
        # Unused trailing bits must be zero, or two encodings would decode alike.
        if binascii.b2a_base64(raw, newline=False).rstrip(b"=") != body.replace(b",", b"/"):
            raise ValueError("non-zero padding bits in encoded sequence")
        if len(raw) % 2:
            raise ValueError("encoded sequence is not whole UTF-16 code units")
        try:
            text = raw.decode("utf-16-be", errors="strict")
        except UnicodeDecodeError:
            raise ValueError("encoded sequence is not valid UTF-16") from None
        if any(_direct(ch) or ch == "&" for ch in text):
            raise ValueError("printable US-ASCII must not be base64-encoded")
        out.append(text)
        i = end + 1
        last_shift_end = i
    return "".join(out)
