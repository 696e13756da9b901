"""Checks run at once on the reactor from cached DNS answers (InboundChecker.check_inline),
and the cache-only mode of BlockingDNS they rely on: a miss abandons the attempt, nothing
computed after it is used or kept, and every other case goes to the worker pool.

DNS is the in-memory zone behind the real DNSClient (on a test clock); the answers a test
wants cached are asked for first, the rest are not.
"""

from __future__ import annotations

import contextlib
import threading
import tomllib
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

import mailsuite.mailauth.inbound as inbound
from mailsuite.config import parse_config
from mailsuite.mailauth.dns import BlockingDNS, DNSClient, NotCached
from mailsuite.mailauth.inbound import InboundChecker
from mailsuite.mailauth.workers import WorkerPool
from mailsuite.testing.dns import MemoryAuthority
from tests.mailauth_helpers import dkim_sign, ed25519_key, message, rsa_key

ZONE = {
    "origin": "test",
    "ttl": 300,
    "names": {
        "good.test": {"TXT": [["v=spf1 ip4:127.0.0.1 -all"]]},
        "_dmarc.good.test": {"TXT": [["v=DMARC1; p=reject"]]},
        "r._domainkey.good.test": {
            "TXT": [[rsa_key().record[i : i + 255] for i in range(0, len(rsa_key().record), 255)]]
        },
        "e._domainkey.good.test": {"TXT": [[ed25519_key().record]]},
        "inc.test": {"TXT": [["v=spf1 include:other.test -all"]]},
        "other.test": {"TXT": [["v=spf1 ip4:127.0.0.1 -all"]]},
        "_dmarc.inc.test": {"TXT": [["v=DMARC1; p=none"]]},
        "exp.test": {"TXT": [["v=spf1 -all exp=why.exp.test"]]},
        "_dmarc.exp.test": {"TXT": [["v=DMARC1; p=none"]]},
        "why.exp.test": {"TXT": [["Mail from exp.test comes from its own hosts only"]]},
    },
}


@pytest.fixture(autouse=True)
def _whole_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are of what may run at once, not of the budget: every check fits,
    whatever ran just before.  The budget is wall time (10 ms per 50 ms window): on a loaded
    machine the checks a test runs back to back inside one window could spend it, and the
    last one came back None (the budget's own test sets its own)."""
    monkeypatch.setattr(inbound, "INLINE_BUDGET", 1.0)


CACHED = [
    (n, t)
    for n, spec in ZONE["names"].items()
    for t in spec
    if n not in ("other.test", "why.exp.test")
]


def checker(
    tmp_path: Path, cached: list[tuple[str, str]] = CACHED, zone: dict[str, Any] = ZONE
) -> InboundChecker:
    clock = Clock()
    clock.advance(1000)
    client = DNSClient(MemoryAuthority(zone), clock)
    for name, qtype in cached:
        client.lookup(name, qtype)  # the in-memory zone answers at once
    assert all(client.peek(n, t) for n, t in cached)
    cfg = parse_config(
        tomllib.loads('[server]\nhostname = "mx.example.test"\ndata_dir = "data"\n'),
        None,
        tmp_path,
    )
    # the pool is never started: a job handed to it would fail (temperror), not run
    return InboundChecker(
        cfg.mail_auth, "mx.example.test", WorkerPool(clock, 1), BlockingDNS(client, clock)
    )


def signed(author: str = "Alice <alice@good.test>", body: str = "Hi.\r\n") -> bytes:
    msg = message(author, body=body)
    return dkim_sign(dkim_sign(msg, "good.test", "r", rsa_key()), "good.test", "e", ed25519_key())


def results(checked: Any) -> tuple[Any, ...]:
    return (
        checked.spf.result,
        sorted((d.result, d.domain, d.selector) for d in checked.dkim),
        checked.arc.result,
        checked.faults,
    )


# ------------------------------------------------------------------ BlockingDNS.cached_only


def test_cached_only_answers_hits_and_raises_on_a_miss(tmp_path):
    dns = checker(tmp_path).dns
    with dns.cached_only() as probe:
        assert dns.txt("good.test") == [b"v=spf1 ip4:127.0.0.1 -all"]
        assert not probe.missed and not dns.missed()
        with pytest.raises(NotCached):
            dns.txt("other.test")
        assert probe.missed and dns.missed()
    assert not dns.missed()  # the scope is over
    assert dns.client.queries == len(CACHED)  # nothing was asked for the miss


def test_a_miss_that_a_library_swallows_is_still_seen(tmp_path):
    """pyspf and dkimpy have bare ``except:`` clauses: the probe, not the exception, says
    whether the attempt stands."""
    dns = checker(tmp_path).dns
    with dns.cached_only() as probe:
        with contextlib.suppress(BaseException):  # what a bare ``except:`` does
            dns.txt("other.test")
        assert probe.missed


def test_prefetch_of_an_uncached_name_abandons_at_once(tmp_path):
    dns = checker(tmp_path).dns
    with dns.cached_only() as probe, pytest.raises(NotCached):
        dns.prefetch([("good.test", "TXT"), ("other.test", "TXT")])
    assert probe.missed
    with dns.cached_only() as probe:
        dns.prefetch([("good.test", "TXT")])  # all cached: nothing to do
    assert not probe.missed


def test_cached_only_is_per_thread(tmp_path):
    """A worker thread's lookups are not touched by the reactor thread's scope."""
    dns = checker(tmp_path).dns
    seen: list[bool] = []
    with dns.cached_only():
        t = threading.Thread(target=lambda: seen.append(dns.missed()))
        t.start()
        t.join(10)
        with pytest.raises(NotCached):
            dns.txt("other.test")
        t = threading.Thread(target=lambda: seen.append(dns.missed()))
        t.start()
        t.join(10)
    assert seen == [False, False]


# ------------------------------------------------------------------ InboundChecker.check_inline


def test_cached_sender_is_checked_at_once_with_the_worker_results(tmp_path):
    c = checker(tmp_path)
    msg = signed()
    inline = c.check_inline(msg, "alice@good.test", "client.example", "127.0.0.1")
    assert inline is not None and c.inline_checked == 1
    assert results(inline) == (
        "pass",
        [("pass", "good.test", "e"), ("pass", "good.test", "r")],
        "none",
        [],
    )
    # what the worker job computes from the same answers (blocking lookups, cache hits)
    assert results(c._checks(msg, "alice@good.test", "client.example", "127.0.0.1")) == results(
        inline
    )
    d = c.check_message(msg, "alice@good.test", "client.example", "127.0.0.1")
    assert d.called  # no worker job, no turn of the reactor
    verdict = d.result
    assert verdict.action == inbound.ACCEPT
    assert b"dmarc=pass" in verdict.header and b"spf=pass" in verdict.header


def test_a_miss_goes_to_the_worker_and_nothing_is_kept(tmp_path):
    """inc.test's SPF record includes other.test, which is not cached: the SPF result that
    pyspf makes of the abandoned lookup must not reach the SPF result cache."""
    c = checker(tmp_path)
    msg = message("Bob <bob@inc.test>")
    assert c.check_inline(msg, "bob@inc.test", "client.example", "127.0.0.1") is None
    assert (c.inline_checked, c.inline_missed) == (0, 1)
    assert c.spf_cache.hits == 0 and not len(c.spf_cache)
    assert c.dns.client.queries == len(CACHED)  # the reactor asked nothing itself
    d = c.check_message(msg, "bob@inc.test", "client.example", "127.0.0.1")
    assert not d.called or d.result.results.spf.result == "temperror"  # the (stopped) pool
    d.addErrback(lambda _f: None)

    c.dns.client.lookup("other.test", "TXT")  # now the whole chain is cached
    checked = c.check_inline(msg, "bob@inc.test", "client.example", "127.0.0.1")
    assert checked is not None and checked.spf.result == "pass"
    assert c.check_inline(msg, "bob@inc.test", "client.example", "127.0.0.1") is not None
    assert c.spf_cache.hits == 1  # kept after a complete evaluation


def test_a_miss_that_pyspf_swallows_is_not_kept(tmp_path):
    """pyspf looks up an exp= explanation inside a bare ``except: pass``: the miss there
    leaves a "fail" without the domain's explanation, which must not be kept for later
    messages (they would get a reason the domain did not publish)."""
    c = checker(tmp_path)
    msg = message("Eve <eve@exp.test>")
    assert c.check_inline(msg, "eve@exp.test", "client.example", "127.0.0.1") is None
    assert not len(c.spf_cache)
    c.dns.client.lookup("why.exp.test", "TXT")
    checked = c.check_inline(msg, "eve@exp.test", "client.example", "127.0.0.1")
    assert checked is not None and checked.spf.result == "fail"
    assert "its own hosts only" in checked.spf.reason


def test_uncached_dkim_key_goes_to_the_worker(tmp_path):
    c = checker(tmp_path, [q for q in CACHED if q[0] != "e._domainkey.good.test"])
    assert c.check_inline(signed(), "alice@good.test", "client.example", "127.0.0.1") is None
    assert c.inline_missed == 1


def test_big_messages_and_long_arc_chains_go_to_the_worker(tmp_path, monkeypatch):
    c = checker(tmp_path)
    big = signed(body="x" * 70 + "\r\n") + b""
    monkeypatch.setattr(inbound, "INLINE_MAX_BYTES", len(big) - 1)
    assert c.check_inline(big, "alice@good.test", "client.example", "127.0.0.1") is None
    monkeypatch.setattr(inbound, "INLINE_MAX_BYTES", len(big))
    assert c.check_inline(big, "alice@good.test", "client.example", "127.0.0.1") is not None
    seals = "".join(
        f"ARC-Seal: i={i}; a=rsa-sha256; d=x.test; s=s; cv=none; b=AAAA\r\n" for i in (1, 2, 3)
    )
    chained = message("Alice <alice@good.test>", extra=seals)
    assert c.check_inline(chained, "alice@good.test", "client.example", "127.0.0.1") is None
    assert c.inline_missed == 0  # neither was attempted


def test_inline_budget_sends_the_rest_of_a_burst_to_the_worker(tmp_path, monkeypatch):
    monkeypatch.setattr(inbound, "INLINE_WINDOW", 3600.0)
    monkeypatch.setattr(inbound, "INLINE_BUDGET", 1e-9)
    c = checker(tmp_path)
    c._window_start = 0.0  # a new window starts with the first message
    msg = signed()
    assert c.check_inline(msg, "alice@good.test", "client.example", "127.0.0.1") is not None
    assert c.check_inline(msg, "alice@good.test", "client.example", "127.0.0.1") is None
    c._window_start -= 3600.0  # the window is over: a new budget
    assert c.check_inline(msg, "alice@good.test", "client.example", "127.0.0.1") is not None
