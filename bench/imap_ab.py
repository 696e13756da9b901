"""Before/after of the logged-in IMAP stress mix: two mailsuite servers, many short rounds.

    python3 bench/imap_ab.py --baseline ../main [--workers 1] [--rounds 6] [--duration 8]

``imap_stress.py`` with Dovecot in the same rounds is the comparison to quote; this is the
quick one for a change: this tree and ``--baseline`` (another checkout) each run one server
(``mailsuite_target.py``), each gets the 1,000-message folder once, then ``--rounds`` rounds
of ``--duration`` seconds alternate between them (who goes first alternates too), with the
same clients and command mix as ``imap_stress.py`` (its functions).  Per round: commands/s,
p50 over all commands, the server's CPU per command (process tree, from /proc) and, with one
worker, the event loop thread's own CPU per command and the share of its time spent waiting
for a CPU (``/proc/PID/task/PID/schedstat``: on a busy machine that wait, not the code, sets
the latency).  Then the medians and the per-round ratios.  Loopback only; both servers are
stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import imap_stress as S  # noqa: E402  (the stress mix's client and helpers)

PASSWORD = "benchpass"
FOLDER = "ab"


def _schedstat(pid: int) -> tuple[int, int]:
    """(ns on a CPU, ns waiting for one) of the process's main thread."""
    run, wait, _ = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
    return int(run), int(wait)


def one_round(t: S.Target, a: argparse.Namespace, seed: int) -> dict[str, Any]:
    start_at = time.time() + 1.0
    jobs = [
        S.Job("127.0.0.1", t.port, t.user, PASSWORD, FOLDER, "logged-in", a.duration,
              seed * 1000 + i, start_at)
        for i in range(a.clients)
    ]  # fmt: skip
    cpu0, (run0, wait0), w0 = S.tree_cpu(t.pid), _schedstat(t.pid), time.time()
    with mp.get_context("fork").Pool(a.clients, initializer=S._client_signals) as pool:
        results = pool.map_async(S.run_client, jobs).get(timeout=a.duration + 300)
    cpu1, (run1, wait1), w1 = S.tree_cpu(t.pid), _schedstat(t.pid), time.time()
    lat = [x for r in results for k, v in r.latencies.items() if k != "CONNECT" for x in v]
    if any(r.failures for r in results) or not lat:
        raise SystemExit(f"{t.name}: {[f for r in results for f in r.failures][:1]}")
    n = len(lat)
    return {
        "rate": n / a.duration,
        "p50_ms": statistics.median(lat) * 1e3,
        "cpu_ms": (cpu1 - cpu0) / n * 1e3,
        "loop_cpu_ms": (run1 - run0) / 1e6 / n,
        "loop_runq": (wait1 - wait0) / 1e9 / (w1 - w0),
        "load": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--baseline", type=Path, required=True, help="the checkout to compare with")
    ap.add_argument("--workers", default="1")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--messages", type=int, default=1000)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mailsuite-imap-ab.", dir="/var/tmp"))
    targets: list[S.Target] = []
    try:
        targets.append(S.start_mailsuite(work, a.workers, None, "this"))
        targets.append(S.start_mailsuite(work, a.workers, a.baseline, "base"))
        for t in targets:
            S.prepare("127.0.0.1", t.port, t.user, PASSWORD, FOLDER, a.messages)
        rounds: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
        for i in range(a.rounds):
            for t in targets if i % 2 == 0 else targets[::-1]:
                r = one_round(t, a, i + 1)
                rounds[t.name].append(r)
                loop = (
                    f" loop {r['loop_cpu_ms']:.2f} ms/cmd, run queue {r['loop_runq']:.0%}"
                    if a.workers == "1"
                    else ""
                )
                print(
                    f"round {i} {t.name:<8} {r['rate']:6.0f} cmds/s  p50 {r['p50_ms']:6.1f} ms"
                    f"  cpu {r['cpu_ms']:.2f} ms/cmd{loop}  load {r['load']:.1f}",
                    flush=True,
                )
    finally:
        for t in targets:
            t.stop()
        shutil.rmtree(work, ignore_errors=True)
    for name, rs in rounds.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        rates = [r["rate"] for r in rs]
        print(
            f"{name:<8} {med['rate']:.0f} cmds/s ({min(rates):.0f}-{max(rates):.0f})"
            f"  p50 {med['p50_ms']:.1f} ms  cpu {med['cpu_ms']:.2f} ms/cmd"
            + (f"  loop {med['loop_cpu_ms']:.2f} ms/cmd" if a.workers == "1" else "")
        )
    this, base = (rounds[t.name] for t in targets)
    ratios = [x["rate"] / y["rate"] for x, y in zip(this, base, strict=True)]
    print(
        f"this/base per round: {', '.join(f'{x:.2f}' for x in ratios)}"
        f"  median {statistics.median(ratios):.2f}"
    )


if __name__ == "__main__":
    main()
