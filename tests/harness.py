"""Run the real server (``twistd -n mailsuite``) on loopback for integration tests.

Every test gets its own data folder and free ports; the server is a child process so tests can
``kill -9`` it.  Users are created by the code the ``mailsuite user add`` command runs (in
this process; the command itself is tested in tests/integration/test_cli.py).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from mailsuite.auth import hash_password
from mailsuite.cli import directory_of
from mailsuite.cli import main as cli_main
from mailsuite.config import load_config
from mailsuite.testing.process import mailsuite_argv

PASSWORD = "correct horse battery"

#: What twisted.logger writes for an error nobody handled: a failure logged with its
#: traceback (``log.failure``, "Traceback (most recent call last):" or "Traceback (failure
#: with no frames)"), a legacy ``log.err`` ("Unhandled Error"), a Deferred garbage-collected
#: with a failure ("Unhandled error in Deferred:"), any event at critical level (``[ns#critical]``
#: when no legacy system is set) and Python's own "Exception ignored in" on stderr.
_LOG_PROBLEM = re.compile(r"Traceback \(|Unhandled [Ee]rror|#critical\]|Exception ignored in")


#: ``[server] workers`` of the servers tests start (unless their snippet sets it): 1 by
#: default, so the suite's time stays what it was; ``MAILSUITE_TEST_WORKERS=2`` runs the
#: integration tests against worker processes sharing the listeners (issue 15).
TEST_WORKERS = int(os.environ.get("MAILSUITE_TEST_WORKERS", "1"))


def log_problems(text: str) -> list[str]:
    """The lines of a server log (or output) that show an unhandled error, each with a few
    lines of context; empty when the log is clean."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        if _LOG_PROBLEM.search(line):
            out.append("\n".join(lines[max(0, i - 1) : i + 12]))
    return out


def assert_clean_log(text: str, what: str) -> None:
    """Fail the test if ``text`` (a server log or its output) holds a traceback."""
    problems = log_problems(text)
    if problems:
        raise AssertionError(
            f"{what} has {len(problems)} traceback(s)/critical error(s); the first:\n" + problems[0]
        )


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


#: Listening ports for test servers: below the kernel's ephemeral range, where no outgoing
#: connection takes its local port.  A port the kernel handed out for ``bind(0)`` and that we
#: closed again was free only until the next outgoing connection of any test process (the
#: test clients, the servers' relays) took it as its local port: a server then failed to
#: start with "Address already in use" (one in ~1,700 tests on CI).  Each pytest-xdist
#: worker draws from its own block, so two workers never pick the same port either.
_PORTS_TOP = _ephemeral_start()
_PORTS_BOTTOM = 20000 if _PORTS_TOP > 21000 else 1024
_worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
_WORKER_INDEX = int(_worker[2:]) if _worker[2:].isdigit() else 0
_WORKERS = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1), _WORKER_INDEX + 1)
_BLOCK = (_PORTS_TOP - _PORTS_BOTTOM) // _WORKERS
_BLOCK_START = _PORTS_BOTTOM + _WORKER_INDEX * _BLOCK
_cursor = [(os.getpid() * 7919) % _BLOCK]  # another pytest run on the machine starts elsewhere


def free_port(host: str = "127.0.0.1") -> int:
    """A port of this test process's block that nothing listens on now (see above); the
    next call gives another one, going round the block."""
    for _ in range(_BLOCK):
        _cursor[0] = (_cursor[0] + 1) % _BLOCK
        port = _BLOCK_START + _cursor[0]
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_BLOCK_START}-{_BLOCK_START + _BLOCK - 1}")


def wait_port(
    host: str, port: int, timeout: float = 60.0, proc: subprocess.Popen | None = None
) -> None:
    """Wait until ``port`` accepts and the server has taken and closed the probe.

    The deadline is generous on purpose: with ``[server] workers`` the supervisor's socket
    accepts at once, but the probe is only taken when a worker process has started, which
    on a loaded machine (a CI runner with two test processes) can take tens of seconds; a
    server that started fine must not fail a test for it."""

    def listening() -> bool:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    try:
        wait_until(listening, timeout, f"{host}:{port} to open")
    except AssertionError:
        raise TimeoutError(f"{host}:{port} did not open") from None
    # and until the server has seen the probe go: it counts towards the per-IP connection
    # limit until then, and a test that opens max_connections_per_ip at once would race it
    wait_until(lambda: not server_connections(port), timeout, f"{host}:{port} to drop the probe")


#: argon2id hashes by password (see ``Server.add_user``)
_HASHES: dict[str, str] = {}


class Server:
    """One mailsuite server in a child process, configured from a TOML snippet."""

    def __init__(
        self,
        root: Path,
        services: tuple[str, ...] = ("smtp",),
        extra_toml: str = "",
        domains: tuple[str, ...] = ("example.test",),
        tls: tuple[Path, Path] | None = None,
        log_errors_expected: str | None = None,
        server_toml: str = "",
    ) -> None:
        """``log_errors_expected``: a reason why this test provokes an internal error on
        purpose; without one, a traceback in the server log fails the test at stop."""
        self.root = root
        self.log_errors_expected = log_errors_expected
        self.root.mkdir(parents=True, exist_ok=True)
        self.data = root / "data"
        self.ports = {s: free_port() for s in services}
        self.config = root / "mailsuite.toml"
        listen = "\n".join(f'{s} = ["tcp:{p}:interface=127.0.0.1"]' for s, p in self.ports.items())
        tls_toml = f'[tls]\ncert = "{tls[0]}"\nkey = "{tls[1]}"\n' if tls else ""
        if "workers" not in server_toml and "sandbox" not in server_toml:
            server_toml = f"workers = {TEST_WORKERS}\n{server_toml}"
        self.config.write_text(
            f'[server]\nhostname = "mx.example.test"\ndata_dir = "data"\n{server_toml}\n'
            f"[listen]\n{listen}\n\n{tls_toml}"
            f"[domains]\nlocal = {list(domains)!r}\n\n{extra_toml}\n".replace("'", '"')
        )
        self.proc: subprocess.Popen[bytes] | None = None
        #: start the server with SIGINT ignored (see :func:`_ignore_sigint`)
        self.sigint_ignored = False
        self.log = root / "twistd.log"
        self._log_checked = 0  # offset in the log up to which it was found clean

    # -- admin -----------------------------------------------------------------------------

    def cli(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "mailsuite.cli", "--config", str(self.config), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"mailsuite {' '.join(args)} failed: {result.stderr}")
        return result

    def polled_cli(self, *args: str) -> str:
        """What ``mailsuite ARGS`` prints on stdout, run by the command's code in this
        process: for a test polling it in ``wait_until``, where a ``mailsuite`` process per
        poll cost ~1 s of CPU each, taken from the server the test waits for.  Like the
        process's stdout, what it printed before a failure is the answer."""
        out = io.StringIO()
        # a failure: the process would have printed a traceback to stderr and exited 1
        with (
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(io.StringIO()),
            contextlib.suppress(Exception),
        ):
            cli_main(["--config", str(self.config), *args])
        return out.getvalue()

    def add_user(self, address: str, password: str = PASSWORD) -> None:
        """Add a user as ``mailsuite user add`` does (the directory edit under its lock, an
        argon2id hash), in this process: a ``mailsuite`` process per user cost ~1 s of CPU
        (the interpreter, Twisted's imports, the hash), a large part of most tests' setup.
        One hash per password serves every user of this test process."""
        if password not in _HASHES:
            _HASHES[password] = hash_password(password)
        directory_of(load_config(self.config)).add_user(address, _HASHES[password])

    def maildir(self, address: str, folder: str = "") -> Path:
        local, domain = address.lower().split("@")
        root = self.data / "mail" / domain / local
        return root / f".{folder}" if folder else root

    def messages(self, address: str, folder: str = "") -> list[bytes]:
        box = self.maildir(address, folder)
        files = sorted(list((box / "new").iterdir()) + list((box / "cur").iterdir()))
        return [f.read_bytes() for f in files]

    # -- life cycle ------------------------------------------------------------------------

    def _new_ports(self) -> None:
        """Pick other ports for every listener and write them into the config."""
        text = self.config.read_text()
        for service, old in list(self.ports.items()):
            new = free_port()
            text = text.replace(f'"tcp:{old}:interface=', f'"tcp:{new}:interface=')
            self.ports[service] = new
        self.config.write_text(text)

    def start(self, wait: bool = True, retries: int = 2) -> Server:
        env = dict(os.environ)
        env.pop("PYTHONWARNINGS", None)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # a server picks its own (workers only)
        self._log_checked = self.log.stat().st_size if self.log.exists() else 0
        self.proc = subprocess.Popen(
            mailsuite_argv(str(self.config), logfile=str(self.log)),
            cwd=self.root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # SIGINT as the test runner has it, or ignored when the test asks (a shell
            # script's background job starts so)
            preexec_fn=_ignore_sigint if self.sigint_ignored else None,
        )
        if wait:
            for port in self.ports.values():
                try:
                    wait_port("127.0.0.1", port, proc=self.proc)
                except (RuntimeError, TimeoutError):
                    output = self.output()
                    exited = self.proc.poll() is not None
                    if exited and retries > 0 and "Address already in use" in output:
                        # another program took the port since it was picked: new ports
                        self._new_ports()
                        return self.start(wait, retries - 1)
                    raise RuntimeError(f"server did not start:\n{output}") from None
            if self.workers() > 1:  # the ports open before the workers can answer on them
                start = self._log_checked
                wait_until(
                    lambda: "workers serving" in self._log_since(start),
                    60,
                    f"the workers of {self.root} to serve",
                )
        return self

    def workers(self) -> int:
        """``[server] workers`` of this server's config (1 when not a number)."""
        found = re.search(r"^workers = (\d+)", self.config.read_text(), re.MULTILINE)
        return int(found.group(1)) if found else 1

    def _log_since(self, offset: int) -> str:
        if not self.log.exists():
            return ""
        with self.log.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def output(self) -> str:
        out = ""
        if self.proc and self.proc.poll() is not None and self.proc.stdout:
            out = self.proc.stdout.read().decode(errors="replace")
        if self.log.exists():
            out += self.log.read_text(errors="replace")
        return out

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        """The log once it holds ``text`` (fail after ``timeout`` s).  A worker's log events
        reach the log file through the supervisor's pipe, after the client has its reply:
        a test that reads the log right after the reply races that hop."""

        def holds() -> str:
            out = self.output()
            return out if text in out else ""

        return wait_until(holds, timeout, text)

    def stop(self) -> None:
        """Stop the server (SIGTERM) and fail if its log shows a traceback."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._finish()

    def kill9(self) -> None:
        """Kill the server (SIGKILL) and fail if its log shows a traceback."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._finish()

    def _finish(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        out = ""
        if proc.stdout is not None:
            out = proc.stdout.read().decode(errors="replace")
            proc.stdout.close()
        self.check_log(out)

    def check_log(self, output: str = "") -> None:
        """Fail if the log written since the last check (or ``output``, the server's
        stdout/stderr) shows a traceback, unless this server expects one; called at every stop
        (the traceback rule of DESIGN.md: none in the server log, ever)."""
        text = ""
        if self.log.exists():
            with self.log.open("rb") as f:
                f.seek(self._log_checked)
                data = f.read()
            self._log_checked += len(data)
            text = data.decode(errors="replace")
        if self.log_errors_expected is None:
            assert_clean_log(output, f"the output of the server in {self.root}")
            assert_clean_log(text, f"{self.log}")

    def port(self, service: str) -> int:
        return self.ports[service]

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


def server_connection_peers(port: int) -> dict[str, str]:
    """The server's side of connections on local ``port`` (Linux /proc), as
    ``{"remote-address:port": state}``, leaving out the listener and connections already closed
    on our side (TIME_WAIT and later): ``ESTABLISHED`` while a client is connected,
    ``CLOSE_WAIT`` when the client hung up and the server has not closed its end yet.

    Keyed by the client's address so a test can tell its own client's connection from another
    one on the same port that is still closing (the STARTTLS mutt test once compared counts and
    mistook the setup session's close for mutt's connection staying open)."""
    peers = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            state = _TCP_STATES.get(fields[3], fields[3])
            if local_port == port and state in ("ESTABLISHED", "CLOSE_WAIT", "SYN_RECV"):
                peers[f"{table[-4:]}:{fields[2]}"] = state
    return peers


def server_connections(port: int) -> list[str]:
    """The TCP states of `server_connection_peers`, sorted: ``["ESTABLISHED"]`` while one
    client is connected, ``[]`` once the server has closed every connection."""
    return sorted(server_connection_peers(port).values())


# -- shared by the tests -------------------------------------------------------------------

ALICE = "alice@example.test"
BOB = "bob@example.test"

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T], timeout: float = 10.0, what: str = "", interval: float = 0.02
) -> T:
    """Poll ``condition`` until it returns something true and return that; fail the test
    (AssertionError naming ``what``) when ``timeout`` seconds pass first.

    The one way tests wait for something another process or thread does: a condition with a
    deadline, never a fixed sleep followed by a look (too short on a loaded machine, and it
    cannot tell "not yet" from "never")."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(interval)


def _ignore_sigint() -> None:
    """In the forked child before exec: SIGINT ignored (kept across exec), as ``cmd &`` in
    a non-interactive shell starts a command."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ServerFactory:
    """Makes servers under ``root`` (one folder each), started and with their users, and
    stops every one of them in ``close()`` (the fixtures ``servers`` and ``module_servers``
    in conftest.py call it at teardown).  ``tls=True`` gives a server the test CA's
    certificate for mx.example.test, localhost and 127.0.0.1."""

    def __init__(self, root: Path, cert: tuple[Path, Path]) -> None:
        self.root = root
        self.cert = cert
        self.made: list[Server] = []

    def __call__(
        self,
        services: tuple[str, ...] = ("smtp",),
        *,
        extra_toml: str = "",
        users: tuple[str, ...] = (),
        domains: tuple[str, ...] = ("example.test",),
        tls: bool | tuple[Path, Path] = False,
        start: bool = True,
        **options: Any,
    ) -> Server:
        pair = self.cert if tls is True else (tls or None)
        server = Server(
            self.root / f"server{len(self.made)}",
            services=services,
            extra_toml=extra_toml,
            domains=domains,
            tls=pair,
            **options,
        )
        self.made.append(server)
        for user in users:
            server.add_user(user)
        if start:
            server.start()
        return server

    def close(self) -> None:
        """Stop every server (``Server.stop`` checks its log)."""
        for server in self.made:
            server.stop()


def server_factory(root: Path, cert: tuple[Path, Path]) -> Iterator[ServerFactory]:
    """The generator behind the ``servers`` fixtures: a factory, closed at teardown."""
    factory = ServerFactory(root, cert)
    try:
        yield factory
    finally:
        factory.close()
