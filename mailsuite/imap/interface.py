"""What the IMAP session core asks of the adapter that runs it: the typed interface between
:mod:`mailsuite.imap.session` (no Twisted) and :mod:`mailsuite.imap.server` (the reactor).

The core's async shape: a command either finishes at once (a plain method) or is a coroutine
(``async def``) that ``await``s what it cannot do itself -- a blocking store call run in a
worker thread (:attr:`Services.run_blocking`), a password check (:attr:`Services.login`),
the client's next line (:meth:`Connection.next_line`: AUTHENTICATE, IDLE), room in the
output buffer between the pieces of a long answer (:meth:`Connection.writable`, through
:func:`mailsuite.pacing.paced`: a client that does not read holds one piece of it) or a
turn of the event loop between SEARCH chunks (:attr:`Services.next_turn`).  ``Session.run``
returns the coroutine, and the adapter drives it: ``Deferred.fromCoroutine`` in the server,
where every awaitable handed to the core is a Deferred; any other loop in a test (asyncio in
``tests/unit/test_imap_session.py``).  Coroutines read as straight-line code (the command's
steps in order, ``try/finally`` for what must be undone), are typed end to end (``await
run_blocking(f, x)`` has ``f``'s return type), and keep the core free of any event loop.

Periodic work (IDLE polling for other programs' changes) is :attr:`Services.every`: start a
timer, get back the function that stops it.  Logging is a :class:`mailsuite.corelog.Log`.
Everything here is a ``typing.Protocol`` or plain data: the adapter provides it without
subclassing, and a test can fake it with a few lines.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, Protocol, TypeVar

from mailsuite.corelog import Log
from mailsuite.login import LoginResult
from mailsuite.store.events import ChangeHub
from mailsuite.store.mailbox import FolderRegistry

P = ParamSpec("P")
T = TypeVar("T")


class ConnectionGone(Exception):
    """Raised into a command waiting on the client (:meth:`Connection.next_line`) when the
    connection is lost: the command ends quietly (there is nobody to answer)."""


class Connection(Protocol):
    """One client connection, as the session sees it (``IMAPProtocol`` provides it)."""

    @property
    def tls(self) -> bool:
        """TLS is active (implicit on 993, or after STARTTLS)."""
        ...

    @property
    def peer_ip(self) -> str: ...

    def write(self, data: bytes) -> None:
        """Queue ``data`` for the client (dropped once the connection is closing)."""
        ...

    def writable(self) -> Awaitable[None]:
        """Completes when the client has read enough that more output may be queued; when
        it may already, after one turn of the event loop (so other connections run between
        the batches of a long answer)."""
        ...

    def gone(self) -> bool:
        """The connection is closed or closing: a command producing a long answer stops
        (what it would still write goes nowhere)."""
        ...

    def next_line(self, prompt: bytes) -> Awaitable[bytes]:
        """Send the continuation ``prompt`` and complete with the client's next line, input
        flowing meanwhile (AUTHENTICATE's response, IDLE's DONE).  Fails with
        :class:`ConnectionGone` if the connection ends first."""
        ...

    def start_tls(self) -> None:
        """Start the TLS handshake; what the client pipelined after STARTTLS is dropped."""
        ...

    def close(self) -> None:
        """Close once what was written has been sent."""
        ...

    def admit_login(self, user: str) -> str | None:
        """Count the connection as ``user``'s, or say why it may not log in here."""
        ...

    def authenticated(self) -> None:
        """The session logged in (the login deadline no longer applies)."""
        ...


class Runner(Protocol):
    """Run a blocking function (store work: file copies, renames, fsync) away from the event
    loop; the result arrives through the awaitable."""

    def __call__(
        self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> Awaitable[T]: ...


A = TypeVar("A")


class StagedRunner(Protocol):
    """Run ``fn(report)`` in a worker thread, where ``fn`` may hand over a first result
    before it ends (a cold SELECT's answer, made before the folder's index is built):
    returns ``(first, done)``.  ``first`` completes on the event loop with what ``fn`` passed
    to ``report`` (called at most once, in the worker thread), or with None when ``fn``
    ended without calling it; ``done`` with ``fn``'s result (or failure), always after
    ``first``.  ``fn`` keeps its thread to the end: what it does after ``report`` never
    waits for a free worker (other jobs may be waiting on a lock it holds)."""

    def __call__(
        self, fn: Callable[[Callable[[A], None]], T], /
    ) -> tuple[Awaitable[A | None], Awaitable[T]]: ...


class Login(Protocol):
    """Check a password (``mailsuite.auth.Authenticator.login`` provides it)."""

    def __call__(
        self, username: str, password: str, ip: str, protocol: str, /
    ) -> Awaitable[LoginResult]: ...


@dataclass(frozen=True)
class Limits:
    """The ``[imap]`` / ``[auth]`` settings the session reads."""

    max_literal: int  # bytes; APPENDLIMIT
    allow_plaintext: bool  # LOGIN / AUTHENTICATE without TLS
    tls_available: bool  # a certificate is configured: STARTTLS is offered


@dataclass(frozen=True)
class Services:
    """What all sessions of one listener share: the store, logins and the event loop's
    services, built by the adapter's factory from the runtime."""

    registry: FolderRegistry  # the process's open folders (shared with POP3)
    changes: ChangeHub  # tell other sessions a folder changed
    mailbox_root: Callable[[str], Path]  # a user's Maildir++ root
    login: Login
    run_blocking: Runner
    next_turn: Callable[[], Awaitable[None]]  # complete after one turn of the event loop
    every: Callable[[float, Callable[[], None]], Callable[[], None]]  # timer -> its stop
    log: Log
    limits: Limits
    #: a user's quota limits (bytes, messages; 0 = none), from the directory (RFC 9208)
    quota_limits: Callable[[str], tuple[int, int]] = lambda _user: (0, 0)
    #: a worker-thread job with a first result before its end (a cold SELECT answered from
    #: the listing before the index is built); None: such jobs are awaited whole
    run_staged: StagedRunner | None = None
