"""A cold SELECT in process: CPU and wall seconds until the answer can go out, and until the
folder is open (the build done), for one trial in this process (start one process per trial).

Runs the code IMAP SELECT runs on a folder new to the server: ``opened_index`` with the early
answer where the tree has it (``index_schema.EarlyAnswer``: the answer is ready when it is
reported, before the index is built), then ``FolderRegistry.get`` and the session's view; a
tree without it (main before the uidlist) answers once the folder is open and \\Recent
claimed.  The folder's ``mailsuite-index*`` files are removed first.  Prints one JSON line.

    for r in 1 2 3; do for t in <main> .; do
        PYTHONPATH=$t python3 bench/cold_answer.py /var/tmp/box; done; done
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def trial(box: Path) -> dict[str, Any]:
    """One cold open of ``box``: seconds (CPU, wall) to the answer and to the end."""
    for f in box.glob("mailsuite-index*"):
        f.unlink()
    from mailsuite.store.mailbox import FolderRegistry, opened_index

    try:
        from mailsuite.store.index_schema import EarlyAnswer
    except ImportError:  # a tree that answers after the build
        EarlyAnswer = None  # noqa: N806
    c0, w0 = time.process_time(), time.perf_counter()
    got: dict[str, Any] = {}

    def report(early: Any) -> None:
        got.update(cpu=time.process_time() - c0, wall=time.perf_counter() - w0, early=early)

    if EarlyAnswer is not None:
        folder = FolderRegistry().get(box, opened_index(box, EarlyAnswer(report, True)))
    else:
        folder = FolderRegistry().get(box, opened_index(box))
    if "early" in got:
        folder.view_as_told(False, got["early"])
    else:
        folder.index.claim_recent()
        got.update(cpu=time.process_time() - c0, wall=time.perf_counter() - w0)
    out = {
        "answer_cpu": round(got["cpu"], 3),
        "answer_wall": round(got["wall"], 3),
        "total_cpu": round(time.process_time() - c0, 3),
        "total_wall": round(time.perf_counter() - w0, 3),
        "messages": len(folder.uids),
    }
    folder.index.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("maildir", type=Path)
    print(json.dumps(trial(ap.parse_args().maildir)), flush=True)


if __name__ == "__main__":
    main()
