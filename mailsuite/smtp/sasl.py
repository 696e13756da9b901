"""SASL PLAIN (RFC 4616) and LOGIN for SMTP AUTH (RFC 4954): pure decoding, no I/O.

Our own code (twisted.mail's ``smtp.PLAINAuthenticator``/``LOGINCredentials`` are tied to its
unsafe ESMTP server).  :class:`Exchange` is the server side of one AUTH exchange as a small
state machine: the SMTP adapter feeds it the AUTH arguments and each continuation line and
acts on the :data:`Step` it returns (send a ``334`` challenge, check credentials, or refuse).
Nothing here logs: the lines carry passwords.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

#: Mechanisms in the order they are advertised (``250-AUTH PLAIN LOGIN``).
MECHANISMS = ("PLAIN", "LOGIN")

#: RFC 4616 section 2: authcid and passwd are 1..255 octets (authzid up to 255 too).
MAX_FIELD = 255
#: Longest base64 response we decode: a PLAIN message of 3 * 255 + 2 octets is 1024 chars.
MAX_RESPONSE = 1024

#: The LOGIN mechanism's prompts (draft-murchison-sasl-login), base64 of "Username:" etc.
LOGIN_USERNAME = base64.b64encode(b"Username:").decode("ascii")
LOGIN_PASSWORD = base64.b64encode(b"Password:").decode("ascii")

_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


class SASLError(ValueError):
    """The client's data is malformed.  ``str(error)`` is safe to send (no client data)."""


class Cancelled(Exception):
    """The client answered ``*`` (RFC 4954 section 4)."""


def decode_response(text: str) -> bytes:
    """Strict base64 of one client response (RFC 4954 section 4).

    ``"="`` is the empty initial response; ``"*"`` raises :class:`Cancelled`.  Whitespace,
    missing padding or characters outside the base64 alphabet are errors.
    """
    if text == "*":
        raise Cancelled()
    if text == "=":
        return b""
    if len(text) > MAX_RESPONSE:
        raise SASLError("Response too long")
    if len(text) % 4 or not _BASE64.fullmatch(text):
        raise SASLError("Invalid base64 data")
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError):
        raise SASLError("Invalid base64 data") from None
    if base64.b64encode(data).decode("ascii") != text:  # non-zero padding bits: not canonical
        raise SASLError("Invalid base64 data")
    return data


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLError(f"{what} is not valid UTF-8") from None


@dataclass(frozen=True)
class Credentials:
    """What the client presented.  ``authzid`` is empty unless it asked to act as another."""

    authcid: str
    password: str
    authzid: str = ""

    def __repr__(self) -> str:  # never print the password, even in a traceback
        return f"Credentials(authcid={self.authcid!r}, authzid={self.authzid!r})"


def parse_plain(message: bytes) -> Credentials:
    """RFC 4616 section 2: ``[authzid] NUL authcid NUL passwd``, UTF-8, no other NULs."""
    parts = message.split(b"\x00")
    if len(parts) != 3:
        raise SASLError("PLAIN needs authzid NUL authcid NUL password")
    authzid, authcid, passwd = parts
    if not authcid or not passwd:
        raise SASLError("PLAIN needs a user name and a password")
    if len(authzid) > MAX_FIELD or len(authcid) > MAX_FIELD or len(passwd) > MAX_FIELD:
        raise SASLError("PLAIN field too long")
    return Credentials(
        authcid=_utf8(authcid, "User name"),
        password=_utf8(passwd, "Password"),
        authzid=_utf8(authzid, "Authorization identity"),
    )


def encode_plain(authcid: str, password: str, authzid: str = "") -> str:
    """The client side (for tests and the outbound client): base64 of the PLAIN message."""
    raw = f"{authzid}\x00{authcid}\x00{password}".encode()
    return base64.b64encode(raw).decode("ascii")


def _login_field(data: bytes, what: str) -> str:
    if not data:
        raise SASLError(f"Empty {what.lower()}")
    if len(data) > MAX_FIELD or b"\x00" in data:
        raise SASLError(f"Invalid {what.lower()}")
    return _utf8(data, what)


# ----------------------------------------------------------------------------- exchange


@dataclass(frozen=True)
class Challenge:
    """Send ``334 <text>`` and feed the client's next line to :meth:`Exchange.respond`."""

    text: str


@dataclass(frozen=True)
class Done:
    """The exchange is complete: check these credentials."""

    credentials: Credentials


@dataclass(frozen=True)
class Failed:
    """Refuse: ``kind`` is ``"cancelled"``, ``"syntax"`` (bad base64/format) or
    ``"mechanism"`` (unknown mechanism).  ``text`` is safe to send."""

    kind: str
    text: str


Step = Challenge | Done | Failed


class Exchange:
    """One server-side AUTH exchange for PLAIN or LOGIN."""

    def __init__(self) -> None:
        self.mechanism: str | None = None
        self._username: str | None = None
        self.finished = False

    def start(self, mechanism: str, initial: str | None) -> Step:
        """``AUTH <mechanism> [initial-response]``."""
        mech = mechanism.upper()
        if mech not in MECHANISMS:
            return self._finish(Failed("mechanism", "Unrecognized authentication mechanism"))
        self.mechanism = mech
        if mech == "PLAIN":
            if initial is None:
                return Challenge("")  # RFC 4954 section 4: empty challenge "334 "
            return self._plain(initial)
        # LOGIN: an initial response, if any, is the user name (as Thunderbird/Outlook send).
        if initial is None:
            return Challenge(LOGIN_USERNAME)
        return self._login_username(initial)

    def respond(self, line: str) -> Step:
        """A continuation line from the client."""
        if self.finished or self.mechanism is None:
            raise RuntimeError("no exchange in progress")
        if self.mechanism == "PLAIN":
            return self._plain(line)
        if self._username is None:
            return self._login_username(line)
        try:
            password = _login_field(decode_response(line), "Password")
        except Cancelled:
            return self._finish(Failed("cancelled", "Authentication cancelled"))
        except SASLError as e:
            return self._finish(Failed("syntax", str(e)))
        return self._finish(Done(Credentials(self._username, password)))

    def _plain(self, text: str) -> Step:
        try:
            return self._finish(Done(parse_plain(decode_response(text))))
        except Cancelled:
            return self._finish(Failed("cancelled", "Authentication cancelled"))
        except SASLError as e:
            return self._finish(Failed("syntax", str(e)))

    def _login_username(self, text: str) -> Step:
        try:
            self._username = _login_field(decode_response(text), "User name")
        except Cancelled:
            return self._finish(Failed("cancelled", "Authentication cancelled"))
        except SASLError as e:
            return self._finish(Failed("syntax", str(e)))
        return Challenge(LOGIN_PASSWORD)

    def _finish(self, step: Step) -> Step:
        self.finished = True
        self._username = None
        return step
