"""The IMAP adapter (``imap/server.py``) over a StringTransport: no sockets, a Clock for the
reactor, the session core behind it.  What the adapter owns is checked here: input paused
while a command waits (pipelined commands answered in order, RFC 3501 5.5), the next line
handed to a command that asked for it (IDLE), and a connection lost in IDLE ending the
command quietly (no traceback in the log, the poller stopped)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from mailsuite.config import parse_config
from mailsuite.deadline import ReadDeadline
from mailsuite.directory import Directory
from mailsuite.imap.server import IMAPFactory, IMAPProtocol
from mailsuite.login import LoginResult, Outcome
from mailsuite.runtime import Runtime
from mailsuite.store.events import ChangeHub

ALICE = "alice@example.test"


class GatedAuth:
    """Logins answered when the test says so (``release``)."""

    def __init__(self) -> None:
        self.pending: list[tuple[defer.Deferred[LoginResult], str]] = []

    def login(
        self, user: str, password: str, ip: str, protocol: str
    ) -> defer.Deferred[LoginResult]:
        d: defer.Deferred[LoginResult] = defer.Deferred()
        self.pending.append((d, password))
        return d

    def release(self) -> None:
        pending, self.pending = self.pending, []
        for d, password in pending:
            d.callback(
                LoginResult(Outcome.OK, ALICE)
                if password == "secret"
                else LoginResult(Outcome.BAD_CREDENTIALS)
            )


@pytest.fixture
def failures() -> Iterator[list[dict[str, Any]]]:
    """Log events that carry a failure (a traceback in the server's log)."""
    seen: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event:
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


class TCPStringTransport(StringTransport):
    """A StringTransport that says whether TCP_NODELAY was asked for."""

    nodelay = False

    def setTcpNoDelay(self, enabled: bool) -> None:  # noqa: N802 (Twisted's name)
        self.nodelay = enabled


class _SyncPool:
    """A thread pool that runs each job at once, in the caller's thread (a SELECT of a
    folder not open opens its index through the pool)."""

    def callInThreadWithCallback(  # noqa: N802 (Twisted's name)
        self, on_result: Callable[[bool, Any], None], f: Callable[..., Any], *a: Any, **kw: Any
    ) -> None:
        try:
            result = f(*a, **kw)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class PoolClock(Clock):
    """A Clock with the reactor's thread calls: jobs run at once, their results too."""

    def getThreadPool(self) -> _SyncPool:  # noqa: N802 (Twisted's name)
        return _SyncPool()

    def callFromThread(self, f: Callable[..., Any], *a: Any, **kw: Any) -> None:  # noqa: N802
        f(*a, **kw)


def connect(
    tmp_path: Path, transport: StringTransport | None = None
) -> tuple[IMAPProtocol, StringTransport, GatedAuth, Clock]:
    config = parse_config(
        {
            "server": {"hostname": "mx.example.test", "data_dir": str(tmp_path / "data")},
            "domains": {"local": ["example.test"]},
        },
        None,
        tmp_path,
    )
    config.mail_dir.mkdir(parents=True)
    directory = Directory(config.directory_file, config.mail_dir, config.local_domains)
    directory.add_user(ALICE, "unused")
    auth = GatedAuth()
    clock = PoolClock()
    runtime = Runtime(config, clock, directory, auth, ChangeHub())  # type: ignore[arg-type]  # a stand-in Authenticator
    proto = IMAPFactory(runtime, implicit_tls=True).buildProtocol(None)
    transport = transport if transport is not None else StringTransport(peerAddress=None)
    proto.makeConnection(transport)
    assert transport.value().startswith(b"* OK [CAPABILITY ")
    transport.clear()
    return proto, transport, auth, clock


def pollers(clock: Clock) -> list[Any]:
    """The clock's timers other than the connection's read deadline."""
    return [
        c
        for c in clock.getDelayedCalls()
        if not isinstance(getattr(c.func, "__self__", None), ReadDeadline)
    ]


def lines(transport: StringTransport) -> list[bytes]:
    out = transport.value().split(b"\r\n")[:-1]
    transport.clear()
    return out


def test_replies_are_sent_without_nagle(tmp_path: Path) -> None:
    """Regression (issue 15): IMAP left Nagle's algorithm on, so the second piece of a reply
    written in two (MOVE: the untagged COPYUID, then the tagged OK after the expunge in a
    worker thread) waited for the client's delayed ACK, ~40 ms.  SMTP and POP3 set it."""
    _, transport, _, _ = connect(tmp_path, TCPStringTransport(peerAddress=None))
    assert isinstance(transport, TCPStringTransport) and transport.nodelay


def test_pipelined_commands_wait_for_the_login(tmp_path: Path) -> None:
    proto, transport, auth, _ = connect(tmp_path)
    proto.dataReceived(b"a1 LOGIN alice@example.test secret\r\na2 SELECT INBOX\r\na3 NOOP\r\n")
    assert lines(transport) == []  # a2 would be BAD (not authenticated) if it ran now
    assert transport.producerState == "paused"  # and the socket is not read meanwhile
    auth.release()
    tags = [line.split(b" ")[:2] for line in lines(transport) if not line.startswith(b"* ")]
    assert tags == [[b"a1", b"OK"], [b"a2", b"OK"], [b"a3", b"OK"]]
    assert transport.producerState == "producing"


def test_idle_takes_the_next_line_and_a_lost_connection_ends_it_quietly(
    tmp_path: Path, failures: list[dict[str, Any]]
) -> None:
    proto, transport, auth, clock = connect(tmp_path)
    proto.dataReceived(b"a1 LOGIN alice@example.test secret\r\n")
    auth.release()
    proto.dataReceived(b"a2 SELECT INBOX\r\na3 IDLE\r\n")
    assert lines(transport)[-1] == b"+ idling"
    assert transport.producerState == "producing"  # DONE must be read
    proto.dataReceived(b"DONE\r\n")
    assert lines(transport) == [b"a3 OK IDLE terminated"]
    assert pollers(clock) == []  # the poller of other programs' changes stopped
    proto.dataReceived(b"a4 IDLE\r\n")
    assert lines(transport) == [b"+ idling"]
    assert len(pollers(clock)) == 1
    proto.connectionLost(None)
    assert pollers(clock) == []
    assert failures == []
