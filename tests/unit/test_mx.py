"""MXResolver (RFC 5321 5.1, RFC 7505) against mailsuite.testing.dns.

The first group hands the in-memory authority straight to the resolver (no sockets); the second
runs the same zone as a real DNS server on 127.0.0.1 (UDP) queried by twisted.names' client.
"""

from __future__ import annotations

import json
import random

import pytest
from twisted.python.failure import Failure

from mailsuite.outbound.mx import (
    MXError,
    MXHost,
    MXResolver,
    Route,
    apply_loop_rule,
    make_resolver,
    parse_nameserver,
)
from mailsuite.testing.dns import MemoryAuthority, spawn_dns_server

ZONE = {
    "origin": "test",
    "names": {
        "example.test": {
            "MX": [[20, "mx3.example.test"], [10, "mx1.example.test"], [10, "mx2.example.test"]]
        },
        "mx1.example.test": {"A": ["127.0.0.2"]},
        "mx2.example.test": {"A": ["127.0.0.3"], "AAAA": ["::1"]},
        "mx3.example.test": {"AAAA": ["::2"]},
        "nomx.test": {"A": ["127.0.0.4"], "AAAA": ["::4"]},
        "nothing.test": {"TXT": [["v=spf1 -all"]]},
        "nullmx.test": {"MX": [[0, "."]]},
        "deadmx.test": {"MX": [[10, "missing.test"]]},
        "halfbroken.test": {"MX": [[10, "broken.test"], [20, "mx1.example.test"]]},
        "allbroken.test": {"MX": [[10, "broken.test"]]},
        "broken.test": "servfail",
        "slow.test": "timeout",
    },
}


def resolve_now(resolver: MXResolver, domain: str) -> Route | Failure:
    results: list[object] = []
    resolver.resolve(domain).addBoth(results.append)
    assert results, "the in-memory authority answers synchronously"
    return results[0]  # type: ignore[return-value]


def error_of(result: object) -> MXError:
    assert isinstance(result, Failure), result
    assert isinstance(result.value, MXError)
    return result.value


@pytest.fixture
def mx() -> MXResolver:
    return MXResolver(MemoryAuthority(ZONE), rng=random.Random(0))


def test_preference_order_and_addresses(mx):
    route = resolve_now(mx, "example.test")
    assert isinstance(route, Route) and not route.implicit
    assert [h.preference for h in route.hosts] == [10, 10, 20]
    assert {h.name for h in route.hosts[:2]} == {"mx1.example.test", "mx2.example.test"}
    assert route.hosts[2].name == "mx3.example.test"
    by_name = {h.name: h.addresses for h in route.hosts}
    assert by_name["mx2.example.test"] == ("127.0.0.3", "::1")
    assert by_name["mx3.example.test"] == ("::2",)


def test_prefer_ipv6():
    r = MXResolver(MemoryAuthority(ZONE), rng=random.Random(0), prefer_ipv6=True)
    route = resolve_now(r, "nomx.test")
    assert route.hosts[0].addresses == ("::4", "127.0.0.4")


def test_equal_preferences_are_shuffled():
    seen = set()
    for seed in range(40):
        route = resolve_now(
            MXResolver(MemoryAuthority(ZONE), rng=random.Random(seed)), "example.test"
        )
        names = tuple(h.name for h in route.hosts)
        assert names[2] == "mx3.example.test"  # never ahead of better preferences
        seen.add(names[:2])
    assert seen == {
        ("mx1.example.test", "mx2.example.test"),
        ("mx2.example.test", "mx1.example.test"),
    }


def test_implicit_mx(mx):
    route = resolve_now(mx, "nomx.test")
    assert route.implicit
    assert [(h.name, h.preference, h.addresses) for h in route.hosts] == [
        ("nomx.test", 0, ("127.0.0.4", "::4"))
    ]


def test_no_mx_no_address_is_permanent(mx):
    e = error_of(resolve_now(mx, "nothing.test"))
    assert e.permanent and e.status == "5.1.2"


def test_null_mx_is_permanent(mx):
    e = error_of(resolve_now(mx, "nullmx.test"))
    assert e.permanent and e.status == "5.1.10"


def test_nxdomain_is_permanent(mx):
    e = error_of(resolve_now(mx, "nonexistent.test"))
    assert e.permanent and e.status == "5.1.2"


def test_servfail_is_temporary(mx):
    e = error_of(resolve_now(mx, "broken.test"))
    assert not e.permanent and e.status.startswith("4.")


def test_mx_host_without_address_is_temporary(mx):
    e = error_of(resolve_now(mx, "deadmx.test"))
    assert not e.permanent


def test_failing_mx_host_is_skipped(mx):
    route = resolve_now(mx, "halfbroken.test")
    assert [h.name for h in route.hosts] == ["mx1.example.test"]
    assert route.unresolved == ("broken.test",)
    e = error_of(resolve_now(mx, "allbroken.test"))
    assert not e.permanent


def test_domain_literals(mx):
    route = resolve_now(mx, "[192.0.2.7]")
    assert route.literal and route.hosts[0].addresses == ("192.0.2.7",)
    route = resolve_now(mx, "[IPv6:2001:db8::1]")
    assert route.hosts[0].addresses == ("2001:db8::1",)
    assert error_of(resolve_now(mx, "[999.1.1.1]")).permanent
    assert error_of(resolve_now(mx, "[2001:db8::1]")).permanent  # IPv6 needs the tag


def test_parse_nameserver():
    assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_nameserver("127.0.0.1") == ("127.0.0.1", 53)
    assert parse_nameserver("[::1]:5353") == ("::1", 5353)
    assert parse_nameserver("::1") == ("::1", 53)


# --------------------------------------------------------------- the loop rule (RFC 5321 5.1)


def _route(*hosts: tuple[str, int], implicit: bool = False) -> Route:
    return Route("d.test", tuple(MXHost(n, p, ("192.0.2.1",)) for n, p in hosts), implicit=implicit)


def test_loop_rule_keeps_only_strictly_better_hosts():
    route = _route(("a.test", 5), ("b.test", 10), ("me.test", 10), ("c.test", 20))
    kept = apply_loop_rule(route, lambda h: h.name == "me.test")
    assert [h.name for h in kept.hosts] == ["a.test"]  # equal preference (b) goes too


def test_loop_rule_leaves_routes_without_us_alone():
    route = _route(("a.test", 5), ("b.test", 10))
    assert apply_loop_rule(route, lambda h: False) is route


@pytest.mark.parametrize(
    "hosts,implicit",
    [
        ([("me.test", 10), ("b.test", 20)], False),  # we are the best MX: nothing better
        ([("b.test", 10), ("me.test", 10)], False),  # a tie with us is not better
        ([("d.test", 0)], True),  # the implicit MX is us
    ],
)
def test_loop_rule_without_a_better_host_is_5_4_6(hosts, implicit):
    route = _route(*hosts, implicit=implicit)
    with pytest.raises(MXError) as info:
        apply_loop_rule(route, lambda h: h.name in ("me.test", "d.test"))
    assert info.value.permanent and info.value.status == "5.4.6"
    assert "loops back to myself" in info.value.reason


# --------------------------------------------------------------- over real sockets


@pytest.fixture(scope="module")
def dns_server(reactor, loopback_dns):
    return reactor, loopback_dns(ZONE)


def resolve_over_network(reactor, nameserver: str, domain: str, timeout: float = 10.0):
    """``domain``'s route from the name server over UDP.  The deadline is long where an
    answer comes (a loaded machine can take a second to schedule the DNS server, a
    subprocess in test_dns_subprocess) and short only where none will (slow.test)."""

    def go():
        mx = MXResolver(
            make_resolver([nameserver], reactor), rng=random.Random(1), timeout=(timeout,)
        )
        return mx.resolve(domain)

    from twisted.internet.threads import blockingCallFromThread

    return blockingCallFromThread(reactor, go)


def test_network_preference_order(dns_server):
    reactor, server = dns_server
    route = resolve_over_network(reactor, server.nameserver, "example.test")
    assert [h.preference for h in route.hosts] == [10, 10, 20]
    assert dict((h.name, h.addresses) for h in route.hosts)["mx2.example.test"] == (
        "127.0.0.3",
        "::1",
    )


def test_network_implicit_mx(dns_server):
    reactor, server = dns_server
    route = resolve_over_network(reactor, server.nameserver, "nomx.test")
    assert route.implicit and route.hosts[0].addresses == ("127.0.0.4", "::4")


@pytest.mark.parametrize(
    "domain,permanent,status",
    [
        ("nullmx.test", True, "5.1.10"),
        ("nonexistent.test", True, "5.1.2"),
        ("broken.test", False, "4.4.3"),
        ("slow.test", False, "4.4.3"),
    ],
)
def test_network_failures(dns_server, domain, permanent, status):
    reactor, server = dns_server
    with pytest.raises(MXError) as info:
        resolve_over_network(
            reactor, server.nameserver, domain, 1.0 if domain == "slow.test" else 10.0
        )
    assert info.value.permanent is permanent
    assert info.value.status == status


def test_dns_subprocess(tmp_path, reactor):
    zone_file = tmp_path / "zone.json"
    zone_file.write_text(json.dumps(ZONE))
    proc, port = spawn_dns_server(str(zone_file))
    try:
        route = resolve_over_network(reactor, f"127.0.0.1:{port}", "example.test")
        assert route.hosts[-1].name == "mx3.example.test"
    finally:
        proc.terminate()
        proc.wait(10)
