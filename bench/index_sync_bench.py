"""How much a command pays for the index's directory check right after a change.

Builds a folder of N messages (half \\Seen, in cur/), opens its index, then for each scenario
makes one change and times ``FolderIndex.sync()`` calls over the next 1.2 s (the window in
which directory mtimes are young).  Prints the median and total time of those syncs.

    python bench/index_sync_bench.py [N]      (default 100000)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mailsuite.store.index import FolderIndex
from mailsuite.store.maildir import ensure_folder
from mailsuite.store.write import write_message


def build(root: Path, n: int) -> Path:
    box = ensure_folder(root / "box")
    cur = box / "cur"
    t = int(time.time()) - 10_000
    for i in range(n):
        name = f"{t + i}.M{i}P1Q{i}.bench,S=40,W=42:2,{'S' if i % 2 else ''}"
        with (cur / name).open("wb") as f:
            f.write(b"Subject: m\n\nbody of the message %08d\n" % i)
    past = time.time() - 5
    os.utime(cur, (past, past))
    os.utime(box / "new", (past, past))
    return box


def window(idx: FolderIndex, seconds: float = 1.2) -> list[float]:
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        idx.sync()
        out.append(time.perf_counter() - t0)
        time.sleep(0.02)  # a client issuing a command every ~20 ms
    return out


def report(label: str, times: list[float]) -> None:
    print(
        f"{label:<44} syncs={len(times):3d} median={statistics.median(times) * 1000:7.2f} ms"
        f" max={max(times) * 1000:7.2f} ms total={sum(times) * 1000:8.1f} ms",
        flush=True,
    )


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as d:
        box = build(Path(d), n)
        idx = FolderIndex(box)
        t0 = time.perf_counter()
        idx.sync()
        print(f"n={n}: first sync {time.perf_counter() - t0:.2f} s", flush=True)
        time.sleep(1.1)
        report("steady state (nothing changed)", window(idx, 0.5))
        # 1. a delivery by another program: one file into new/
        write_message(box, [b"Subject: new\n\nhello\n"])
        report("after a delivery into new/ (other program)", window(idx))
        time.sleep(1.1)
        # 2. our own flag change: rename within cur/ through the index
        uid = idx.messages()[0].uid if n < 1000 else 2
        idx.store_flags([(uid, frozenset({"\\Flagged"}))])
        report("after our own STORE (rename in cur/)", window(idx))
        time.sleep(1.1)
        # 3. another program's flag change in cur/
        victim = next(os.scandir(box / "cur")).path
        Path(victim).rename(victim + "F" if victim.endswith(",") else victim)
        os.utime(box / "cur")
        report("after another program's rename in cur/", window(idx))
        idx.close()


if __name__ == "__main__":
    main()
