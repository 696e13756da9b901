"""POP3 benchmark: mailsuite and Dovecot side by side with ../shared/bench/pop3_bench.py.

Creates a 1,000-message box in each server (the shared generator: small messages, none
\\Seen), starts mailsuite (``twistd -n mailsuite``) on a loopback port and, when Dovecot is
installed, the shared harness's Dovecot peer (``peers.sh start dovecot``, ports 10000-10999,
its own run directory), and runs the same poplib workload (the shared ``pop3_bench.trial``:
login, STAT, UIDL, RETR of every message, QUIT; nothing deleted; then 1,000 NOOP round trips
on a connection of their own) against both: one cold
trial each, then ``--trials`` warm rounds alternating which server goes first, so a drift in
machine load hits both alike.  Prints the warm medians (min-max), the mailsuite/Dovecot
ratios and the load average.

    python bench/pop3.py [--count 1000] [--trials 5] [--no-dovecot] [--keep DIR]
        [--workers N] [--profile py-spy.svg] [--cprofile pop3.pstats] [--floor]

Runs as root for the Dovecot peer (its Maildirs belong to uid 5000); mailsuite runs as the
invoking user.  Everything listens on 127.0.0.1 only.  ``--profile FILE`` records the
mailsuite process with py-spy during the warm rounds (a flame graph for ``.svg``, else
collapsed stacks; py-spy must be installed).  ``--cprofile FILE`` records mailsuite's warm rounds
with cProfile (switched on and off by SIGUSR2): every call with its count and time (read it
with ``python -m pstats FILE``).
``--floor`` adds ``bench/pop3_floor.py`` to the rounds: a one-thread epoll loop that makes
mailsuite's system calls per RETR and its dot-stuffing and nothing else, the least a Python
server can cost per message on that machine at that load.
Besides wall times it prints the server's CPU time per RETR and per NOOP (the server's
threads' run time from ``/proc/PID/task/*/schedstat``, nanoseconds, so steadier than wall
time on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import poplib
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from mailsuite.testing.process import mailsuite_argv

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("BENCH_DIR", REPO.parent / "shared" / "bench"))
PASSWORD = "benchpass"
STEPS = ("login", "stat", "uidl", "retr_all", "quit", "total", "noop_1000")
NOOPS = 1000  # NOOP round trips timed per round, on a connection of their own
DOVECOT_UID = 5000
# twistd with a cProfile that SIGUSR2 switches on and, the next time, off (writing the
# statistics to $MAILSUITE_BENCH_CPROFILE): the warm rounds alone are profiled.
PROFILED_TWISTD = """
import cProfile, os, signal
from twisted.scripts.twistd import run
on = []
def toggle(signum, frame):
    if on:
        profile = on.pop()
        profile.disable()
        profile.dump_stats(os.environ["MAILSUITE_BENCH_CPROFILE"])
    else:
        on.append(cProfile.Profile())  # a new one each time: each dump has its span alone
        on[0].enable()
signal.signal(signal.SIGUSR2, toggle)
run()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open")


def shared_modules() -> tuple[Any, Any]:
    """The shared harness's client (``pop3_bench``) and generator (``gen_maildir``)."""
    sys.path.insert(0, str(SHARED))
    import gen_maildir  # the shared harness, found at run time
    import pop3_bench

    return pop3_bench, gen_maildir


@contextmanager
def mailsuite_server(
    work: Path,
    count: int,
    workers: int,
    gen: Any,
    name: str = "mailsuite",
    tree: str | None = None,
    cprofile: str | None = None,
) -> Iterator[Any]:
    """mailsuite on a free port with ``count`` messages; ``tree``: the source tree to run
    (PYTHONPATH), else the one this Python imports; ``cprofile``: where the server writes
    its cProfile statistics (see :data:`PROFILED_TWISTD`)."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    if tree is not None:
        env["PYTHONPATH"] = tree
    config = work / "mailsuite.toml"
    config.write_text(
        f'[server]\nhostname = "localhost"\ndata_dir = "data"\nworkers = {workers}\n\n'
        f'[listen]\npop3 = ["tcp:{port}:interface=127.0.0.1"]\n\n'
        '[domains]\nlocal = ["example.test"]\n\n'
        "[auth]\nallow_plaintext = true\n"  # pop3_bench.py logs in without TLS
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mailsuite.cli",
            "--config",
            str(config),
            "user",
            "add",
            "pop1k@example.test",
            "--password-stdin",
        ],
        input=PASSWORD + "\n",
        text=True,
        check=True,
        capture_output=True,
        cwd=work,
        env=env,
    )
    maildir = work / "data" / "mail" / "example.test" / "pop1k"
    gen.gen_maildir(str(maildir), count, 0.0, None, None, 6, 7)
    argv = mailsuite_argv(str(config), logfile=str(work / "twistd.log"))
    if cprofile is not None:
        argv[2] = PROFILED_TWISTD  # python -c CODE twistd-arguments...
        env["MAILSUITE_BENCH_CPROFILE"] = cprofile
    proc = subprocess.Popen(argv, cwd=work, env=env)
    try:
        wait_port(port, proc)
        yield SimpleNamespace(name=name, port=port, user="pop1k@example.test", pid=proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@contextmanager
def floor_server(work: Path, count: int, gen: Any) -> Iterator[Any]:
    """``bench/pop3_floor.py`` on a free port over its own copy of the box (see ``--floor``)."""
    maildir = work / "floor" / "Maildir"
    gen.gen_maildir(str(maildir), count, 0.0, None, None, 6, 7)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "pop3_floor.py"), str(port), str(maildir)]
    )
    try:
        wait_port(port, proc)
        yield SimpleNamespace(name="floor", port=port, user="floor", pid=proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)


@contextmanager
def dovecot_server(work: Path, count: int, gen: Any) -> Iterator[Any]:
    run = work / "peers"
    work.chmod(0o755)  # Dovecot's auth and mail processes (other uids) read below here
    env = dict(os.environ, RUN=str(run), BENCH_DIR=str(SHARED))
    peers = [str(SHARED / "peers.sh")]
    subprocess.run(["bash", *peers, "start", "dovecot"], env=env, check=True, timeout=120)
    try:
        maildir = run / "dovecot/users/pop1k/Maildir"
        shutil.rmtree(maildir, ignore_errors=True)
        gen.gen_maildir(str(maildir), count, 0.0, DOVECOT_UID, DOVECOT_UID, 6, 7)
        port = int(os.environ.get("PORT_DOVECOT_POP3", "10110"))
        pid = int((run / "dovecot/run/master.pid").read_text().split()[0])
        yield SimpleNamespace(name="dovecot", port=port, user="pop1k", pid=pid)
    finally:
        subprocess.run(["bash", *peers, "stop", "dovecot"], env=env, timeout=60)


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU of a process and its live children (the workers), from /proc."""
    if pid is None:
        return 0.0
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def run_ns(pid: int | None) -> int:
    """Nanoseconds on a CPU of a process's threads and its live children's
    (``/proc/PID/task/TID/schedstat``: per-command costs need finer than clock ticks), plus
    the children it has reaped (``cutime + cstime``, in ticks): Dovecot's pop3 process for a
    session ends at its QUIT, and its master reaps it."""
    if pid is None:
        return 0
    tick = os.sysconf("SC_CLK_TCK")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = (int(fields[13]) + int(fields[14])) * 1_000_000_000 // tick
    except (OSError, ValueError):
        total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                total += int((task / "schedstat").read_text().split()[0])
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def client(pop3_bench: Any, target: Any) -> Callable[[], tuple[dict[str, float], dict[str, Any]]]:
    args = SimpleNamespace(
        host="127.0.0.1", port=target.port, user=target.user, password=PASSWORD, timeout=300
    )

    def run() -> tuple[dict[str, float], dict[str, Any]]:
        ns0 = run_ns(target.pid)
        times, checks = pop3_bench.trial(args)
        # server CPU per message of a whole download (login, STAT, UIDL, RETRs, QUIT)
        times["cpu_retr_us"] = (run_ns(target.pid) - ns0) / 1000 / max(checks["retrieved"], 1)
        p = poplib.POP3(args.host, args.port, timeout=args.timeout)
        try:
            p.user(args.user)
            p.pass_(args.password)
            ns0 = run_ns(target.pid)
            t0 = time.perf_counter()
            for _ in range(NOOPS):
                p.noop()
            times["noop_1000"] = round(time.perf_counter() - t0, 4)
            times["cpu_noop_us"] = (run_ns(target.pid) - ns0) / 1000 / NOOPS
            p.quit()
        finally:
            p.close()
        return times, checks

    return run


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.4f} ({min(values):.4f}-{max(values):.4f})"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--workers", type=int, default=1, help="[server] workers of mailsuite")
    ap.add_argument("--no-dovecot", action="store_true")
    ap.add_argument("--keep", help="work directory to keep (default: a temporary one)")
    ap.add_argument(
        "--compare-tree",
        help="also run mailsuite from this source tree (e.g. the main checkout), same rounds",
    )
    ap.add_argument(
        "--profile", help="py-spy record of mailsuite's warm rounds (.svg: flame graph)"
    )
    ap.add_argument("--cprofile", help="twistd's cProfile of mailsuite, written at its stop")
    ap.add_argument(
        "--floor", action="store_true", help="also the minimal server bench/pop3_floor.py"
    )
    a = ap.parse_args()
    pop3_bench, gen = shared_modules()
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="mailsuite-pop3-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    loads = [os.getloadavg()[0]]
    warm: dict[str, list[dict[str, float]]] = {}
    cold: dict[str, dict[str, float]] = {}
    spy: subprocess.Popen[bytes] | None = None
    cpu: dict[str, list[float]] = {}
    try:
        with (
            mailsuite_server(
                work / "ms",
                a.count,
                a.workers,
                gen,
                cprofile=a.cprofile and str(Path(a.cprofile).resolve()),
            ) as ours,
            (
                mailsuite_server(
                    work / "ms-compare", a.count, a.workers, gen, "compare", a.compare_tree
                )
                if a.compare_tree
                else _nothing()
            ) as other,
            floor_server(work, a.count, gen) if a.floor else _nothing() as floor,
        ):
            targets = [ours] + [t for t in (other, floor) if t is not None]
            dovecot = None if a.no_dovecot or not Path("/usr/sbin/dovecot").exists() else True
            with dovecot_server(work, a.count, gen) if dovecot else _nothing() as theirs:
                if theirs is not None:
                    targets.append(theirs)
                for t in targets:
                    times, checks = client(pop3_bench, t)()
                    ok = checks["stat_count"] == a.count == checks["retrieved"]
                    print(f"[pop3] {t.name} cold {times} checks {'ok' if ok else checks}")
                    if not ok:
                        raise SystemExit(f"{t.name}: wrong answers {checks}")
                    cold[t.name] = times
                    warm[t.name] = []
                    cpu[t.name] = []
                if a.cprofile:
                    os.kill(ours.pid, signal.SIGUSR2)
                if a.profile:
                    spy = subprocess.Popen(
                        ["py-spy", "record", "-o", a.profile, "-p", str(ours.pid), "-r", "500"]
                        + ([] if a.profile.endswith(".svg") else ["--format", "raw"])
                    )
                    time.sleep(1)
                for r in range(a.trials):
                    order = targets if r % 2 == 0 else targets[::-1]
                    for t in order:
                        before = cpu_seconds(t.pid)
                        times, _ = client(pop3_bench, t)()
                        cpu[t.name].append(cpu_seconds(t.pid) - before)
                        warm[t.name].append(times)
                        print(f"[pop3] round {r + 1} {t.name}: {times}", flush=True)
                    loads.append(os.getloadavg()[0])
                if a.cprofile:
                    os.kill(ours.pid, signal.SIGUSR2)
                    deadline = time.monotonic() + 30
                    while not Path(a.cprofile).exists() and time.monotonic() < deadline:
                        time.sleep(0.1)
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(60)
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    names = list(warm)
    print(
        f"\nPOP3, {a.count} messages, {a.trials} warm rounds, seconds: median (min-max); "
        f"mailsuite workers = {a.workers}"
    )
    peers = [n for n in names if n != "mailsuite"]
    print(
        f"{'step':<10}"
        + "".join(f"{n:>28}" for n in names)
        + "".join(f"{'vs ' + n:>16}" for n in peers)
    )
    for step in STEPS:
        row = f"{step:<10}" + "".join(f"{fmt([w[step] for w in warm[n]]):>28}" for n in names)
        mine = statistics.median(w[step] for w in warm["mailsuite"])
        for n in peers:  # speed of mailsuite relative to the other (> 1: mailsuite faster)
            ref = statistics.median(w[step] for w in warm[n])
            row += f"{ref / mine:>15.2f}x" if mine else f"{'-':>16}"
        print(row)
    for n in names:
        if n != "dovecot":
            print(f"server CPU per round, {n}: {fmt(cpu[n])} s")
    print("server CPU (every process of the server), us: median (min-max)")
    for n in names:
        per = {what: [w[f"cpu_{what}_us"] for w in warm[n]] for what in ("retr", "noop")}
        print(
            f"  {n:<10} per message downloaded {statistics.median(per['retr']):6.1f}"
            f" ({min(per['retr']):.1f}-{max(per['retr']):.1f}),"
            f" per NOOP {statistics.median(per['noop']):6.1f}"
            f" ({min(per['noop']):.1f}-{max(per['noop']):.1f})"
        )
    print("cold: " + "; ".join(f"{n} {cold[n]}" for n in names))
    print(f"load average (1 min) during the run: {min(loads):.2f}-{max(loads):.2f}")


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


if __name__ == "__main__":
    main()
