"""Plain objects to drive :class:`mailsuite.smtp.session.Session` without sockets: a directory,
a configuration, profiles, and helpers that play the adapter's part."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from mailsuite.config import Config, parse_config
from mailsuite.directory import LocalBox, Resolution
from mailsuite.smtp.policy import Check, Profile, mx_profile, submission_profile
from mailsuite.smtp.replies import Reply
from mailsuite.smtp.session import (
    CheckMessage,
    Deliver,
    OpenMessage,
    Options,
    ReceiveData,
    Session,
    State,
    Step,
)

HOST = "mx.example.test"
DOMAIN = "example.test"


class Directory:
    """Users and aliases of example.test; ``send_as`` extra addresses per user."""

    def __init__(
        self,
        users: Sequence[str] = ("alice@example.test", "bob@example.test"),
        aliases: dict[str, list[str]] | None = None,
        send_as: dict[str, set[str]] | None = None,
    ) -> None:
        self.users = {u.lower() for u in users}
        self.aliases = aliases or {}
        self.send_as = send_as or {}
        self.lookups = 0

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower() == DOMAIN

    def resolve(self, address: str) -> Resolution:
        self.lookups += 1
        addr = address.lower()
        local, _, domain = addr.partition("@")
        base = f"{local.split('+', 1)[0]}@{domain}"
        if base in self.users:
            return Resolution(local=[LocalBox(base, Path("/mail") / base)])
        if addr in self.aliases:
            out = Resolution()
            for target in self.aliases[addr]:
                if target.endswith("@" + DOMAIN):
                    out.local.append(LocalBox(target, Path("/mail") / target))
                else:
                    out.remote.append(target)
            return out
        if local == "postmaster":
            return Resolution(local=[LocalBox(addr, Path("/mail") / addr)])
        return Resolution(unknown=True)

    def domains(self) -> list[str]:
        return [DOMAIN]

    def may_send_as(self, user: str, address: str) -> bool:
        if not address:
            return True
        return address.lower() in {user, *self.send_as.get(user, set())}


def config(**smtp: int) -> Config:
    return parse_config({"server": {"hostname": HOST}, "smtp": dict(smtp)}, None, Path("/none"))


def profile(
    name: str = "mx",
    cfg: Config | None = None,
    directory: Directory | None = None,
    has_queue: bool = True,
    extra: Sequence[Check] = (),
) -> Profile:
    cfg = cfg or config()
    make = mx_profile if name == "mx" else submission_profile
    p = make(cfg, directory or Directory(), lambda: has_queue)
    if extra:
        p = Profile(p.name, p.auth, p.requires_auth, p.policy.with_checks(*extra))
    return p


def session(
    name: str = "mx",
    *,
    tls: bool = False,
    tls_available: bool = True,
    allow_plaintext: bool = False,
    trusted: bool = False,
    directory: Directory | None = None,
    has_queue: bool = True,
    extra: Sequence[Check] = (),
    line_length: int | None = None,
    **smtp: int,
) -> Session:
    """A session on ``name``'s profile; ``smtp`` are ``[smtp]`` settings, ``line_length``
    a line limit below what the configuration allows (to reach it with small data)."""
    cfg = config(**smtp)
    options = Options(
        hostname=HOST,
        max_message_size=cfg.smtp.max_message_size,
        max_line_length=line_length or cfg.smtp.max_line_length,
        max_errors=cfg.smtp.max_errors,
        tls_available=tls_available,
        allow_plaintext=allow_plaintext,
    )
    directory = directory or Directory()
    p = profile(name, cfg, directory, has_queue, extra)
    return Session(options, p, directory, client_ip="192.0.2.7", tls=tls, trusted=trusted)


def cmd(s: Session, line: str | bytes) -> Step:
    return s.line(line if isinstance(line, bytes) else line.encode("utf-8"))


def code(step: Step) -> int:
    assert len(step.replies) == 1, step
    return step.replies[0].code


def status(step: Step) -> str:
    """``"250 2.1.0"``: code and enhanced code of the step's only reply."""
    assert len(step.replies) == 1, step
    reply = step.replies[0]
    return f"{reply.code} {reply.enhanced}" if reply.enhanced else str(reply.code)


def run(awaitable: Awaitable[Any]) -> Any:
    """Drive a coroutine that never really suspends (the fakes here do not)."""
    coro = awaitable if isinstance(awaitable, Coroutine) else _wrap(awaitable)
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("the coroutine suspended")


async def _wrap(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def reader_of(data: bytes) -> Callable[[], Awaitable[bytes]]:
    async def read() -> bytes:
        return data

    return read


def transaction(s: Session, *rcpts: str, sender: str = "a@remote.test") -> None:
    """EHLO (if needed), MAIL, RCPTs, each answered 250."""
    if s.helo is None:
        assert code(cmd(s, "EHLO client.example")) == 250
    assert code(cmd(s, f"MAIL FROM:<{sender}>")) == 250
    for rcpt in rcpts:
        assert code(cmd(s, f"RCPT TO:<{rcpt}>")) == 250


def send_data(s: Session, body: bytes, *, delivered: bool = True) -> Step:
    """DATA, the 354, ``body`` (already CRLF, without the final dot), the end of data and,
    if asked, the checks and delivery: the last step (the final reply)."""
    step = cmd(s, "DATA")
    assert isinstance(step.action, OpenMessage) and not step.replies
    step = s.message_opened(True)
    assert code(step) == 354 and isinstance(step.action, ReceiveData)
    chunk = s.data(body + b".\r\n")
    assert chunk.rest == b""
    step = s.end_of_data(reader_of(body.replace(b"\r\n", b"\n")))
    if isinstance(step.action, CheckMessage):
        verdict = run(s.profile.policy.end_of_data(s, step.action.message))
        step = s.checks_done(verdict)
    if isinstance(step.action, Deliver):
        assert s.state is State.DELIVERING
        step = s.delivery_finished(delivered)
    return step


_LINE = re.compile(rb"([2-5][0-9][0-9])([- ])([^\r\n]*)\r\n")
_ENHANCED = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}\Z")


def check_wire(reply: Reply) -> None:
    """The reply is well-formed on the wire: CRLF-terminated lines of one code, ``-`` on all
    but the last (RFC 5321 4.2.1), the enhanced code on every line and of the reply's class
    (RFC 3463, RFC 2034 3) where there is one; none only where RFC 2034 allows it."""
    wire = reply.encode()
    assert wire.endswith(b"\r\n")
    lines = _LINE.findall(wire)
    assert b"".join(c + sep + text + b"\r\n" for c, sep, text in lines) == wire, wire
    assert {c for c, _, _ in lines} == {str(reply.code).encode()}
    assert [sep for _, sep, _ in lines] == [b"-"] * (len(lines) - 1) + [b" "]
    if reply.enhanced is None:
        # The greeting, EHLO/HELO, 354 and SASL challenges carry none (RFC 2034 3).
        assert reply.code in (220, 250, 354, 334), reply
    else:
        assert _ENHANCED.match(reply.enhanced), reply
        assert reply.enhanced[0] == str(reply.code)[0], reply
        assert all(text.startswith(reply.enhanced.encode() + b" ") for _, _, text in lines)
