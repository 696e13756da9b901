"""What the checks of one inbound message cost in the mail-auth worker, in process, without
the SMTP server, the reactor or other threads: the figure a shared machine disturbs least.

The zone and the messages are ``mailauth_smtp.py``'s (20 sending domains, 4 KiB, signed
rsa-sha256 + ed25519-sha256 by dkimpy, stored form: LF line ends; a pool of 100, taken in
turn).  Every DNS answer is put in
the real :class:`~mailsuite.mailauth.dns.DNSClient`'s cache first (from an in-memory zone, on
a test clock), as in a server that has seen these senders before, so each check is the worker
job alone: :meth:`InboundChecker._checks` (SPF, DKIM, ARC, DMARC discovery) on N messages in
turn, timed with the thread's CPU clock, best of R passes; ``--profile`` prints cProfile's
top functions of one more pass.

For a count that does not depend on the machine's load at all, run it under callgrind with
two message counts and take the difference (the start-up cancels out).  The keys are random,
and making an RSA key costs a random number of instructions, so both runs must read the same
pool (``--pool FILE``: made and saved by the first run that does not find it)::

    python3 bench/mailauth_costs.py --pool /tmp/pool --msgs 0
    valgrind --tool=callgrind python3 bench/mailauth_costs.py --pool /tmp/pool --msgs 0 --passes 1
    valgrind --tool=callgrind python3 bench/mailauth_costs.py --pool /tmp/pool --msgs 200 --passes 1

    python3 bench/mailauth_costs.py [--msgs 300] [--passes 5] [--profile] [--pool FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import math
import pickle
import pstats
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from mailauth_smtp import messages, zone  # noqa: E402

from mailsuite.config import parse_config  # noqa: E402
from mailsuite.mailauth import dmarc  # noqa: E402
from mailsuite.mailauth import inbound as inline  # noqa: E402
from mailsuite.mailauth.dns import BlockingDNS, DNSClient  # noqa: E402
from mailsuite.mailauth.inbound import InboundChecker  # noqa: E402
from mailsuite.mailauth.workers import WorkerPool  # noqa: E402
from mailsuite.testing.dns import MemoryAuthority  # noqa: E402

DOMAINS = 20
POOL = 100  # messages made (signing them costs more than checking them)


def checker(names: dict[str, Any]) -> InboundChecker:
    """An InboundChecker whose DNS cache holds every answer of the zone ``names``."""
    clock = Clock()
    clock.advance(1000)
    client = DNSClient(MemoryAuthority(names), clock)
    for name, records in names["names"].items():
        for qtype in records:
            client.lookup(name, qtype)  # the in-memory zone answers at once
    assert all(client.peek(n, t) for n, r in names["names"].items() for t in r)
    cfg = parse_config(
        tomllib.loads('[server]\nhostname = "mx.example.test"\ndata_dir = "data"\n'),
        None,
        Path(tempfile.mkdtemp(prefix="mailauth-costs.")),
    )
    dmarc.organizational_domain("example.com")  # the Public Suffix List, as at start
    return InboundChecker(
        cfg.mail_auth, "mx.example.test", WorkerPool(clock, 1), BlockingDNS(client, clock)
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--msgs", type=int, default=300)
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--profile", action="store_true")
    p.add_argument(
        "--pool",
        type=Path,
        help="keys, zone and messages: read from FILE if it exists, else made and saved there",
    )
    a = p.parse_args()
    if a.pool is not None and a.pool.exists():
        names, pool = pickle.loads(a.pool.read_bytes())  # our own file (see --pool)
    else:
        # always the same pool (signing them costs more than checking), taken in turn
        names = zone(DOMAINS, 300)
        pool = [(s, m.replace(b"\r\n", b"\n")) for s, m in messages(POOL, DOMAINS, 4096)]
        if a.pool is not None:
            a.pool.write_bytes(pickle.dumps((names, pool)))
    check = checker(names)
    for sender, data in pool[:20]:  # warm: key parses, caches of the last values
        r = check._checks(data, sender, "client.example", "127.0.0.1")
    assert r.spf is not None and r.spf.result == "pass", r
    assert r.dkim is not None and [d.result for d in r.dkim] == ["pass", "pass"], r
    msgs = [pool[i % POOL] for i in range(a.msgs)]
    if not msgs:
        return

    def one_pass() -> float:
        started = time.thread_time()
        for sender, data in msgs:
            check._checks(data, sender, "client.example", "127.0.0.1")
        return (time.thread_time() - started) / len(msgs)

    def whole_pass() -> float:
        started = time.thread_time()
        for sender, data in msgs:
            check.check_message(data, sender, "client.example", "127.0.0.1")
        return (time.thread_time() - started) / len(msgs)

    times = sorted(one_pass() for _ in range(a.passes))
    print(
        f"worker job per message ({len(msgs)} messages, SPF + 2 DKIM + ARC + DMARC, DNS "
        f"cached): best {times[0] * 1000:.3f} ms, median {times[len(times) // 2] * 1000:.3f} "
        f"ms of thread CPU over {a.passes} passes"
    )
    inline.INLINE_BUDGET = math.inf  # (one pass is all inline work: no window to respect)
    times = sorted(whole_pass() for _ in range(a.passes))
    assert check.inline_missed == 0 and check.inline_checked == a.passes * len(msgs)
    print(
        f"check_message per message (checks run at once from the cache, and the verdict "
        f"with its Authentication-Results): best {times[0] * 1000:.3f} ms, "
        f"median {times[len(times) // 2] * 1000:.3f} ms"
    )
    if a.profile:
        prof = cProfile.Profile()
        prof.runcall(whole_pass)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
