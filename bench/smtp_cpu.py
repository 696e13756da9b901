"""Server CPU per SMTP message, split by process (supervisor and each worker).

Throughput figures on a shared machine move with the other load; the CPU the server's own
processes spend per message does not (much), so this is what to compare between two trees.

    python3 bench/smtp_cpu.py --target w2-noauth --target main:w2-noauth=/path/to/tree \\
        --msgs 1000 --rounds 3

A target is ``[LABEL:]wN[-noauth][-nolimits][=TREE]``: mailsuite with ``[server] workers =
N`` (every ``[mail_auth]`` check off with ``-noauth``; every connection limit off with
``-nolimits``, else the defaults), run from TREE through ``PYTHONPATH``
(default: this tree).  Each is started once (bench/mailsuite_target.py, loopback, a
temporary directory); then, round by round in rotating order, smtp-source sends ``--msgs``
messages of ``--size`` bytes over ``--sessions`` sessions (a new connection per message)
and the script waits until all are in the Maildir.  The user+system CPU of every process
of the server (from /proc/PID/stat) before and after gives microseconds per message, for
the supervisor (the twistd process) and the workers (its children) apart.  Medians over
the rounds are printed with the spread and the load average.  Every server it started is
stopped by PID on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def snapshot(pid: int) -> dict[str, float]:
    """CPU seconds of the supervisor and of all its children together (workers)."""
    out = {"supervisor": cpu_seconds(pid), "workers": 0.0}
    for kid in children(pid):
        with contextlib.suppress(OSError):  # a worker being restarted
            out["workers"] += cpu_seconds(kid)
    return out


def start(label: str, spec: str, work: Path, tree: str | None) -> dict[str, str]:
    limits = "off" if spec.endswith("-nolimits") else "default"
    spec = spec.removesuffix("-nolimits")
    base = spec.removesuffix("-noauth")
    extra = ""
    if base != spec:
        extra = "[mail_auth]\nspf = false\ndkim = false\ndmarc = false\narc = false"
    env = dict(os.environ)
    if tree:
        env["PYTHONPATH"] = tree
    out = subprocess.run(
        [
            sys.executable,
            str(HERE / "mailsuite_target.py"),
            "start",
            "--dir",
            str(work / label),
            "--workers",
            base.removeprefix("w"),
            "--extra-toml",
            extra,
            "--connection-limits",
            limits,
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return {k: shlex.split(v)[0] if v else "" for k, v in values.items()}


def count(maildir: Path) -> int:
    return sum(1 for sub in ("new", "cur") for _ in (maildir / sub).iterdir())


def clear(maildir: Path) -> None:
    for sub in ("new", "cur"):
        for path in (maildir / sub).iterdir():
            path.unlink()


def one_round(env: dict[str, str], a: argparse.Namespace) -> tuple[float, dict[str, float]]:
    maildir = Path(env["MS_MAILDIR_FMT"].format(user="bench"))
    clear(maildir)
    pid = int(env["MS_PID"])
    before = snapshot(pid)
    t0 = time.perf_counter()
    cmd = [a.smtp_source, "-s", str(a.sessions), "-m", str(a.msgs), "-l", str(a.size)]
    cmd += ["-f", "load@example.org", "-t", "bench@example.test", "-M", "client.example.org"]
    cmd.append(f"127.0.0.1:{env['MS_SMTP_PORT']}")
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    deadline = time.monotonic() + 120
    while count(maildir) < a.msgs and time.monotonic() < deadline:
        time.sleep(0.02)
    took = time.perf_counter() - t0
    time.sleep(0.3)  # log lines still in flight to the supervisor
    after = snapshot(pid)
    per = {k: (after[k] - before[k]) / a.msgs * 1e6 for k in before}
    per["total"] = per["supervisor"] + per["workers"]
    return a.msgs / took, per


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--target", action="append", required=True)
    ap.add_argument("--msgs", type=int, default=1000)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smtp-source", default=os.environ.get("SMTP_SOURCE", "/usr/sbin/smtp-source"))
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mailsuite-smtp-cpu."))
    targets: list[tuple[str, dict[str, str]]] = []
    try:
        for t in a.target:
            label, _, rest = t.rpartition(":")
            spec, _, tree = rest.partition("=")
            targets.append((label or spec, start(label or spec, spec, work, tree or None)))
        time.sleep(3)  # workers import and adopt the sockets
        rates: dict[str, list[float]] = {n: [] for n, _ in targets}
        cpu: dict[str, dict[str, list[float]]] = {n: {} for n, _ in targets}
        for r in range(a.rounds):
            print(f"round {r + 1}/{a.rounds}, load {os.getloadavg()[:3]}", flush=True)
            for i in range(len(targets)):
                name, env = targets[(i + r) % len(targets)]
                rate, per = one_round(env, a)
                rates[name].append(rate)
                for k, v in per.items():
                    cpu[name].setdefault(k, []).append(v)
                shown = " ".join(f"{k} {v:.0f}" for k, v in per.items())
                print(f"  {name}: {rate:.0f} msgs/s; us/msg {shown}", flush=True)
        print(f"median of {a.rounds} (spread), load {os.getloadavg()[:3]}:")
        for name, _ in targets:
            parts = [f"{statistics.median(rates[name]):.0f} msgs/s"]
            for k, vs in cpu[name].items():
                parts.append(f"{k} {statistics.median(vs):.0f} us ({min(vs):.0f}-{max(vs):.0f})")
            print(f"  {name}: " + "; ".join(parts))
    finally:
        for name, _ in targets:
            stop = [sys.executable, str(HERE / "mailsuite_target.py"), "stop"]
            subprocess.run([*stop, "--dir", str(work / name)], check=False)
        if not a.keep:
            subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
