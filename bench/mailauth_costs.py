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

``--plain`` checks instead what ``bench/smtp_cpu.py`` sends (smtp-source's messages: unsigned,
~4 KiB, ``load@example.org`` from 127.0.0.1), with an SPF record for example.org or none
(``--spf none``) and a DMARC record or none (``--dmarc none``), every answer (NXDOMAIN
included) cached.  Both modes also time the whole inline check as the SMTP server runs it at
the end of DATA (``MailAuthCheck.settle``: ``check_now``, the verdict, the
Authentication-Results field, the forged-field scan) and count the Python calls it makes per
message (``--calls``, cProfile)::

    python3 bench/mailauth_costs.py --plain [--spf none] [--dmarc none] [--calls]

and its instructions per message, free of the load (both runs with ``--settle-only``)::

    valgrind --tool=callgrind python3 bench/mailauth_costs.py --plain --settle-only --msgs 0
    valgrind --tool=callgrind python3 bench/mailauth_costs.py --plain --settle-only --msgs 300
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
from mailsuite.smtp.mailauth_checks import MailAuthCheck  # noqa: E402
from mailsuite.smtp.policy import ReceivedMessage  # noqa: E402
from mailsuite.testing.dns import MemoryAuthority  # noqa: E402

DOMAINS = 20
POOL = 100  # messages made (signing them costs more than checking them)


def checker(names: dict[str, Any], absent: tuple[str, ...] = ()) -> InboundChecker:
    """An InboundChecker whose DNS cache holds every answer of the zone ``names``, and the
    NXDOMAIN of each TXT name in ``absent``."""
    clock = Clock()
    clock.advance(1000)
    client = DNSClient(MemoryAuthority(names), clock)
    for name, records in names["names"].items():
        for qtype in records:
            client.lookup(name, qtype)  # the in-memory zone answers at once
    for name in absent:
        client.lookup(name, "TXT")
    assert all(client.peek(n, t) for n, r in names["names"].items() for t in r)
    assert all(client.peek(n, "TXT") for n in absent)
    cfg = parse_config(
        tomllib.loads('[server]\nhostname = "mx.example.test"\ndata_dir = "data"\n'),
        None,
        Path(tempfile.mkdtemp(prefix="mailauth-costs.")),
    )
    dmarc.organizational_domain("example.com")  # the Public Suffix List, as at start
    return InboundChecker(
        cfg.mail_auth, "mx.example.test", WorkerPool(clock, 1), BlockingDNS(client, clock)
    )


PLAIN_DOMAIN = "example.org"


def plain(spf: bool, dmarc_record: bool) -> tuple[dict[str, Any], tuple[str, ...], list[Any]]:
    """The zone, the absent names and a pool of smtp-source's messages (see the docstring):
    From/To/Date/Message-Id, then lines of "La de da de da N." up to 4 KiB, LF line ends."""
    names: dict[str, Any] = {}
    absent: list[str] = []
    if spf:
        names[PLAIN_DOMAIN] = {"TXT": [["v=spf1 ip4:127.0.0.1 -all"]]}
    else:
        absent.append(PLAIN_DOMAIN)
    if dmarc_record:
        names[f"_dmarc.{PLAIN_DOMAIN}"] = {"TXT": [["v=DMARC1; p=none"]]}
    else:
        absent.append(f"_dmarc.{PLAIN_DOMAIN}")
    zone_ = {"origin": "test", "also": ["in-addr.arpa", PLAIN_DOMAIN], "ttl": 300, "names": names}
    pool = []
    for i in range(POOL):
        head = (
            f"From: <load@{PLAIN_DOMAIN}>\nTo: <bench@example.test>\n"
            f"Date: Wed, 2 Dec 2026 13:00:{i % 60:02d} +0000\n"
            f"Message-Id: <{i:04x}.{i * 7:04x}.0001@client.example>\n\n"
        ).encode()
        body = b"".join(b"La de da de da %d.\n" % n for n in range(1, 300))[: 4096 - len(head)]
        pool.append((f"load@{PLAIN_DOMAIN}", head + body))
    return zone_, tuple(absent), pool


class _Service:
    """The part of :class:`~mailsuite.mailauth.service.MailAuth` that settle() calls."""

    def __init__(self, inbound: InboundChecker) -> None:
        self.inbound = inbound

    def applies_to(self, client_ip: str, authenticated: bool) -> bool:
        return not authenticated

    def check_now(self, message: bytes, mail_from: str, helo: str, client_ip: str) -> Any:
        return self.inbound.check_now(message, mail_from, helo, client_ip)


class _Facts:
    client_ip = "127.0.0.1"
    helo = "client.example"
    tls = False
    user = None
    trusted = False
    recipients = ("bench@example.test",)


async def _unread() -> bytes:
    raise AssertionError("settle() reads data, not the file")


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
    p.add_argument("--plain", action="store_true", help="smtp-source's unsigned messages")
    p.add_argument("--spf", choices=("record", "none"), default="record")
    p.add_argument("--dmarc", choices=("record", "none"), default="record")
    p.add_argument("--calls", action="store_true", help="Python calls per settle() (cProfile)")
    p.add_argument("--settle-only", action="store_true", help="one pass of settle() alone")
    a = p.parse_args()
    absent: tuple[str, ...] = ()
    if a.plain:
        names, absent, pool = plain(a.spf == "record", a.dmarc == "record")
    elif a.pool is not None and a.pool.exists():
        names, pool = pickle.loads(a.pool.read_bytes())  # our own file (see --pool)
    else:
        # always the same pool (signing them costs more than checking), taken in turn
        names = zone(DOMAINS, 300)
        pool = [(s, m.replace(b"\r\n", b"\n")) for s, m in messages(POOL, DOMAINS, 4096)]
        if a.pool is not None:
            a.pool.write_bytes(pickle.dumps((names, pool)))
    check = checker(names, absent)
    for sender, data in pool[:20]:  # warm: key parses, caches of the last values
        r = check._checks(data, sender, "client.example", "127.0.0.1")
    want_spf = "pass" if a.spf == "record" else "none"
    assert r.spf is not None and r.spf.result == want_spf, r
    assert r.dkim is not None and [d.result for d in r.dkim] == ([] if a.plain else ["pass"] * 2)
    inline.INLINE_BUDGET = math.inf  # (a pass is all inline work: no window to respect)
    check_smtp = MailAuthCheck(_Service(check))
    for sender, data in pool[:20]:
        head = data[: data.index(b"\n\n") + 1]
        warm = ReceivedMessage(sender, ("bench@example.test",), head, len(data), _unread, data)
        check_smtp.settle(_Facts, warm)  # type: ignore[arg-type]
    msgs = [pool[i % POOL] for i in range(a.msgs)]
    settled = [
        ReceivedMessage(s, ("bench@example.test",), d[: d.index(b"\n\n") + 1], len(d), _unread, d)
        for s, d in msgs
    ]
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

    def settle_pass() -> float:
        started = time.thread_time()
        for m in settled:
            check_smtp.settle(_Facts, m)  # type: ignore[arg-type]
        return (time.thread_time() - started) / len(settled)

    if a.settle_only:  # (for callgrind: the difference of two message counts)
        settle_pass()
        return
    kind = "plain (unsigned)" if a.plain else "SPF + 2 DKIM + ARC + DMARC"
    times = sorted(one_pass() for _ in range(a.passes))
    print(
        f"worker job per message ({len(msgs)} messages, {kind}, DNS "
        f"cached): best {times[0] * 1000:.3f} ms, median {times[len(times) // 2] * 1000:.3f} "
        f"ms of thread CPU over {a.passes} passes"
    )
    checked = check.inline_checked
    times = sorted(whole_pass() for _ in range(a.passes))
    assert check.inline_missed == 0 and check.inline_checked - checked == a.passes * len(msgs)
    print(
        f"check_message per message (checks run at once from the cache, and the verdict "
        f"with its Authentication-Results): best {times[0] * 1000:.3f} ms, "
        f"median {times[len(times) // 2] * 1000:.3f} ms"
    )
    verdict = check_smtp.settle(_Facts, settled[0])  # type: ignore[arg-type]
    assert verdict is not None and verdict.prepend, verdict
    print(verdict.prepend[0])
    times = sorted(settle_pass() for _ in range(a.passes))
    print(
        f"MailAuthCheck.settle per message (the SMTP server's inline check): best "
        f"{times[0] * 1e6:.1f} us, median {times[len(times) // 2] * 1e6:.1f} us"
    )
    if a.calls:
        prof = cProfile.Profile()
        prof.runcall(settle_pass)
        stats = pstats.Stats(prof)
        calls = sum(v[1] for v in stats.stats.values())  # type: ignore[attr-defined]
        print(f"Python calls per settle(): {calls / len(settled):.1f}")
        stats.sort_stats("ncalls").print_stats(40)
    if a.profile:
        prof = cProfile.Profile()
        prof.runcall(whole_pass)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
