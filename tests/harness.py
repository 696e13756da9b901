"""Run the real server (``twistd -n mailsuite``) on loopback for integration tests.

Every test gets its own data folder and free ports; the server is a child process so tests can
``kill -9`` it.  Users are created with the real ``mailsuite`` command.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from mailsuite.testing.process import mailsuite_argv

SERVICES = (
    "smtp", "submission", "submissions", "imap", "imaps", "pop3", "pop3s", "managesieve",
)
PASSWORD = "correct horse battery"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(
    host: str, port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} did not open")


class Server:
    """One mailsuite server in a child process, configured from a TOML snippet."""

    def __init__(
        self,
        root: Path,
        services: tuple[str, ...] = ("smtp",),
        extra_toml: str = "",
        domains: tuple[str, ...] = ("example.test",),
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.data = root / "data"
        self.ports = {s: free_port() for s in services}
        self.config = root / "mailsuite.toml"
        listen = "\n".join(f'{s} = ["tcp:{p}:interface=127.0.0.1"]' for s, p in self.ports.items())
        tls_toml = f'[tls]\ncert = "{tls[0]}"\nkey = "{tls[1]}"\n' if tls else ""
        self.config.write_text(
            f'[server]\nhostname = "mx.example.test"\ndata_dir = "data"\n\n'
            f"[listen]\n{listen}\n\n{tls_toml}"
            f"[domains]\nlocal = {list(domains)!r}\n\n{extra_toml}\n".replace("'", '"')
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "twistd.log"

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

    def add_user(self, address: str, password: str = PASSWORD) -> None:
        self.cli("user", "add", address, "--password-stdin", stdin=password + "\n")

    def maildir(self, address: str, folder: str = "") -> Path:
        local, domain = address.lower().split("@")
        root = self.data / "mail" / domain / local
        return root / f".{folder}" if folder else root

    def messages(self, address: str, folder: str = "") -> list[bytes]:
        box = self.maildir(address, folder)
        files = sorted(list((box / "new").iterdir()) + list((box / "cur").iterdir()))
        return [f.read_bytes() for f in files]

    # -- life cycle ------------------------------------------------------------------------

    def start(self, wait: bool = True) -> Server:
        env = dict(os.environ)
        env.pop("PYTHONWARNINGS", None)
        self.proc = subprocess.Popen(
            mailsuite_argv(str(self.config), logfile=str(self.log)),
            cwd=self.root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        if wait:
            for port in self.ports.values():
                try:
                    wait_port("127.0.0.1", port, proc=self.proc)
                except (RuntimeError, TimeoutError):
                    raise RuntimeError(f"server did not start:\n{self.output()}") from None
        return self

    def output(self) -> str:
        out = ""
        if self.proc and self.proc.poll() is not None and self.proc.stdout:
            out = self.proc.stdout.read().decode(errors="replace")
        if self.log.exists():
            out += self.log.read_text(errors="replace")
        return out

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

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


def server_connections(port: int) -> list[str]:
    """TCP states of the server's side of connections on local ``port`` (Linux /proc),
    leaving out the listener and connections already closed on our side (TIME_WAIT and
    later): ``["ESTABLISHED"]`` while a client is connected, ``["CLOSE_WAIT"]`` when the
    client hung up and the server has not closed its end yet."""
    states = []
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
                states.append(state)
    return sorted(states)
