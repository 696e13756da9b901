"""First SELECT of a big Maildir written by another program, mailsuite and Dovecot in turn.

Both servers are running and their Maildirs hold the same messages (``imap_bench.sh`` sets
this up and runs this script when ``COLD_ROUNDS`` is set).  Each round, for each server in an
order that alternates: its index files are removed (mailsuite's ``mailsuite-index*``,
Dovecot's ``dovecot-uidlist`` and ``dovecot.index*``), so the folder is new to it again; then
LOGIN (not timed) and SELECT INBOX timed with imaplib, LOGOUT.  The directory listing itself
stays in the kernel's cache for both alike.  Prints each round, the medians, the spread and
the ratio mailsuite / Dovecot, and the load average before and after.

    python3 bench/cold_select.py --rounds 5 --password benchpass \\
        --target mailsuite:PORT:USER:MAILDIR --target dovecot:PORT:USER:MAILDIR
"""

from __future__ import annotations

import argparse
import imaplib
import json
import os
import statistics
import time
from pathlib import Path

INDEX_FILES = {
    "mailsuite": ("mailsuite-index",),
    "dovecot": ("dovecot-uidlist", "dovecot.index"),
}


def forget(kind: str, maildir: Path) -> None:
    """Remove the server's index files, so its next SELECT is a first sight of the folder."""
    prefixes = INDEX_FILES.get(kind, ())
    for path in maildir.iterdir():
        if path.name.startswith(prefixes):
            path.unlink()


def cold_select(port: int, user: str, password: str) -> tuple[float, int]:
    """(seconds for SELECT INBOX, EXISTS)."""
    m = imaplib.IMAP4("127.0.0.1", port, timeout=600)
    try:
        m.login(user, password)
        t0 = time.perf_counter()
        typ, data = m.select("INBOX")
        took = time.perf_counter() - t0
        if typ != "OK":
            raise SystemExit(f"SELECT failed on port {port}: {data!r}")
        return took, int(data[0] or 0)
    finally:
        m.logout()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", action="append", required=True, help="NAME:PORT:USER:MAILDIR")
    ap.add_argument("--password", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    targets = []
    for t in a.target:
        name, port, user, maildir = t.split(":", 3)
        targets.append((name, int(port), user, Path(maildir)))
    times: dict[str, list[float]] = {t[0]: [] for t in targets}
    load_before = os.getloadavg()
    for r in range(a.rounds):
        order = targets if r % 2 == 0 else list(reversed(targets))
        line = []
        for name, port, user, maildir in order:
            forget(name, maildir)
            took, exists = cold_select(port, user, a.password)
            times[name].append(took)
            line.append(f"{name} {took:.3f} s ({exists})")
        print(f"round {r + 1}: " + ", ".join(line), f"load {os.getloadavg()[0]:.1f}", flush=True)
    load_after = os.getloadavg()
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:10} median {med[k]:.3f} s  (min {min(v):.3f}, max {max(v):.3f})")
    if "mailsuite" in med and "dovecot" in med:
        print(f"ratio mailsuite / dovecot: {med['mailsuite'] / med['dovecot']:.2f}x")
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f}")
    if a.out:
        a.out.write_text(
            json.dumps({"times": times, "median": med, "load": [load_before, load_after]})
        )


if __name__ == "__main__":
    main()
