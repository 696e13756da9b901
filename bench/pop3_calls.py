"""Python calls per POP3 command in the mailsuite server (cProfile counts, which are exact).

Starts mailsuite as ``bench/pop3.py --cprofile`` does (a 1,000-message INBOX, cProfile
switched on and off by SIGUSR2), logs in once, retrieves the messages once (their \\Seen is
then stored, as in ``bench/pop3.py``'s warm rounds), then sends each command ``--repeat``
times (one command per segment, waiting for each answer, as poplib does) with the profiler
on only around those, and prints the calls the server made per command: every function
call cProfile sees, Python functions and C built-ins alike, from the bytes arriving to the
answer's ``send`` and whatever the reactor did meanwhile (its timers: a few in a thousand).

    python bench/pop3_calls.py [--repeat 500] [--tree DIR] [--keep DIR]
    python bench/pop3_calls.py --cpu --compare-tree /path/to/main [--rounds 5]

``--tree DIR`` runs the server from another source tree (e.g. the main checkout) to count
the calls before a change.  ``--cpu --compare-tree DIR [--rounds 5]`` instead measures the
server CPU per command (no profiler) of this tree and DIR in alternating rounds.
"""

from __future__ import annotations

import argparse
import os
import poplib
import pstats
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pop3 import PASSWORD, mailsuite_server, run_ns, shared_modules

#: command name -> what it sends for the i-th repetition (1-based message numbers)
COMMANDS: dict[str, Callable[[int], bytes]] = {
    "NOOP": lambda i: b"NOOP",
    "STAT": lambda i: b"STAT",
    "LIST n": lambda i: b"LIST %d" % i,
    "UIDL n": lambda i: b"UIDL %d" % i,
    "RETR n": lambda i: b"RETR %d" % i,
    "TOP n 0": lambda i: b"TOP %d 0" % i,
    "TOP n 5": lambda i: b"TOP %d 5" % i,
    "DELE n": lambda i: b"DELE %d" % i,  # then one RSET
}


def calls(path: str) -> int:
    return int(pstats.Stats(path).total_calls)  # type: ignore[attr-defined]


def send(p: poplib.POP3, name: str, repeat: int) -> None:
    """``repeat`` times the command ``name``, each answer read before the next is sent."""
    command, multi = COMMANDS[name], name.startswith(("RETR", "TOP"))
    for i in range(1, repeat + 1):
        p._putcmd(command(i).decode())  # type: ignore[attr-defined]
        if multi:
            p._getlongresp()  # type: ignore[attr-defined]
        else:
            p._getresp()  # type: ignore[attr-defined]
    if name.startswith("DELE"):
        p.rset()


def login(server: Any, warm: int) -> poplib.POP3:
    p = poplib.POP3("127.0.0.1", server.port, timeout=60)
    p.user(server.user)
    p.pass_(PASSWORD)
    p.stat()
    for i in range(1, warm + 1):  # warm: \Seen stored, as in bench/pop3.py's warm rounds
        p.retr(i)
    time.sleep(0.5)
    return p


def cpu(a: argparse.Namespace, gen: Any, work: Path) -> None:
    """``--cpu``: server CPU per command (``/proc`` schedstat, as bench/pop3.py), this tree
    and ``--compare-tree`` in alternating order, ``--rounds`` times; medians and ratios."""
    with (
        mailsuite_server(work / "ms", 1000, 1, gen) as ours,
        mailsuite_server(work / "other", 1000, 1, gen, "compare", a.compare_tree) as other,
    ):
        targets = [(ours, login(ours, a.repeat)), (other, login(other, a.repeat))]
        got: dict[tuple[str, str], list[float]] = {}
        for r in range(a.rounds):
            for name in COMMANDS:
                for server, p in targets if r % 2 == 0 else targets[::-1]:
                    ns0 = run_ns(server.pid)
                    send(p, name, a.repeat)
                    us = (run_ns(server.pid) - ns0) / 1000 / a.repeat
                    got.setdefault((server.name, name), []).append(us)
        print(f"server CPU per command, us, median of {a.rounds} rounds (load {os.getloadavg()})")
        print(f"{'command':<8} {'this tree':>10} {'compare':>10} {'ratio':>7}")
        for name in COMMANDS:
            mine = statistics.median(got[("mailsuite", name)])
            theirs = statistics.median(got[("compare", name)])
            print(f"{name:<8} {mine:10.1f} {theirs:10.1f} {theirs / mine:6.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=500)
    ap.add_argument("--tree", help="source tree to run the server from")
    ap.add_argument("--keep", help="directory to keep each command's statistics in")
    ap.add_argument("--compare-tree", help="with --cpu: the other source tree (e.g. main)")
    ap.add_argument("--cpu", action="store_true", help="server CPU per command, no profiler")
    ap.add_argument("--rounds", type=int, default=5, help="with --cpu: alternating rounds")
    a = ap.parse_args()
    _, gen = shared_modules()
    with tempfile.TemporaryDirectory(prefix="mailsuite-pop3-calls-") as tmp:
        work = Path(tmp)
        if a.cpu:
            cpu(a, gen, work)
            return
        stats = str(work / "calls.pstats")
        with mailsuite_server(work / "ms", 1000, 1, gen, tree=a.tree, cprofile=stats) as ms:
            p = login(ms, a.repeat)
            for name in COMMANDS:
                p.noop()
                os.kill(ms.pid, signal.SIGUSR2)  # on
                time.sleep(0.2)
                send(p, name, a.repeat)
                os.kill(ms.pid, signal.SIGUSR2)  # off, statistics written
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    try:
                        total = calls(stats)
                        break
                    except (OSError, EOFError, ValueError):
                        pass
                    time.sleep(0.1)
                if a.keep:
                    Path(a.keep).mkdir(parents=True, exist_ok=True)
                    Path(stats).replace(Path(a.keep) / (name.replace(" ", "_") + ".pstats"))
                else:
                    Path(stats).unlink()
                print(f"{name:<8} {total / a.repeat:6.1f} calls per command")
            p.close()


if __name__ == "__main__":
    main()
