"""Python calls per SMTP message in the mailsuite server, by function (cProfile counts).

A 4 KiB message over a new connection, as ``bench/smtp_cpu.py`` sends it (smtp-source,
``--sessions`` sessions, counted until every message is in the Maildir), default config and
``[server] workers = --workers``.  Call counts are exact and do not move with the machine's
load, so they show what a change to the per-message path does where CPU time cannot.

How: the server runs with a ``sitecustomize`` put first on its ``PYTHONPATH`` (written to a
temporary directory), which, in every process of the server (the supervisor and each
worker), runs cProfile from the start in the main thread and in every thread started later
(the disk threads, the mail-authentication threads: cProfile follows one thread only), and
on SIGUSR2 writes the statistics of all of them so far to a file.  After ``--warm``
messages (caches, imports), a first dump; then ``--msgs`` messages; a second dump; the
difference per function over the messages is the calls per message (calls still in progress
at a dump, such as a thread's loop, are not counted).  Every function cProfile sees is
counted, Python functions and C built-ins alike.

    python3 bench/smtp_calls.py [--msgs 2000] [--tree DIR] [--top 40] [--by-file]
    python3 bench/smtp_calls.py --compare-tree DIR      # this tree and DIR, calls
    python3 bench/smtp_calls.py --cpu --compare-tree DIR [--rounds 5]

``--tree DIR`` runs the server from another source tree.  ``--compare-tree DIR`` counts
both trees and prints the totals and the functions whose counts changed most.  ``--cpu``
measures instead (no profiler) the server's CPU and context switches per message of this
tree and ``--compare-tree`` in alternating rounds (``bench/smtp_cpu.py``'s rounds).
Give ``TMPDIR_BASE=/mnt/benchfs`` for a journaled file system, as for ``smtp_cpu.py``.
"""

from __future__ import annotations

import argparse
import marshal
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smtp_cpu

#: The profiler installed in every Python process of the server (see the module docstring).
SITECUSTOMIZE = r"""
import cProfile, itertools, marshal, os, signal, sys, threading
_OUT = os.environ.get("MAILSUITE_BENCH_CALLS")
if _OUT:
    _profiles = []
    _seq = itertools.count()
    _run = threading.Thread.run
    def _profiled_run(self):
        p = cProfile.Profile()
        _profiles.append(p)
        p.enable()
        try:
            _run(self)
        finally:
            p.disable()
    threading.Thread.run = _profiled_run
    def _dump(signum, frame):
        _main.disable()  # the dump's own calls are not counted
        merged = {}
        for p in list(_profiles):
            p.snapshot_stats()  # no disable(): that would act on this thread
            for func, (cc, nc, tt, ct, callers) in p.stats.items():
                old = merged.setdefault(func, [0, {}])
                old[0] += nc
                for caller, c in callers.items():
                    n = c[1] if isinstance(c, tuple) else c
                    old[1][caller] = old[1].get(caller, 0) + n
        path = os.path.join(_OUT, "%d.%d" % (os.getpid(), next(_seq)))
        with open(path + ".part", "wb") as f:
            marshal.dump(merged, f)
        os.replace(path + ".part", path)
        _main.enable()
    _main = cProfile.Profile()
    _profiles.append(_main)
    signal.signal(signal.SIGUSR2, _dump)
    _main.enable()
"""

Func = tuple[str, int, str]
#: function -> [calls, {caller: calls}]
Counts = dict[Func, list[Any]]


def dump_all(pids: list[int], out: Path, seq: int) -> dict[int, Counts]:
    """SIGUSR2 to every process, and their statistics (dump number ``seq``) once written."""
    for pid in pids:
        os.kill(pid, signal.SIGUSR2)
    got: dict[int, Counts] = {}
    deadline = time.monotonic() + 60
    while len(got) < len(pids) and time.monotonic() < deadline:
        for pid in pids:
            path = out / f"{pid}.{seq}"
            if pid not in got and path.exists():
                with path.open("rb") as f:
                    got[pid] = marshal.load(f)
        time.sleep(0.1)
    if len(got) < len(pids):
        raise SystemExit(f"no statistics from {sorted(set(pids) - set(got))}")
    return got


def diff(after: Counts, before: Counts) -> dict[Func, int]:
    return {f: n[0] - before.get(f, [0, {}])[0] for f, n in after.items()}


def caller_diff(after: Counts, before: Counts, func: Func) -> dict[Func, int]:
    old = before.get(func, [0, {}])[1]
    return {c: n - old.get(c, 0) for c, n in after[func][1].items()}


def name(func: Func) -> str:
    path, line, fn = func
    if path == "~":
        return fn
    parts = Path(path).parts
    for root in ("mailsuite", "twisted", "prometheus_client"):
        if root in parts:
            i = len(parts) - 1 - parts[::-1].index(root)
            return f"{'/'.join(parts[i:])}:{line}({fn})"
    return f"{Path(path).name}:{line}({fn})"


def count_calls(
    a: argparse.Namespace, tree: str, work: Path
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Calls per message: (workers by function, supervisor by function)."""
    site = work / "site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    out = work / "dumps"
    out.mkdir(exist_ok=True)
    os.environ["MAILSUITE_BENCH_CALLS"] = str(out)
    try:
        t = smtp_cpu.start_mailsuite("calls", f"w{a.workers}", work, f"{site}:{tree}")
    finally:
        del os.environ["MAILSUITE_BENCH_CALLS"]
    try:
        time.sleep(3)  # the workers import and adopt the sockets
        a.msgs, msgs = a.warm, a.msgs
        smtp_cpu.one_round(t, a)
        a.msgs = msgs
        pids = smtp_cpu.tree(t.pid)
        before = dump_all(pids, out, 0)
        t0 = smtp_cpu.snapshot(t.pid)
        smtp_cpu.one_round(t, a)
        t1 = smtp_cpu.snapshot(t.pid)
        after = dump_all(pids, out, 1)
    finally:
        for cmd in t.stop:
            subprocess.run(cmd, check=False, capture_output=True, timeout=120)
    workers: dict[str, float] = {}
    sup: dict[str, float] = {}
    callers: dict[str, dict[str, float]] = {}
    for pid in pids:
        into = sup if pid == t.pid else workers
        for func, n in diff(after[pid], before[pid]).items():
            if n:
                key = name(func)
                into[key] = into.get(key, 0.0) + n / a.msgs
                if pid != t.pid and a.callers and any(c in key for c in a.callers.split(",")):
                    mine = callers.setdefault(key, {})
                    for c, k in caller_diff(after[pid], before[pid], func).items():
                        if k:
                            mine[name(c)] = mine.get(name(c), 0.0) + k / a.msgs
    for key, by in callers.items():
        print(f"callers of {key} per message (workers):")
        for c, v in sorted(by.items(), key=lambda kv: -kv[1])[: a.top]:
            print(f"  {v:8.2f}  {c}")
    cs = {"context switches": (t1["cs"] - t0["cs"]) / a.msgs}
    return workers, sup, cs


def by_file(calls: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in calls.items():
        f = k.split(":", 1)[0] if ":" in k and "(" in k else "(built-ins)"
        out[f] = out.get(f, 0.0) + v
    return out


def show(title: str, calls: dict[str, float], top: int) -> None:
    print(f"{title}: {sum(calls.values()):.1f} calls per message")
    for k, v in sorted(calls.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {v:8.2f}  {k}")


def calls_main(a: argparse.Namespace, work: Path) -> None:
    here = str(Path(__file__).resolve().parent.parent)
    runs = [("this tree", a.tree or here)]
    if a.compare_tree:
        runs.append(("compare", a.compare_tree))
    got = []
    for label, tree in runs:
        workers, sup, cs = count_calls(a, tree, work / label.replace(" ", "_"))
        print(f"== {label} ({tree}), {a.msgs} messages, load {os.getloadavg()[:3]}")
        show("workers", by_file(workers) if a.by_file else workers, a.top)
        show("supervisor", sup, min(a.top, 10))
        print(f"context switches per message (server): {cs['context switches']:.1f}")
        got.append((workers, sup))
    if len(got) == 2:
        (w0, s0), (w1, s1) = got
        print(f"workers: {sum(w0.values()):.1f} against {sum(w1.values()):.1f} calls/msg; ", end="")
        print(f"supervisor {sum(s0.values()):.1f} against {sum(s1.values()):.1f}")
        change = {k: w0.get(k, 0.0) - w1.get(k, 0.0) for k in set(w0) | set(w1)}
        print("biggest changes in the workers (this tree minus compare):")
        for k, v in sorted(change.items(), key=lambda kv: -abs(kv[1]))[: a.top]:
            if abs(v) >= 0.01:
                print(f"  {v:+8.2f}  {k}")


def cpu_main(a: argparse.Namespace, work: Path) -> None:
    """Server CPU and context switches per message, this tree and ``--compare-tree``."""
    here = str(Path(__file__).resolve().parent.parent)
    specs = [("new", a.tree or here), ("compare", a.compare_tree)]
    targets = []
    try:
        for label, tree in specs:
            targets.append(smtp_cpu.start_mailsuite(label, f"w{a.workers}", work, tree))
        time.sleep(3)
        got: dict[str, dict[str, list[float]]] = {t.name: {} for t in targets}
        for r in range(a.rounds):
            for t in targets if r % 2 == 0 else targets[::-1]:
                rate, per = smtp_cpu.one_round(t, a)
                per["rate"] = rate
                for k, v in per.items():
                    got[t.name].setdefault(k, []).append(v)
                print(
                    f"  round {r + 1} {t.name}: {rate:.0f} msgs/s, server {per['server']:.0f}"
                    f" us/msg, cs {per['cs']:.1f}",
                    flush=True,
                )
    finally:
        for t in targets:
            for cmd in t.stop:
                subprocess.run(cmd, check=False, capture_output=True, timeout=120)
    print(f"median of {a.rounds} rounds, load {os.getloadavg()[:3]}:")
    for t in targets:
        v = got[t.name]
        print(
            f"  {t.name}: "
            + "; ".join(
                f"{k} {statistics.median(xs):.1f}"
                for k, xs in v.items()
                if k in ("rate", "server", "user", "sys", "sup", "cs")
            )
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--msgs", type=int, default=2000)
    ap.add_argument("--warm", type=int, default=300, help="messages before counting")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--tree", help="source tree to run the server from (default: this one)")
    ap.add_argument("--compare-tree", help="the other source tree (e.g. main)")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument(
        "--callers", help="callers of the functions whose name has one of these (comma list)"
    )
    ap.add_argument("--by-file", action="store_true", help="workers' calls summed by file")
    ap.add_argument("--cpu", action="store_true", help="CPU per message, no profiler")
    ap.add_argument("--rounds", type=int, default=5, help="with --cpu: alternating rounds")
    ap.add_argument("--smtp-source", default=os.environ.get("SMTP_SOURCE", "/usr/sbin/smtp-source"))
    a = ap.parse_args()
    a.keep = False
    base = os.environ.get("TMPDIR_BASE", "/var/tmp")
    with tempfile.TemporaryDirectory(prefix="mailsuite-smtp-calls.", dir=base) as tmp:
        if a.cpu:
            if not a.compare_tree:
                raise SystemExit("--cpu needs --compare-tree")
            cpu_main(a, Path(tmp))
        else:
            calls_main(a, Path(tmp))


if __name__ == "__main__":
    main()
