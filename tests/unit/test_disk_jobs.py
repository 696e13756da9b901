"""DiskJobs: the delivery's file work in plain threads, results back on the reactor thread."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from mailsuite.disk_jobs import DiskJobs


class Reactor:
    """What DiskJobs uses of a reactor: callFromThread (queued here, run by the test as the
    reactor would run them) and a shutdown trigger."""

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]]] = (
            queue.SimpleQueue()
        )
        self.triggers: list[tuple[str, str, Callable[[], None]]] = []
        self.thread = threading.get_ident()

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:  # noqa: N802
        assert threading.get_ident() != self.thread  # only ever from a job's thread
        self.calls.put((f, args))

    def addSystemEventTrigger(self, phase: str, event: str, f: Callable[[], None]) -> None:  # noqa: N802
        self.triggers.append((phase, event, f))

    def turn(self) -> None:
        f, args = self.calls.get(timeout=10)
        f(*args)

    def turn_until(self, done: Callable[[], bool]) -> None:
        """Run the calls from the job threads until ``done()`` (each may fire several jobs)."""
        while not done():
            self.turn()


def test_results_and_errors_come_back_and_shutdown_ends_the_threads() -> None:
    reactor = Reactor()
    jobs = DiskJobs(reactor, threads=3)
    ran_in: list[int] = []

    def work(x: int) -> int:
        ran_in.append(threading.get_ident())
        return x * 2

    def fail() -> None:
        raise OSError(28, "No space left on device")

    results: list[object] = []
    for i in range(5):
        jobs.run(work, i).addCallback(results.append)
    errors: list[Any] = []
    jobs.run(fail).addErrback(errors.append)
    reactor.turn_until(lambda: len(results) + len(errors) == 6)
    assert sorted(results) == [0, 2, 4, 6, 8]  # type: ignore[type-var]
    assert len(errors) == 1 and errors[0].check(OSError) and errors[0].value.errno == 28
    assert reactor.thread not in ran_in
    # started with the first job, ended with the reactor, like Twisted's own pool
    assert [(p, e) for p, e, _ in reactor.triggers] == [("during", "shutdown")]
    threads = list(jobs._threads)
    assert len(threads) == 3 and all(t.is_alive() for t in threads)
    reactor.triggers[0][2]()
    assert not any(t.is_alive() for t in threads)
    late: list[Any] = []
    jobs.run(work, 1).addErrback(late.append)
    assert late and late[0].check(RuntimeError)


def test_jobs_handed_over_before_shutdown_finish() -> None:
    reactor = Reactor()
    jobs = DiskJobs(reactor, threads=1)
    gate = threading.Event()
    done: list[str] = []
    jobs.run(gate.wait, 10).addCallback(lambda _: done.append("first"))
    jobs.run(lambda: "second").addCallback(done.append)
    stopper = threading.Thread(target=reactor.triggers[0][2])
    stopper.start()
    gate.set()
    stopper.join(timeout=10)
    assert not stopper.is_alive()
    reactor.turn_until(lambda: len(done) == 2)
    assert done == ["first", "second"]


def test_jobs_finished_before_the_reactor_turns_come_back_in_one_call() -> None:
    """One wake-up of the reactor for every job that finished while it was busy, and the
    next job after that wakes it again (nothing is left waiting)."""
    reactor = Reactor()
    jobs = DiskJobs(reactor, threads=3)

    def work(x: int) -> int:
        return x

    results: list[int] = []
    for i in range(6):
        jobs.run(work, i).addCallback(results.append)
    deadline = time.monotonic() + 10
    while len(jobs._done) < 6:  # every job finished, none fired yet
        assert time.monotonic() < deadline
        time.sleep(0.001)
    f, args = reactor.calls.get(timeout=10)
    assert reactor.calls.empty()  # the five others joined the first one's call
    f(*args)
    assert sorted(results) == list(range(6))
    jobs.run(work, 6).addCallback(results.append)
    reactor.turn()
    assert results[-1] == 6
    reactor.triggers[0][2]()


@pytest.mark.parametrize("threads", [1, 4])
def test_no_thread_before_the_first_job(threads: int) -> None:
    reactor = Reactor()
    jobs = DiskJobs(reactor, threads=threads)
    assert jobs._threads == [] and reactor.triggers == []
