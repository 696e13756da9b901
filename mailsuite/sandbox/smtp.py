"""The sandbox's SMTP profile: take everything, keep each transaction once, faults on demand.

A :class:`~mailsuite.smtp.policy.Profile` of the SMTP server (:mod:`mailsuite.smtp.session`
and :mod:`mailsuite.smtp.protocol` are the same as for the MX and submission listeners):

* AUTH PLAIN/LOGIN is offered and optional; any user name and password are accepted (the
  runtime's authenticator is :class:`mailsuite.sandbox.inboxes.AnyPassword`), in clear text
  too unless ``[auth] allow_plaintext = false``;
* every recipient, in any domain, goes to one place: the inbox of the session's AUTH user
  (``default`` without AUTH), so a transaction is stored once whatever its recipients, and
  nothing is ever relayed or queued; no sender binding, no per-address connection limit;
* at the end of the data the envelope is written into the message as Mailpit does: recipients
  that are not in To/Cc/Bcc are added to a ``Bcc:`` field, and a message without
  ``Message-ID:`` gets one (``Return-Path:`` is written by delivery);
* fault recipients make the server misbehave on purpose (:func:`fault_of`).

Fault recipients (local part, any case, any domain):

=====================  ======================================================================
``reject-NNN``         RCPT answered NNN (400-599), e.g. ``reject-550`` -> 550 5.1.1
``defer-NNN``          the same (the name says what a 4xx means), e.g. ``defer-451``
``fail-NNN``           RCPT accepted; the end of DATA answered NNN; nothing is kept
``drop``               the connection is closed after the end of DATA with no reply
``slow-N``             the reply to the end of DATA comes N seconds late (1-300)
=====================  ======================================================================

A ``421`` reply closes the connection after it (RFC 5321 3.8).  The faults of the data stage
apply to the whole transaction: ``drop`` before ``fail`` before ``slow``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import getaddresses
from typing import Any

from twisted.internet import interfaces, task

from mailsuite.directory import Resolution
from mailsuite.imap.message import header_fields
from mailsuite.runtime import Runtime
from mailsuite.sandbox.inboxes import SandboxDirectory, inbox_name
from mailsuite.smtp.policy import (
    ACCEPT,
    Check,
    Facts,
    Policy,
    Profile,
    ReceivedMessage,
    Recipient,
    RecipientLimit,
    Verdict,
    refuse,
)
from mailsuite.smtp.protocol import SMTPFactory
from mailsuite.smtp.replies import Reply

MAX_SLOW = 300

_FAULT = re.compile(r"(reject|defer|fail)-([45][0-5]\d)|(drop)|slow-(\d{1,3})")

#: Enhanced status codes (RFC 3463) for the common fault codes; others get X.0.0.
_ENHANCED = {
    421: "4.3.2",
    450: "4.2.1",
    451: "4.3.0",
    452: "4.2.2",
    455: "4.5.4",
    550: "5.1.1",
    551: "5.1.6",
    552: "5.2.2",
    553: "5.1.3",
    554: "5.7.1",
    555: "5.5.4",
}


@dataclass(frozen=True)
class Fault:
    """A fault recipient: ``kind`` is "rcpt", "fail", "drop" or "slow"; ``code`` the reply
    code (rcpt, fail); ``seconds`` the delay (slow)."""

    kind: str
    code: int = 0
    seconds: int = 0
    name: str = ""

    def reply(self) -> Reply:
        enhanced = _ENHANCED.get(self.code, f"{self.code // 100}.0.0")
        what = "Requested action not taken" if self.code >= 500 else "Try again later"
        return Reply(self.code, enhanced, f"{what} (sandbox fault {self.name})")


def fault_of(address: str) -> Fault | None:
    """The fault an address asks for, or None for an ordinary recipient."""
    local = address.rpartition("@")[0].lower()
    m = _FAULT.fullmatch(local)
    if m is None:
        return None
    if m.group(3):
        return Fault("drop", name=local)
    if m.group(4):
        seconds = int(m.group(4))
        return Fault("slow", seconds=seconds, name=local) if 0 < seconds <= MAX_SLOW else None
    kind = "fail" if m.group(1) == "fail" else "rcpt"
    return Fault(kind, code=int(m.group(2)), name=local)


class RecipientFaults(Check):
    """``reject-NNN`` and ``defer-NNN`` recipients are refused at RCPT."""

    def __init__(self, refused: Callable[[], None]) -> None:
        self.refused = refused

    def rcpt(self, facts: Facts, rcpt: Recipient) -> Verdict:
        fault = fault_of(rcpt.address)
        if fault is None or fault.kind != "rcpt":
            return ACCEPT
        self.refused()
        return refuse(fault.reply(), f"sandbox fault {fault.name} for <{rcpt.address}>")


class DataFaults(Check):
    """``drop``, ``fail-NNN`` and ``slow-N`` recipients act at the end of the data."""

    def __init__(
        self, sleep: Callable[[float], Awaitable[object]], refused: Callable[[], None]
    ) -> None:
        self.sleep = sleep
        self.refused = refused

    async def end_of_data(self, facts: Facts, message: ReceivedMessage) -> Verdict:
        faults = [f for f in map(fault_of, message.recipients) if f is not None]
        for kind in ("drop", "fail"):
            for fault in faults:
                if fault.kind == kind:
                    self.refused()
                    if kind == "drop":
                        return Verdict(disconnect=True, reason=f"sandbox fault {fault.name}")
                    return refuse(fault.reply(), f"sandbox fault {fault.name}")
        delay = max((f.seconds for f in faults if f.kind == "slow"), default=0)
        if delay:
            await self.sleep(delay)
        return ACCEPT


class EnvelopeFields(Check):
    """Keep the envelope with the message, as Mailpit does: recipients missing from
    To/Cc/Bcc go into ``Bcc:`` (one field, merged with an existing one), and a message without
    ``Message-ID:`` gets one.  Counts the capture for ``/api/v1/info``."""

    def __init__(self, hostname: str, captured: Callable[[int], None]) -> None:
        self.hostname = hostname
        self.captured = captured

    async def end_of_data(self, facts: Facts, message: ReceivedMessage) -> Verdict:
        fields = header_fields(message.headers)
        listed: set[str] = set()
        bcc: list[str] = []
        for name, value in fields:
            if name in ("to", "cc", "bcc"):
                text = value.decode("utf-8", "replace")
                listed.update(a.lower() for _, a in getaddresses([text]) if a)
                if name == "bcc" and text.strip():
                    bcc.append(text.strip())
        missing = [r for r in message.recipients if r.lower() not in listed]
        prepend: list[str] = []
        remove: list[bytes] = []
        if missing:
            if bcc:
                remove.extend(_raw_fields(message.headers, b"bcc"))
            prepend.append("Bcc: " + ", ".join([*bcc, *missing]))
        if not any(name == "message-id" for name, _ in fields):
            prepend.append(f"Message-ID: <{uuid.uuid4().hex}@{self.hostname}>")
        self.captured(message.size)
        return Verdict(prepend=tuple(prepend), remove=tuple(remove))


def _raw_fields(headers: bytes, lname: bytes) -> list[bytes]:
    """The fields called ``lname`` exactly as they appear (folded lines included)."""
    out: list[bytes] = []
    current: list[bytes] | None = None
    for line in headers.split(b"\n"):
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                current.append(line)
            continue
        if current is not None:
            out.append(b"\n".join(current))
            current = None
        if line.split(b":", 1)[0].strip().lower() == lname:
            current = [line]
    if current is not None:
        out.append(b"\n".join(current))
    return out


def sandbox_profile(
    directory: SandboxDirectory,
    sandbox: Any,
    hostname: str,
    max_recipients: int,
    sleep: Callable[[float], Awaitable[object]],
) -> Profile:
    """The sandbox's SMTP profile (see the module docstring)."""

    def route(facts: Facts, rcpt: Recipient) -> Resolution:
        name = inbox_name(facts.user) or "default"
        return Resolution(local=[directory.box(name)])

    checks: list[Check] = [
        RecipientLimit(max_recipients),
        RecipientFaults(sandbox.refused),
        DataFaults(sleep, sandbox.refused),
        EnvelopeFields(hostname, sandbox.captured),
    ]

    return Profile(
        "sandbox",
        auth=True,
        requires_auth=False,
        policy=Policy(checks),
        route=route,
        limit_per_ip=False,
    )


def sandbox_factory(runtime: Runtime, implicit_tls: bool) -> interfaces.IProtocolFactory:
    """Every SMTP listener in sandbox mode (smtp, submission, submissions)."""
    reactor = runtime.reactor

    def sleep(seconds: float) -> Awaitable[object]:
        return task.deferLater(reactor, seconds, lambda: None)

    directory = runtime.directory
    assert isinstance(directory, SandboxDirectory)
    config = runtime.config
    profile = sandbox_profile(
        directory, runtime.sandbox, config.hostname, config.smtp.max_recipients, sleep
    )
    return SMTPFactory(runtime, profile, implicit_tls)
