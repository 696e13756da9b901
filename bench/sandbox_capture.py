"""Sandbox capture rate against mailsuite's own server mode, in the same run.

    python3 bench/sandbox_capture.py [--messages 3000] [--sessions 20] [--rounds 3]
                                     [--size 4096] [--out FILE.json]

Mailpit cannot be installed on this machine (it is a Go program with a web UI built by npm;
nothing outside the package registries can be fetched), so the comparison is the one the
issue names for that case: the same SMTP load against mailsuite in server mode (MX listener,
one local user, fsync per message) and in sandbox mode, alternately, round by round, each on
a fresh data folder.  The load: ``--sessions`` concurrent SMTP clients (asyncio, one new
connection per message, as applications and ``bench/smtp.sh`` do), ``--messages`` messages of
``--size`` bytes in all.

Reported per mode, median (min-max) over the rounds, in messages per second:

* ``accepted``: until the client has the last 250 (every message fsynced in a Maildir);
* ``visible``: until the message can be read back: in server mode every file is in the user's
  Maildir, in sandbox mode ``GET /api/v1/messages`` reports them all (parsed, catalogued,
  searchable; what a test waiting for its mail sees).

Everything listens on 127.0.0.1 on free ports; each server is started with
``mailsuite.testing.process`` and stopped by its PID; data folders are temporary.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mailsuite.testing.process import mailsuite_argv

USER = "bench@example.test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def body(size: int, n: int) -> bytes:
    head = (
        f"From: App <app@example.org>\r\nTo: {USER}\r\nSubject: capture {n}\r\n"
        f"Message-ID: <bench-{n}@example.org>\r\n\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"
    text = (line * (size // len(line) + 1))[: max(0, size - len(head))]
    return head + text


async def one_message(port: int, data: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def expect(code: bytes) -> None:
        while True:
            line = await reader.readline()
            if not line:
                raise RuntimeError("connection closed")
            if line[3:4] != b"-":
                if not line.startswith(code):
                    raise RuntimeError(f"unexpected reply {line!r}")
                return

    await expect(b"220")
    for command, code in (
        (b"EHLO bench.example\r\n", b"250"),
        (b"MAIL FROM:<app@example.org>\r\n", b"250"),
        (f"RCPT TO:<{USER}>\r\n".encode(), b"250"),
        (b"DATA\r\n", b"354"),
    ):
        writer.write(command)
        await expect(code)
    writer.write(data + b"\r\n.\r\n")
    await expect(b"250")
    writer.write(b"QUIT\r\n")
    await expect(b"221")
    writer.close()
    await writer.wait_closed()


async def load(port: int, messages: int, sessions: int, size: int) -> float:
    """Send everything; returns the seconds until the last 250."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(messages):
        queue.put_nowait(n)

    async def client() -> None:
        while True:
            try:
                n = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await one_message(port, body(size, n))

    start = time.monotonic()
    await asyncio.gather(*(client() for _ in range(sessions)))
    return time.monotonic() - start


def count_files(folder: Path) -> int:
    return sum(
        sum(1 for _ in (folder / sub).iterdir())
        for sub in ("new", "cur")
        if (folder / sub).is_dir()
    )


def api_total(web_port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", web_port, timeout=30)
    try:
        conn.request("GET", "/api/v1/messages?limit=1")
        return int(json.loads(conn.getresponse().read())["total"])
    finally:
        conn.close()


class Target:
    def __init__(self, mode: str, root: Path) -> None:
        self.mode = mode
        self.root = root
        self.smtp = free_port()
        self.web = free_port()
        root.mkdir(parents=True)
        server = f'mode = "{mode}"\n' if mode == "sandbox" else ""
        web = f'web = ["tcp:{self.web}:interface=127.0.0.1"]\n' if mode == "sandbox" else ""
        (root / "mailsuite.toml").write_text(
            f'[server]\nhostname = "mx.example.test"\ndata_dir = "data"\n{server}\n'
            f'[listen]\nsmtp = ["tcp:{self.smtp}:interface=127.0.0.1"]\n{web}\n'
            '[domains]\nlocal = ["example.test"]\n\n'
            "[smtp]\nmax_connections = 0\nmax_connections_per_ip = 0\n"
            "[sandbox]\nmax_messages = 1000000\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        config = str(self.root / "mailsuite.toml")
        if self.mode == "server":
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "mailsuite.cli",
                    "--config",
                    config,
                    "user",
                    "add",
                    USER,
                    "--password-stdin",
                ],
                input=b"benchpass\n",
                check=True,
                capture_output=True,
            )
        self.proc = subprocess.Popen(
            mailsuite_argv(config, logfile=str(self.root / "twistd.log")),
            cwd=self.root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        ports = [self.smtp] + ([self.web] if self.mode == "sandbox" else [])
        for port in ports:
            while True:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{self.mode} server did not start; see {self.root}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    time.sleep(0.05)

    def visible(self) -> int:
        if self.mode == "sandbox":
            return api_total(self.web)
        return count_files(self.root / "data" / "mail" / "example.test" / "bench")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def run_round(mode: str, base: Path, n: int, a: argparse.Namespace) -> tuple[float, float]:
    target = Target(mode, base / f"{mode}-{n}")
    target.start()
    try:
        start = time.monotonic()
        accepted = asyncio.run(load(target.smtp, a.messages, a.sessions, a.size))
        deadline = time.monotonic() + 300
        while target.visible() < a.messages:
            if time.monotonic() > deadline:
                raise SystemExit(f"{mode}: only {target.visible()} of {a.messages} visible")
            time.sleep(0.02)
        visible = time.monotonic() - start
    finally:
        target.stop()
    return a.messages / accepted, a.messages / visible


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=3000)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    a = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="mailsuite-sandbox-bench."))
    results: dict[str, dict[str, list[float]]] = {
        m: {"accepted": [], "visible": []} for m in ("server", "sandbox")
    }
    try:
        for r in range(a.rounds):
            order = ("server", "sandbox") if r % 2 == 0 else ("sandbox", "server")
            for mode in order:
                accepted, visible = run_round(mode, base, r, a)
                results[mode]["accepted"].append(accepted)
                results[mode]["visible"].append(visible)
                print(
                    f"round {r + 1} {mode:7}: accepted {accepted:7.1f} msgs/s, "
                    f"visible {visible:7.1f} msgs/s",
                    flush=True,
                )
    finally:
        shutil.rmtree(base, ignore_errors=True)

    def fmt(values: list[float]) -> str:
        return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"

    print(
        f"\n{a.messages} messages x {a.size} B, {a.sessions} sessions, {a.rounds} rounds, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print("| mode | accepted (last 250) msgs/s | visible msgs/s |")
    print("|---|---|---|")
    for mode in ("server", "sandbox"):
        print(f"| {mode} | {fmt(results[mode]['accepted'])} | {fmt(results[mode]['visible'])} |")
    ratio = statistics.median(results["sandbox"]["accepted"]) / statistics.median(
        results["server"]["accepted"]
    )
    print(f"sandbox / server (accepted): {ratio:.2f}x")
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "results": results}, indent=2))


if __name__ == "__main__":
    main()
