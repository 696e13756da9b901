"""The IMAP session core driven as a unit: no reactor, no sockets, no Twisted.

``Adapter`` below is a fake of ``imap/server.py`` on asyncio: it provides the session's
``Connection`` (:mod:`mailsuite.imap.interface`), parses input with the real
``CommandReader``, runs one command at a time and drives the coroutine a waiting command
returns, handing it the next line when it asked for one (AUTHENTICATE, IDLE) -- what the real
adapter does with Deferreds.  The store is real (a Maildir in ``tmp_path``); logins, worker
threads and timers are the test's.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import pytest

from mailsuite.directory import Directory
from mailsuite.imap import message_commands
from mailsuite.imap.interface import ConnectionGone, Limits, Services
from mailsuite.imap.parser import Command, CommandReader
from mailsuite.imap.session import POLL_INTERVAL, Session
from mailsuite.login import LoginResult, Outcome
from mailsuite.store.events import ChangeHub
from mailsuite.store.folder_copy import append_blocking
from mailsuite.store.mailbox import FolderRegistry

P = ParamSpec("P")
T = TypeVar("T")
ALICE = "alice@example.test"
MESSAGE = b"From: <bob@remote.test>\nTo: <alice@example.test>\nSubject: %d\n\nbody %d\n"


class RecordingLog:
    """A :class:`mailsuite.corelog.Log` that keeps what it was told (failures with the
    exception being handled)."""

    def __init__(self) -> None:
        self.failures: list[tuple[str, BaseException | None]] = []

    def failure(self, format: str, **fields: Any) -> None:
        self.failures.append((format.format(**fields), sys.exc_info()[1]))

    def warn(self, format: str, **fields: Any) -> None:
        pass

    def info(self, format: str, **fields: Any) -> None:
        pass

    def debug(self, format: str, **fields: Any) -> None:
        pass


class Host:
    """The listener's side: a real store and directory; logins, threads and timers faked."""

    def __init__(self, tmp: Path) -> None:
        self.directory = Directory(tmp / "directory.json", tmp / "mail", ("example.test",))
        self.directory.add_user(ALICE, "unused")
        self.changes = ChangeHub()
        loop = asyncio.get_running_loop()
        self.registry = FolderRegistry(self.changes, loop.call_soon)
        self.gate: asyncio.Future[None] | None = None  # set: logins wait for it
        self.timers: dict[int, tuple[float, Callable[[], None]]] = {}
        self.blocking_calls: list[str] = []
        self.fail_blocking: BaseException | None = None
        self.log = RecordingLog()
        self.services = Services(
            registry=self.registry,
            changes=self.changes,
            mailbox_root=self.directory.mailbox_root,
            login=self.login,
            run_blocking=self.run_blocking,
            next_turn=lambda: asyncio.sleep(0),
            every=self.every,
            log=self.log,
            limits=Limits(max_literal=1 << 20, allow_plaintext=False, tls_available=True),
        )

    async def login(self, user: str, password: str, ip: str, protocol: str) -> LoginResult:
        assert (ip, protocol) == ("127.0.0.1", "imap")
        if self.gate is not None:
            await self.gate
        if user == ALICE and password == "secret":
            return LoginResult(Outcome.OK, ALICE)
        return LoginResult(Outcome.BAD_CREDENTIALS)

    async def run_blocking(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        self.blocking_calls.append(fn.__name__)
        await asyncio.sleep(0)  # the answer comes later, as from a thread
        if self.fail_blocking is not None:
            raise self.fail_blocking
        return fn(*args, **kwargs)

    def every(self, seconds: float, tick: Callable[[], None]) -> Callable[[], None]:
        key = len(self.timers) + 1
        self.timers[key] = (seconds, tick)
        return lambda: self.timers.pop(key)  # twice would raise: the core stops it once

    def deliver(self, n: int, folder: str = "") -> None:
        root = self.directory.mailbox_root(ALICE)
        path = root / f".{folder}" if folder else root
        append_blocking(path, MESSAGE % (n, n), frozenset(), time.time())
        self.changes.notify(path)


class Adapter:
    """A fake ``imap/server.py``: the session's Connection, and input one command at a time."""

    def __init__(self, host: Host, tls: bool = True) -> None:
        self.out = bytearray()
        self._tls = tls
        self.closed = False
        self.logged_in = False
        self.writable_waits = 0
        self.reader = CommandReader(max_append_literal=1 << 20)
        self.session = Session(host.services, self)
        self.task: asyncio.Future[None] | None = None
        self._line: asyncio.Future[bytes] | None = None
        self._asked = asyncio.Event()

    # -- Connection ----------------------------------------------------------------------

    @property
    def tls(self) -> bool:
        return self._tls

    @property
    def peer_ip(self) -> str:
        return "127.0.0.1"

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.out += data

    async def writable(self) -> None:
        self.writable_waits += 1
        await asyncio.sleep(0)

    def gone(self) -> bool:
        return self.closed

    def next_line(self, prompt: bytes) -> Awaitable[bytes]:
        self.write(prompt)
        self._line = asyncio.get_running_loop().create_future()
        self._asked.set()
        return self._line

    def start_tls(self) -> None:
        self._tls = True

    def close(self) -> None:
        self.closed = True

    def admit_login(self, user: str) -> str | None:
        return None

    def authenticated(self) -> None:
        self.logged_in = True

    # -- input, as the real adapter handles it -------------------------------------------

    async def send(self, data: bytes) -> None:
        """Feed the client's bytes (complete lines): each command runs to its end, or until
        it waits for a line, before the next line is read (ordered pipelining)."""
        for line in data.split(b"\r\n")[:-1]:
            if self._line is not None:
                waiting, self._line = self._line, None
                waiting.set_result(line)
                await self._settle()
                continue
            assert self.task is None or self.task.done(), "input read while a command runs"
            cmd = self.reader.feed_line(line)
            assert isinstance(cmd, Command), cmd
            work = self.session.run(cmd)
            if work is not None:
                self.task = asyncio.ensure_future(work)
                await self._settle()

    async def _settle(self) -> None:
        assert self.task is not None
        self._asked.clear()
        asked = asyncio.ensure_future(self._asked.wait())
        await asyncio.wait({self.task, asked}, return_when=asyncio.FIRST_COMPLETED)
        asked.cancel()
        if self.task.done():
            self.task.result()  # the core answers failures itself: nothing may escape

    def lose_connection(self) -> None:
        if self._line is not None:
            waiting, self._line = self._line, None
            waiting.set_exception(ConnectionGone())
        self.closed = True
        self.session.connection_lost()

    def take(self) -> list[bytes]:
        lines = bytes(self.out).split(b"\r\n")
        self.out.clear()
        return lines[:-1]


def run(scenario: Callable[[Host], Awaitable[None]], tmp: Path) -> None:
    async def main() -> None:
        await scenario(Host(tmp))

    asyncio.run(main())


def tagged(lines: list[bytes]) -> list[bytes]:
    return [line for line in lines if not line.startswith((b"* ", b"+ "))]


@pytest.fixture
def small_batches() -> Iterator[None]:
    saved = message_commands.BATCH
    message_commands.BATCH = 2
    yield
    message_commands.BATCH = saved


# -- LOGIN, SELECT, FETCH --------------------------------------------------------------------


def test_login_select_fetch_and_seen(tmp_path: Path) -> None:
    async def scenario(host: Host) -> None:
        for n in (1, 2):
            host.deliver(n)
        a = Adapter(host)
        await a.send(b"a1 LOGIN alice@example.test secret\r\n")
        assert a.take() == [
            b"a1 OK [CAPABILITY " + a.session.capabilities().encode() + b"] Logged in"
        ]
        assert a.logged_in
        await a.send(b"a2 SELECT INBOX\r\n")
        lines = a.take()
        assert b"* 2 EXISTS" in lines and b"* 2 RECENT" in lines
        assert b"* OK [UNSEEN 1] First unseen" in lines
        assert lines[-1] == b"a2 OK [READ-WRITE] SELECT completed"
        await a.send(b"a3 FETCH 1:2 (FLAGS BODY[HEADER.FIELDS (SUBJECT)])\r\n")
        out = bytes(a.out)
        assert (
            b"* 1 FETCH (FLAGS (\\Seen \\Recent) BODY[HEADER.FIELDS (SUBJECT)] {14}\r\n"
            b"Subject: 1\r\n\r\n)" in out
        )
        assert out.endswith(b"a3 OK FETCH completed\r\n")
        a.take()
        # the \Seen FETCH set is in the store, seen by a second session
        b = Adapter(host)
        await b.send(
            b"b1 LOGIN alice@example.test secret\r\nb2 EXAMINE INBOX\r\nb3 FETCH 1:2 FLAGS\r\n"
        )
        assert b"* 2 FETCH (FLAGS (\\Seen))" in b.take()

    run(scenario, tmp_path)


def test_bad_password_and_commands_before_login(tmp_path: Path) -> None:
    async def scenario(host: Host) -> None:
        a = Adapter(host)
        await a.send(b"a1 SELECT INBOX\r\na2 LOGIN alice@example.test wrong\r\na3 SELECT INBOX\r\n")
        assert a.take() == [
            b"a1 BAD SELECT is not allowed in the not authenticated state",
            b"a2 NO [AUTHENTICATIONFAILED] Invalid user name or password",
            b"a3 BAD SELECT is not allowed in the not authenticated state",
        ]
        assert not a.logged_in

    run(scenario, tmp_path)


def test_login_without_tls_is_refused(tmp_path: Path) -> None:
    async def scenario(host: Host) -> None:
        a = Adapter(host, tls=False)
        assert "LOGINDISABLED" in a.session.capabilities()
        assert "STARTTLS" in a.session.capabilities()
        await a.send(b"a1 LOGIN alice@example.test secret\r\n")
        assert a.take() == [b"a1 NO [PRIVACYREQUIRED] Use STARTTLS first"]

    run(scenario, tmp_path)


def test_authenticate_plain_reads_the_response_line(tmp_path: Path) -> None:
    async def scenario(host: Host) -> None:
        a = Adapter(host)
        await a.send(b"a1 AUTHENTICATE PLAIN\r\n")
        assert a.take() == [b"+ "]
        await a.send(base64.b64encode(b"\x00alice@example.test\x00secret") + b"\r\n")
        (line,) = a.take()
        assert line.startswith(b"a1 OK [CAPABILITY ")
        b = Adapter(host)
        await b.send(b"b1 AUTHENTICATE PLAIN\r\n*\r\n")
        assert b.take() == [b"+ ", b"b1 BAD Authentication cancelled"]

    run(scenario, tmp_path)


def test_fetch_waits_for_the_output_between_batches(tmp_path: Path, small_batches: None) -> None:
    async def scenario(host: Host) -> None:
        for n in range(1, 6):
            host.deliver(n)
        a = Adapter(host)
        await a.send(b"a1 LOGIN alice@example.test secret\r\na2 EXAMINE INBOX\r\n")
        a.take()
        await a.send(b"a3 FETCH 1:* UID\r\n")
        lines = a.take()
        assert [line for line in lines if b"FETCH (" in line] == [
            b"* %d FETCH (UID %d)" % (n, n) for n in range(1, 6)
        ]
        assert a.writable_waits == 2  # batches of 2: waits after the first and the second

    run(scenario, tmp_path)


# -- IDLE ------------------------------------------------------------------------------------


def test_idle_pushes_changes_and_ends_with_done(tmp_path: Path) -> None:
    async def scenario(host: Host) -> None:
        host.deliver(1)
        a = Adapter(host)
        await a.send(b"a1 LOGIN alice@example.test secret\r\na2 SELECT INBOX\r\n")
        a.take()
        await a.send(b"a3 IDLE\r\n")
        assert a.take() == [b"+ idling"]
        assert [s for s, _ in host.timers.values()] == [POLL_INTERVAL]  # polls other programs
        host.deliver(2)  # this process: the change hub, then the folder refresh
        await asyncio.sleep(0)
        assert a.take() == [b"* 2 EXISTS", b"* 2 RECENT"]  # both new to this session
        await a.send(b"DONE\r\n")
        assert a.take() == [b"a3 OK IDLE terminated"]
        assert host.timers == {}
        await a.send(b"a4 IDLE\r\n")
        await a.send(b"NOPE\r\n")
        assert a.take() == [b"+ idling", b"a4 BAD Expected DONE"]
        assert host.timers == {}

    run(scenario, tmp_path)


def test_connection_lost_in_idle_ends_it_quietly(tmp_path: Path) -> None:
    async def scenario(host: Host) -> None:
        a = Adapter(host)
        await a.send(b"a1 LOGIN alice@example.test secret\r\na2 SELECT INBOX\r\na3 IDLE\r\n")
        a.take()
        assert len(host.timers) == 1
        a.lose_connection()
        await asyncio.sleep(0)
        assert a.task is not None and a.task.done() and a.task.exception() is None
        assert host.timers == {}  # the poller stopped
        assert host.log.failures == []  # nobody to answer, nothing to log

    run(scenario, tmp_path)


# -- pipelining, failures --------------------------------------------------------------------


def test_pipelined_commands_are_answered_in_order(tmp_path: Path) -> None:
    async def scenario(host: Host) -> None:
        host.deliver(1)
        host.gate = asyncio.get_running_loop().create_future()
        a = Adapter(host)
        sending = asyncio.ensure_future(
            a.send(
                b"a1 LOGIN alice@example.test secret\r\na2 SELECT INBOX\r\na3 SELECT Nope\r\n"
                b"a4 NOOP\r\na5 LOGOUT\r\n"
            )
        )
        await asyncio.sleep(0)
        assert a.take() == []  # the login waits: nothing after it is answered either
        host.gate.set_result(None)
        await sending
        assert [line.split(b" ", 2)[:2] for line in tagged(a.take())] == [
            [b"a1", b"OK"],
            [b"a2", b"OK"],
            [b"a3", b"NO"],
            [b"a4", b"OK"],
            [b"a5", b"OK"],
        ]
        assert a.closed

    run(scenario, tmp_path)


def test_select_opens_a_folder_not_open_in_a_worker_thread(tmp_path: Path) -> None:
    """The index of a folder this process has not open is opened (built, filled, synced) in
    a worker thread: a first SELECT of 100,000 files must not hold the event loop.  An open
    or warm folder is selected at once; a connection lost meanwhile leaves nothing open."""

    async def scenario(host: Host) -> None:
        host.deliver(1)
        inbox = host.directory.mailbox_root(ALICE)
        a = Adapter(host)
        await a.send(b"a1 LOGIN alice@example.test secret\r\na2 SELECT INBOX\r\n")
        assert b"* 1 EXISTS" in a.take()
        assert host.blocking_calls == ["opened_index"]
        assert host.registry.has(inbox)
        await a.send(b"a3 EXAMINE INBOX\r\n")  # open here: no thread
        assert tagged(a.take()) == [b"a3 OK [READ-ONLY] EXAMINE completed"]
        assert host.blocking_calls == ["opened_index"]
        b = Adapter(host)
        await b.send(b"b1 LOGIN alice@example.test secret\r\n")
        await b.send(b"b2 CREATE Archive\r\n")
        b.take()
        archive = inbox / ".Archive"
        cmd = b.reader.feed_line(b"b3 SELECT Archive")
        assert isinstance(cmd, Command)
        work = b.session.run(cmd)
        assert work is not None
        task = asyncio.ensure_future(work)
        b.lose_connection()  # while the index is being opened in the worker
        await task
        assert host.blocking_calls == ["opened_index", "opened_index"]
        assert not host.registry.has(archive)
        assert not [ln for ln in b.take() if ln.startswith(b"b3")]

    run(scenario, tmp_path)


def test_a_failure_in_a_waiting_command_is_answered_and_logged(tmp_path: Path) -> None:
    async def scenario(host: Host) -> None:
        host.deliver(1)
        a = Adapter(host)
        await a.send(
            b"a1 LOGIN alice@example.test secret\r\na2 CREATE Archive\r\na3 SELECT INBOX\r\n"
        )
        a.take()
        host.fail_blocking = OSError("disk on fire")
        await a.send(b"a4 COPY 1 Archive\r\na5 NOOP\r\n")
        assert tagged(a.take()) == [
            b"a4 NO [SERVERBUG] Internal server error, logged",
            b"a5 OK NOOP completed",
        ]
        # SELECT opened the folder's index in a worker thread (it was not open)
        assert host.blocking_calls == ["opened_index", "copy_blocking"]
        ((text, exc),) = host.log.failures
        assert text == f"IMAP COPY failed for {ALICE}" and isinstance(exc, OSError)
        host.fail_blocking = None
        await a.send(b"a6 COPY 1 Archive\r\n")
        (line,) = tagged(a.take())
        assert re.fullmatch(rb"a6 OK \[COPYUID \d+ 1 1\] COPY completed", line), line

    run(scenario, tmp_path)


def _run_staged(fn: Callable[[Callable[[T], None]], Any]) -> tuple[Awaitable[T | None], Any]:
    """The real adapter's ``run_staged`` on asyncio: ``fn`` in a worker thread, its report
    brought to the loop before its end (both through ``call_soon_threadsafe``: in order)."""
    loop = asyncio.get_running_loop()
    first: asyncio.Future[T | None] = loop.create_future()

    def fire(value: T | None) -> None:
        if not first.done():
            first.set_result(value)

    done = loop.run_in_executor(None, fn, lambda value: loop.call_soon_threadsafe(fire, value))
    done.add_done_callback(lambda _: fire(None))
    return first, done


def test_a_build_failing_after_the_early_answer_ends_the_session(tmp_path: Path) -> None:
    """A first SELECT of a big folder is answered before its index is built (index_build); a
    build that then fails cannot take the answer back: the session ends with BYE, the
    failure is logged, and the uidlist left gives the next open the UIDs that were told."""
    from unittest import mock

    from mailsuite.store import index_build
    from mailsuite.store.index import FolderIndex
    from mailsuite.store.uidlist import read_uidlist

    async def scenario(host: Host) -> None:
        inbox = host.directory.mailbox_root(ALICE)
        host.deliver(1)  # (makes the Maildir) ...
        for f in inbox.glob("mailsuite-index*"):
            f.unlink()  # ... which another program then filled
        for i in range(index_build.UIDLIST_MIN):
            (inbox / "cur" / f"{1_700_000_000 + i}.M{i}P1.h:2,S").write_bytes(b"Subject: x\n\n")
        host.services = dataclasses.replace(host.services, run_staged=_run_staged)
        a = Adapter(host)
        await a.send(b"a1 LOGIN alice@example.test secret\r\n")
        a.take()
        with mock.patch.object(index_build, "_write", side_effect=RuntimeError("disk on fire")):
            await a.send(b"a2 SELECT INBOX\r\n")
        lines = a.take()
        n = index_build.UIDLIST_MIN + 1
        assert b"* %d EXISTS" % n in lines and b"* OK [UNSEEN %d] First unseen" % n in lines
        assert lines[-2:] == [
            b"a2 OK [READ-WRITE] SELECT completed",
            b"* BYE Mailbox index could not be built, please reconnect",
        ]
        assert a.closed and a.session.view is None and not host.registry.has(inbox)
        ((text, exc),) = host.log.failures
        assert text == f"index build of {inbox} failed" and isinstance(exc, RuntimeError)
        told = re.search(rb"UIDVALIDITY (\d+)", b" ".join(lines))
        assert told is not None
        left = read_uidlist(inbox)
        assert left is not None and left.uidvalidity == int(told.group(1))
        index = FolderIndex(inbox)
        assert (index.uidvalidity, index.uidnext) == (left.uidvalidity, n + 1)
        index.close()

    run(scenario, tmp_path)
