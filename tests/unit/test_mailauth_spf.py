"""SPF (RFC 7208) through pyspf with our DNS hook: results, the 10-lookup and 2-void-lookup
limits (4.6.4), include loops, garbage records.  DNS is the in-memory zone behind the real
DNSClient and BlockingDNS, answered by the reactor thread as in the server."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailsuite.mailauth.dns import Answer, BlockingDNS, DNSClient
from mailsuite.mailauth.spf import RESULTS, check_spf
from mailsuite.testing.dns import MemoryAuthority

INCLUDES = {f"l{i}.test": {"TXT": [["v=spf1 -all"]]} for i in range(1, 12)}
CHAIN = {f"c{i}.test": {"TXT": [[f"v=spf1 include:c{i + 1}.test -all"]]} for i in range(40)}


def spf(text: str) -> dict:
    return {"TXT": [[text]]}


ZONE = {
    "origin": "test",
    "names": {
        "pass.test": spf("v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 -all"),
        "mx.test": {"TXT": [["v=spf1 mx -all"]], "MX": [[10, "mail.mx.test"]]},
        "mail.mx.test": {"A": ["192.0.2.10"]},
        "soft.test": spf("v=spf1 ~all"),
        "neutral.test": spf("v=spf1 ?all"),
        "split.test": {"TXT": [["v=spf1 ip4:192.0.2.7", " -all"]]},
        "two.test": {"TXT": [["v=spf1 -all"], ["v=spf1 +all"]]},
        "other-txt.test": {"TXT": [["google-site-verification=abc"]]},
        "loop.test": spf("v=spf1 include:loop.test -all"),
        "loop-a.test": spf("v=spf1 include:loop-b.test -all"),
        "loop-b.test": spf("v=spf1 include:loop-a.test -all"),
        "ten.test": spf(
            "v=spf1 " + " ".join(f"include:l{i}.test" for i in range(1, 11)) + " ip4:192.0.2.1 -all"
        ),
        "eleven.test": spf(
            "v=spf1 " + " ".join(f"include:l{i}.test" for i in range(1, 12)) + " ip4:192.0.2.1 -all"
        ),
        "twovoid.test": spf("v=spf1 a:nx1.test a:nx2.test ip4:192.0.2.1 -all"),
        "threevoid.test": spf("v=spf1 a:nx1.test a:nx2.test a:nx3.test ip4:192.0.2.1 -all"),
        "redirect.test": spf("v=spf1 redirect=pass.test"),
        "helo.test": spf("v=spf1 ip4:192.0.2.5 -all"),
        "temp.test": "servfail",
        "incl-temp.test": spf("v=spf1 include:temp.test -all"),
        "slowspf.test": "timeout",
        **INCLUDES,
        **CHAIN,
    },
}

GARBAGE = [
    "v=spf1 ip4:999.1.1.1 -all",
    "v=spf1 foo:bar -all",
    "v=spf1 include: -all",
    "v=spf1 redirect=",
    "v=spf1 ip4:192.0.2.1/99 -all",
    "v=spf1 exists:%{z} -all",
    "v=spf1 a:%{ -all",
    "v=spf1 mx:.. -all",
    "v=spf1 ip6:::zz -all",
    "v=spf1 \u00e9\u00e8 -all",
    "v=spf1 -all -all exp=",
    "v=spf1 include:" + "a" * 300 + ".test -all",
]
for n, text in enumerate(GARBAGE):
    ZONE["names"][f"garbage{n}.test"] = spf(text)


@pytest.fixture(scope="module")
def dns(reactor):
    client = DNSClient(MemoryAuthority(ZONE), reactor, timeout=1)
    # the client's 1 s answers slowspf.test (temperror); the facade's own wait for the
    # reactor thread is only for a wedged reactor: long, so that a loaded machine that
    # leaves the test reactor's thread unscheduled for a second or two fails nothing
    return BlockingDNS(client, reactor, deadline=10)


@pytest.mark.parametrize(
    "ip,sender,expected",
    [
        ("192.0.2.1", "a@pass.test", "pass"),
        ("198.51.100.1", "a@pass.test", "fail"),
        ("2001:db8::5", "a@pass.test", "pass"),
        ("::ffff:192.0.2.9", "a@pass.test", "pass"),  # an IPv4-mapped client is IPv4
        ("192.0.2.10", "a@mx.test", "pass"),
        ("192.0.2.11", "a@mx.test", "fail"),
        ("192.0.2.1", "a@soft.test", "softfail"),
        ("192.0.2.1", "a@neutral.test", "neutral"),
        ("192.0.2.7", "a@split.test", "pass"),  # strings of one record are joined
        ("192.0.2.1", "a@two.test", "permerror"),  # two SPF records (4.5)
        ("192.0.2.1", "a@other-txt.test", "none"),
        ("192.0.2.1", "a@nonexistent.test", "none"),
        ("192.0.2.3", "a@redirect.test", "pass"),
        ("192.0.2.1", "a@temp.test", "temperror"),
        ("192.0.2.1", "a@incl-temp.test", "temperror"),
        ("192.0.2.1", "a@slowspf.test", "temperror"),
        ("192.0.2.1", "a@[192.0.2.1]", "none"),
        ("192.0.2.1", "a@localhost", "none"),
    ],
)
def test_results(dns, ip, sender, expected):
    r = check_spf(ip, sender, "client.example", dns)
    assert r.result == expected, r
    assert r.identity == "mailfrom"


def test_null_sender_checks_the_helo_name(dns):
    r = check_spf("192.0.2.5", "", "helo.test", dns)
    assert (r.result, r.identity, r.domain) == ("pass", "helo", "helo.test")
    assert check_spf("192.0.2.6", "", "helo.test", dns).result == "fail"
    assert check_spf("192.0.2.6", "", "[192.0.2.6]", dns).result == "none"


@pytest.mark.parametrize("domain", ["loop.test", "loop-a.test", "eleven.test", "c0.test"])
def test_include_loops_and_the_ten_lookup_limit_are_permerror(dns, domain):
    before = dns.client.queries
    started = time.monotonic()
    assert check_spf("192.0.2.1", f"a@{domain}", "x.example", dns).result == "permerror"
    assert dns.client.queries - before <= 12  # bounded: the limit stops it, not the chain
    assert time.monotonic() - started < 5


def test_ten_lookups_are_still_allowed(dns):
    assert check_spf("192.0.2.1", "a@ten.test", "x.example", dns).result == "pass"


def test_void_lookup_limit(dns):
    assert check_spf("192.0.2.1", "a@twovoid.test", "x.example", dns).result == "pass"
    assert check_spf("192.0.2.1", "a@threevoid.test", "x.example", dns).result == "permerror"


@pytest.mark.parametrize("n", range(len(GARBAGE)))
def test_garbage_records_are_permerror(dns, n):
    r = check_spf("192.0.2.1", f"a@garbage{n}.test", "x.example", dns)
    assert r.result == "permerror", (GARBAGE[n], r)


class OneRecord:
    """A BlockingDNS stand-in serving one TXT record for every name."""

    def __init__(self, text: bytes) -> None:
        self.text = text

    def lookup(self, name: str, qtype: str) -> Answer:
        if qtype == "TXT":
            return Answer(name, qtype, ((self.text,),))
        return Answer(name, qtype, nxdomain=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200).map(lambda b: b"v=spf1 " + b))
def test_any_record_gives_a_result_never_an_exception(record):
    r = check_spf("192.0.2.1", "a@fuzz.test", "x.example", OneRecord(record))  # type: ignore[arg-type]
    assert r.result in RESULTS


CACHED_ZONE = {
    "origin": "test",
    "ttl": 300,
    "names": {
        "kept.test": spf("v=spf1 include:inc.kept.test -all exp=why.kept.test"),
        "inc.kept.test": spf("v=spf1 ip4:192.0.2.0/24 -all"),
        "why.kept.test": spf("not allowed from %{i}"),
        "clock.test": spf("v=spf1 ip4:192.0.2.0/24 -all exp=why.clock.test"),
        "why.clock.test": spf("refused at %{t}"),
        "temp.test": "servfail",
    },
}


@pytest.fixture
def cached(reactor):
    """A cache over a DNS client whose time is ``clock`` (the records' TTL is 300 s)."""
    from twisted.internet.task import Clock

    from mailsuite.mailauth.spf import SPFCache

    clock = Clock()
    clock.advance(1000)
    client = DNSClient(MemoryAuthority(CACHED_ZONE), clock, timeout=1)
    return BlockingDNS(client, reactor), SPFCache(client), clock


def test_a_result_is_kept_while_its_dns_answers_are(cached):
    dns, cache, clock = cached
    first = check_spf("192.0.2.1", "a@kept.test", "h.example", dns, cache=cache)
    assert first.result == "pass" and cache.hits == 0
    queries = dns.client.queries
    again = check_spf("192.0.2.1", "a@kept.test", "h.example", dns, cache=cache)
    assert again == first and cache.hits == 1
    # the identity is the caller's, the result the cached one
    helo = check_spf("192.0.2.1", "", "kept.test", dns, cache=cache)
    assert (helo.identity, helo.address) == ("helo", "postmaster@kept.test")
    assert cache.hits == 1  # another sender (postmaster@...) is another key
    other_ip = check_spf("198.51.100.1", "a@kept.test", "h.example", dns, cache=cache)
    assert other_ip.result == "fail" and "198.51.100.1" in other_ip.reason
    assert cache.hits == 1
    assert dns.client.queries == queries  # every answer came from the DNS cache

    clock.advance(299)
    check_spf("192.0.2.1", "a@kept.test", "h.example", dns, cache=cache)
    assert cache.hits == 2
    clock.advance(2)  # the answers are gone from the DNS cache: evaluated again
    queries = dns.client.queries
    assert check_spf("192.0.2.1", "a@kept.test", "h.example", dns, cache=cache) == first
    assert cache.hits == 2 and dns.client.queries > queries


def test_temporary_failures_and_the_time_macro_are_not_kept(cached):
    dns, cache, _clock = cached
    for _ in range(2):
        assert check_spf("192.0.2.1", "a@temp.test", "h", dns, cache=cache).result == "temperror"
        refused = check_spf("198.51.100.1", "a@clock.test", "h", dns, cache=cache)
        assert refused.result == "fail"
    assert cache.hits == 0


def test_the_cache_is_bounded(cached):
    dns, cache, _clock = cached
    cache.size = 2
    for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        check_spf(ip, "a@kept.test", "h", dns, cache=cache)
    check_spf("192.0.2.1", "a@kept.test", "h", dns, cache=cache)  # the oldest went
    assert cache.hits == 0
    check_spf("192.0.2.3", "a@kept.test", "h", dns, cache=cache)
    assert cache.hits == 1
