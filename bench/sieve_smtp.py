"""SMTP acceptance with a 50-rule Sieve script active, as a ratio to no script, in one run.

Issue 16's figure (aim >= 0.9x).  One mailsuite server (``bench/mailsuite_target.py``, this
working tree) with two users: ``bench@example.test`` (no script) and ``sieve@example.test``
(the 50-rule script of ``bench/sieve_bench.py``: header, address, envelope and exists tests,
fileinto, flags -- none matching the load, so every rule is evaluated and the message kept,
the worst case).  Each round sends N messages to each user in turn (the order alternates
between rounds, so a drift in machine load hits both alike), with S concurrent sessions and
a new connection per message as ``smtp-source`` does, and times until every message is in
the user's Maildir.  Prints msgs/s per round, the medians and their ratio, and the server's
CPU time per message (``/proc/PID/stat``): on a machine shared with other work msgs/s
follows the load, the CPU a message costs much less.

    python bench/sieve_smtp.py [--rounds 5] [--msgs 1000] [--sessions 20] [--size 4096]

``SIEVE_SMTP_CONTROL=1`` runs the same with no script for either user (an A/A control): the
ratio it prints is what this machine's noise and the two users alone make of "no effect".

Everything listens on 127.0.0.1; the server is stopped by its PID at the end, failure
included; its directory is a temporary one (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from sieve_bench import SCRIPT  # noqa: E402  (the 50-rule script, one definition)

DOMAIN = "example.test"


def message(size: int, n: int) -> bytes:
    head = (
        f"From: Load <load@example.org>\r\nTo: <someone@{DOMAIN}>\r\n"
        f"Subject: quarterly numbers {n}\r\nMessage-ID: <{n}.{time.time_ns()}@example.org>\r\n"
        "X-Mailer: bench\r\nDate: Tue, 1 Oct 2024 10:00:00 +0000\r\n\r\n"
    ).encode()
    line = b"Body line of text for the benchmark, with nothing special in it.\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


async def one(port: int, rcpt: str, data: bytes, sender: str = "load@example.org") -> None:
    """One message over a new connection (CRLF data without dot-stuffing needs); raises
    unless every reply is the expected one."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> bytes:
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("closed")
            if line[3:4] != b"-":
                return line

    try:
        for cmd, want in (
            (None, b"220"),
            (b"EHLO client.example.org", b"250"),
            (f"MAIL FROM:<{sender}>".encode(), b"250"),
            (f"RCPT TO:<{rcpt}>".encode(), b"250"),
            (b"DATA", b"354"),
        ):
            if cmd is not None:
                writer.write(cmd + b"\r\n")
            got = await reply()
            if not got.startswith(want):
                raise RuntimeError(f"{cmd!r}: {got!r}")
        writer.write(data + b".\r\n")
        got = await reply()
        if not got.startswith(b"250"):
            raise RuntimeError(f"end of data: {got!r}")
        writer.write(b"QUIT\r\n")
        await reply()
    finally:
        writer.close()


async def load(port: int, rcpt: str, msgs: int, sessions: int, size: int) -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(msgs):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            await one(port, rcpt, message(size, queue.get_nowait()))

    await asyncio.gather(*(worker() for _ in range(sessions)))


def count(box: Path) -> int:
    return sum(len(list((box / sub).iterdir())) for sub in ("new", "cur"))


def clear(box: Path) -> None:
    for sub in ("new", "cur"):
        for f in (box / sub).iterdir():
            f.unlink()


def cpu_seconds(pid: str) -> tuple[float, float]:
    """User and system CPU time the server has used (``/proc/PID/stat``, all threads), its
    worker processes included (the children of a server with ``[server] workers`` > 1)."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        kids = []
    for p in (pid, *kids):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except OSError:  # a worker being restarted
            continue
        user, system = user + int(fields[11]), system + int(fields[12])
    return user / tick, system / tick


def trial(
    port: int, box: Path, rcpt: str, a: argparse.Namespace, pid: str | None = None
) -> tuple[float, float]:
    """msgs/s, and the server's CPU milliseconds (user + system) per message: on a machine
    shared with other work msgs/s follows the load, the CPU a message costs much less."""
    clear(box)
    cpu = cpu_seconds(pid) if pid else (0.0, 0.0)
    t0 = time.perf_counter()
    asyncio.run(load(port, rcpt, a.msgs, a.sessions, a.size))
    deadline = time.monotonic() + 300
    while count(box) < a.msgs:  # every 250 came after its fsync; this only confirms it
        if time.monotonic() > deadline:
            raise SystemExit(f"only {count(box)}/{a.msgs} messages in {box}")
        time.sleep(0.01)
    rate = a.msgs / (time.perf_counter() - t0)
    used = sum(cpu_seconds(pid)) - sum(cpu) if pid else 0.0
    return rate, used * 1000 / a.msgs


def arguments(description: str | None) -> argparse.Namespace:
    """The options every SMTP-ratio benchmark on this harness takes (bench/quota_smtp.py too)."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--msgs", type=int, default=1000)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--keep", action="store_true", help="keep the server's directory")
    return p.parse_args()


def start_server(work: Path) -> tuple[int, list[str], dict[str, str]]:
    """Start one server of this tree in ``work`` (SMTP only): its SMTP port, the admin command
    for it, and what ``mailsuite_target.py start`` printed.

    Mail authentication is off: its own benchmark is bench/mailauth_smtp.py, and its DNS
    waits (the load comes from 127.0.0.1, not a trusted network) would hide what is measured."""
    target = [sys.executable, str(HERE / "mailsuite_target.py")]
    off = "[mail_auth]\nspf = false\ndkim = false\ndmarc = false\narc = false\n"
    out = subprocess.run(
        [*target, "start", "--dir", str(work), "--services", "smtp", "--extra-toml", off],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    env = dict(line.split("=", 1) for line in out.split())
    cli = [sys.executable, "-m", "mailsuite.cli", "--config", env["MS_CONFIG"]]
    return int(env["MS_SMTP_PORT"]), cli, env


def stop_server(work: Path, keep: bool) -> None:
    """Stop the server `start_server` started and, unless ``keep``, remove its directory."""
    target = [sys.executable, str(HERE / "mailsuite_target.py")]
    subprocess.run([*target, "stop", "--dir", str(work)], check=False)
    if not keep:
        shutil.rmtree(work, ignore_errors=True)


def admin(cli: list[str], *args: str, stdin: str | None = None) -> None:
    """Run ``mailsuite ARGS`` against the benchmark's server; fails loudly."""
    subprocess.run([*cli, *args], input=stdin, text=True, check=True, capture_output=True)


def alternate(
    port: int, targets: dict[str, tuple[str, Path]], a: argparse.Namespace, pid: str
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Warm up, then ``a.rounds`` rounds over ``targets`` (name -> recipient, Maildir), the
    order alternating between rounds so neither side always runs on a warmer server;
    msgs/s and server CPU ms/message per name, each round printed."""
    for _, box in targets.values():
        for sub in ("new", "cur", "tmp"):
            (box / sub).mkdir(parents=True, exist_ok=True)
    for rcpt, box in targets.values():  # warm up
        trial(port, box, rcpt, a)
    rates: dict[str, list[float]] = {name: [] for name in targets}
    cpus: dict[str, list[float]] = {name: [] for name in targets}
    for r in range(a.rounds):
        order = list(targets) if r % 2 == 0 else list(reversed(targets))
        for name in order:
            rcpt, box = targets[name]
            rate, cpu_ms = trial(port, box, rcpt, a, pid)
            rates[name].append(rate)
            cpus[name].append(cpu_ms)
        print(
            f"round {r + 1}: "
            + "   ".join(
                f"{name} {rates[name][-1]:7.1f} msgs/s ({cpus[name][-1]:.2f} CPU ms/msg)"
                for name in targets
            ),
            flush=True,
        )
    return rates, cpus


def main() -> None:
    a = arguments(__doc__)
    work = Path(tempfile.mkdtemp(prefix="mailsuite-sieve-smtp."))
    try:
        port, cli, env = start_server(work)
        sieve_user = f"sieve@{DOMAIN}"
        admin(cli, "user", "add", sieve_user, "--password-stdin", stdin="benchpass\n")
        if os.environ.get("SIEVE_SMTP_CONTROL") != "1":
            admin(cli, "sieve", "put", sieve_user, "rules", "-", "--activate", stdin=SCRIPT)
        mail = work / "data" / "mail" / DOMAIN
        targets = {
            "no script": (f"bench@{DOMAIN}", mail / "bench"),
            "50 rules": (sieve_user, mail / "sieve"),
        }
        rates, cpus = alternate(port, targets, a, env["MS_PID"])
        base = statistics.median(rates["no script"])
        with_script = statistics.median(rates["50 rules"])
        ratios = [b / c for b, c in zip(rates["50 rules"], rates["no script"], strict=True)]
        cpu_base = statistics.median(cpus["no script"])
        cpu_script = statistics.median(cpus["50 rules"])
        print(
            f"\n{a.msgs} x {a.size} B, {a.sessions} sessions, {a.rounds} rounds "
            f"(median msgs/s): no script {base:.1f}, 50 rules {with_script:.1f}, "
            f"ratio {with_script / base:.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f}); "
            f"server CPU ms/msg (median): no script {cpu_base:.2f}, 50 rules "
            f"{cpu_script:.2f}, CPU ratio {cpu_base / cpu_script:.2f}x"
        )
    finally:
        stop_server(work, a.keep)


if __name__ == "__main__":
    main()
