"""Parse ``MAIL FROM:<path> params`` and ``RCPT TO:<path> params`` (RFC 5321 4.1.2, 4.1.1.11).

Pure functions.  Addresses that reach a Received header or a file name are validated here,
so nothing a client sends can inject a header line or a path component.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# RFC 5321 4.1.2 atext (RFC 5322 3.2.3), plus UTF-8 with SMTPUTF8 (RFC 6531 3.3).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(\.{_ATEXT}+)*\Z")
_QUOTED = re.compile(r'"([\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"\Z')
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_ESMTP_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+\Z")


class AddressError(ValueError):
    """The path or its parameters are not valid; ``code``/``enhanced`` say how to answer."""

    def __init__(self, message: str, code: int = 501, enhanced: str = "5.1.7") -> None:
        super().__init__(message)
        self.code = code
        self.enhanced = enhanced


@dataclass
class Path:
    address: str  # "" for the null reverse-path
    params: dict[str, str | None] = field(default_factory=dict)


def _valid_domain(domain: str, utf8: bool) -> bool:
    if domain.startswith("[") and domain.endswith("]"):
        return _valid_literal(domain[1:-1])
    if len(domain) > 255 or not domain:
        return False
    if not domain.isascii():
        if not utf8:
            return False
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return False
    return all(_LABEL.match(label) for label in domain.rstrip(".").split("."))


def _valid_literal(text: str) -> bool:
    import ipaddress

    if text.lower().startswith("ipv6:"):
        try:
            ipaddress.IPv6Address(text[5:])
            return True
        except ValueError:
            return False
    try:
        ipaddress.IPv4Address(text)
        return True
    except ValueError:
        return False


def _valid_local(local: str, utf8: bool) -> bool:
    if len(local.encode("utf-8")) > 64:
        return False
    if not local.isascii():
        if not utf8:
            return False
        # RFC 6531 3.3: UTF-8 characters are atext too.
        if any(ord(c) < 0x20 or c in ' "(),:;<>@[\\]' or c == "\x7f" for c in local):
            return False
        return not (local.startswith(".") or local.endswith(".") or ".." in local)
    return bool(_DOT_STRING.match(local) or _QUOTED.match(local))


def valid_mailbox(address: str, utf8: bool) -> bool:
    local, at, domain = address.rpartition("@")
    return bool(at) and _valid_local(local, utf8) and _valid_domain(domain, utf8)


def parse_path(arg: str, prefix: str, allow_null: bool, utf8_ok: bool) -> Path:
    """Parse the argument of MAIL (``prefix="FROM:"``) or RCPT (``"TO:"``).

    ``utf8_ok`` is whether UTF-8 addresses are allowed (the server offers SMTPUTF8; the MAIL
    command must then also carry the SMTPUTF8 parameter, which the caller checks).
    """
    if arg[: len(prefix)].upper() != prefix:
        raise AddressError(f"Syntax: {prefix}<address>", 501, "5.5.4")
    rest = arg[len(prefix) :].lstrip(" ")  # tolerate "MAIL FROM: <a@b>" as most MTAs do
    if not rest.startswith("<"):
        raise AddressError("Address must be enclosed in <>", 501, "5.5.4")
    end = _closing_bracket(rest)
    if end < 0:
        raise AddressError("Missing > after the address", 501, "5.5.4")
    inner, params_text = rest[1:end], rest[end + 1 :]
    if params_text and not params_text.startswith(" "):
        raise AddressError("Expected a space before parameters", 501, "5.5.4")
    # Source routes (RFC 5321 4.1.2 A-d-l) are accepted and ignored (RFC 5321 C).
    if inner.startswith("@") and ":" in inner:
        inner = inner.split(":", 1)[1]
    if inner == "":
        if not allow_null:
            raise AddressError("The null address is not allowed here", 501, "5.1.3")
        address = ""
    else:
        if not valid_mailbox(inner, utf8_ok):
            if not inner.isascii() and not utf8_ok:
                raise AddressError("UTF-8 address without SMTPUTF8", 553, "5.6.7")
            raise AddressError(f"Bad address syntax: {inner[:100]}", 501, "5.1.3")
        address = inner
    return Path(address, parse_params(params_text))


def _closing_bracket(text: str) -> int:
    """Index of the ``>`` that closes the path, skipping quoted local parts."""
    quoted = False
    escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return i
    return -1


def parse_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for item in text.split(" "):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not _ESMTP_KEYWORD.match(key) or (eq and not _ESMTP_VALUE.match(value)):
            raise AddressError(f"Bad parameter syntax: {item[:50]}", 501, "5.5.4")
        key = key.upper()
        if key in params:
            raise AddressError(f"Parameter given twice: {key}", 501, "5.5.4")
        params[key] = value if eq else None
    return params
