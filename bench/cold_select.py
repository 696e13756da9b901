"""First SELECT of a big Maildir written by another program, mailsuite and Dovecot in turn.

Both servers are running and their Maildirs hold the same messages (``imap_bench.sh`` sets
this up, restarts mailsuite before each round, since a running server keeps a folder warm,
and runs this script once per round when ``COLD_ROUNDS`` is set).  A round, for each server
in an order that rotates with the round's number: its index files are removed
(mailsuite's ``mailsuite-index*``, Dovecot's ``dovecot-uidlist`` and ``dovecot.index*``), so
the folder is new to it again; then LOGIN (not timed), SELECT INBOX timed with imaplib,
LOGOUT.  The directory listing stays in the kernel's cache for both alike.  With ``--pid
NAME=PID`` the server's CPU seconds for the round's SELECT and LOGOUT are taken too,
from /proc (the process and its descendants, reaped children included: Dovecot's per-login
imap process lands in its master's), which a busy machine moves far less than wall time.
``--report`` prints the medians, spread and ratio mailsuite / Dovecot over the rounds, and the
load.

    python3 bench/cold_select.py --round 1 --out r1.json \\
        --target mailsuite:PORT:USER:MAILDIR --target dovecot:PORT:USER:MAILDIR
    python3 bench/cold_select.py --report r*.json
"""

from __future__ import annotations

import argparse
import imaplib
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from imap_stress import tree_cpu  # a sibling script, not a package

INDEX_FILES = {
    "mailsuite": ("mailsuite-index",),
    "dovecot": ("dovecot-uidlist", "dovecot.index"),
}


def forget(kind: str, maildir: Path) -> None:
    """Remove the server's index files, so its next SELECT is a first sight of the folder
    (``kind``: the target's name up to a "-", e.g. "mailsuite" for "mailsuite-base")."""
    prefixes = INDEX_FILES[kind.split("-", 1)[0]]
    for path in maildir.iterdir():
        if path.name.startswith(prefixes):
            path.unlink()


def cold_select(port: int, user: str, password: str, pid: int = 0) -> tuple[float, int, float]:
    """(seconds for SELECT INBOX, EXISTS, the server's CPU seconds from after LOGIN to after
    LOGOUT: 0 without ``pid``).  The LOGIN is left out of both: its password check costs
    what each server's hash scheme costs, not what the folder does."""
    m = imaplib.IMAP4("127.0.0.1", port, timeout=600)
    try:
        m.login(user, password)
        before = tree_cpu(pid)
        t0 = time.perf_counter()
        typ, data = m.select("INBOX")
        took = time.perf_counter() - t0
        if typ != "OK":
            raise SystemExit(f"SELECT failed on port {port}: {data!r}")
    finally:
        m.logout()
    if not pid:
        return took, int(data[0] or 0), 0.0
    time.sleep(0.5)  # the process that served the session is reaped (Dovecot's imap)
    return took, int(data[0] or 0), tree_cpu(pid) - before


def settle(pid: int, deadline: float = 60.0) -> None:
    """Wait until the server ``pid`` is idle (under 20 ms of CPU in half a second): a
    restarted mailsuite answers on its listening socket while its worker processes may still
    be importing, which would be timed (and counted) with the first SELECT."""
    end = time.monotonic() + deadline
    last = tree_cpu(pid)
    while time.monotonic() < end:
        time.sleep(0.5)
        now = tree_cpu(pid)
        if now - last < 0.02:
            return
        last = now


def one_round(
    targets: list[tuple[str, int, str, Path]], r: int, password: str, pids: dict[str, int]
) -> tuple[dict[str, float], dict[str, float]]:
    """Round ``r`` (1-based): each target's cold SELECT, in an order that rotates (each
    target takes each place in turn; with two, they alternate).  (seconds, server CPU
    seconds of the targets in ``pids``)."""
    k = (r - 1) % len(targets)
    order = targets[k:] + targets[:k]
    times: dict[str, float] = {}
    cpu: dict[str, float] = {}
    line = []
    for name, port, user, maildir in order:
        forget(name, maildir)
        if name in pids:
            settle(pids[name])
        took, exists, used = cold_select(port, user, password, pids.get(name, 0))
        times[name] = took
        line.append(f"{name} {took:.3f} s ({exists})")
        if name in pids:
            cpu[name] = used
            line[-1] += f" cpu {used:.3f} s"
    print(f"round {r}: " + ", ".join(line), f"load {os.getloadavg()[0]:.1f}", flush=True)
    return times, cpu


def report(files: list[Path]) -> None:
    """Medians, spread and ratio over the rounds' JSON files."""
    rounds = [json.loads(f.read_text()) for f in files]
    times: dict[str, list[float]] = {}
    for r in rounds:
        for k, v in r["times"].items():
            times.setdefault(k, []).append(v)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(
            f"{k:10} median {med[k]:.3f} s  (min {min(v):.3f}, max {max(v):.3f}, {len(v)} rounds)"
        )
    cpu: dict[str, list[float]] = {}
    for r in rounds:
        for k, v in r.get("cpu", {}).items():
            cpu.setdefault(k, []).append(v)
    for k, v in cpu.items():
        print(
            f"{k:10} server CPU median {statistics.median(v):.3f} s"
            f"  (min {min(v):.3f}, max {max(v):.3f})"
        )
    for name in [k for k in med if k.startswith("mailsuite")]:
        if "dovecot" not in med:
            break
        per_round = sorted(r["times"][name] / r["times"]["dovecot"] for r in rounds)
        print(
            f"ratio {name} / dovecot: {med[name] / med['dovecot']:.2f}x"
            f" (per round {per_round[0]:.2f}-{per_round[-1]:.2f}x)"
        )
    loads = [r["load"] for r in rounds]
    print(f"load average (1 min) during the rounds: {min(loads):.1f}-{max(loads):.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", action="append", default=[], help="NAME:PORT:USER:MAILDIR")
    ap.add_argument("--password", default="benchpass")
    ap.add_argument("--round", type=int, default=1, help="the round's number (sets the order)")
    ap.add_argument("--out", type=Path, help="the round's JSON")
    ap.add_argument("--report", type=Path, nargs="+", help="summarise these rounds' JSON")
    ap.add_argument("--pid", action="append", default=[], help="NAME=PID: take its CPU too")
    a = ap.parse_args()
    if a.report:
        report(a.report)
        return
    targets = []
    for t in a.target:
        name, port, user, maildir = t.split(":", 3)
        targets.append((name, int(port), user, Path(maildir)))
    pids = {k: int(v) for k, v in (p.split("=", 1) for p in a.pid)}
    times, cpu = one_round(targets, a.round, a.password, pids)
    if a.out:
        a.out.write_text(json.dumps({"times": times, "cpu": cpu, "load": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
