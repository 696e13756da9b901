"""The DNS layer of mail authentication: answers, the TTL cache, deadlines, and the blocking
facade the worker threads use (over a loopback twisted.names server on 127.0.0.1)."""

from __future__ import annotations

import threading
import time

import pytest
from twisted.internet import defer, task
from twisted.python.failure import Failure

from mailsuite.mailauth.dns import Answer, BlockingDNS, DNSClient, DNSTempError, server_resolver
from mailsuite.testing.dns import MemoryAuthority
from tests.reactor_thread import in_reactor

ZONE = {
    "origin": "test",
    "also": ["in-addr.arpa"],
    "names": {
        "example.test": {
            "TXT": [["v=spf1 ", "mx -all"], ["other"]],
            "MX": [[10, "mx.example.test"]],
            "A": ["127.0.0.2"],
        },
        "mx.example.test": {"A": ["127.0.0.2"], "AAAA": ["2001:db8::1"]},
        "_imaps._tcp.example.test": {"SRV": [[0, 1, 993, "mx.example.test"]]},
        "2.0.0.127.in-addr.arpa": {"PTR": ["mx.example.test"]},
        "broken.test": "servfail",
        "slow.test": "timeout",
    },
}


def now(d: defer.Deferred) -> object:
    out: list[object] = []
    d.addBoth(out.append)
    assert out, "answered synchronously"
    return out[0]


@pytest.fixture
def client():
    clock = task.Clock()
    return DNSClient(MemoryAuthority(ZONE), clock, timeout=5), clock


def test_record_types_are_decoded(client):
    c, _ = client
    txt = now(c.lookup("Example.Test.", "TXT"))
    assert isinstance(txt, Answer) and txt.texts() == [b"v=spf1 mx -all", b"other"]
    assert now(c.lookup("example.test", "MX")).records == ((10, "mx.example.test"),)
    assert now(c.lookup("mx.example.test", "AAAA")).records == ("2001:db8::1",)
    assert now(c.lookup("_imaps._tcp.example.test", "SRV")).records == (
        (0, 1, 993, "mx.example.test"),
    )
    assert now(c.lookup("2.0.0.127.in-addr.arpa", "PTR")).records == ("mx.example.test",)


def test_nxdomain_nodata_and_temporary_failures_differ(client):
    c, _ = client
    nx = now(c.lookup("missing.test", "TXT"))
    assert nx.nxdomain and nx.records == ()
    nodata = now(c.lookup("mx.example.test", "TXT"))
    assert not nodata.nxdomain and nodata.records == ()
    assert now(c.lookup("9.9.9.9.in-addr.arpa", "PTR")).nxdomain
    failed = now(c.lookup("broken.test", "TXT"))
    assert isinstance(failed, Failure) and failed.check(DNSTempError)
    assert "SERVFAIL" in str(failed.value) or "scripted" in str(failed.value)


def test_names_that_cannot_exist_are_nxdomain_without_a_query(client):
    c, _ = client
    for bad in ("", "a..b.test", "x" * 64 + ".test", "a." * 130 + "test"):
        assert now(c.lookup(bad, "A")).nxdomain
    assert c.queries == 0


def test_deadline_turns_silence_into_a_temporary_error(client):
    c, clock = client
    d = c.lookup("slow.test", "TXT")
    out: list[object] = []
    d.addBoth(out.append)
    assert not out
    clock.advance(4.9)
    assert not out
    clock.advance(0.2)
    assert isinstance(out[0], Failure) and out[0].check(DNSTempError)
    assert "no answer within 5 s" in str(out[0].value)


def test_answers_are_cached_for_their_ttl(client):
    c, clock = client
    now(c.lookup("example.test", "TXT"))
    now(c.lookup("example.test", "TXT"))
    now(c.lookup("missing.test", "TXT"))
    now(c.lookup("missing.test", "TXT"))
    assert c.queries == 2  # records have TTL 1, the SOA minimum is 1
    clock.advance(1.5)
    now(c.lookup("example.test", "TXT"))
    assert c.queries == 3
    for _ in range(3):  # temporary failures are never cached
        now(c.lookup("broken.test", "TXT"))
    assert c.queries == 6


def test_cache_is_bounded():
    clock = task.Clock()
    c = DNSClient(MemoryAuthority(ZONE), clock, cache_size=3)
    for i in range(10):
        now(c.lookup(f"n{i}.test", "A"))
    assert len(c._cache) == 3
    now(c.lookup("n9.test", "A"))  # the most recent ones stay
    assert c.queries == 10


def test_concurrent_lookups_of_one_name_share_one_query(client):
    c, clock = client
    first, second = c.lookup("slow.test", "TXT"), c.lookup("Slow.Test.", "TXT")
    other = c.lookup("slow.test", "A")
    assert c.queries == 2  # one per (name, type)
    clock.advance(5.1)
    for d in (first, second, other):  # every waiter gets the outcome, failures included
        assert now(d).check(DNSTempError)
    again = c.lookup("slow.test", "TXT")
    assert c.queries == 3  # the shared query is over: a new lookup asks again
    clock.advance(5.1)
    assert now(again).check(DNSTempError)


def test_peek_reads_fresh_cached_answers_only(client):
    c, clock = client
    assert c.peek("example.test", "TXT") is None
    answer = now(c.lookup("example.test", "TXT"))
    assert c.peek("EXAMPLE.test.", "TXT") is answer
    assert c.peek("example.test", "MX") is None and c.peek("a..b", "TXT") is None
    clock.advance(1.5)  # past the TTL
    assert c.peek("example.test", "TXT") is None


# ------------------------------------------------------------------ over a real socket


@pytest.fixture(scope="module")
def loopback(reactor, loopback_dns):
    server = loopback_dns(ZONE)
    resolver = server_resolver((server.nameserver,), reactor)
    return reactor, DNSClient(resolver, reactor, timeout=2)


def test_blocking_facade_from_worker_threads(loopback):
    reactor, c = loopback
    facade = BlockingDNS(c, reactor)
    results: list[object] = []

    def work() -> None:
        try:
            results.append(facade.txt("example.test"))
            results.append(facade.lookup("nothere.test", "A").nxdomain)
            facade.lookup("broken.test", "A")
        except DNSTempError as e:
            results.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert results.count([b"v=spf1 mx -all", b"other"]) == 4
    assert results.count(True) == 4
    assert sum(isinstance(r, DNSTempError) for r in results) == 4


def test_blocking_facade_deadline(loopback):
    reactor, c = loopback
    facade = BlockingDNS(c, reactor)
    started = time.monotonic()
    with pytest.raises(DNSTempError, match="no answer within"):
        facade.lookup("slow.test", "TXT")
    assert time.monotonic() - started < 5  # the client's 2 s deadline, not twisted's minute

    stuck = BlockingDNS(DNSClient(MemoryAuthority(ZONE), task.Clock()), reactor, deadline=0.3)
    started = time.monotonic()
    with pytest.raises(DNSTempError):  # a clock that never moves: the facade's own deadline
        stuck.lookup("slow.test", "TXT")
    assert time.monotonic() - started < 3


def test_blocking_facade_refuses_the_reactor_thread(loopback):
    reactor, c = loopback
    facade = BlockingDNS(c, reactor)
    with pytest.raises(RuntimeError, match="reactor thread"):
        in_reactor(reactor, facade.lookup, "example.test", "A")


def test_prefetch_asks_ahead_and_lookups_then_read_the_cache(loopback):
    reactor, c = loopback
    facade = BlockingDNS(c, reactor)
    wanted = [("mx.example.test", "AAAA"), ("_imaps._tcp.example.test", "SRV")]
    facade.prefetch(wanted)  # from this (non-reactor) thread; returns at once
    deadline = time.monotonic() + 10
    while any(c.peek(*q) is None for q in wanted):
        assert time.monotonic() < deadline, "the prefetched answers never reached the cache"
        time.sleep(0.01)
    asked = c.queries
    assert facade.lookup("mx.example.test", "AAAA").records == ("2001:db8::1",)
    assert facade.lookup("_imaps._tcp.example.test", "SRV").records == (
        (0, 1, 993, "mx.example.test"),
    )
    assert c.queries == asked  # answered from the cache, in this thread
