"""A small Internet on loopback for the outbound tests: a DNS server and recording SMTP
servers on 127.0.0.x, each in a child process, and helpers to send through a mailsuite server
and read its queue.

The DNS server answers from a zone held in memory (``mailsuite.testing.dns``); each recording
MX (``mailsuite.testing.mx``) writes what it accepted to its record directory (``NNNN.json``
envelope, ``NNNN.eml`` data), which ``MX.transactions()`` reads back.  The ``loopback_net``
fixture (conftest.py) makes a ``Net`` and stops everything in it at teardown.
"""

from __future__ import annotations

import json
import random
import smtplib
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from mailsuite.testing.dns import spawn_dns_server
from mailsuite.testing.mx import spawn_mx_server
from tests.harness import ALICE, Server

HOSTS = [f"127.0.0.{i}" for i in range(2, 17)]


def common_port() -> int:
    """A port free on every 127.0.0.x we use (each test MX listens on it)."""
    for _ in range(200):
        port = random.randint(20000, 60000)
        socks = []
        try:
            for host in [*HOSTS, "127.0.0.1"]:
                s = socket.socket()
                socks.append(s)
                s.bind((host, port))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no common free port")


class MX:
    """One scripted SMTP server process on ADDRESS:PORT that records what it accepted."""

    def __init__(self, root: Path, address: str, port: int, script: dict[str, Any] | None):
        self.address = address
        self.port = port
        self.dir = root / f"mx-{address}-{time.monotonic_ns()}"
        self.dir.mkdir()
        self.proc, _ = spawn_mx_server(f"{address}:{port}", str(self.dir), script)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def transactions(self) -> list[dict[str, Any]]:
        """Every transaction recorded so far, in order (envelope fields and ``data``)."""
        out = []
        for eml in sorted(self.dir.glob("*.eml")):
            env = json.loads(eml.with_suffix(".json").read_text())
            env["data"] = eml.read_bytes()
            out.append(env)
        return out


class Net:
    """The DNS server and the MX servers of one test module.  Every MX listens on ``port``
    (the ``[relay] port`` of the servers under test) unless it is given one of its own."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = common_port()
        self.mxs: list[MX] = []
        self.dns_proc: subprocess.Popen[str] | None = None
        self.dns_port = 0

    def start_dns(self, names: dict[str, Any], ttl: int = 1) -> None:
        zone = self.root / "zone.json"
        zone.write_text(json.dumps({"origin": "test", "names": names, "ttl": ttl}))
        self.dns_proc, self.dns_port = spawn_dns_server(str(zone))

    def mx(self, address: str, script: dict[str, Any] | None = None, port: int = 0) -> MX:
        """Start a recording MX on ``address`` (and ``port``, else the common one)."""
        server = MX(self.root, address, port or self.port, script)
        self.mxs.append(server)
        return server

    def relay_toml(self, extra: str = "") -> str:
        """The ``[relay]`` and ``[dns]`` sections of a server that relays through this net:
        trusts 127.0.0.1, delivers to ``port``, retries after 1-2 s; ``extra`` goes into
        ``[relay]``."""
        return (
            "[relay]\n"
            'trusted_networks = ["127.0.0.1/32"]\n'
            f"port = {self.port}\n"
            "retry_initial = 1\n"
            "retry_max = 2\n"
            f"{extra}\n"
            "[dns]\n"
            f'nameservers = ["127.0.0.1:{self.dns_port}"]\n'
        )

    def stop(self) -> None:
        for m in self.mxs:
            m.stop()
        if self.dns_proc is not None:
            self.dns_proc.kill()
            self.dns_proc.wait(5)
            self.dns_proc = None


# -- sending through a server and reading its queue ----------------------------------------


def send(
    server: Server, rcpts: list[str], subject: str, sender: str = ALICE, body: str = "hello\n"
) -> None:
    """Submit one message over SMTP from a trusted address; every recipient must be taken."""
    msg = (
        f"From: <{sender or 'mailer-daemon@example.test'}>\r\nTo: {', '.join(rcpts)}\r\n"
        f"Subject: {subject}\r\nMessage-ID: <{subject}@example.test>\r\n\r\n{body}"
    )
    with smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=15) as s:
        refused = s.sendmail(sender, rcpts, msg.encode())
    assert not refused


def with_subject(transactions: list[dict[str, Any]], subject: str) -> list[dict[str, Any]]:
    return [t for t in transactions if f"Subject: {subject}\r\n".encode() in t["data"]]


def queue_ids(server: Server) -> list[str]:
    env = server.data / "queue" / "env"
    return sorted(p.stem for p in env.glob("*.json")) if env.exists() else []


def show(server: Server, queue_id: str) -> str:
    """``mailsuite queue show`` output, or "" once the entry has left the queue (run in this
    process, see ``Server.polled_cli``; test_relay.py runs the command as a process too)."""
    return server.polled_cli("queue", "show", queue_id)


def entries_for(server: Server, rcpt: str) -> list[str]:
    """The queue entries that still hold ``rcpt``."""
    return [q for q in queue_ids(server) if rcpt in show(server, q)]
