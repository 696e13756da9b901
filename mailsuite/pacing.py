"""Writing a long answer as fast as the client reads it: the loop, for code that imports no
Twisted (the IMAP core).  The Twisted side -- knowing when the transport is full, holding
input meanwhile -- is :mod:`mailsuite.flow`.

A command that writes a lot (a FETCH of message bodies, a long SEARCH, LIST or STORE
answer) hands its output as an iterable of pieces, produced lazily; :func:`paced` joins them
into writes of about ``PIECE`` bytes and, after each, awaits the connection's "there is room
again" (``Connection.writable`` of :mod:`mailsuite.imap.interface`), so a client that does
not read makes the server hold one piece, not the whole answer (issue 10).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

#: The most a command writes in one go before it waits for room in the output.
PIECE = 64 * 1024


async def paced(
    writable: Callable[[], Awaitable[None]],
    gone: Callable[[], bool],
    write: Callable[[bytes], None],
    pieces: Iterable[bytes],
) -> None:
    """Write ``pieces`` in writes of about ``PIECE`` bytes, awaiting ``writable()`` after
    each (it completes once the client has read enough, or after one turn of the event loop
    when it has already: other connections run between the pieces of a long answer).
    Returns early once ``gone()``: the rest would be produced for nobody."""
    buf: list[bytes] = []
    size = 0
    for piece in pieces:
        buf.append(piece)
        size += len(piece)
        if size >= PIECE:
            write(b"".join(buf))
            buf, size = [], 0
            await writable()
            if gone():
                return
    if buf:
        write(b"".join(buf))
