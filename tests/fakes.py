"""Stand-ins for what a protocol adapter gets from Twisted and the service, for tests that feed
bytes to an adapter without sockets (``proto.makeConnection(transport)``, ``dataReceived``)."""

from __future__ import annotations

from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from mailsuite.flow import HeapTrim


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that can start TLS; ``tls_started`` says whether it was asked to."""

    tls_started = False

    def startTLS(self, contextFactory: object) -> None:  # Twisted's name
        self.tls_started = True


class FakeRuntime:
    """The parts of ``mailsuite.runtime.Runtime`` an adapter reads before login: a TLS context
    (any object: TLSStringTransport does not use it), a clock for its timers and the heap
    trimmer a connection tells when it closes."""

    tls = object()
    metrics = None  # no /metrics registry: the adapters count nothing

    def __init__(self) -> None:
        self.reactor = Clock()
        self.heap = HeapTrim(self.reactor)

    def heap_trim(self) -> HeapTrim:
        return self.heap
