"""Typed edges of Twisted for our protocols: the transport they talk to and the line receiver
they are built on.

Twisted types ``Protocol.transport`` as ``ITransport | None``: it lacks what a TCP or TLS
connection really offers and the protocols use (pausing, STARTTLS, TCP options, abort,
``disconnecting``).  :func:`transport_of` gives the connected transport typed as
:class:`Transport`, so the rest of the protocol code is checked against what it calls.
:class:`LineReceiver` is Twisted's, with typed signatures.
"""

from __future__ import annotations

import socket
from typing import Any, Protocol, cast

from twisted.internet import tcp
from twisted.internet.error import UnsupportedAddressFamily
from twisted.protocols import basic
from twisted.protocols.tls import TLSMemoryBIOProtocol


class Transport(Protocol):
    """What a connected TCP transport (``tcp.Server``/``tcp.Client``, or the TLS wrapper
    around one) provides: ITCPTransport, ITLSTransport, IPushProducer and IConsumer."""

    disconnecting: bool
    connected: int

    def write(self, data: bytes) -> None: ...

    def loseConnection(self) -> None: ...  # noqa: N802

    def abortConnection(self) -> None: ...  # noqa: N802

    def getPeer(self) -> Any: ...  # noqa: N802

    def getHandle(self) -> Any: ...  # noqa: N802

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def startTLS(self, contextFactory: Any) -> None: ...

    def setTcpNoDelay(self, enabled: bool) -> None: ...  # noqa: N802

    def registerProducer(self, producer: Any, streaming: bool) -> None: ...  # noqa: N802

    def unregisterProducer(self) -> None: ...  # noqa: N802


def transport_of(protocol: Any) -> Transport:
    """``protocol.transport`` once connected.  Twisted sets it in ``makeConnection`` to a
    transport with everything :class:`Transport` lists; its stubs only say ITransport."""
    transport = protocol.transport
    if transport is None:
        raise RuntimeError(f"{type(protocol).__name__} is not connected")
    return cast(Transport, transport)


def no_delay(transport: Transport) -> bool:
    """Set TCP_NODELAY (a TLS wrapper passes it on to the TCP transport); False where the
    connection is no TCP one (a UNIX socket).  The line protocols answer requests with
    small replies, and a reply written in two pieces with a wait between them (IMAP MOVE's
    untagged COPYUID, then the tagged OK after the expunge) had its second piece held by
    Nagle's algorithm until the client's delayed ACK, ~40 ms later (issue 15).

    A connection a listener accepted takes the option from it where the kernel copies it
    to accepted sockets (Linux does): see :func:`nodelay_from_listener`, which makes that a
    ``setsockopt`` per listener instead of one per connection."""
    tcp_transport: Any = (
        transport.transport if isinstance(transport, TLSMemoryBIOProtocol) else transport
    )
    if isinstance(tcp_transport, tcp.Server) and isinstance(tcp_transport.server, tcp.Port):
        port: Any = tcp_transport.server
        try:
            port._nodelay_inherited = nodelay_from_listener(
                tcp_transport.socket, port.socket, getattr(port, "_nodelay_inherited", None)
            )
        except OSError:
            return False
        return True
    try:
        transport.setTcpNoDelay(True)
    except (AttributeError, OSError, NotImplementedError, UnsupportedAddressFamily):
        return False
    return True


def nodelay_from_listener(
    conn: socket.socket, listener: socket.socket, inherited: bool | None
) -> bool | None:
    """Make sure ``conn``, accepted by ``listener``, has TCP_NODELAY; returns what is known
    for the listener's next connection: True once a connection came with the option (the
    kernel copies it from the listener: nothing to do for every later one), else None.

    Until then the option is set on ``conn`` and on the listener; a connection accepted
    before the listener had it (already waiting in the queue) is set on its own, and so is
    every connection where a kernel does not copy it (``getsockopt`` and ``setsockopt``
    each, instead of the one ``setsockopt`` of before).  Raises OSError (no TCP socket)."""
    if inherited:
        return True
    if conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY):
        return True
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return None


class LineReceiver(basic.LineReceiver):
    """``basic.LineReceiver`` with the methods our protocols call typed (Twisted's are
    unannotated, so strict mypy would see every call as untyped).  The base is called by
    name: that is a call into twisted.protocols.basic, which setup.cfg's
    ``untyped_calls_exclude`` lists (this class derives from nothing else)."""

    def dataReceived(self, data: bytes) -> None:
        basic.LineReceiver.dataReceived(self, data)

    def lineReceived(self, line: bytes) -> None:
        """One line, without its delimiter (every protocol defines it)."""
        raise NotImplementedError

    def setLineMode(self, extra: bytes = b"") -> None:  # noqa: N802
        basic.LineReceiver.setLineMode(self, extra)

    def setRawMode(self) -> None:  # noqa: N802
        basic.LineReceiver.setRawMode(self)

    def clearLineBuffer(self) -> bytes:  # noqa: N802
        return bytes(basic.LineReceiver.clearLineBuffer(self))

    def pauseProducing(self) -> None:
        basic.LineReceiver.pauseProducing(self)

    def resumeProducing(self) -> None:
        basic.LineReceiver.resumeProducing(self)
