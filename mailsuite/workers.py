"""The supervisor of ``[server] workers`` > 1: the twistd process binds, workers serve.

Why this shape (issue 15): one Python process does TLS, parsing and every session on one
core.  Here the twistd process binds every listener once -- before ``--uid``/``--gid`` drop
root, so ports below 1024 work as before -- and never accepts on them; it starts N worker
processes (``python -m mailsuite.worker``, :func:`reactor.spawnProcess` with the listening
sockets passed as ``childFDs``), each of which adopts the sockets
(``reactor.adoptStreamPort``) and serves every protocol.  The kernel hands each new
connection to one of the workers waiting in ``accept``.

What stays here, once for the whole server: the queue runner (workers tell it of a new
entry through a pipe, fd 3, one queue id per line, so it is tried at once), the sweep of
leftover temporary files, DKIM signing of the queue's DSNs.  What every worker does: the
listeners, TLS (and its reload on SIGHUP or change), logins, deliveries.  What the workers
share: the store (flock, SQLite WAL, Maildir renames were already safe for several
processes), failed-login counts (:mod:`mailsuite.shared.counters`), connection counts
(:mod:`mailsuite.shared.connection_table`, mmapped in tmpfs), and
folder change notifications through inotify (:mod:`mailsuite.shared.folder_watch`).

Supervision: a worker that dies is started again after a back-off (0.5 s doubling to 30 s,
back to 0.5 s once a worker has lived a minute); its connections leave the shared counts.
SIGHUP is passed on (certificate reload); SIGTERM/SIGINT stop the server: each worker stops
accepting, lets its sessions end for up to :data:`SHUTDOWN_GRACE` seconds,
then exits; one that does not is killed.

The log stays one file written by this process.  A worker formats its own lines exactly as
this process's observer would, ``w<N>`` in front of their system, and sends them finished
down a pipe on its fd 4 (:mod:`mailsuite.loglines`); they are written here as they arrive.
When twistd's own observer stands (``--syslog``, ``--logger``) a worker sends its events
instead, as JSON on its stdout, and they are published here.  Anything else a worker
prints (stdout, stderr) is logged here as a warning naming the worker.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer, endpoints, protocol
from twisted.internet.error import CannotListenError
from twisted.logger import Logger, eventFromJSON, globalLogPublisher

from mailsuite.config import Config
from mailsuite.loglines import Frames, LineLog
from mailsuite.shared import connection_table, counters

log = Logger(namespace="mailsuite.workers")

#: ``[server] workers = "auto"``: one per core, at most this many (past a few processes the
#: shared state costs more than another process gains on a small server).
AUTO_CAP = 4


def count(config: Config) -> int:
    """How many processes serve the listeners: ``[server] workers``, "auto" resolved here
    (1 in sandbox mode, whose catalog, event streams and waiters live in one process)."""
    if config.workers:
        return config.workers
    if config.mode == "sandbox":
        return 1
    return max(1, min(os.cpu_count() or 1, AUTO_CAP))


#: tmpfs on Linux: files there are never written back to a disk
SHM = Path("/dev/shm")


def live_state_dir(config: Config, shm: Path = SHM, owner: int | None = None) -> Path:
    """Where the twistd process and its workers keep the state they share through mmapped
    files: prometheus-client's counts (:mod:`mailsuite.metrics`) and the connection table
    (:mod:`mailsuite.shared.connection_table`).

    Those files are written at every count.  On a disk file system a write to a mmapped
    page that writeback has just cleaned waits in the kernel (``page_mkwrite``) for the
    journal, which a stream of fsyncs (one per delivery) keeps busy: a 14 ms reactor stall
    was seen under SMTP load.  So they go to tmpfs (``/dev/shm``), in a folder named for
    the account that serves and the data folder, made here with mode 0700 (the same name
    on every call, so the supervisor and its workers agree).  ``owner``: that account's
    uid when it is not this process's (twistd started as root with ``--uid``: the folder is
    made and given to it here).  Where there is no tmpfs, or the name is taken by anything
    but that account's private folder (another user's, a symlink), the data folder's
    ``run/live``."""
    fallback = config.data_dir / "run" / "live"
    if not shm.is_dir():
        return fallback
    uid = os.geteuid() if owner is None else owner
    key = hashlib.sha256(os.fsencode(config.data_dir.resolve())).hexdigest()[:16]
    path = shm / f"mailsuite-live-{uid}-{key}"
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass  # ours from an earlier call or run, or not ours: checked below
    except OSError:
        return fallback  # not writable for us
    else:
        if uid != os.geteuid():
            try:
                os.chown(path, uid, -1)  # just made by us (root): nobody else could swap it
            except OSError:
                return fallback
    try:
        st = os.lstat(path)
    except OSError:
        return fallback
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        return fallback
    _note_data_folder(path, config.data_dir.resolve(), uid)
    sweep_live_state(shm, uid, keep=path)
    return path


#: the file in a live-state folder that names the data folder it serves
DATA_FOLDER_NOTE = "data-folder"


def _note_data_folder(path: Path, data_dir: Path, uid: int) -> None:
    """Write which data folder ``path`` belongs to (see :func:`sweep_live_state`), once, and
    only once that folder exists: a new server asks for its live-state folder before it
    makes its data folder, and a note naming a folder not made yet would have a server
    starting at the same moment remove the live-state folder of this one.  (The supervisor
    asks again once the data folder is made.)"""
    if not data_dir.is_dir():
        return
    note = path / DATA_FOLDER_NOTE
    text = os.fsencode(data_dir)
    with contextlib.suppress(OSError):
        if note.read_bytes() == text:
            return
    tmp = path / f"{DATA_FOLDER_NOTE}.{os.getpid()}"
    try:
        tmp.write_bytes(text)
        if uid != os.geteuid():
            os.chown(tmp, uid, -1)
        tmp.replace(note)  # whole or not at all: a sweep never reads half a name
    except OSError:
        tmp.unlink(missing_ok=True)


def sweep_live_state(shm: Path, uid: int, keep: Path) -> int:
    """Remove ``uid``'s live-state folders in ``shm`` whose data folder no longer exists;
    return how many.

    A server stopped cleanly removes its folder, one killed (``kill -9``, a crash, a
    power cut does not matter: tmpfs is empty after it) leaves it, 16-600 KB of memory each,
    for as long as the machine runs -- a test suite that kills servers on temporary data
    folders left dozens.  A server started again on the same data folder reuses its own;
    the folders of data folders that are gone can never be used again, and any server of
    the same account removes them when it starts.  A folder without its note (being made
    right now, or by an older version) is left alone, as is anything not a private folder
    of ``uid``."""
    removed = 0
    try:
        candidates = list(shm.glob(f"mailsuite-live-{uid}-*"))
    except OSError:
        return 0
    for folder in candidates:
        if folder == keep:
            continue
        try:
            st = os.lstat(folder)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
                continue
            data_dir = os.fsdecode((folder / DATA_FOLDER_NOTE).read_bytes())
        except (OSError, ValueError):
            continue
        if not data_dir.startswith("/") or os.path.lexists(data_dir):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
    return removed


#: Restart back-off: first delay, cap, and how long a worker must live to reset it.
RESTART_FIRST = 0.5
RESTART_MAX = 30.0
RESTART_RESET_AFTER = 60.0

#: Seconds a stopping worker waits for its sessions to end before closing them.
SHUTDOWN_GRACE = 10.0

#: Listening sockets are numbered from here in the worker (0-2 stdio, 3 the queue pipe,
#: 4 the log lines).
FIRST_LISTENER_FD = 10

#: The worker's end of the pipe its finished log lines come down (mailsuite.loglines).
LOG_LINES_FD = 4

#: Seconds a worker's log pipe is left unread after a read that emptied it: the lines
#: written meanwhile wait in the pipe (the kernel's: nothing is lost if the worker dies,
#: and the worker's write wakes no one) and are written to the log together -- one wake-up,
#: one read and one write for many lines instead of each.  A read that fills the buffer
#: (more waiting) is followed by the next at once, so a burst never fills the pipe.
LOG_READ_PAUSE = 0.02
#: What Twisted reads from a pipe at most per readable event (twisted.internet.fdesc).
_READ_SIZE = 8192

_FAMILIES = {socket.AF_INET: "inet", socket.AF_INET6: "inet6", socket.AF_UNIX: "unix"}


class _NeverAccepts(protocol.Factory):
    """The factory of the supervisor's own ports, which never accept (reading is stopped at
    once; the workers accept on copies of the socket)."""

    noisy = False

    def buildProtocol(self, addr: Any) -> None:
        return None


class WorkerSupervisor(service.Service):
    """Binds the listeners, runs ``count`` workers and keeps them running."""

    def __init__(
        self,
        config: Config,
        reactor: Any,
        count: int,
        enqueued: Callable[[str], None],
        live_dir: Path | None = None,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.count = count
        self.enqueued = enqueued
        self.ports: list[tuple[str, Any]] = []  # (service name, listening port)
        self.workers: list[_Worker] = []
        self.stopping = False
        self.all_ready = False
        self._previous_hup: Any = None
        self._previous_int: Any = None
        self.shared_path = counters.state_path(config.data_dir)
        #: prometheus-client's multiprocess files and the connection table (live_state_dir)
        self.live_dir = live_state_dir(config) if live_dir is None else live_dir
        self.connections_path = connection_table.table_path(self.live_dir)
        #: the server log's observer, when this process owns the log's output (set by
        #: mailsuite.tap): workers then send it finished lines, not events
        self.log_lines: LineLog | None = None

    # -- binding (as root, before twistd drops privileges) ----------------------------------

    def privilegedStartService(self) -> None:
        service.Service.privilegedStartService(self)
        for name, descs in self.config.listen.items():
            for desc in descs:
                self.ports.append((name, self._bind(name, desc)))

    def _bind(self, name: str, desc: str) -> Any:
        endpoint = endpoints.serverFromString(self.reactor, desc)
        result: list[Any] = []
        endpoint.listen(_NeverAccepts()).addBoth(result.append)  # tcp/unix bind at once
        port = result[0] if result else None
        if port is None or not hasattr(port, "fileno"):
            error = getattr(port, "value", port)
            reason = str(error)
            if isinstance(error, CannotListenError):
                reason = getattr(error.socketError, "strerror", None) or str(error.socketError)
            raise SystemExit(
                f"mailsuite: {self.config.where}: [listen] {name} {desc!r}: cannot listen: "
                f"{reason} (is another server using that port? ports below 1024 need root)"
            )
        port.stopReading()  # the workers accept; this process only holds the socket
        return port

    # -- running ----------------------------------------------------------------------------

    def startService(self) -> None:
        service.Service.startService(self)
        self.stopping = False
        self.all_ready = False
        counters.reset(self.shared_path)
        # (the metrics files were emptied by mailsuite.metrics.share_with_workers before
        # this process counted anything into them)
        self.live_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        connection_table.create(self.connections_path, self.count)  # fresh: nothing open
        if hasattr(signal, "SIGHUP"):
            self._previous_hup = signal.signal(signal.SIGHUP, self._on_hangup)
        if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
            # Started with SIGINT ignored (a shell script's background job): Twisted then
            # leaves it so, but every worker stops on SIGINT (mailsuite.worker), and this
            # process started them again and again.  SIGINT stops the whole server instead
            # (Twisted's own SIGINT handling, which it installs only over Python's default).
            self._previous_int = signal.signal(signal.SIGINT, self._on_interrupt)
        self.workers = [_Worker(self, i) for i in range(self.count)]
        for w in self.workers:
            w.start()
        log.info("started {n} worker processes", n=self.count)

    def worker_ready(self, worker: _Worker) -> None:
        """A worker adopted the sockets and accepts; the first time all do, say so (tests
        and operators wait for this line rather than for the port, which this process opened
        before any worker could answer on it)."""
        worker.ready = True
        log.info("worker {i} (pid {pid}) serving", i=worker.index, pid=worker.pid)
        if not self.all_ready and all(w.ready for w in self.workers):
            self.all_ready = True
            log.info("all {n} workers serving", n=self.count)

    def _on_interrupt(self, signum: int, frame: Any) -> None:
        self.reactor.sigInt(signum, frame)  # logs it and stops the reactor from its thread

    def _on_hangup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.signal_all, "HUP")

    def signal_all(self, name: str) -> None:
        for w in self.workers:
            w.signal(name)

    def stopService(self) -> defer.Deferred[None]:
        service.Service.stopService(self)
        self.stopping = True
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        if self._previous_int is not None:
            signal.signal(signal.SIGINT, self._previous_int)
            self._previous_int = None
        ended = [w.stop(SHUTDOWN_GRACE + 5.0) for w in self.workers]
        d = defer.DeferredList(ended, consumeErrors=True)

        def close_ports(_: object) -> None:
            for _name, port in self.ports:
                with contextlib.suppress(Exception):  # at exit: nothing left to do about it
                    port.connectionLost(None)  # closes the socket (it was never reading)
            self.ports = []
            if self.live_dir.parent == SHM:  # memory, not a disk: give it back
                shutil.rmtree(self.live_dir, ignore_errors=True)
            else:
                self.connections_path.unlink(missing_ok=True)

        d.addCallback(close_ports)
        return d.addCallback(lambda _: None)

    # -- what a worker is started with --------------------------------------------------------

    def worker_argv(self, index: int) -> tuple[list[str], dict[int, Any]]:
        argv = [
            sys.executable,
            "-m",
            "mailsuite.worker",
            "--index",
            str(index),
            "--parent",
            str(os.getpid()),
            "--connections",
            str(self.connections_path),
        ]
        if self.config.path is not None:
            argv += ["--config", str(self.config.path)]
        fds: dict[int, Any] = {0: "w", 1: "r", 2: "r", 3: "r"}
        if self.log_lines is not None:
            argv += ["--log-lines", self.config.log_format]
            fds[LOG_LINES_FD] = "r"
        for n, (name, port) in enumerate(self.ports):
            child_fd = FIRST_LISTENER_FD + n
            fds[child_fd] = port.fileno()
            family = _FAMILIES[port.addressFamily]
            argv += ["--listener", f"{name}:{child_fd}:{family}"]
        return argv, fds


class _Worker(protocol.ProcessProtocol):
    """One worker process slot: started, watched, started again."""

    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.process: Any = None
        self.pid: int | None = None
        self.started_at = 0.0
        self.backoff = RESTART_FIRST
        self.restart_call: Any = None
        self.ended: defer.Deferred[None] | None = None
        self.ready = False
        self._buffers: dict[int, bytes] = {}
        self._frames = Frames()
        self._log_resume: Any = None  # the delayed call that reads the log pipe again
        #: the log pipe's descriptor while it is among the reactor's quiet ones
        self._quiet_fd: int | None = None

    def start(self) -> None:
        self.restart_call = None
        argv, fds = self.supervisor.worker_argv(self.index)
        reactor = self.supervisor.reactor
        self.started_at = reactor.seconds()
        self.ended = defer.Deferred()
        self.ready = False
        self._buffers = {}
        self._frames = Frames()
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(self.supervisor.live_dir))
        self.process = reactor.spawnProcess(self, sys.executable, argv, env=env, childFDs=fds)
        self.pid = self.process.pid
        self._quiet_log_pipe()
        log.info("worker {i} started (pid {pid})", i=self.index, pid=self.pid)

    def signal(self, name: str) -> None:
        if self.process is not None and self.pid is not None:
            with contextlib.suppress(Exception):
                self.process.signalProcess(name)

    def stop(self, deadline: float) -> defer.Deferred[None]:
        if self.restart_call is not None and self.restart_call.active():
            self.restart_call.cancel()
        self.restart_call = None
        if self.process is None or self.pid is None or self.ended is None:
            return defer.succeed(None)
        ended = self.ended
        self.signal("TERM")
        reactor = self.supervisor.reactor
        timer = reactor.callLater(deadline, self._kill)
        ended.addBoth(lambda r: timer.cancel() if timer.active() else None)
        return ended

    def _kill(self) -> None:
        log.warn(
            "worker {i} (pid {pid}) did not stop in time: killing it", i=self.index, pid=self.pid
        )
        self.signal("KILL")

    # -- what it says ---------------------------------------------------------------------------

    def childDataReceived(self, fd: int, data: bytes) -> None:  # noqa: N802
        if fd == LOG_LINES_FD:
            lines = self.supervisor.log_lines
            if lines is not None:
                lines.write_lines(self._frames.feed(data))
            if len(data) < _READ_SIZE:
                self._pause_log_pipe()
            return
        buffered = self._buffers.get(fd, b"") + data
        # every stream is lines: jsonFileLogObserver writes "\x1e{json}\n" (JSON escapes
        # newlines), so a record is complete at its newline, not at the next record's \x1e
        *records, rest = buffered.split(b"\n")
        self._buffers[fd] = rest
        for record in records:
            if fd == 1 and self.supervisor.log_lines is None:
                self._relay_event(record)
            elif fd == 3:
                queue_id = record.decode("ascii", "replace").strip()
                if queue_id == "ready":
                    self.supervisor.worker_ready(self)
                elif queue_id:
                    self.supervisor.enqueued(queue_id)
            elif record.strip():
                log.warn(
                    "worker {i}: {line}",
                    i=self.index,
                    line=record.decode("utf-8", "replace").rstrip(),
                )

    def _quiet_log_pipe(self) -> None:
        """Input on the log pipe does not wake the reactor-lag probe (see
        :mod:`mailsuite.reactor_dispatch`): relaying lines is not the work it watches for."""
        quiet = getattr(self.supervisor.reactor, "mailsuite_quiet", None)
        reader = getattr(self.process, "pipes", {}).get(LOG_LINES_FD)
        if isinstance(quiet, set) and reader is not None:
            self._quiet_fd = reader.fileno()
            quiet.add(self._quiet_fd)

    def _unquiet_log_pipe(self) -> None:
        """The pipe is closed: its number may be reused by a descriptor that counts."""
        if self._quiet_fd is not None:
            quiet = getattr(self.supervisor.reactor, "mailsuite_quiet", None)
            if isinstance(quiet, set):
                quiet.discard(self._quiet_fd)
            self._quiet_fd = None

    def childConnectionLost(self, childFD: int) -> None:  # noqa: N802, N803
        if childFD == LOG_LINES_FD:
            self._unquiet_log_pipe()

    def _pause_log_pipe(self) -> None:
        """Leave the log pipe unread for :data:`LOG_READ_PAUSE` (see there)."""
        pipes = getattr(self.process, "pipes", None)
        reader = pipes.get(LOG_LINES_FD) if pipes is not None else None
        if reader is None or self._log_resume is not None:
            return
        reader.stopReading()

        def resume() -> None:
            self._log_resume = None
            pipes = getattr(self.process, "pipes", None)
            if pipes is not None and pipes.get(LOG_LINES_FD) is reader:
                reader.startReading()

        self._log_resume = self.supervisor.reactor.callLater(LOG_READ_PAUSE, resume)

    def _relay_event(self, record: bytes) -> None:
        text = record.decode("utf-8", "replace").strip().lstrip("\x1e")
        if not text:
            return
        try:
            event = eventFromJSON(text)
        except ValueError:
            log.warn("worker {i}: {line}", i=self.index, line=text)
            return
        system = event.get("log_system")
        if not system:  # what twistd's text format shows in its place
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{getattr(level, 'name', level)}"
        event["log_system"] = f"w{self.index} {system}"
        globalLogPublisher(event)

    def processEnded(self, reason: Any) -> None:  # noqa: N802
        sup = self.supervisor
        self._unquiet_log_pipe()
        pid, self.pid, self.process = self.pid, None, None
        if self._log_resume is not None and self._log_resume.active():
            self._log_resume.cancel()
        self._log_resume = None
        for fd, rest in list(self._buffers.items()):
            if rest.strip():
                self.childDataReceived(fd, b"\n")
        ended, self.ended = self.ended, None
        if pid is not None:
            try:
                # its column: the slot index, which the worker started again here keeps
                connection_table.forget_worker(sup.connections_path, self.index)
                counters.forget_process(sup.shared_path, pid)  # its password checks
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(pid, str(sup.live_dir))  # its live gauges
            except Exception:
                log.failure("forgetting worker {pid}'s connections failed", pid=pid)
        status = reason.value
        if sup.stopping:
            log.info("worker {i} (pid {pid}) stopped", i=self.index, pid=pid)
        else:
            reactor = sup.reactor
            lived = reactor.seconds() - self.started_at
            if lived >= RESTART_RESET_AFTER:
                self.backoff = RESTART_FIRST
            delay = self.backoff
            self.backoff = min(self.backoff * 2, RESTART_MAX)
            log.warn(
                "worker {i} (pid {pid}) ended ({status}) after {lived:.1f} s; starting it "
                "again in {delay} s",
                i=self.index,
                pid=pid,
                status=str(status),
                lived=lived,
                delay=delay,
            )
            self.restart_call = reactor.callLater(delay, self._restart)
        if ended is not None:
            ended.callback(None)

    def _restart(self) -> None:
        self.restart_call = None
        if not self.supervisor.stopping:
            self.start()
