"""IMAP stress, imaptest-like: mailsuite and Dovecot under the same command mix, in one run.

Dovecot's ``imaptest`` is not packaged here, so this is its workload in Python: C client
PROCESSES (``multiprocessing``, default 10) hammer one shared mailbox of M messages (default
1,000, made by APPEND before the clock starts, a fresh folder per round) for D seconds (default
20), each drawing commands from a weighted mix close to imaptest's default profile with its own
seeded RNG (``--seed`` + client number: both servers get the same sequence of commands):

    SELECT, FETCH FLAGS / ENVELOPE / BODY.PEEK[] of a random range, STORE +/-FLAGS of \\Seen
    \\Flagged (random range) and +FLAGS \\Deleted (one message), SEARCH, APPEND, EXPUNGE,
    STATUS, LIST, NOOP

Two modes:

* ``logged-in``: each client logs in and selects once before the clock starts and stays in.
* ``churn``: each client loops LOGIN, SELECT, three commands of the mix, LOGOUT on a new
  connection (every one of those counts as a command).

Targets: ``dovecot`` (started with the shared harness ``../shared/bench/peers.sh`` under a
private RUN directory and free ports; Dovecot 2.3 with ``mail_fsync = optimized``) and one
mailsuite per ``--workers`` value (``bench/mailsuite_target.py --workers N``, this tree unless
``--code DIR``).  Each round runs every target in a rotating order (mode by mode), so drift in
the machine's load hits them alike.  Prints commands/s per round, the median and spread
(min-max) per target and mode, commands/s and p50/p99 latency per command (from the median
round), and the ratio mailsuite/Dovecot of the medians.  JSON of every round goes to ``--out``.

    python3 bench/imap_stress.py [--rounds 3] [--clients 10] [--duration 20] [--messages 1000]
        [--modes logged-in,churn] [--workers 1,2] [--targets dovecot,mailsuite] [--seed 1]
        [--code DIR] [--baseline DIR] [--out FILE] [--keep]
    python3 bench/imap_stress.py --costs N [...]   # server CPU per command, kind by kind
    python3 bench/imap_stress.py --host-port 127.0.0.1:PORT --user U --password P   # any server

Loopback only; every process started here is stopped by its PID at the end, failure or Ctrl-C
included; the working directory is a temporary one under /var/tmp (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = Path(os.environ.get("SHARED_BENCH", ROOT.parent / "shared" / "bench")).resolve()
if not SHARED.exists():  # a checkout one level deeper (a git worktree): ../../shared/bench
    SHARED = (ROOT.parent.parent / "shared" / "bench").resolve()

# Weighted mix (imaptest's default profile keeps the mailbox size steady: one \Deleted STORE
# and one EXPUNGE per APPEND, and reads dominate).
MIX: dict[str, int] = {
    "FETCH_FLAGS": 16,
    "FETCH_ENVELOPE": 10,
    "FETCH_BODY": 8,
    "STORE": 16,
    "STORE_DELETED": 6,
    "SEARCH": 8,
    "APPEND": 6,
    "EXPUNGE": 6,
    "STATUS": 6,
    "LIST": 4,
    "NOOP": 8,
    "SELECT": 6,
}
RANGE = 10  # FETCH / STORE touch a random range of up to this many messages

_EXISTS = re.compile(rb"^\* (\d+) EXISTS")
_EXPUNGE = re.compile(rb"^\* (\d+) EXPUNGE")
_LITERAL = re.compile(rb"\{(\d+)\}\r\n$")


def message(rng: random.Random, n: int) -> bytes:
    """A plausible 2-6 KiB message (headers an ENVELOPE reads, a text body)."""
    body = "".join(
        f"line {i} of message {n}: {rng.random():.12f} lorem ipsum dolor\r\n"
        for i in range(rng.randint(30, 100))
    )
    return (
        f"From: Sender {n} <sender{n}@example.test>\r\n"
        f"To: Bench <bench@example.test>\r\n"
        f'Cc: "Other, One" <other{n % 7}@example.test>\r\n'
        f"Subject: stress message {n} {rng.randint(0, 10**9)}\r\n"
        f"Date: Tue, 01 Dec 2026 12:{n % 60:02d}:00 +0000\r\n"
        f"Message-ID: <{n}.{rng.randint(0, 10**9)}@example.test>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + body
    ).encode()


class ImapError(Exception):
    pass


class Client:
    """A minimal IMAP client: one command at a time, literal-aware response reader, tracks
    EXISTS of the selected folder (so ranges stay in it)."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.tagn = 0
        self.exists = 0
        self.readline()  # greeting

    def readline(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line, self.buf = self.buf[: i + 2], self.buf[i + 2 :]
                return line
            data = self.sock.recv(262144)
            if not data:
                raise ImapError("connection closed")
            self.buf += data

    def readn(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.sock.recv(262144)
            if not data:
                raise ImapError("connection closed")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def command(self, cmd: bytes, literal: bytes | None = None) -> bytes:
        """Send a command (with a LITERAL+ literal), read to its tagged reply; returns the
        status word (OK/NO/BAD)."""
        self.tagn += 1
        tag = b"a%d" % self.tagn
        if literal is None:
            self.sock.sendall(tag + b" " + cmd + b"\r\n")
        else:
            self.sock.sendall(tag + b" " + cmd + b" {%d+}\r\n" % len(literal) + literal + b"\r\n")
        prefix = tag + b" "
        while True:
            line = self.readline()
            m = _LITERAL.search(line)
            while m:  # a literal in the response: skip it and read the rest of the line
                self.readn(int(m.group(1)))
                line = self.readline()
                m = _LITERAL.search(line)
            if line.startswith(b"* "):
                if (m2 := _EXISTS.match(line)) is not None:
                    self.exists = int(m2.group(1))
                elif _EXPUNGE.match(line):
                    self.exists -= 1
            elif line.startswith(prefix):
                return line[len(prefix) :].split(b" ", 1)[0]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@dataclass
class Job:
    host: str
    port: int
    user: str
    password: str
    folder: str
    mode: str
    duration: float
    seed: int
    start_at: float  # time.time() at which the clock starts (all clients together)


@dataclass
class ClientResult:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def _rng_range(rng: random.Random, exists: int) -> bytes | None:
    if exists <= 0:
        return None
    first = rng.randint(1, exists)
    last = min(exists, first + rng.randint(0, RANGE - 1))
    return b"%d:%d" % (first, last) if last > first else b"%d" % first


def one(c: Client, name: str, rng: random.Random, job: Job, n: list[int]) -> bytes | None:
    """Issue one command of the mix; returns its status (None: nothing to do in an empty box)."""
    folder = job.folder.encode()
    if name == "FETCH_FLAGS":
        r = _rng_range(rng, c.exists)
        return None if r is None else c.command(b"FETCH " + r + b" (UID FLAGS)")
    if name == "FETCH_ENVELOPE":
        r = _rng_range(rng, c.exists)
        return (
            None
            if r is None
            else c.command(b"FETCH " + r + b" (UID ENVELOPE INTERNALDATE RFC822.SIZE)")
        )
    if name == "FETCH_BODY":
        r = _rng_range(rng, c.exists)
        return None if r is None else c.command(b"FETCH " + r + b" (UID BODY.PEEK[])")
    if name == "STORE":
        r = _rng_range(rng, c.exists)
        flag = rng.choice((b"\\Seen", b"\\Flagged"))
        op = rng.choice((b"+FLAGS", b"-FLAGS"))
        return None if r is None else c.command(b"STORE " + r + b" " + op + b" (" + flag + b")")
    if name == "STORE_DELETED":
        if c.exists <= 0:
            return None
        return c.command(b"STORE %d +FLAGS (\\Deleted)" % rng.randint(1, c.exists))
    if name == "SEARCH":
        q = rng.choice((b"UNSEEN", b"FLAGGED", b"SEEN NOT FLAGGED", b"SUBJECT stress", b"DELETED"))
        return c.command(b"SEARCH " + q)
    if name == "APPEND":
        n[0] += 1
        return c.command(b"APPEND " + folder, message(rng, n[0]))
    if name == "EXPUNGE":
        return c.command(b"EXPUNGE")
    if name == "STATUS":
        return c.command(b"STATUS " + folder + b" (MESSAGES UNSEEN UIDNEXT)")
    if name == "LIST":
        return c.command(b'LIST "" "*"')
    if name == "NOOP":
        return c.command(b"NOOP")
    if name == "SELECT":
        return c.command(b"SELECT " + folder)
    raise ValueError(name)


def _timed(res: ClientResult, name: str, fn: Any, *args: Any) -> None:
    t0 = time.perf_counter()
    status = fn(*args)
    if status is None:
        return
    res.latencies.setdefault(name, []).append(time.perf_counter() - t0)
    if status != b"OK":
        res.errors[name] = res.errors.get(name, 0) + 1


def login(c: Client, job: Job) -> bytes:
    return c.command(b'LOGIN "%s" "%s"' % (job.user.encode(), job.password.encode()))


def run_client(job: Job) -> ClientResult:
    """One client process: the whole run of one mode against one server."""
    rng = random.Random(job.seed)
    names = list(MIX)
    weights = [MIX[k] for k in names]
    res = ClientResult()
    appended = [job.seed * 1_000_000]
    try:
        if job.mode == "logged-in":
            c = Client(job.host, job.port)
            if login(c, job) != b"OK" or c.command(b"SELECT " + job.folder.encode()) != b"OK":
                raise ImapError("login/select failed")
            time.sleep(max(0.0, job.start_at - time.time()))
            end = time.perf_counter() + job.duration
            while time.perf_counter() < end:
                name = rng.choices(names, weights)[0]
                _timed(res, name, one, c, name, rng, job, appended)
            c.command(b"LOGOUT")
            c.close()
        else:
            time.sleep(max(0.0, job.start_at - time.time()))
            end = time.perf_counter() + job.duration
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                c = Client(job.host, job.port)
                res.latencies.setdefault("CONNECT", []).append(time.perf_counter() - t0)
                _timed(res, "LOGIN", login, c, job)
                _timed(res, "SELECT", c.command, b"SELECT " + job.folder.encode())
                for _ in range(3):
                    name = rng.choices(names, weights)[0]
                    _timed(res, name, one, c, name, rng, job, appended)
                _timed(res, "LOGOUT", c.command, b"LOGOUT")
                c.close()
    except (OSError, ImapError) as e:
        res.failures.append(f"{type(e).__name__}: {e}")
    return res


def prepare(host: str, port: int, user: str, password: str, folder: str, count: int) -> None:
    """Make ``folder`` afresh with ``count`` messages (before the clock starts)."""
    c = Client(host, port)
    job = Job(host, port, user, password, folder, "", 0, 0, 0)
    if login(c, job) != b"OK":
        raise SystemExit(f"LOGIN as {user} on port {port} failed")
    c.command(b"DELETE " + folder.encode())
    if c.command(b"CREATE " + folder.encode()) != b"OK":
        raise SystemExit(f"CREATE {folder} failed on port {port}")
    rng = random.Random(12345)
    for i in range(count):
        if c.command(b"APPEND " + folder.encode(), message(rng, i)) != b"OK":
            raise SystemExit(f"APPEND to {folder} failed on port {port}")
    c.command(b"LOGOUT")
    c.close()


def cleanup_folder(host: str, port: int, user: str, password: str, folder: str) -> None:
    try:
        c = Client(host, port)
        login(c, Job(host, port, user, password, folder, "", 0, 0, 0))
        c.command(b"DELETE " + folder.encode())
        c.command(b"LOGOUT")
        c.close()
    except (OSError, ImapError):
        pass


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and every live descendant, with what its reaped
    children used (Dovecot's master reaps each imap process: its time lands in ``cutime``)."""
    if pid <= 0:
        return 0.0
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        d = entry.name
        if not d.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        stats[int(d)] = fields
        children.setdefault(int(fields[1]), []).append(int(d))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        f = stats.get(p)
        if f is None:
            continue
        total += sum(int(x) for x in f[11:15]) / tick  # utime stime cutime cstime
        todo += children.get(p, [])
    return total


def percentile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))] if s else float("nan")


def _client_signals() -> None:
    """Client processes end on SIGTERM at once (the parent's handler, inherited through
    fork, would raise SystemExit inside the pool's queue lock and hang Pool.terminate)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


def run_round(
    host: str,
    port: int,
    user: str,
    password: str,
    mode: str,
    a: argparse.Namespace,
    folder: str,
    pid: int = 0,
) -> dict[str, Any]:
    prepare(host, port, user, password, folder, a.messages)
    start_at = time.time() + 1.0 + 0.05 * a.clients
    jobs = [
        Job(host, port, user, password, folder, mode, a.duration, a.seed * 1000 + i, start_at)
        for i in range(a.clients)
    ]
    load0 = os.getloadavg()[0]
    cpu0 = tree_cpu(pid)
    ctx = mp.get_context("fork")
    with ctx.Pool(a.clients, initializer=_client_signals) as pool:
        # map_async + a timeout: a plain map() cannot be interrupted by Ctrl-C
        results = pool.map_async(run_client, jobs).get(timeout=a.duration + 300)
    cpu1 = tree_cpu(pid)
    load1 = os.getloadavg()[0]
    lat: dict[str, list[float]] = {}
    errors: dict[str, int] = {}
    failures: list[str] = []
    for r in results:
        for k, v in r.latencies.items():
            lat.setdefault(k, []).extend(v)
        for k, e in r.errors.items():
            errors[k] = errors.get(k, 0) + e
        failures += r.failures
    cmds = {k: len(v) for k, v in lat.items() if k != "CONNECT"}
    total = sum(cmds.values())
    cleanup_folder(host, port, user, password, folder)
    return {
        "mode": mode,
        "cmds_per_s": total / a.duration,
        # the server's CPU per command: what a busy shared machine moves least
        "cpu_ms_per_cmd": (cpu1 - cpu0) / total * 1e3 if total and pid else None,
        "per_command": {
            k: {
                "per_s": cmds[k] / a.duration,
                "p50_ms": percentile(lat[k], 0.5) * 1e3,
                "p99_ms": percentile(lat[k], 0.99) * 1e3,
            }
            for k in sorted(cmds)
        },
        "errors": errors,
        "failures": failures,
        "loadavg": [load0, load1],
    }


def command_costs(
    host: str, port: int, user: str, password: str, pid: int, folder: str, n: int, messages: int
) -> dict[str, float]:
    """The server's CPU per command, command by command: one client sends ``n`` of each kind
    of the mix (same seeded ranges) in a row while a second client keeps flipping flags in
    the same folder (so each command also pays for catching up with another session's
    changes, as under the stress mix).  CPU from /proc, so the machine's load matters less
    than for commands/s."""
    prepare(host, port, user, password, folder, messages)
    out: dict[str, float] = {}
    job = Job(host, port, user, password, folder, "logged-in", 0, 7, 0)
    c, other = Client(host, port), Client(host, port)
    for cl in (c, other):
        if login(cl, job) != b"OK" or cl.command(b"SELECT " + folder.encode()) != b"OK":
            raise SystemExit("login/select failed")
    orng = random.Random(99)
    for name in MIX:
        rng = random.Random(7)
        appended = [10**7]
        cpu0 = tree_cpu(pid)
        for i in range(n):
            one(c, name, rng, job, appended)
            if i % 2 == 0:  # another session's change: \Flagged on a random message
                op = orng.choice((b"+", b"-"))
                other.command(b"STORE %d %sFLAGS (\\Flagged)" % (orng.randint(1, 100), op))
        out[name] = (tree_cpu(pid) - cpu0) * 1e3 / n
    cpu0 = tree_cpu(pid)
    for _ in range(n // 2):
        other.command(b"STORE %d +FLAGS (\\Flagged)" % orng.randint(1, 100))
    out["(other STORE)"] = (tree_cpu(pid) - cpu0) * 1e3 / (n // 2)
    for name in MIX:  # the other session's STOREs were counted with each command: take out
        out[name] -= out["(other STORE)"] / 2
    for cl in (c, other):
        cl.command(b"LOGOUT")
        cl.close()
    cleanup_folder(host, port, user, password, folder)
    return out


# -- servers ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Target:
    name: str
    port: int
    user: str
    stop: Any
    pid: int = 0


def start_mailsuite(
    work: Path, workers: str, code: Path | None, label: str = "mailsuite"
) -> Target:
    d = work / f"{label}-w{workers}"
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = str(code)
    elif "PYTHONPATH" not in env:
        env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, str(HERE / "mailsuite_target.py"), "start", "--dir", str(d),
         "--services", "imap", "--workers", workers],
        env=env, check=True, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    vals = dict(line.split("=", 1) for line in out.stdout.split() if "=" in line)

    def stop() -> None:
        subprocess.run(
            [sys.executable, str(HERE / "mailsuite_target.py"), "stop", "--dir", str(d)],
            env=env, check=False, timeout=60,
        )  # fmt: skip

    return Target(
        f"{label}-w{workers}",
        int(vals["MS_IMAP_PORT"]),
        "bench@example.test",
        stop,
        int(vals["MS_PID"]),
    )


def start_dovecot(work: Path) -> Target:
    run = work / "peers"
    port, port3 = free_port(), free_port()
    env = dict(
        os.environ,
        RUN=str(run),
        PORT_DOVECOT_IMAP=str(port),
        PORT_DOVECOT_POP3=str(port3),
        BIGBOX_SIZES="",
    )
    subprocess.run(
        ["bash", str(SHARED / "peers.sh"), "start", "dovecot"], env=env, check=True, timeout=120
    )

    def stop() -> None:
        subprocess.run(
            ["bash", str(SHARED / "peers.sh"), "stop", "dovecot"], env=env, check=False, timeout=60
        )

    pid = 0
    for _ in range(100):
        try:
            pid = int((run / "dovecot" / "run" / "master.pid").read_text())
            break
        except (OSError, ValueError):
            time.sleep(0.1)
    return Target("dovecot", port, "bench", stop, pid)


def summarize(rounds: dict[str, dict[str, list[dict[str, Any]]]], modes: list[str]) -> str:
    lines: list[str] = []
    for mode in modes:
        lines.append(f"\n## {mode}: commands/s, median (min-max) over rounds")
        meds: dict[str, float] = {}
        for t, by_mode in rounds.items():
            rs = by_mode.get(mode, [])
            if not rs:
                continue
            rates = [r["cmds_per_s"] for r in rs]
            meds[t] = statistics.median(rates)
            errs = sum(sum(r["errors"].values()) for r in rs)
            fails = sum(len(r["failures"]) for r in rs)
            loads = [x for r in rs for x in r["loadavg"]]
            cpus = [r["cpu_ms_per_cmd"] for r in rs if r.get("cpu_ms_per_cmd")]
            cpu = f"  cpu {statistics.median(cpus):.2f} ms/cmd" if cpus else ""
            lines.append(
                f"{t:<14} {meds[t]:8.0f} ({min(rates):.0f}-{max(rates):.0f})  rounds: "
                + ", ".join(f"{x:.0f}" for x in rates)
                + f"{cpu}  errors {errs} failures {fails}  load {min(loads):.1f}-{max(loads):.1f}"
            )
        if "dovecot" in meds:
            for t, m in meds.items():
                if t != "dovecot":
                    ratios = [
                        a["cmds_per_s"] / b["cmds_per_s"]
                        for a, b in zip(rounds[t][mode], rounds["dovecot"][mode], strict=False)
                    ]
                    lines.append(
                        f"ratio {t}/dovecot: {m / meds['dovecot']:.2f}x "
                        f"(per round {min(ratios):.2f}-{max(ratios):.2f})"
                    )
        cmds = sorted(
            {c for rs in rounds.values() for r in rs.get(mode, []) for c in r["per_command"]}
        )
        names = [t for t in rounds if rounds[t].get(mode)]
        lines.append(f"{'command':<15}" + "".join(f"{t + ' /s p50 p99 ms':>34}" for t in names))
        for c in cmds:
            row = f"{c:<15}"
            for t in names:
                rs = sorted(rounds[t][mode], key=lambda r: r["cmds_per_s"])
                r = rs[len(rs) // 2]["per_command"].get(c)
                row += (
                    f"{r['per_s']:>16.0f} {r['p50_ms']:>7.2f} {r['p99_ms']:>8.2f}"
                    if r
                    else f"{'-':>34}"
                )
            lines.append(row)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--modes", default="logged-in,churn")
    ap.add_argument(
        "--workers", default="1,2", help="mailsuite [server] workers values, one server each"
    )
    ap.add_argument("--targets", default="dovecot,mailsuite")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--code", type=Path, help="run mailsuite from this checkout (PYTHONPATH)")
    ap.add_argument(
        "--baseline",
        type=Path,
        help="also run mailsuite from this checkout (targets base-wN): before/after in one run",
    )
    ap.add_argument("--out", type=Path)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--host-port", help="HOST:PORT of an already running server (no start)")
    ap.add_argument("--user", default="bench@example.test")
    ap.add_argument("--password", default="benchpass")
    ap.add_argument(
        "--costs",
        type=int,
        default=0,
        metavar="N",
        help="instead of the stress: N commands of each kind, server CPU ms per command",
    )
    ap.add_argument("--pid", type=int, default=0, help="with --host-port: the server's PID (CPU)")
    a = ap.parse_args()
    modes = [m for m in a.modes.split(",") if m]
    for m in modes:
        if m not in ("logged-in", "churn"):
            raise SystemExit(f"unknown mode {m!r}")
    # SIGTERM ends the run like Ctrl-C: the servers started here are stopped (finally below)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    targets: list[Target] = []
    work = Path(tempfile.mkdtemp(prefix="mailsuite-imap-stress.", dir="/var/tmp"))
    work.chmod(0o755)  # Dovecot's auth process (user dovecot) reads its passwd file below it
    rounds: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        if a.host_port:
            host, port = a.host_port.rsplit(":", 1)
            if not host.startswith("127."):
                raise SystemExit("loopback only")
            targets.append(Target("server", int(port), a.user, lambda: None, a.pid))
        else:
            wanted = a.targets.split(",")
            if "dovecot" in wanted:
                targets.append(start_dovecot(work))
            if "mailsuite" in wanted:
                for w in a.workers.split(","):
                    targets.append(start_mailsuite(work, w, a.code))
                    if a.baseline is not None:
                        targets.append(start_mailsuite(work, w, a.baseline, "base"))
        print(
            f"targets: {', '.join(f'{t.name} (port {t.port}, pid {t.pid})' for t in targets)}",
            file=sys.stderr,
        )
        if a.costs:
            costs = {
                t.name: command_costs(
                    "127.0.0.1", t.port, t.user, a.password, t.pid, "costs", a.costs, a.messages
                )
                for t in targets
            }
            print(f"server CPU ms per command ({a.costs} of each, {a.messages} messages)")
            print(f"{'command':<16}" + "".join(f"{t:>16}" for t in costs))
            for name in next(iter(costs.values())):
                print(f"{name:<16}" + "".join(f"{costs[t][name]:>16.3f}" for t in costs))
            return
        for i in range(a.rounds):
            k = i % len(targets)
            order = targets[k:] + targets[:k]
            for mode in modes:
                for t in order:
                    r = run_round(
                        "127.0.0.1", t.port, t.user, a.password, mode, a, f"stress{i}", t.pid
                    )
                    rounds.setdefault(t.name, {}).setdefault(mode, []).append(r)
                    print(
                        f"round {i} {mode:<9} {t.name:<14} {r['cmds_per_s']:8.0f} cmds/s "
                        f"cpu {r['cpu_ms_per_cmd'] or 0:.2f} ms/cmd "
                        f"errors {sum(r['errors'].values())} failures {len(r['failures'])} "
                        f"load {r['loadavg'][1]:.1f}",
                        file=sys.stderr,
                        flush=True,
                    )
                    if r["failures"]:
                        print("  " + r["failures"][0], file=sys.stderr)
    finally:
        for t in targets:
            t.stop()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}", file=sys.stderr)
    print(
        f"IMAP stress: {a.clients} clients, {a.duration:.0f} s, {a.messages} messages, "
        f"{a.rounds} rounds, seed {a.seed}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(summarize(rounds, modes))
    if a.out:
        a.out.write_text(json.dumps(rounds, indent=1))


if __name__ == "__main__":
    main()
