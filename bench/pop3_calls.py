"""Python calls per POP3 command in the mailsuite server (cProfile counts, which are exact).

Starts mailsuite as ``bench/pop3.py --cprofile`` does (a 1,000-message INBOX, cProfile
switched on and off by SIGUSR2), logs in once, retrieves the messages once (their \\Seen is
then stored, as in ``bench/pop3.py``'s warm rounds), then sends each command ``--repeat``
times (one command per segment, waiting for each answer, as poplib does) with the profiler
on only around those, and prints the calls the server made per command: every function
call cProfile sees, Python functions and C built-ins alike, from the bytes arriving to the
answer's ``send`` and whatever the reactor did meanwhile (its timers: a few in a thousand).

    python bench/pop3_calls.py [--repeat 500] [--tree DIR]

``--tree DIR`` runs the server from another source tree (e.g. the main checkout) to count
the calls before a change.
"""

from __future__ import annotations

import argparse
import os
import poplib
import pstats
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pop3 import PASSWORD, mailsuite_server, shared_modules

#: command name -> what it sends for the i-th repetition (1-based message numbers)
COMMANDS: dict[str, Callable[[int], bytes]] = {
    "NOOP": lambda i: b"NOOP",
    "STAT": lambda i: b"STAT",
    "LIST n": lambda i: b"LIST %d" % i,
    "UIDL n": lambda i: b"UIDL %d" % i,
    "RETR n": lambda i: b"RETR %d" % i,
    "TOP n 0": lambda i: b"TOP %d 0" % i,
    "TOP n 5": lambda i: b"TOP %d 5" % i,
    "DELE n": lambda i: b"DELE %d" % i,  # last: the session then ends without QUIT
}


def calls(path: str) -> int:
    return int(pstats.Stats(path).total_calls)  # type: ignore[attr-defined]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=500)
    ap.add_argument("--tree", help="source tree to run the server from")
    ap.add_argument("--keep", help="directory to keep each command's statistics in")
    a = ap.parse_args()
    _, gen = shared_modules()
    with tempfile.TemporaryDirectory(prefix="mailsuite-pop3-calls-") as tmp:
        work = Path(tmp)
        stats = str(work / "calls.pstats")
        with mailsuite_server(work / "ms", 1000, 1, gen, tree=a.tree, cprofile=stats) as ms:
            p = poplib.POP3("127.0.0.1", ms.port, timeout=60)
            p.user(ms.user)
            p.pass_(PASSWORD)
            p.stat()
            for i in range(1, a.repeat + 1):  # warm: \Seen stored, as in the warm rounds
                p.retr(i)
            time.sleep(0.5)
            for name, command in COMMANDS.items():
                multi = name.startswith(("RETR", "TOP"))
                p.noop()
                os.kill(ms.pid, signal.SIGUSR2)  # on
                time.sleep(0.2)
                for i in range(1, a.repeat + 1):
                    p._putcmd(command(i).decode())  # type: ignore[attr-defined]
                    if multi:
                        p._getlongresp()  # type: ignore[attr-defined]
                    else:
                        p._getresp()  # type: ignore[attr-defined]
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
