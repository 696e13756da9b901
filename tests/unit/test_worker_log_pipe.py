"""The supervisor's side of a worker's log pipe: its events do not wake the reactor-lag probe
(mailsuite.reactor_dispatch's ``mailsuite_quiet``), for as long as the pipe is open."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from mailsuite.workers import LOG_LINES_FD, _Worker


class Reader:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


def worker(quiet: set[int]) -> _Worker:
    supervisor: Any = SimpleNamespace(reactor=SimpleNamespace(mailsuite_quiet=quiet))
    w = _Worker(supervisor, 0)
    w.process = SimpleNamespace(pipes={LOG_LINES_FD: Reader(42), 3: Reader(43)})
    return w


def test_the_log_pipe_is_quiet_while_open() -> None:
    quiet: set[int] = {7}
    w = worker(quiet)
    w._quiet_log_pipe()
    assert quiet == {7, 42}  # the log pipe only: the queue pipe (43) still counts
    w.childConnectionLost(3)
    assert quiet == {7, 42}
    w.childConnectionLost(LOG_LINES_FD)
    assert quiet == {7}  # its number may be reused by a descriptor that counts
    w._unquiet_log_pipe()  # (processEnded after the pipe closed: nothing more)
    assert quiet == {7}


def test_a_reactor_without_the_lean_dispatch_is_left_alone() -> None:
    supervisor: Any = SimpleNamespace(reactor=SimpleNamespace())
    w = _Worker(supervisor, 0)
    w.process = SimpleNamespace(pipes={LOG_LINES_FD: Reader(42)})
    w._quiet_log_pipe()
    w.childConnectionLost(LOG_LINES_FD)
    assert w._quiet_fd is None
