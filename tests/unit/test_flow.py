"""Output flow control (mailsuite.flow) on a fake transport: no line is handled while the
output waits unread, the socket stops once more input arrives, everything resumes in order
when the client reads, and closing unregisters the producer first."""

from __future__ import annotations

from collections.abc import Iterator

from twisted.internet import defer
from twisted.internet.testing import StringTransport

from mailsuite.flow import GatedLineReceiver
from mailsuite.pacing import PIECE, paced


class Lines(GatedLineReceiver):
    delimiter = b"\r\n"

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.stall_on: bytes | None = None

    def connectionMade(self) -> None:
        self.start_flow()

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)
        if line == self.stall_on:
            assert self.flow is not None
            self.flow.pauseProducing()  # what the transport does when its buffer is full


def connected() -> tuple[Lines, StringTransport]:
    proto = Lines()
    transport = StringTransport()
    proto.makeConnection(transport)
    assert transport.producer is proto.flow and transport.streaming
    return proto, transport


def test_no_line_is_handled_while_the_output_is_stalled() -> None:
    proto, transport = connected()
    proto.stall_on = b"big"
    proto.dataReceived(b"big\r\nnext\r\n")
    assert proto.lines == [b"big"]
    # the socket is still read (a TLS handshake would need it) until more input comes
    assert transport.producerState == "producing"
    proto.dataReceived(b"more\r\n")
    assert proto.lines == [b"big"] and transport.producerState == "paused"
    assert proto.flow is not None
    proto.flow.resumeProducing()  # the client read: everything goes on, in order
    assert proto.lines == [b"big", b"next", b"more"]
    assert transport.producerState == "producing"


def test_the_socket_stays_paused_while_read_lines_stall_the_output_again() -> None:
    proto, transport = connected()
    proto.stall_on = b"big"
    proto.dataReceived(b"big\r\nbig\r\nlast\r\n")
    proto.dataReceived(b"x\r\n")
    assert transport.producerState == "paused"
    assert proto.flow is not None
    proto.flow.resumeProducing()  # the second "big" stalls it again before "last"
    assert proto.lines == [b"big", b"big"] and transport.producerState == "paused"
    proto.flow.resumeProducing()
    assert proto.lines == [b"big", b"big", b"last", b"x"]
    assert transport.producerState == "producing"


def test_a_pending_command_and_a_stalled_output_are_separate_holds() -> None:
    proto, transport = connected()
    proto.pauseProducing()  # a command's answer is pending (LineReceiver's own pause)
    proto.dataReceived(b"a\r\n")
    assert proto.lines == [] and transport.producerState == "paused"
    assert proto.flow is not None
    proto.flow.pauseProducing()
    proto.resumeProducing()  # the answer went out, but the client does not read it
    assert proto.lines == [] and transport.producerState == "paused"
    proto.flow.resumeProducing()
    assert proto.lines == [b"a"] and transport.producerState == "producing"


class Holding(Lines):
    """Every line starting with "hold" has its answer pending (an SMTP 250 after the fsyncs)."""

    def lineReceived(self, line: bytes) -> None:
        super().lineReceived(line)
        if line.startswith(b"hold"):
            self.pauseProducing()


def holding() -> tuple[Holding, StringTransport]:
    proto = Holding()
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def test_a_pending_command_stops_the_socket_only_once_input_waits() -> None:
    proto, transport = holding()
    proto.dataReceived(b"hold1\r\n")
    # a client that waits for the answer sends nothing: the socket is not stopped and
    # started again around every answer (two epoll_ctl calls each)
    assert proto.lines == [b"hold1"] and transport.producerState == "producing"
    proto.resumeProducing()
    assert transport.producerState == "producing"
    proto.dataReceived(b"hold2\r\n")
    proto.dataReceived(b"next\r\n")  # sent under the hold: kept, and no more is read
    assert proto.lines == [b"hold1", b"hold2"] and transport.producerState == "paused"
    proto.resumeProducing()
    assert proto.lines == [b"hold1", b"hold2", b"next"]
    assert transport.producerState == "producing"


def test_input_left_unhandled_by_a_batch_stops_the_socket_at_its_end() -> None:
    proto, transport = holding()
    proto.dataReceived(b"hold\r\nnext\r\n")  # pipelined behind a pending answer
    assert proto.lines == [b"hold"] and transport.producerState == "paused"
    proto.resumeProducing()
    assert proto.lines == [b"hold", b"next"] and transport.producerState == "producing"


def test_close_unregisters_the_producer_and_a_stalled_hang_up_aborts() -> None:
    proto, transport = connected()
    proto.close_connection()
    assert transport.producer is None and transport.disconnecting
    proto, transport = connected()
    assert proto.flow is not None
    proto.flow.pauseProducing()
    aborted = []
    transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
    proto.hang_up()
    assert aborted == [True]


class Replies(GatedLineReceiver):
    """Answers each line through ``reply``; ``BIG`` answers more than a piece."""

    delimiter = b"\r\n"

    def __init__(self) -> None:
        self.sent_before_bookkeeping: list[bytes] = []
        self.writes: list[bytes] = []

    def connectionMade(self) -> None:
        self.start_flow()
        write = self.transport.write

        def counted(data: bytes) -> None:
            self.writes.append(data)
            write(data)

        self.transport.write = counted

    def lineReceived(self, line: bytes) -> None:
        self.reply(b"+OK " + (b"x" * PIECE if line == b"BIG" else line) + b"\r\n")
        if line == b"STLS":
            self.begin_tls(object())
        elif line == b"QUIT":
            self.close_connection()

    def after_replies(self) -> None:
        self.sent_before_bookkeeping.append(self.transport.value())


def test_replies_of_a_batch_leave_together_before_the_bookkeeping() -> None:
    proto = Replies()
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b"a\r\nb\r\nc")  # two lines and part of a third
    assert proto.writes == [b"+OK a\r\n+OK b\r\n"]  # one write for the batch
    assert proto.sent_before_bookkeeping == [b"+OK a\r\n+OK b\r\n"]
    proto.dataReceived(b"\r\nBIG\r\nd\r\n")
    # a piece's worth is written at once (the transport's back-pressure applies to it)
    assert proto.writes[1:] == [b"+OK c\r\n+OK " + b"x" * PIECE + b"\r\n", b"+OK d\r\n"]
    proto.reply(b"+OK later\r\n")  # outside a batch: at once
    assert proto.writes[-1] == b"+OK later\r\n"


def test_replies_gathered_go_out_before_tls_starts_or_the_connection_closes() -> None:
    proto = Replies()
    transport = StringTransport()
    started: list[bytes] = []
    transport.startTLS = lambda ctx: started.append(transport.value())  # type: ignore[attr-defined]
    proto.makeConnection(transport)
    proto.dataReceived(b"STLS\r\n")
    assert started == [b"+OK STLS\r\n"]  # in the clear, before the handshake
    proto = Replies()
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b"QUIT\r\n")
    assert transport.value() == b"+OK QUIT\r\n" and transport.disconnecting


def test_paced_writes_pieces_and_waits_while_paused() -> None:
    """The IMAP core's pacing (mailsuite.pacing, no Twisted) over this flow, as the IMAP
    adapter drives it: pieces of about PIECE bytes, a wait whenever the transport is full,
    and nothing more produced once the connection is gone."""
    proto, _ = connected()
    flow = proto.flow
    assert flow is not None
    written: list[bytes] = []
    produced = 0

    def write(data: bytes) -> None:
        written.append(data)
        if sum(map(len, written)) > PIECE:
            flow.pauseProducing()

    def writable() -> defer.Deferred[None]:
        wait = flow.wait_writable()
        return wait if wait is not None else defer.succeed(None)

    def pieces() -> Iterator[bytes]:
        nonlocal produced
        for _ in range(200):
            produced += 1
            yield b"x" * 1000

    done = defer.Deferred.fromCoroutine(paced(writable, lambda: flow.stopped, write, pieces()))
    assert not done.called  # waiting for the client to read
    assert sum(map(len, written)) < 2 * PIECE + 1000
    flow.resumeProducing()
    assert not done.called  # the next pieces filled the transport again
    before = produced
    flow.stopProducing()  # the connection went away: the rest is not produced
    assert done.called and produced == before < 200
    assert sum(map(len, written)) < 4 * PIECE


def test_heap_trim_once_after_a_burst_of_stalled_closes() -> None:
    """Connections whose output stalled hand their freed memory back with one trim, a
    moment after the last of a burst closed; a connection that never stalled asks none."""
    from twisted.internet import task

    from mailsuite.flow import HeapTrim

    clock = task.Clock()
    trims: list[int] = []
    heap = HeapTrim(clock, delay=1.0)
    heap._trim = trims.append  # the real one is glibc's malloc_trim

    proto, _ = connected()
    proto.stop_flow(heap)  # never stalled
    clock.advance(5)
    assert trims == []
    for _ in range(3):
        proto, _ = connected()
        assert proto.flow is not None
        proto.flow.pauseProducing()
        proto.stop_flow(heap)
        clock.advance(0.5)
    assert trims == []  # still closing: one trim at the end, not one each
    clock.advance(1)
    assert trims == [0]
    proto, _ = connected()
    assert proto.flow is not None
    proto.flow.pauseProducing()
    proto.stop_flow(heap)
    clock.advance(5)
    assert trims == [0]  # at most one per interval (10 s)
    clock.advance(5)
    assert trims == [0, 0]


class _FDSet:
    """A reactor's descriptor set that records what a transport asks it to watch."""

    def __init__(self) -> None:
        self.writers: list[object] = []
        self.write_requests = 0

    def addReader(self, r: object) -> None:  # noqa: N802
        pass

    def removeReader(self, r: object) -> None:  # noqa: N802
        pass

    def addWriter(self, w: object) -> None:  # noqa: N802
        self.write_requests += 1
        self.writers.append(w)

    def removeWriter(self, w: object) -> None:  # noqa: N802
        if w in self.writers:
            self.writers.remove(w)


def test_write_now_sends_at_once_and_keeps_the_order_behind_a_buffer() -> None:
    import socket

    from twisted.internet import protocol, tcp

    from mailsuite.flow import write_now

    ours, peer = socket.socketpair()
    try:
        ours.setblocking(False)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        fds = _FDSet()
        transport = tcp.Server(ours, protocol.Protocol(), ("127.0.0.1", 1), None, 0, fds)  # type: ignore[arg-type]
        # an empty buffer: straight into the socket, the reactor is not asked to watch it
        write_now(transport, b"250 ok\r\n")
        assert peer.recv(100) == b"250 ok\r\n" and fds.write_requests == 0
        # more than the kernel takes: the rest waits in the transport, the reactor watches
        big = bytes(range(256)) * 4096
        write_now(transport, big)
        assert fds.write_requests == 1 and transport._tempDataLen + len(transport.dataBuffer) > 0
        # while something waits, a reply goes behind it, never ahead
        write_now(transport, b"221 bye\r\n")
        received = b""
        peer.settimeout(5)
        while len(received) < len(big) + 9:
            if fds.writers:
                transport.doWrite()  # what the reactor does when the socket has room
            received += peer.recv(1 << 20)
        assert received == big + b"221 bye\r\n"
    finally:
        ours.close()
        peer.close()
