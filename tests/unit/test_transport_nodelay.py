"""TCP_NODELAY for accepted connections: set once on the listener where the kernel passes it
on (Linux), never missing on a connection (loopback sockets, no reactor)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from mailsuite.transport import nodelay_from_listener


def nodelay(s: socket.socket) -> bool:
    return bool(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s


def accept_one(listener: socket.socket, keep: list[socket.socket]) -> socket.socket:
    client = socket.create_connection(listener.getsockname(), timeout=10)
    conn, _ = listener.accept()
    keep += [client, conn]
    return conn


def test_every_connection_has_the_option_and_the_listener_passes_it_on(
    listener: socket.socket,
) -> None:
    keep: list[socket.socket] = []
    try:
        waiting = socket.create_connection(listener.getsockname(), timeout=10)  # queued early
        keep.append(waiting)
        first = accept_one(listener, keep)
        assert not nodelay(first) and not nodelay(listener)
        state = nodelay_from_listener(first, listener, None)
        assert nodelay(first) and nodelay(listener) and state is None
        # accepted before the listener had the option: set on its own, still not known
        early, _ = listener.accept()
        keep.append(early)
        state = nodelay_from_listener(early, listener, state)
        assert nodelay(early)
        second = accept_one(listener, keep)
        assert nodelay(second)  # copied from the listener by the kernel (Linux)
        state = nodelay_from_listener(second, listener, state)
        assert state is True
        third = accept_one(listener, keep)
        assert nodelay_from_listener(third, listener, state) is True and nodelay(third)
    finally:
        for s in keep:
            s.close()
