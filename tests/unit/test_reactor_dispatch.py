"""The lean epoll dispatch (mailsuite.reactor_dispatch): same events handled as Twisted's
``doPoll``, errors logged and survived, nothing else touched."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from twisted.internet import task
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.selectreactor import SelectReactor
from twisted.python import log as legacy_log

from mailsuite.reactor_dispatch import lean_dispatch


class Reader:
    """A readable descriptor for the reactor: records what arrives; ``fail`` makes its read
    and its connectionLost raise (the second escapes ``_doReadOrWrite``)."""

    def __init__(self, sock: socket.socket, fail: bool = False) -> None:
        self.sock = sock
        self.fail = fail
        self.got: list[bytes] = []
        self.lost = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:  # noqa: N802
        self.got.append(self.sock.recv(100))
        if self.fail:
            raise ValueError("read failed")

    def connectionLost(self, reason: Any) -> None:
        self.lost += 1
        if self.fail:
            raise RuntimeError("connectionLost failed")

    def logPrefix(self) -> str:  # noqa: N802
        return "FailingReader" if self.fail else "Reader"


def test_only_a_plain_epoll_reactor_is_switched_and_only_once() -> None:
    reactor = EPollReactor()
    try:
        assert lean_dispatch(reactor) is True
        assert lean_dispatch(reactor) is False  # already
    finally:
        reactor._poller.close()
    select_reactor = SelectReactor()
    assert lean_dispatch(select_reactor) is False
    assert "doIteration" not in vars(select_reactor)
    assert lean_dispatch(task.Clock()) is False


@pytest.fixture
def reactor() -> Any:
    r = EPollReactor()
    assert lean_dispatch(r)
    yield r
    r._poller.close()


def test_ready_descriptors_are_handed_their_events(reactor: Any) -> None:
    a, a_peer = socket.socketpair()
    b, b_peer = socket.socketpair()
    with a, a_peer, b, b_peer:
        ra, rb = Reader(a), Reader(b)
        reactor.addReader(ra)
        reactor.addReader(rb)
        reactor.doIteration(0)  # nothing ready: returns at once
        assert ra.got == rb.got == []
        a_peer.send(b"one")
        b_peer.send(b"two")
        reactor.doIteration(1)
        assert (ra.got, rb.got) == ([b"one"], [b"two"])
        reactor.removeReader(rb)
        b_peer.send(b"ignored")
        a_peer.send(b"three")
        reactor.doIteration(1)
        assert (ra.got, rb.got) == ([b"one", b"three"], [b"two"])


def test_an_error_escaping_an_event_is_logged_and_the_others_are_handled(reactor: Any) -> None:
    bad, bad_peer = socket.socketpair()
    good, good_peer = socket.socketpair()
    events: list[dict[str, Any]] = []
    legacy_log.addObserver(events.append)
    try:
        with bad, bad_peer, good, good_peer:
            failing, ok = Reader(bad, fail=True), Reader(good)
            reactor.addReader(failing)
            reactor.addReader(ok)
            bad_peer.send(b"x")
            good_peer.send(b"y")
            reactor.doIteration(1)  # must not raise
            assert ok.got == [b"y"] and failing.got == [b"x"] and failing.lost == 1
            assert failing not in reactor.getReaders()  # disconnected, as doPoll does
    finally:
        legacy_log.removeObserver(events.append)
    errors = {type(e["failure"].value): e["system"] for e in events if e.get("isError")}
    # the read's error, logged by Twisted's _doReadOrWrite; the one escaping it, by us, named
    # as callWithLogger names it
    assert errors == {ValueError: "-", RuntimeError: "FailingReader"}


def test_a_poll_with_events_calls_the_activity_callbacks_before_handling_them(
    reactor: Any,
) -> None:
    """The reactor-lag probe's wake-up (mailsuite.reactor_lag): called once per poll that
    returned events, before their work runs; not for a poll that timed out."""
    a, a_peer = socket.socketpair()
    with a, a_peer:
        ra = Reader(a)
        reactor.addReader(ra)
        seen: list[list[bytes]] = []
        reactor.mailsuite_activity.append(lambda: seen.append(list(ra.got)))
        reactor.doIteration(0)  # nothing ready
        assert seen == []
        a_peer.send(b"one")
        reactor.doIteration(1)
        assert seen == [[]] and ra.got == [b"one"]  # called before the read


def test_events_of_quiet_descriptors_alone_do_not_count_as_activity(reactor: Any) -> None:
    """The supervisor's log pipes (``mailsuite_quiet``) do not wake the probe; a poll with
    any other descriptor's event among them still does."""
    a, a_peer = socket.socketpair()
    b, b_peer = socket.socketpair()
    with a, a_peer, b, b_peer:
        ra, rb = Reader(a), Reader(b)
        reactor.addReader(ra)
        reactor.addReader(rb)
        calls: list[int] = []
        reactor.mailsuite_activity.append(lambda: calls.append(1))
        reactor.mailsuite_quiet.add(a.fileno())
        a_peer.send(b"log line")
        reactor.doIteration(1)
        assert ra.got == [b"log line"] and calls == []  # read, and no activity
        a_peer.send(b"more")
        b_peer.send(b"work")
        reactor.doIteration(1)
        assert rb.got == [b"work"] and calls == [1]
        reactor.mailsuite_quiet.discard(a.fileno())
        a_peer.send(b"again")
        reactor.doIteration(1)
        assert calls == [1, 1]


def test_input_on_a_tcp_connection_reaches_the_protocol_and_a_close_ends_it(
    reactor: Any,
) -> None:
    """An accepted TCP connection's input is read by the dispatch itself (``_read``): the
    bytes reach ``dataReceived``, the peer's close is ``ConnectionDone``, and an exception
    from the protocol is logged and drops the connection, as ``_doReadOrWrite`` does."""
    from twisted.internet import protocol
    from twisted.internet.error import ConnectionDone

    got: list[bytes] = []
    lost: list[Any] = []
    made: list[object] = []

    class Proto(protocol.Protocol):
        def connectionMade(self) -> None:
            made.append(self)

        def dataReceived(self, data: bytes) -> None:
            got.append(data)
            if data == b"boom":
                raise ValueError("protocol failed")

        def connectionLost(self, reason: Any = None) -> None:
            lost.append(reason)

    def spin(done: Any) -> None:
        for _ in range(200):
            if done():
                return
            reactor.doIteration(0.05)
        raise AssertionError("the reactor did not get there")

    factory = protocol.ServerFactory.forProtocol(Proto)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    events: list[dict[str, Any]] = []
    legacy_log.addObserver(events.append)
    try:
        for k, (last, expected) in enumerate(((b"", ConnectionDone), (b"boom", ValueError))):
            with socket.create_connection(("127.0.0.1", port.getHost().port)) as c:
                spin(lambda: len(made) > k)  # noqa: B023 (called within the iteration)
                c.sendall(b"hello")
                spin(lambda: len(got) > k)  # noqa: B023
                if last:
                    c.sendall(last)
                else:
                    c.shutdown(socket.SHUT_WR)
                spin(lambda: len(lost) > k)  # noqa: B023
                assert lost[-1].check(expected)
        assert got == [b"hello", b"hello", b"boom"]
    finally:
        legacy_log.removeObserver(events.append)
        port.stopListening()
    assert [type(e["failure"].value) for e in events if e.get("isError")] == [ValueError]
