"""Replies leave in the reactor turn that made them (mailsuite.flow.send_now), on a real
loopback TCP connection: after the protocol handled a batch of input, nothing it wrote waits
in the transport for the reactor's next turn, and everything arrives in order.  Before
send_now, every reply waited for another epoll turn (measured: a third of the server's time
per POP3 RETR of a small message)."""

from __future__ import annotations

import socket
import time
from typing import Any

from twisted.internet import protocol

from mailsuite.flow import GatedLineReceiver
from tests.reactor_thread import in_reactor, running_reactor


class Echo(GatedLineReceiver):
    delimiter = b"\r\n"

    def __init__(self, left: list[int]) -> None:
        self.left = left  # bytes still buffered in the transport after each batch

    def connectionMade(self) -> None:
        self.start_flow()

    def lineReceived(self, line: bytes) -> None:
        self.transport.write(b"+OK " + line + b"\r\n")

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        t = self.transport
        self.left.append(len(t.dataBuffer) - t.offset + t._tempDataLen)

    def connectionLost(self, reason: Any = None) -> None:
        self.stop_flow()


def test_replies_are_sent_in_the_turn_that_wrote_them() -> None:
    reactor = running_reactor()
    left: list[int] = []
    factory = protocol.Factory.forProtocol(lambda: Echo(left))  # type: ignore[arg-type]
    port = in_reactor(reactor, reactor.listenTCP, 0, factory, interface="127.0.0.1")
    try:
        with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10) as s:
            f = s.makefile("rb")
            for i in range(20):
                s.sendall(f"a{i}\r\nb{i}\r\n".encode())  # two lines, one batch (usually)
                assert f.readline() == f"+OK a{i}\r\n".encode()
                assert f.readline() == f"+OK b{i}\r\n".encode()
    finally:
        in_reactor(reactor, port.stopListening)
    assert left and all(n == 0 for n in left), left


class Replier(GatedLineReceiver):
    """Answers through :meth:`GatedLineReceiver.reply`; ``BIG n`` answers ``n`` bytes.
    Counts the transport's ``startWriting`` (asking the reactor to watch the socket)."""

    delimiter = b"\r\n"

    def __init__(self, seen: dict[str, Any]) -> None:
        self.seen = seen

    def connectionMade(self) -> None:
        self.start_flow()
        self.seen["proto"] = self
        self.seen["watch"] = 0
        start = self.transport.startWriting

        def counted() -> None:
            self.seen["watch"] += 1
            start()

        self.transport.startWriting = counted
        self.reply(b"+OK hello\r\n")

    def lineReceived(self, line: bytes) -> None:
        if line.startswith(b"BIG "):
            n = int(line[4:])
            self.reply(b"+OK big\r\n" + b"x" * n + b"\r\n")
        else:
            self.reply(b"+OK " + line + b"\r\n")

    def connectionLost(self, reason: Any = None) -> None:
        self.stop_flow()


def _replier() -> tuple[Any, Any, dict[str, Any]]:
    reactor = running_reactor()
    seen: dict[str, Any] = {}
    factory = protocol.Factory.forProtocol(lambda: Replier(seen))  # type: ignore[arg-type]
    port = in_reactor(reactor, reactor.listenTCP, 0, factory, interface="127.0.0.1")
    return reactor, port, seen


def test_replies_go_straight_to_the_socket_in_order() -> None:
    """Small replies leave in one send without the reactor watching the socket (no
    epoll_ctl pair per reply); pipelined lines are answered in order."""
    reactor, port, seen = _replier()
    try:
        with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10) as s:
            f = s.makefile("rb")
            assert f.readline() == b"+OK hello\r\n"
            for i in range(20):
                s.sendall(f"a{i}\r\nb{i}\r\n".encode())
                assert f.readline() == f"+OK a{i}\r\n".encode()
                assert f.readline() == f"+OK b{i}\r\n".encode()
            assert seen["watch"] == 0
    finally:
        in_reactor(reactor, port.stopListening)


def test_a_reply_the_socket_does_not_take_waits_in_order_and_pauses_input() -> None:
    """A reply bigger than the socket takes, to a client that does not read: the rest waits
    in the transport, the output flow is paused (no further line is handled), and once the
    client reads, everything arrives whole and in order."""
    reactor, port, seen = _replier()
    big = 32 * 1024 * 1024  # more than the kernel's socket buffers on both sides take
    try:
        with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=30) as s:
            f = s.makefile("rb")
            assert f.readline() == b"+OK hello\r\n"
            s.sendall(f"BIG {big}\r\nafter\r\n".encode())
            proto = seen["proto"]
            deadline = time.monotonic() + 10
            while not in_reactor(reactor, lambda: proto.flow.paused):
                assert time.monotonic() < deadline, "the flow never paused"
                time.sleep(0.01)
            t = proto.transport
            waiting = in_reactor(reactor, lambda: len(t.dataBuffer) - t.offset + t._tempDataLen)
            assert 0 < waiting <= big
            assert f.readline() == b"+OK big\r\n"
            assert f.read(big + 2) == b"x" * big + b"\r\n"
            assert f.readline() == b"+OK after\r\n"
            assert seen["watch"] >= 1  # the rest went through the transport
    finally:
        in_reactor(reactor, port.stopListening)
