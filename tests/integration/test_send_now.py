"""Replies leave in the reactor turn that made them (mailsuite.flow.send_now), on a real
loopback TCP connection: after the protocol handled a batch of input, nothing it wrote waits
in the transport for the reactor's next turn, and everything arrives in order.  Before
send_now, every reply waited for another epoll turn (measured: a third of the server's time
per POP3 RETR of a small message)."""

from __future__ import annotations

import socket
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
