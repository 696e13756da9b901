"""First open of a big folder written by another program, in process: what the server itself
spends on a cold SELECT and a cold ``FETCH 1:* (ENVELOPE)`` (no client, no socket).

Runs the code IMAP runs: ``FolderRegistry.get`` + ``claim_recent`` (SELECT), then the FETCH
batches (``FolderIndex.details`` + ``fetch_pieces`` + ``store_cached``, 1,000 messages a batch).
Before each trial the folder's ``mailsuite-index*`` files are removed, so every trial is the
first sight of the folder.  Prints the times and an MD5 of the FETCH output (equal digests:
equal responses, e.g. across two trees).

    python3 ../shared/bench/gen_maildir.py --maildir /var/tmp/box --count 100000
    PYTHONPATH=. python3 bench/cold_folder.py /var/tmp/box [--trials 3] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import pstats
import time
from pathlib import Path

from mailsuite.imap.fetch_response import FetchPlan, fetch_pieces
from mailsuite.imap.parser import Atom, parse_fetch
from mailsuite.store.mailbox import FolderRegistry

BATCH = 1000  # as mailsuite.imap.message_commands.BATCH


def trial(box: Path) -> tuple[float, float, str]:
    for f in box.glob("mailsuite-index*"):
        f.unlink()
    t0 = time.perf_counter()
    folder = FolderRegistry().get(box)
    folder.index.claim_recent()
    t1 = time.perf_counter()
    plan = FetchPlan(parse_fetch([Atom("ENVELOPE")]), False, False)
    digest = hashlib.md5()
    uids = folder.uids
    for start in range(0, len(uids), BATCH):
        batch = [(start + i + 1, u) for i, u in enumerate(uids[start : start + BATCH])]
        details = folder.index.details([u for _, u in batch], plan.need_size, plan.need_date)
        cache: list[tuple[int, str, bytes]] = []
        data = b"".join(
            fetch_pieces(
                plan,
                folder.path,
                batch,
                folder.flags,
                folder.modseqs,
                lambda _u: False,
                details,
                cache,
                set(),
            )
        )
        if cache:
            folder.index.store_cached(cache)
        digest.update(data)
    t2 = time.perf_counter()
    folder.index.close()
    return t1 - t0, t2 - t1, digest.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("maildir", type=Path)
    ap.add_argument("--trials", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="cProfile one trial, print the top")
    a = ap.parse_args()
    if a.profile:
        prof = cProfile.Profile()
        prof.runcall(trial, a.maildir)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return
    for _ in range(a.trials):
        sel, env, md5 = trial(a.maildir)
        print(f"cold select {sel:.3f} s  cold fetch envelope {env:.3f} s  md5 {md5}", flush=True)


if __name__ == "__main__":
    main()
