"""Mail-authentication cost below SMTP: checks and signatures per second, and the reactor's
longest stall while they run.

A twisted.names server on 127.0.0.1 serves SPF, DKIM (rsa + ed25519) and DMARC records; the
real MailAuth service (worker pool, DNS client with its cache, blocking facade) checks N
messages signed with both algorithms, CONCURRENCY at a time, then DKIM-signs N messages.  A
5 ms LoopingCall on the reactor records the largest gap between its ticks (the stall).

    python bench/mailauth_checks.py [N] [CONCURRENCY]      (default 400 20)
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from twisted.internet import defer, task

from mailsuite.config import parse_config
from mailsuite.mailauth.dkim_keys import KeyStore, txt_strings
from mailsuite.mailauth.dns import server_resolver
from mailsuite.mailauth.service import MailAuth
from mailsuite.testing.dns import LoopbackDNS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.mailauth_helpers import dkim_sign, ed25519_key, message, rsa_key
from tests.reactor_thread import StallProbe


async def run(reactor, n: int, concurrency: int) -> None:
    zone = {
        "origin": "test",
        "names": {
            "good.test": {"TXT": [["v=spf1 ip4:127.0.0.1 -all"]]},
            "_dmarc.good.test": {"TXT": [["v=DMARC1; p=reject"]]},
            "r._domainkey.good.test": {"TXT": [txt_strings(rsa_key().record)]},
            "e._domainkey.good.test": {"TXT": [[ed25519_key().record]]},
        },
    }
    server = LoopbackDNS(zone)
    server.start(reactor)
    root = Path(tempfile.mkdtemp())
    cfg = parse_config(
        tomllib.loads(
            f'[server]\nhostname = "mx.example.test"\ndata_dir = "data"\n'
            f'[dns]\nnameservers = ["{server.nameserver}"]\n'
        ),
        None,
        root,
    )
    auth = MailAuth(cfg, reactor, server_resolver(cfg.nameservers, reactor))
    auth.startService()
    body = "".join(f"line {i} of a message body of moderate size\r\n" for i in range(100))
    msgs = [
        dkim_sign(
            dkim_sign(message("a@good.test", body=body), "good.test", "r", rsa_key()),
            "good.test",
            "e",
            ed25519_key(),
        )
        for _ in range(n)
    ]

    probe = StallProbe()
    probe.start()
    await task.deferLater(reactor, 2.0, lambda: None)
    print(
        f"idle reactor (noise floor of this machine): longest gap "
        f"{probe.longest() * 1000:.1f} ms in 2 s"
    )
    probe.reset()
    latencies: list[float] = []
    sem = defer.DeferredSemaphore(concurrency)

    async def one(m: bytes) -> None:
        started = time.monotonic()
        v = await auth.check_message(m, "a@good.test", "client.example", "127.0.0.1")
        assert v.action == "accept" and b"dmarc=pass" in v.header, v.header
        latencies.append(time.monotonic() - started)

    started = time.monotonic()
    await defer.gatherResults([sem.run(lambda m=m: defer.ensureDeferred(one(m))) for m in msgs])
    elapsed = time.monotonic() - started
    check_stall = probe.longest()
    latencies.sort()
    print(
        f"checks: {n / elapsed:.0f} messages/s ({n} messages, {concurrency} at a time; "
        "SPF + 2 DKIM + DMARC + ARC each)"
    )
    print(
        f"  latency p50 {statistics.median(latencies) * 1000:.1f} ms, "
        f"p99 {latencies[int(len(latencies) * 0.99) - 1] * 1000:.1f} ms"
    )
    print(f"  reactor's longest stall: {check_stall * 1000:.1f} ms")

    KeyStore(cfg.dkim_dir).generate("good.test", "r1", "rsa")
    KeyStore(cfg.dkim_dir).generate("good.test", "e1", "ed25519")
    probe.reset()
    plain = [message("a@good.test", body=body) for _ in range(n)]
    started = time.monotonic()
    signed = await defer.gatherResults([sem.run(auth.sign, m) for m in plain])
    elapsed = time.monotonic() - started
    assert all(s.count(b"DKIM-Signature:") == 2 for s in signed)
    print(
        f"signing: {n / elapsed:.0f} messages/s (rsa-sha256 2048 + ed25519-sha256 each); "
        f"reactor's longest stall {probe.longest() * 1000:.1f} ms"
    )
    probe.stop()
    await auth.stopService()
    await server.stop()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    concurrency = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, n, concurrency)))


if __name__ == "__main__":
    main()
