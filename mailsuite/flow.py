"""Output flow control for the line protocols (SMTP, IMAP, POP3).  Our own code, on Twisted's
producer/consumer interfaces.

A client that sends commands and never reads must not make the server keep their answers:
before this, ``FETCH 1:* BODY[]`` by such a client kept the whole answer (100 MiB for 100
messages of 1 MiB) in the transport, and pipelined commands (POP3 RETR, SMTP EHLO) filled it
further while the server went on reading input.  Two rules bound it:

* **produce only while the transport takes it**: ``OutputFlow`` is registered with the
  transport as a streaming producer for the connection's whole life.  Twisted pauses it when
  more than ``bufferSize`` (64 KiB) waits unsent and resumes it once everything went to the
  kernel; a command that writes a lot (a FETCH of message bodies, a POP3 RETR, a long SEARCH
  or LIST answer) writes one piece of at most ``mailsuite.pacing.PIECE`` bytes at a time
  and waits on :meth:`OutputFlow.wait_writable` between pieces (the IMAP core through
  :func:`mailsuite.pacing.paced`, which imports no Twisted);
* **read no command while the output is stalled**: while the flow is paused the protocol
  hands no further line to ``lineReceived`` and stops reading the socket
  (``GatedLineReceiver``), so a pipelining client gets no further answers queued, whatever
  the command, and its input waits in the kernel, not here.

So a stalled connection costs the transport's 64 KiB, one piece, and the session's objects;
the kernel's socket buffers are not the server's memory.  This is what Dovecot (an output
buffer limit, then the command waits) and Postfix (a blocking write with a deadline) do.

When stalled connections close, their buffers are freed but the C allocator keeps the pages
(64 KiB pieces come from the heap, not from ``mmap``), so the process's RSS would stay at its
peak; :class:`HeapTrim` hands them back to the system (glibc's ``malloc_trim``) shortly after
(measured: 500 stalled FETCH readers, +87 MiB while they wait, all but 21 MiB of it returned).
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from mailsuite.pacing import PIECE
from mailsuite.tls import lose_connection
from mailsuite.transport import LineReceiver


class GatedLineReceiver(LineReceiver):
    """A ``LineReceiver`` whose input is held for named reasons ("command": an answer is
    pending, "disk": the file writes are behind, "output": the client does not read) and
    flows again only when no reason is left.  A hold stops both reading from the socket and
    handing already-read lines to ``lineReceived``.

    A stalled output (:meth:`output_stalled`) stops the lines at once but the socket only
    when more input arrives: a TLS layer pauses its producer while its handshake is under
    way, and stopping the socket then would stop the handshake for good."""

    transport: Any  # a TCP or TLS transport (Twisted's ITransport lacks most of what we use)
    #: replies gathered (:meth:`reply`) while a batch of input is handled; None outside one
    _replies: list[bytes] | None = None
    _replies_size = 0
    _holds: frozenset[str] = frozenset()
    _stalled = False  # the output waits unread: no line is handled
    _socket_paused = False  # we asked the transport to stop reading
    flow: OutputFlow | None = None
    _registered = False

    # -- the output flow -------------------------------------------------------------------

    def start_flow(self) -> OutputFlow:
        """Register the connection's :class:`OutputFlow` (call in ``connectionMade``)."""
        self.flow = OutputFlow(self)
        self.transport.registerProducer(self.flow, True)
        self._registered = True
        return self.flow

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            self.transport.unregisterProducer()

    # -- replies ---------------------------------------------------------------------------

    def reply(self, data: bytes) -> None:
        """Send ``data`` to the client, in order with every other :meth:`reply`.

        While a batch of input is handled (:meth:`dataReceived`) the replies are gathered and
        leave together at its end, in one ``send`` (a pipelining client's commands are
        answered in one segment, as before); once :data:`~mailsuite.pacing.PIECE` bytes are
        gathered they leave at once, so a large answer meets the transport's back-pressure
        (the pause that stops the next pipelined command) exactly as a plain ``write`` does.
        Outside a batch (an answer after a password check, a timeout) it leaves now.  Either
        way through :func:`write_now`: straight to the socket when nothing waits before it.
        A protocol that replies this way must not also call ``transport.write`` (the order
        would not hold)."""
        gathered = self._replies
        if gathered is None:
            write_now(self.transport, data)
            return
        gathered.append(data)
        self._replies_size += len(data)
        if self._replies_size >= PIECE:
            self.flush_replies()

    def flush_replies(self) -> None:
        """Send the replies gathered so far (before closing, starting TLS, or a big one)."""
        gathered = self._replies
        if gathered:
            data = gathered[0] if len(gathered) == 1 else b"".join(gathered)
            gathered.clear()
            self._replies_size = 0
            write_now(self.transport, data)

    def close_connection(self, at_once: bool = False) -> None:
        """Close once the buffered output is sent.  Always close this way, never with a bare
        ``transport.loseConnection()``: Twisted closes a connection that has a registered
        producer only once it is unregistered (over TLS never, over TCP not while paused).

        ``at_once``: when everything is sent already (plain TCP), close now rather than on
        the reactor's next turn (:func:`close_now`): ``connectionLost`` runs before this
        returns, so only for a caller that expects that (SMTP's QUIT)."""
        self.flush_replies()
        self._unregister()
        if at_once and close_now(self.transport):
            return
        lose_connection(self.transport)  # over TLS: not waiting for the peer's close_notify

    def hang_up(self) -> None:
        """Close after a timeout: politely when the client reads, at once when it does not
        (a polite close would wait for it forever), or when a polite one is already waiting."""
        self.flush_replies()
        if (self.flow is not None and self.flow.paused) or self.transport.disconnecting:
            self.transport.abortConnection()
        else:
            self.close_connection()

    def begin_tls(self, context: Any) -> None:
        """``transport.startTLS``, with the flow moved onto the TLS layer (which pauses it
        while the handshake holds back what we write).  Replies gathered before go out first,
        in the clear (RFC 2595 4, RFC 3207 4: the answer to STLS/STARTTLS precedes TLS)."""
        self.flush_replies()
        registered = self._registered
        self._unregister()
        self.transport.startTLS(context)
        if registered and self.flow is not None:
            self.transport.registerProducer(self.flow, True)
            self._registered = True
            if self.flow.paused:
                self.flow.resumeProducing()  # the next write pauses it again if need be

    def stop_flow(self, trim: HeapTrim | None = None) -> None:
        """The connection is gone (call in ``connectionLost``): commands waiting to write
        wake up and see :attr:`OutputFlow.stopped`.  ``trim``: the process's
        :class:`HeapTrim`, told when this connection's output ever stalled (its buffers were
        the memory a client that does not read costs)."""
        self._registered = False
        if self.flow is not None:
            self.flow.stopProducing()
            if trim is not None and self.flow.stalled_once:
                trim.soon()

    # -- input -----------------------------------------------------------------------------

    def hold_input(self, reason: str) -> None:
        """Hold the input for ``reason``.  The "command" hold (an answer is pending) stops
        the socket only when input arrives meanwhile (:meth:`dataReceived`): a client that
        waits for the answer, as most do, sends nothing, and stopping and restarting the
        socket cost two ``epoll_ctl`` calls per command answered later (every SMTP message:
        its 250 waits for the fsyncs).  The socket stops at the end of the batch when input
        read in it waits unhandled (a pipelining client), else at the next read: what is
        read before the stop is one read at most, kept unhandled like any input under a
        hold."""
        self._holds = self._holds | {reason}
        self.paused = True
        if reason != "command":
            self._pause_socket()

    def _pause_socket(self) -> None:
        if not self._socket_paused:
            self._socket_paused = True
            self.transport.pauseProducing()

    def release_input(self, reason: str) -> None:
        if reason in self._holds:
            self._holds = self._holds - {reason}
            self._resume_if_free()

    def input_held(self, reason: str) -> bool:
        return reason in self._holds

    def _resume_if_free(self) -> None:
        """No hold left: hand on the lines read before, and read the socket again only when
        they did not stall the output once more (else more input would pile up here)."""
        if self._holds or self.transport is None or self.transport.disconnecting:
            return
        if not self._stalled:
            self.paused = False
            self.dataReceived(b"")  # the lines read before the hold
        if not self._holds and not self._stalled and self._socket_paused:
            self._socket_paused = False
            self.transport.resumeProducing()

    # LineReceiver's own pause/resume, as the protocols use them to keep pipelined replies in
    # order, are the "command" hold: they must not undo the other holds.
    def pauseProducing(self) -> None:
        self.hold_input("command")

    def resumeProducing(self) -> None:
        self.release_input("command")

    def output_stalled(self) -> None:
        self._stalled = True
        self.paused = True

    def output_flowing(self) -> None:
        self._stalled = False
        self._holds = self._holds - {"output"}
        self._resume_if_free()

    def dataReceived(self, data: bytes) -> None:
        if data and self._holds:
            # input while a command is answered: keep it, read no more (see hold_input)
            self._pause_socket()
        if self._stalled and data:
            self.hold_input("output")  # keep this, read no more until the client reads
        if self._replies is not None:  # called again from within a batch (input resumed)
            super().dataReceived(data)
            return
        self._replies = []
        try:
            delimiter = self.delimiter
            end = len(data) - len(delimiter)
            if (
                0 <= end <= self.MAX_LENGTH
                and data.find(delimiter) == end  # one whole line, nothing after it
                and self.line_mode
                and not self.paused
                and not self._buffer
                and not self._busyReceiving
            ):
                self._one_line(data[:end])
            else:
                super().dataReceived(data)
        finally:
            self.flush_replies()
            self._replies = None
        if self._holds and self._buffer:
            self._pause_socket()  # pipelined input waits already: read no more for now
        self.after_replies()
        send_now(self.transport)

    def _one_line(self, line: bytes) -> None:
        """What ``LineReceiver.dataReceived`` does with input that is exactly one complete
        line (the common case of a request/response protocol: one command per segment),
        without its buffer and loop: ``lineReceived`` runs with ``_busyReceiving`` set, so
        input fed from within it (a hold released, ``setLineMode(extra)``) is buffered for
        later exactly as there."""
        self._busyReceiving = True
        try:
            self.lineReceived(line)
        finally:
            self._busyReceiving = False

    def after_replies(self) -> None:
        """Called after each batch of input once its replies are sent (or handed to the
        transport): bookkeeping that need not hold up the answer (counting the commands,
        moving the read deadline) goes here.  Nothing by default."""


@implementer(IPushProducer)
class OutputFlow:
    """The connection's streaming producer: whether the transport wants a pause, and who waits
    for it to end (made by :meth:`GatedLineReceiver.start_flow`)."""

    def __init__(self, proto: GatedLineReceiver) -> None:
        self.proto = proto
        self.paused = False
        #: the transport asked for a pause at least once (the client did not keep up)
        self.stalled_once = False
        #: the connection is gone: nothing more will be written, waiting commands stop
        self.stopped = False
        self._waiting: list[defer.Deferred[None]] = []

    def wait_writable(self) -> defer.Deferred[None] | None:
        """None when the transport takes more now; else a Deferred that fires when it does
        (or when the connection is gone: check :attr:`stopped`)."""
        if not self.paused or self.stopped:
            return None
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(d)
        return d

    def pauseProducing(self) -> None:
        if self.stopped:
            return
        self.paused = True
        self.stalled_once = True
        self.proto.output_stalled()

    def resumeProducing(self) -> None:
        self.paused = False
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)
        if not self.stopped and not self.paused:
            self.proto.output_flowing()

    def stopProducing(self) -> None:
        """The transport is closing: wake the waiters so they see :attr:`stopped` and end."""
        if not self.stopped:
            self.stopped = True
            self.resumeProducing()


def send_now(transport: Any) -> None:
    """Send what is waiting in a TCP transport's buffer now, in one ``send``, instead of at
    the reactor's next turn.

    Twisted's ``write`` only buffers and asks the reactor to watch the socket for room; the
    reply then leaves after another ``epoll_wait`` and a trip through the reactor's dispatch
    (measured: a third of the server's time per POP3 RETR of a small message, and the
    replies of a request/response protocol are the whole workload).  Called once after a
    batch of input was handled (every reply to it goes out together, as before) and after
    work that answers later (SMTP's 250 once the fsync is done).  This is the transport's
    own ``doWrite`` (``IWriteDescriptor``), which the reactor would call: what does not fit
    stays buffered and the reactor sends it when there is room, producers are paused and
    resumed as always.  Not while the connection is closing (``doWrite`` would finish the
    close, which belongs to the reactor) and only when something waits (``_tempDataLen``:
    Twisted's list buffer; no ``send`` of nothing).  A failed ``send`` is left to the
    reactor, which still watches the socket and closes the connection on its next turn.
    Implicit TLS: the TLS layer's own transport carries the ciphertext."""
    if isinstance(transport, TLSMemoryBIOProtocol):
        transport = transport.transport
    if not getattr(transport, "_tempDataLen", 0):
        return  # nothing waits (the common case: write_now sent it)
    writer: Any = transport  # (Twisted's doWrite is untyped)
    if (
        isinstance(transport, tcp.Connection)
        and transport.connected
        and not transport.disconnecting
        and not getattr(transport, "_writeDisconnecting", True)
    ):
        writer.doWrite()


def write_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, sent now: for a plain TCP connection with nothing waiting
    in its buffer, straight to the socket (one ``send``), else written and sent by
    :func:`send_now`.

    Twisted's ``write`` asks the reactor to watch the socket for room (``epoll_ctl``) and
    ``doWrite``, once everything is sent, asks it to stop (``epoll_ctl`` again): two system
    calls and a dozen Python calls around every reply of a request/response protocol, whose
    replies nearly always fit into the socket at once (measured: about a sixth of the server's
    CPU per POP3 NOOP or RETR).  Dovecot's output streams, too, write to the socket directly
    and watch it only for what did not fit.  Here what the socket does not take is handed to
    ``transport.write``, so buffering, the streaming producer's pause (the back-pressure of
    :class:`OutputFlow`) and errors are the transport's as always; a failed ``send`` is left
    to it too (it fails again there and closes the connection).  Not over TLS (``TLS`` set by
    STARTTLS, or the TLS wrapper of implicit TLS): the TLS layer encrypts what is written."""
    tcp_transport: Any = transport
    if (
        isinstance(tcp_transport, tcp.Connection)
        and not tcp_transport.TLS
        and tcp_transport.connected
        and not tcp_transport.disconnecting
        and not tcp_transport._writeDisconnecting
        and not tcp_transport._writeDisconnected
        and not tcp_transport._tempDataLen
        and tcp_transport.offset == len(tcp_transport.dataBuffer)
    ):
        try:
            sent = tcp_transport.socket.send(data)
        except OSError:
            sent = 0  # full (EAGAIN) or broken: the transport's write and doWrite deal with it
        if sent < len(data):
            transport.write(data[sent:] if sent else data)
        return
    transport.write(data)
    send_now(transport)


#: the reason a connection closed by :func:`close_now` gives (shared, as Twisted's own
#: ``_disconnectSelectable`` shares its)
_DONE = Failure(ConnectionDone())


def close_now(transport: Any) -> bool:
    """Close a plain TCP connection at once when nothing is left to send; False (nothing
    done) otherwise.

    ``loseConnection`` on such a connection stops reading, asks the reactor to watch the
    socket for room (``epoll_ctl`` twice), and on the reactor's next turn ``doWrite`` finds
    nothing to send and the reactor stops watching it (``epoll_ctl`` again) and calls
    ``connectionLost`` -- three system calls, a poll wake-up and a dozen Python calls per
    connection for what is known now.  This does what that turn does, now: stop reading,
    ``connectionLost`` with ``ConnectionDone`` (orderly ``shutdown`` and ``close`` of the
    socket, the protocol's ``connectionLost``), as Twisted's ``abortConnection`` does at once
    (with a reset instead) and its ``loseConnection`` for a connection whose write side is
    shut.  Not over TLS, not with a producer, not
    with bytes waiting in the transport's buffer: those close the usual way."""
    if not isinstance(transport, tcp.Connection):
        return False
    t: Any = transport  # (Twisted's transport methods are untyped)
    if not (
        not t.TLS
        and t.connected
        and not t.disconnecting
        and not t._writeDisconnecting
        and not t._writeDisconnected
        and t.producer is None
        and not t._tempDataLen
        and t.offset == len(t.dataBuffer)
    ):
        return False
    t.disconnecting = True  # as loseConnection: nothing more is read or written
    t.stopReading()
    t.stopWriting()
    t.connectionLost(_DONE)
    return True


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` from the C library the process runs on; None elsewhere (musl,
    macOS: nothing to do there)."""
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


class HeapTrim:
    """Give the memory stalled connections held back to the system once they closed (one per
    process: :meth:`mailsuite.runtime.Runtime.heap_trim`): a full garbage collection (a
    closed session's objects refer to each other, so only the cycle collector frees them),
    then glibc's ``malloc_trim``.  A burst of closes makes one trim, ``delay`` seconds after
    the last, and there is at most one per ``interval`` seconds: both are walks over every
    object and every free chunk (milliseconds to a few tens of them, in the reactor thread),
    paid only after clients that did not keep up went away."""

    def __init__(self, reactor: Any, delay: float = 1.0, interval: float = 10.0) -> None:
        self.reactor = reactor
        self.delay = delay
        self.interval = interval
        self._call: Any = None
        self._last = -interval
        self._trim = _malloc_trim()

    def soon(self) -> None:
        if self._trim is None:
            return
        wait = max(self.delay, self._last + self.interval - self.reactor.seconds())
        if self._call is not None and self._call.active():
            self._call.reset(wait)
            return
        self._call = self.reactor.callLater(wait, self._run)

    def _run(self) -> None:
        self._call = None
        self._last = self.reactor.seconds()
        if self._trim is not None:
            gc.collect()
            self._trim(0)
