"""Cost of the shared connection counts per connection (issue 15): one acquire (the
service total and the client's address, as ConnectionLimits.admit asks with the default
limits) and one release, in one process and with several processes contending.

    PYTHONPATH=. python3 bench/connection_counts.py [--procs 3] [--n 5000] [--rounds 5]
        [--sqlite-from FILE]

``--sqlite-from``: a copy of the earlier ``mailsuite/shared/counters.py`` (``git show
<commit>:mailsuite/shared/counters.py > FILE``), whose ``SharedConnectionCounts`` is
measured in the same run, rounds alternating.  Prints CPU microseconds per acquire+release
(``time.process_time``) in one process, and the wall-clock latency of each acquire+release
(p50/p99/max) while ``--procs`` processes do the same at once; "local", the same calls on
a dict of the process, is the noise floor (scheduling on a loaded machine).
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mailsuite.shared.connection_table import SharedConnectionTable, create, table_path


class LocalCounts:
    """The same calls on a dict of this process (nothing shared): the noise floor of the
    timing -- what the scheduler and the loop itself cost on a loaded machine."""

    def __init__(self) -> None:
        self.n: dict[str, int] = {}

    def acquire(self, add: list[tuple[str, int]], drop: list[str] = []) -> int | None:  # noqa: B006
        for i, (key, limit) in enumerate(add):
            if limit and self.n.get(key, 0) >= limit:
                return i
        for key, _ in add:
            self.n[key] = self.n.get(key, 0) + 1
        return None

    def release(self, keys: list[str]) -> None:
        for key in keys:
            self.n[key] -= 1


def table_maker(directory: Path, procs: int) -> Callable[[int], Any]:
    path = table_path(directory)
    create(path, procs)
    return lambda column: SharedConnectionTable(path, column)


def sqlite_maker(source: Path, directory: Path) -> Callable[[int], Any]:
    spec = importlib.util.spec_from_file_location("old_counters", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = module.state_path(directory)
    module.reset(path)
    return lambda column: module.SharedConnectionCounts(path)


def one_round(counts: Any, n: int, offset: int) -> list[float]:
    """n acquire+release pairs; each one's wall-clock seconds."""
    times = []
    clock = time.perf_counter
    for i in range(n):
        key = f"smtp ip 192.0.2.{(i + offset) % 200}"
        t = clock()
        counts.acquire([("smtp total", 500), (key, 50)])
        counts.release(["smtp total", key])
        times.append(clock() - t)
    return times


def cpu_per_pair(counts: Any, n: int) -> float:
    t = time.process_time()
    one_round(counts, n, 0)
    return (time.process_time() - t) / n * 1e6


def _contender(make: Callable[[int], Any], column: int, n: int, barrier: Any, out: Any) -> None:
    counts = make(column)
    barrier.wait()
    out.put(one_round(counts, n, column * 7))


def contended(make: Callable[[int], Any], procs: int, n: int) -> list[float]:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(procs)
    out = ctx.Queue()
    ps = [ctx.Process(target=_contender, args=(make, c, n, barrier, out)) for c in range(procs)]
    for p in ps:
        p.start()
    times = [t for _ in ps for t in out.get(timeout=600)]
    for p in ps:
        p.join()
    return times


def summary(times: list[float]) -> str:
    s = sorted(times)
    p = lambda q: s[min(len(s) - 1, int(q * len(s)))] * 1e6  # noqa: E731
    return f"p50 {p(0.5):.0f} us, p99 {p(0.99):.0f} us, max {s[-1] * 1e6:.0f} us"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=3)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sqlite-from", type=Path)
    args = ap.parse_args()
    with (
        tempfile.TemporaryDirectory(dir="/dev/shm") as shm,
        tempfile.TemporaryDirectory() as disk,
    ):
        makers: dict[str, Callable[[int], Any]] = {
            "local": lambda column: LocalCounts(),
            "table": table_maker(Path(shm), args.procs),
        }
        if args.sqlite_from:
            makers["sqlite"] = sqlite_maker(args.sqlite_from, Path(disk))
        run(makers, args)


def run(makers: dict[str, Callable[[int], Any]], args: argparse.Namespace) -> None:
    cpu: dict[str, list[float]] = {name: [] for name in makers}
    lat: dict[str, list[float]] = {name: [] for name in makers}
    maxes: dict[str, list[float]] = {name: [] for name in makers}
    for _ in range(args.rounds):
        for name, make in makers.items():
            cpu[name].append(cpu_per_pair(make(0), args.n))
            times = contended(make, args.procs, args.n)
            lat[name].extend(times)
            maxes[name].append(max(times) * 1e6)
    for name in makers:
        print(
            f"{name}: CPU per acquire+release, 1 process: median "
            f"{statistics.median(cpu[name]):.1f} us (rounds: "
            f"{', '.join(f'{x:.1f}' for x in cpu[name])}); {args.procs} processes contending: "
            f"{summary(lat[name])} (max per round: {', '.join(f'{x:.0f}' for x in maxes[name])})"
        )


if __name__ == "__main__":
    main()
