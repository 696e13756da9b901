"""SMTP acceptance with mail authentication on, as a ratio to checks off, in one run; and the
reactor's longest stall meanwhile.

Issue 12's figures (aims: >= 0.7x, stall < 50 ms).  A twisted.names server on 127.0.0.1
(``python -m mailsuite.testing.dns``; records with a TTL of ``--ttl`` seconds, 300 by default
as real SPF/DKIM/DMARC records have or longer, so each domain's records are asked once and
then come from the server's cache; ``--ttl 1`` is the worst case, where nearly every check
asks again) serves, for each of D sending domains ``dN.test``: SPF
``v=spf1 ip4:127.0.0.1 -all``, DMARC ``p=reject``, and an rsa-2048 and an ed25519 DKIM key.
Two mailsuite servers from this working tree (``bench/mailsuite_target.py``) use it as their
``[dns] nameservers``: ``on`` with every check (SPF, DKIM, DMARC, ARC: the embedded default)
and ``off`` with ``[mail_auth] spf = dkim = dmarc = arc = false``.  The messages, made before
the clock starts, are signed by dkimpy with both keys of their domain (so the server verifies
two signatures each), from ``load@dN.test`` to ``bench@example.test``.

Each round sends N messages to each server in turn (the order alternates between rounds),
S concurrent sessions, a new connection per message, timed until every message is in the
Maildir.  The stall is read from each server's ``/metrics`` (:mod:`mailsuite.reactor_lag`):
``mailsuite_reactor_lag_seconds`` (largest probe delay in the last 10 s, read at the end of
each trial: that server was loaded or idle all that time), ``mailsuite_reactor_held_seconds``
(the same less the time the reactor thread waited for a CPU: the stall the server's own work
made, the figure the aim is about; the load generator, the DNS server and both servers share
the machine's cores, and a process waiting for one shows a lag of 20-60 ms in every run,
checks on or off) and the delta of the tick-delay histogram over the trial (how many 10 ms
ticks came more than 50 ms late).  A delivered
message of the ``on`` server is checked for ``spf=pass``, ``dkim=pass`` and ``dmarc=pass``
first, so the figure is of checks that ran.

    python bench/mailauth_smtp.py [--rounds 3] [--msgs 500] [--sessions 20] [--domains 20]
                                  [--ttl 300] [--workers 1] [--profile FILE]

Everything listens on 127.0.0.1; the servers and the DNS server are stopped by their PIDs at
the end, failure included; the directory is a temporary one (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from sieve_smtp import clear, count, cpu_seconds, one  # noqa: E402  (one definition each)

from mailsuite.mailauth.dkim_keys import txt_strings  # noqa: E402
from mailsuite.testing.dns import spawn_dns_server  # noqa: E402
from tests.mailauth_helpers import dkim_sign, ed25519_key, rsa_key  # noqa: E402

DOMAIN = "example.test"
RCPT = f"bench@{DOMAIN}"
OFF = "[mail_auth]\nspf = false\ndkim = false\ndmarc = false\narc = false\n"
STALL = 0.05  # the aim: no stall of 50 ms or more


def zone(domains: int, ttl: int) -> dict:
    names: dict[str, dict] = {}
    for d in range(domains):
        name = f"d{d}.test"
        names[name] = {"TXT": [["v=spf1 ip4:127.0.0.1 -all"]], "A": ["127.0.0.1"]}
        names[f"_dmarc.{name}"] = {"TXT": [["v=DMARC1; p=reject"]]}
        names[f"r._domainkey.{name}"] = {"TXT": [txt_strings(rsa_key().record)]}
        names[f"e._domainkey.{name}"] = {"TXT": [[ed25519_key().record]]}
    return {"origin": "test", "also": ["in-addr.arpa"], "ttl": ttl, "names": names}


def messages(n: int, domains: int, size: int) -> list[tuple[str, bytes]]:
    """(sender, signed CRLF message) pairs, both DKIM keys of the sender's domain."""
    out = []
    line = b"Body line of text for the benchmark, with nothing special in it.\r\n"
    for i in range(n):
        dom = f"d{i % domains}.test"
        head = (
            f"From: Load <load@{dom}>\r\nTo: <{RCPT}>\r\nSubject: quarterly numbers {i}\r\n"
            f"Message-ID: <{i}.{time.time_ns()}@{dom}>\r\n"
            "Date: Tue, 1 Oct 2024 10:00:00 +0000\r\n\r\n"
        ).encode()
        msg = head + line * max(1, (size - len(head)) // len(line))
        msg = dkim_sign(dkim_sign(msg, dom, "r", rsa_key()), dom, "e", ed25519_key())
        out.append((f"load@{dom}", msg))
    return out


async def load(port: int, msgs: list[tuple[str, bytes]], sessions: int) -> None:
    queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    for m in msgs:
        queue.put_nowait(m)

    async def worker() -> None:
        while not queue.empty():
            sender, data = queue.get_nowait()
            await one(port, RCPT, data, sender=sender)

    await asyncio.gather(*(worker() for _ in range(sessions)))


def scrape(web_port: int) -> dict[str, float]:
    """The reactor-lag series of one server's /metrics (name{le} -> value)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("mailsuite_reactor_"):
            name, _, v = line.rpartition(" ")
            out[name] = float(v)
    return out


def late_ticks(before: dict[str, float], after: dict[str, float]) -> tuple[int, str]:
    """Ticks more than STALL late during the trial, and the bucket of the latest tick."""

    def bucket(le: str) -> float:
        key = f'mailsuite_reactor_tick_lag_seconds_bucket{{le="{le}"}}'
        return after[key] - before[key]

    total = (
        after["mailsuite_reactor_tick_lag_seconds_count"]
        - before["mailsuite_reactor_tick_lag_seconds_count"]
    )
    les = [k.split('"')[1] for k in after if k.startswith("mailsuite_reactor_tick_lag_seconds_b")]
    worst = next((le for le in les if bucket(le) == total), "+Inf")
    return int(total - bucket(repr(STALL))), worst


def switches(pid: str) -> int:
    """Context switches (voluntary + involuntary) of every thread of the server and of its
    worker processes: each hand-over between the reactor and a pool thread is two."""
    total = 0
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        kids = []
    for p in (pid, *kids):
        for status in Path(f"/proc/{p}/task").glob("*/status"):
            try:
                text = status.read_text()
            except OSError:  # a thread that ended meanwhile
                continue
            for line in text.splitlines():
                if "ctxt_switches:" in line:
                    total += int(line.split()[-1])
    return total


def trial(
    server: dict, msgs: list[tuple[str, bytes]], sessions: int
) -> tuple[float, float, float, int, str, float]:
    """msgs/s, the lag and held gauges at the end, ticks late by more than STALL, the worst
    tick's bucket, and the server's CPU milliseconds per message (robust on a shared machine,
    where msgs/s also depends on what else runs)."""
    box = server["box"]
    clear(box)
    before = scrape(server["web"])
    cpu = cpu_seconds(server["pid"])
    ctx = switches(server["pid"])
    t0 = time.perf_counter()
    asyncio.run(load(server["smtp"], msgs, sessions))
    deadline = time.monotonic() + 300
    while count(box) < len(msgs):  # every 250 came after its fsync; this only confirms it
        if time.monotonic() > deadline:
            raise SystemExit(f"only {count(box)}/{len(msgs)} messages in {box}")
        time.sleep(0.01)
    rate = len(msgs) / (time.perf_counter() - t0)
    user, system = (
        1000 * (b - a) / len(msgs) for a, b in zip(cpu, cpu_seconds(server["pid"]), strict=True)
    )
    cpu_ms = user + system
    per = (switches(server["pid"]) - ctx) / len(msgs)
    server["split"] = f"user {user:.2f} + sys {system:.2f}; {per:.1f} switches/msg"
    after = scrape(server["web"])
    if "mailsuite_reactor_lag_seconds" not in after:  # a server from before the probe
        return rate, math.nan, math.nan, -1, "n/a", cpu_ms
    late, worst = late_ticks(before, after)
    lag = after["mailsuite_reactor_lag_seconds"]
    return rate, lag, after.get("mailsuite_reactor_held_seconds", lag), late, worst, cpu_ms


def check_results(box: Path) -> str:
    """The Authentication-Results field of one delivered message (it must say pass)."""
    f = next(p for sub in ("new", "cur") for p in (box / sub).iterdir())
    head = f.read_bytes().split(b"\n\n", 1)[0].decode()
    lines = head[head.index("Authentication-Results:") :].splitlines()
    field = "\n".join(
        [
            lines[0],
            *next(
                ([*lines[1:i]] for i in range(1, len(lines)) if not lines[i][:1].isspace()),
                lines[1:],
            ),
        ]
    )
    for want in ("spf=pass", "dkim=pass", "dmarc=pass"):
        if want not in field:
            raise SystemExit(f"the checks did not pass ({want} missing):\n{field}")
    return " ".join(field.split())


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--msgs", type=int, default=500)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--domains", type=int, default=20)
    p.add_argument(
        "--ttl",
        type=int,
        default=300,
        help="TTL of every DNS record (1: the "
        "server's cache keeps nothing past a second, nearly every check asks)",
    )
    p.add_argument(
        "--workers",
        default="1",
        help='[server] workers of both servers (a number or "auto"; the CPU figures add up '
        "every process, the stall is the largest of any process: /metrics shows them all)",
    )
    p.add_argument("--keep", action="store_true", help="keep the servers' directory")
    p.add_argument(
        "--code",
        metavar="DIR",
        help="run the servers from another checkout "
        "(PYTHONPATH=DIR; to compare with an older version in the same conditions)",
    )
    p.add_argument(
        "--profile",
        metavar="FILE",
        help="py-spy record each server's first round into FILE.on and FILE.off (raw "
        "folded stacks of the thread holding the GIL, workers included; py-spy must be "
        "installed)",
    )
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mailsuite-mailauth-smtp."))
    target = [sys.executable, str(HERE / "mailsuite_target.py")]
    dns = None
    started: list[Path] = []
    try:
        zone_file = work / "zone.json"
        zone_file.write_text(json.dumps(zone(a.domains, a.ttl)))
        dns, dns_port = spawn_dns_server(str(zone_file))
        servers: dict[str, dict] = {}
        for name, extra in (("off", OFF), ("on", "")):
            d = work / name
            started.append(d)
            toml = f'[dns]\nnameservers = ["127.0.0.1:{dns_port}"]\n{extra}'
            env = dict(os.environ, PYTHONPATH=a.code) if a.code else None
            out = subprocess.run(
                [
                    *target,
                    "start",
                    "--dir",
                    str(d),
                    "--services",
                    "smtp,web",
                    "--workers",
                    a.workers,
                    "--extra-toml",
                    toml,
                ],
                check=True,
                capture_output=True,
                text=True,
                env=env,
            ).stdout
            ms = dict(line.split("=", 1) for line in out.split())
            servers[name] = {
                "smtp": int(ms["MS_SMTP_PORT"]),
                "web": int(ms["MS_WEB_PORT"]),
                "box": d / "data" / "mail" / DOMAIN / "bench",
                "pid": ms["MS_PID"],
            }
        t = time.perf_counter()
        msgs = messages(a.msgs, a.domains, a.size)
        print(
            f"{a.msgs} messages signed (rsa-sha256 + ed25519-sha256) in "
            f"{time.perf_counter() - t:.1f} s",
            flush=True,
        )
        for name in ("off", "on"):  # warm up (imports, DNS cache of nothing, thread pools)
            trial(servers[name], msgs[: max(50, a.msgs // 5)], a.sessions)
        print("on:", check_results(servers["on"]["box"]), flush=True)
        rates: dict[str, list[float]] = {name: [] for name in ("off", "on")}
        stalls: dict[str, list[float]] = {name: [] for name in ("off", "on")}
        helds: dict[str, list[float]] = {name: [] for name in ("off", "on")}
        cpus: dict[str, list[float]] = {name: [] for name in ("off", "on")}
        for r in range(a.rounds):
            order = ["off", "on"] if r % 2 == 0 else ["on", "off"]
            cells = {}
            for name in order:
                spy = None
                if a.profile and r == 0:
                    spy = subprocess.Popen(
                        [
                            "py-spy",
                            "record",
                            "-p",
                            servers[name]["pid"],
                            "-f",
                            "raw",
                            "-o",
                            f"{a.profile}.{name}",
                            "--threads",
                            "--nonblocking",
                            "--subprocesses",
                            "--gil",
                            "-r",
                            "400",
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    time.sleep(1)
                rate, stall, held, late, worst, cpu_ms = trial(servers[name], msgs, a.sessions)
                cpus[name].append(cpu_ms)
                if spy is not None:
                    spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
                    spy.wait(60)
                rates[name].append(rate)
                stalls[name].append(stall)
                helds[name].append(held)
                cells[name] = (
                    f"{name} {rate:6.1f} msgs/s (CPU ms/msg {servers[name]['split']}), "
                    f"stall {stall * 1000:5.1f} ms, held {held * 1000:5.1f} ms "
                    f"(ticks >{STALL * 1000:.0f} ms late: {late}, worst <= {worst} s)"
                )
            print(f"round {r + 1}: {cells['off']}   {cells['on']}", flush=True)
        base, on = statistics.median(rates["off"]), statistics.median(rates["on"])
        ratios = [b / c for b, c in zip(rates["on"], rates["off"], strict=True)]
        print(
            f"\n{a.msgs} x {a.size} B, {a.sessions} sessions, {a.domains} domains, "
            f"TTL {a.ttl} s, "
            f"{a.rounds} rounds (median msgs/s): off {base:.1f}, on {on:.1f}, "
            f"ratio {on / base:.2f}x (per round {min(ratios):.2f}-{max(ratios):.2f}); "
            f"longest stall: on {max(stalls['on']) * 1000:.1f} ms, "
            f"off {max(stalls['off']) * 1000:.1f} ms; held (less the waits for a CPU): "
            f"on {max(helds['on']) * 1000:.1f} ms, off {max(helds['off']) * 1000:.1f} ms; "
            "server CPU per message (median): "
            f"off {statistics.median(cpus['off']):.2f} ms, "
            f"on {statistics.median(cpus['on']):.2f} ms, CPU ratio off/on "
            f"{statistics.median(cpus['off']) / statistics.median(cpus['on']):.2f}x"
        )
    finally:
        for d in started:
            subprocess.run([*target, "stop", "--dir", str(d)], check=False)
        if dns is not None:
            dns.terminate()
            dns.wait(10)
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
