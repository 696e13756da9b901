"""The POP3 adapter (mailsuite.pop3.server) on a fake transport and clock: commands reach
/metrics by name within a second, at once when the connection ends, and at once when many
different keywords pile up (a client cannot grow the tally)."""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from mailsuite.connection_limits import ConnectionLimits
from mailsuite.metrics import Metrics
from mailsuite.pop3.server import MAX_UNCOUNTED, TALLY_DELAY, POP3Protocol
from mailsuite.pop3.session import Options


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
