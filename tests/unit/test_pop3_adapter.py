"""The POP3 adapter (mailsuite.pop3.server) on a fake transport and clock: commands reach
/metrics by name within a second, at once when the connection ends, and at once when many
different keywords pile up (a client cannot grow the tally); a command alone in its segment
(the adapter's short path) is answered, counted and timed as any other."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from mailsuite.connection_limits import ConnectionLimits
from mailsuite.metrics import Metrics
from mailsuite.pop3.server import IDLE_TIMEOUT, MAX_UNCOUNTED, TALLY_DELAY, POP3Protocol
from mailsuite.pop3.session import ERR_TEMP, Options, State
from tests.pop3_helpers import FakeMaildrop


def connected() -> tuple[POP3Protocol, StringTransport, task.Clock, Metrics]:
    clock = task.Clock()
    metrics = Metrics()
    runtime = SimpleNamespace(reactor=clock, metrics=metrics, heap_trim=lambda: None)
    proto = POP3Protocol(
        runtime,  # type: ignore[arg-type]
        Options(max_errors=1000),
        False,
        ConnectionLimits(),
        login_timeout=60,
    )
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    proto.makeConnection(transport)
    assert transport.value().startswith(b"+OK")
    return proto, transport, clock, metrics


def counted(metrics: Metrics, command: str) -> float:
    value = metrics.registry.get_sample_value("mailsuite_pop3_commands_total", {"command": command})
    return value or 0.0


def tally_timers(proto: POP3Protocol, clock: task.Clock) -> list[object]:
    return [c for c in clock.getDelayedCalls() if c.active() and c.func == proto._tally]


def test_commands_are_counted_within_a_second_by_name() -> None:
    proto, transport, clock, metrics = connected()
    proto.dataReceived(b"CAPA\r\n")
    proto.dataReceived(b"noop\r\nFROB x\r\n")  # (NOOP before login: wrong state, still NOOP)
    assert transport.value().count(b"\r\n.\r\n") == 1  # answered at once
    assert counted(metrics, "CAPA") == 0
    clock.advance(TALLY_DELAY)
    assert [counted(metrics, c) for c in ("CAPA", "NOOP", "other")] == [1, 1, 1]
    proto.dataReceived(b"CAPA\r\n")
    clock.advance(TALLY_DELAY)
    assert counted(metrics, "CAPA") == 2
    assert not tally_timers(proto, clock)  # nothing waits: no timer left running


def test_the_end_of_the_session_counts_what_waits() -> None:
    proto, transport, clock, metrics = connected()
    proto.dataReceived(b"CAPA\r\nQUIT\r\n")
    # counted by the time QUIT's answer is sent (a scrape right after it sees them)
    assert transport.value().endswith(b"signing off\r\n")
    assert [counted(metrics, c) for c in ("CAPA", "QUIT")] == [1, 1]
    proto.connectionLost()
    assert not tally_timers(proto, clock)
    proto, transport, clock, metrics = connected()
    proto.dataReceived(b"CAPA\r\n")
    proto.connectionLost()  # dropped without QUIT
    assert counted(metrics, "CAPA") == 1 and not tally_timers(proto, clock)


def test_many_different_keywords_are_counted_at_once() -> None:
    proto, _transport, _clock, metrics = connected()
    proto.dataReceived(b"".join(b"X%d\r\n" % i for i in range(MAX_UNCOUNTED + 1)))
    assert counted(metrics, "other") == MAX_UNCOUNTED + 1
    assert len(proto._counts) == 0


class Drop(FakeMaildrop):
    """The fake maildrop with what the adapter itself calls (\\Seen, UPDATE, close)."""

    def __init__(self, bodies: list[bytes]) -> None:
        super().__init__(bodies)
        self.seen_pending: set[int] = set()
        self.closed = False

    def flush_seen(self) -> None:
        self.seen_pending.clear()

    def commit(self) -> list[int]:
        return sorted(self.deleted)

    def close(self) -> None:
        self.closed = True


def logged_in() -> tuple[POP3Protocol, StringTransport, task.Clock, Metrics, Drop]:
    proto, transport, clock, metrics = connected()
    md = Drop([b"Subject: one\n\n.dot\nbody\n", b"Subject: two\n\nsecond\n"])
    proto.session.maildrop = md
    proto.session.state = State.TRANSACTION
    proto.deadline.logged_in()  # type: ignore[union-attr]
    transport.clear()
    return proto, transport, clock, metrics, md


def test_one_command_per_segment_is_answered_counted_and_moves_the_deadline() -> None:
    """The one-line path of ``POP3Protocol.dataReceived``: the same answers, counts and
    deadline as the general path."""
    proto, transport, clock, metrics, md = logged_in()
    for _ in range(3):
        clock.advance(IDLE_TIMEOUT - 1)  # each command gives the next IDLE_TIMEOUT again
        proto.dataReceived(b"NOOP\r\n")
    assert transport.value() == b"+OK\r\n" * 3
    transport.clear()
    proto.dataReceived(b"RETR 1\r\n")
    assert transport.value() == b"+OK %d octets\r\nSubject: one\r\n\r\n..dot\r\nbody\r\n.\r\n" % (
        md.messages[0].size
    )
    assert md.retrieved == {1} and md.seen == {1}
    transport.clear()
    proto.dataReceived(b"stat\n")  # bare LF, lower case
    proto.dataReceived(b"DELE 9\r\n")
    assert transport.value() == b"+OK 2 %d\r\n-ERR No such message\r\n" % sum(
        m.size for m in md.messages
    )
    clock.advance(TALLY_DELAY)
    assert [counted(metrics, c) for c in ("NOOP", "RETR", "STAT", "DELE")] == [3, 1, 1, 1]
    assert not transport.disconnecting
    clock.advance(IDLE_TIMEOUT)  # no command: the idle timeout ends it
    assert transport.value().endswith(b"-ERR Idle timeout, closing connection\r\n")


def test_a_failing_command_is_answered_sys_temp(monkeypatch: pytest.MonkeyPatch) -> None:
    proto, transport, _clock, _metrics, md = logged_in()

    def broken(n: int) -> bytes:
        raise OSError("disk gone")

    monkeypatch.setattr(md, "read", broken)
    errors: list[dict[str, object]] = []
    globalLogPublisher.addObserver(errors.append)
    try:
        proto.dataReceived(b"RETR 2\r\n")
    finally:
        globalLogPublisher.removeObserver(errors.append)
    assert transport.value() == ERR_TEMP
    assert any("log_failure" in e for e in errors)  # logged, not raised
    transport.clear()
    proto.dataReceived(b"NOOP\r\n")  # and the session goes on
    assert transport.value() == b"+OK\r\n"


def test_quit_in_one_segment_runs_the_update_state_and_closes() -> None:
    proto, transport, _clock, _metrics, md = logged_in()
    transport._lenient = True  # (the adapter pauses input after UPDATE closed: allowed in TCP)
    proto.dataReceived(b"DELE 1\r\n")
    proto.dataReceived(b"QUIT\r\n")
    assert transport.value().endswith(b"signing off (1 messages deleted)\r\n")
    assert md.closed and transport.disconnecting


def test_pipelined_commands_are_answered_in_order_either_way() -> None:
    proto, transport, _clock, _metrics, _md = logged_in()
    proto.dataReceived(b"NOOP\r\nLIST 2\r\nUIDL 1\r\n")  # several lines: the general path
    proto.dataReceived(b"STAT\r\n")  # one: the short one
    proto.dataReceived(b"LIST")  # part of one, then the rest
    proto.dataReceived(b" 1\r\n")
    assert transport.value().split(b"\r\n")[:-1] == [
        b"+OK",
        b"+OK 2 %d" % _md.messages[1].size,
        b"+OK 1 abc.a",
        b"+OK 2 %d" % sum(m.size for m in _md.messages),
        b"+OK 1 %d" % _md.messages[0].size,
    ]
