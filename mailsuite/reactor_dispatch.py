"""The epoll reactor's event dispatch without the legacy log context per event.

Twisted's ``EPollReactor.doPoll`` hands every ready descriptor to ``_doReadOrWrite`` through
``twisted.python.log.callWithLogger``: per event it asks the connection for its
``logPrefix()``, copies the legacy log context dict, pushes it and pops it again (a dozen
Python calls, 3-10 us on our machines), only so that a message logged with the *legacy*
``twisted.python.log.msg``/``err`` while the event is handled carries the connection's name as
its "system".  mailsuite logs with ``twisted.logger.Logger``, whose events never read that
context, and a request/response protocol gets one event per command: for a POP3 NOOP or RETR
it was the largest single item of the server's own Python time after the protocol code.

:func:`lean_dispatch` gives an epoll reactor a ``doIteration`` that does what ``doPoll`` does
-- the same poll, the same ``_doReadOrWrite`` per event, an exception escaping it logged
(with the connection's prefix as its system, as ``callWithLogger`` logs it) and the other
events still handled -- without the context.  What changes: a legacy message logged by
Twisted itself while handling an event (its "Unhandled Error" for an exception a protocol
raised) has the system ``-`` instead of the connection's prefix; the traceback is the same.
Any other reactor (a test's, a subclass with its own ``doIteration``) is left as it is.
Input on an accepted TCP connection, the event of nearly every command, is read here and
handed to the protocol directly (:func:`_read`: two Python calls fewer per command).

The switched reactor also gets ``mailsuite_activity``, a list of callables called (in
order, before the events are handled) after every poll that returned events: the reactor-lag
probe slows down while the server is idle and is woken by it
(:mod:`mailsuite.reactor_lag`).  One check of an empty list per poll otherwise.  Events of
the descriptors in ``mailsuite_quiet`` (a set of numbers) do not count: the supervisor puts
its workers' log pipes there, whose lines arrive all the time a server takes mail and only
need writing to the log; counted, they kept its probe at 100 ticks a second, each a wake-up
of an otherwise idle process (about 35 us of CPU per SMTP message at 400 messages a second,
``bench/smtp_cpu.py``).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from select import EPOLLIN
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.internet.tcp import Server
from twisted.logger import Logger
from twisted.python import log as legacy_log

__all__ = ["lean_dispatch"]

log = Logger(namespace="mailsuite.reactor")


def lean_dispatch(reactor: Any) -> bool:
    """Switch an ``EPollReactor`` to the lean dispatch (see the module docstring); False,
    and nothing changed, for any other reactor or one switched already."""
    if getattr(
        type(reactor), "doIteration", None
    ) is not EPollReactor.doPoll or "doIteration" in vars(reactor):
        return False
    poller = reactor._poller
    selectables: dict[int, Any] = reactor._selectables
    handle = reactor._doReadOrWrite
    activity: list[Callable[[], None]] = []
    quiet: set[int] = set()

    def do_poll(timeout: float | None) -> None:
        try:
            # as doPoll: at most one event per descriptor we watch, block for ``timeout``
            events = poller.poll(-1 if timeout is None else timeout, len(selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        if events and activity and (not quiet or not all(fd in quiet for fd, _ in events)):
            for f in activity:
                f()
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue  # removed by an earlier event of this batch
            try:
                if event == EPOLLIN and type(selectable) is Server:
                    _read(reactor, selectable)
                else:
                    handle(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                prefix = _prefix(selectable)
                log.failure("Unhandled Error in {system}", system=prefix, log_system=prefix)

    reactor.doIteration = do_poll
    reactor.mailsuite_activity = activity
    reactor.mailsuite_quiet = quiet
    return True


def _read(reactor: Any, connection: Any) -> None:
    """Input on an accepted TCP connection, and nothing else to report (``EPOLLIN`` alone):
    what ``_doReadOrWrite`` and ``doRead`` do then, without their two calls and the
    ``fileno`` check (a connection is removed from the reactor before its socket is closed),
    so the bytes reach the protocol's ``dataReceived`` one call from the poll.  A failed
    ``recv``, the peer's close and an exception from the protocol end as there: the
    connection is disconnected with ``ConnectionLost``, ``ConnectionDone`` or the exception
    (logged as Twisted logs it).  Other events and descriptors go through
    ``_doReadOrWrite`` as before."""
    try:
        data = connection.socket.recv(connection.bufferSize)
    except OSError as e:
        if e.args[0] == errno.EWOULDBLOCK:
            return
        reactor._disconnectSelectable(connection, CONNECTION_LOST, True)
        return
    if not data:
        reactor._disconnectSelectable(connection, CONNECTION_DONE, True)
        return
    try:
        connection.protocol.dataReceived(data)
    except BaseException as e:
        legacy_log.err()  # type: ignore[no-untyped-call]  # (as _doReadOrWrite)
        reactor._disconnectSelectable(connection, e, True)


def _prefix(selectable: Any) -> str:
    """The selectable's ``logPrefix()``, as ``callWithLogger`` names it (only on an error)."""
    try:
        return str(selectable.logPrefix())
    except Exception:
        return "(buggy logPrefix method)"
