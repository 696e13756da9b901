"""Where to deliver a domain's mail: RFC 5321 section 5.1 over a twisted.names resolver.

Written here rather than using twisted.mail's MXCalculator: that returns one host, never an ordered
list, ignores AAAA, and turns a null MX (RFC 7505) into a connection attempt to ''.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.names import cache, client, dns, error, hosts, resolve
from twisted.names.error import DNSQueryTimeoutError
from twisted.python.failure import Failure

__all__ = [
    "DNS_DEADLINE",
    "MXError",
    "MXHost",
    "MXResolver",
    "Route",
    "apply_loop_rule",
    "make_resolver",
    "parse_nameserver",
]

#: Seconds one DNS query may take in all (twisted.names' own retries give up after 60 s).
DNS_DEADLINE = 30.0


@dataclass(frozen=True)
class MXHost:
    """One mail exchanger: its name, MX preference and addresses (IPv4 and/or IPv6, in order)."""

    name: str
    preference: int
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class Route:
    """The hosts to try for a domain, best first.

    ``implicit`` is True when the domain has no MX and its own address records are used (RFC 5321
    5.1), ``literal`` when the domain was an address literal such as ``[192.0.2.1]``.
    Hosts whose names did not resolve to any address are left out; ``unresolved`` names them.
    """

    domain: str
    hosts: tuple[MXHost, ...]
    implicit: bool = False
    literal: bool = False
    unresolved: tuple[str, ...] = ()


class MXError(Exception):
    """The domain cannot be routed now (``permanent`` False) or ever (``permanent`` True).

    ``status`` is the RFC 3463 enhanced status code to put in a DSN or reply.
    """

    def __init__(self, domain: str, permanent: bool, status: str, reason: str) -> None:
        super().__init__(f"{domain}: {status} {reason}")
        self.domain = domain
        self.permanent = permanent
        self.status = status
        self.reason = reason


class _NoData(Exception):
    """The name exists but has no records of the asked type."""


class _NoName(Exception):
    """NXDOMAIN."""


class _Transient(Exception):
    """SERVFAIL, timeout, refused, or anything else that may go away."""


def parse_nameserver(spec: str) -> tuple[str, int]:
    """``"127.0.0.1:5353"`` -> ``("127.0.0.1", 5353)``; ``"[::1]:53"``, bare hosts -> port 53."""
    spec = spec.strip()
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 53
        return host, port
    if spec.count(":") == 1:
        host, _, port_text = spec.partition(":")
        return host, int(port_text)
    return spec, 53  # a bare IPv4 address, or a bare IPv6 address


def make_resolver(nameservers: list[str] | None, reactor: Any) -> Any:
    """An IResolver: exactly the given ``host:port`` servers, or the system's when None.

    With None this is what ``client.createResolver`` builds (hosts file, cache, resolv.conf), but
    with our reactor passed in rather than the global one.
    """
    if nameservers:
        servers = [parse_nameserver(s) for s in nameservers]
        return client.Resolver(servers=servers, reactor=reactor)
    return resolve.ResolverChain(
        [
            hosts.Resolver(b"/etc/hosts"),
            cache.CacheResolver(reactor=reactor),
            client.Resolver(resolv=b"/etc/resolv.conf", reactor=reactor),
        ]
    )


def _classify(failure_value: BaseException) -> Exception:
    if isinstance(failure_value, error.DNSNameError | error.AuthoritativeDomainError):
        return _NoName()
    if isinstance(failure_value, DNSQueryTimeoutError | defer.TimeoutError):
        return _Transient("timeout")
    if isinstance(failure_value, error.DNSServerError):
        return _Transient("SERVFAIL")
    if isinstance(failure_value, error.DNSQueryRefusedError):
        return _Transient("REFUSED")
    return _Transient(f"{type(failure_value).__name__}: {failure_value}")


def _literal(domain: str) -> Route | None:
    """RFC 5321 4.1.3 address literals: ``[192.0.2.1]`` and ``[IPv6:2001:db8::1]``."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
        version = 6
    else:
        version = 4
    try:
        addr = ipaddress.ip_address(inner)
    except ValueError:
        raise MXError(domain, True, "5.1.2", "malformed address literal") from None
    if addr.version != version:
        raise MXError(domain, True, "5.1.2", "malformed address literal") from None
    return Route(domain, (MXHost(domain, 0, (str(addr),)),), literal=True)


def _ascii_name(domain: str) -> str:
    """The domain as DNS asks for it: lower case, no trailing dot, IDNA A-labels (RFC 5890)
    for an internationalized name; a name IDNA cannot encode is permanently invalid."""
    name = domain.rstrip(".").lower()
    try:
        name.encode("ascii")
    except UnicodeEncodeError:
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise MXError(domain, True, "5.1.2", "invalid domain name") from None
    return name


class MXResolver:
    """Resolve a recipient domain to a :class:`Route` (RFC 5321 5.1, RFC 7505).

    ``resolver`` is any twisted.names IResolver. ``rng`` shuffles MX hosts of equal preference
    (inject a seeded ``random.Random`` in tests). ``timeout`` is passed to every lookup (the
    resolver's retry schedule in seconds). ``prefer_ipv6`` puts each host's AAAA addresses first.
    With a ``clock`` (the reactor), no single lookup may take longer than ``deadline`` seconds:
    a resolver that never answers becomes a temporary failure (4.4.3), not a stuck delivery.
    """

    def __init__(
        self,
        resolver: Any,
        rng: random.Random | None = None,
        timeout: Sequence[int] | None = None,
        prefer_ipv6: bool = False,
        clock: Any = None,
        deadline: float = DNS_DEADLINE,
    ) -> None:
        self._resolver = resolver
        self._clock = clock
        self._deadline = deadline
        self._rng = rng if rng is not None else random.SystemRandom()
        self._timeout = tuple(timeout) if timeout is not None else None
        self._prefer_ipv6 = prefer_ipv6

    def resolve(self, domain: str) -> Deferred[Route]:
        """Fire with a :class:`Route`, or fail with :class:`MXError`."""
        return defer.ensureDeferred(self.resolve_async(domain))

    async def resolve_async(self, domain: str) -> Route:
        """The route for ``domain``: an address literal as it is, else its MX hosts in order
        (RFC 5321 5.1), else the domain's own addresses when it has no MX at all."""
        literal = _literal(domain)
        if literal is not None:
            return literal
        name = _ascii_name(domain)
        try:
            mx_records = await self._query(name, dns.MX)
        except _NoName:
            raise MXError(domain, True, "5.1.2", "domain does not exist (NXDOMAIN)") from None
        except _Transient as e:
            raise MXError(domain, False, "4.4.3", f"MX lookup failed: {e}") from None
        except _NoData:
            mx_records = []
        if not mx_records:
            return await self._implicit_route(domain, name)
        return await self._mx_route(domain, self._order_exchanges(domain, mx_records))

    async def _implicit_route(self, domain: str, name: str) -> Route:
        """RFC 5321 5.1: no MX -> the domain itself is the implicit MX, preference 0.

        NXDOMAIN or no address at all is permanent (the sender mistyped the domain); a
        failed lookup is temporary, so the queue tries again.
        """
        try:
            addresses = await self._addresses(name)
        except _NoName:
            raise MXError(domain, True, "5.1.2", "domain does not exist (NXDOMAIN)") from None
        except _Transient as e:
            raise MXError(domain, False, "4.4.3", f"address lookup failed: {e}") from None
        if not addresses:
            raise MXError(domain, True, "5.1.2", "domain has no MX and no address records")
        return Route(domain, (MXHost(name, 0, addresses),), implicit=True)

    def _order_exchanges(self, domain: str, mx_records: Sequence[Any]) -> list[tuple[int, str]]:
        """(preference, exchange) in preference order; equal preferences in random order
        (RFC 5321 5.1, which spreads load over equal hosts); duplicates dropped.

        Raises for a null MX (RFC 7505 3: a single "MX 0 ." says the domain accepts no mail).
        """
        exchanges = [
            (int(r.preference), r.name.name.decode("ascii").rstrip(".").lower()) for r in mx_records
        ]
        real = [(p, x) for p, x in exchanges if x != ""]
        if not real:
            raise MXError(domain, True, "5.1.10", "domain does not accept mail (null MX)")
        by_pref: dict[int, list[str]] = {}
        for pref, exchange in real:
            group = by_pref.setdefault(pref, [])
            if exchange not in group:
                group.append(exchange)
        ordered: list[tuple[int, str]] = []
        for pref in sorted(by_pref):
            group = by_pref[pref]
            self._rng.shuffle(group)
            ordered.extend((pref, x) for x in group)
        return ordered

    async def _mx_route(self, domain: str, ordered: list[tuple[int, str]]) -> Route:
        """Look up every exchange's addresses at once and keep those that have some.

        When none has an address the failure is temporary either way: a lookup that failed
        may work later, and a missing host is a DNS misconfiguration that may be fixed (the
        queue's lifetime bounces it eventually).
        """
        results = await defer.DeferredList(
            [defer.ensureDeferred(self._host_addresses(x)) for _, x in ordered],
            consumeErrors=True,
        )
        hosts_out: list[MXHost] = []
        unresolved: list[str] = []
        transient: list[str] = []
        for (pref, exchange), (ok, value) in zip(ordered, results, strict=True):
            if ok and value:
                hosts_out.append(MXHost(exchange, pref, value))
            else:
                unresolved.append(exchange)
                if ok is False or value is None:
                    transient.append(exchange)
        if not hosts_out:
            if transient:
                raise MXError(
                    domain,
                    False,
                    "4.4.3",
                    "address lookup of MX hosts failed: " + ", ".join(transient),
                )
            raise MXError(
                domain, False, "4.4.3", "MX hosts have no addresses: " + ", ".join(unresolved)
            )
        return Route(domain, tuple(hosts_out), unresolved=tuple(unresolved))

    async def host_route(self, name: str) -> Route:
        """``name``'s own A/AAAA records as a one-host :class:`Route`, without any MX lookup:
        the ``[host]:port`` next hop of a configured route (Postfix's brackets).  An IP address
        is taken as it is.  Fails with :class:`MXError` (NXDOMAIN or no address: permanent,
        SERVFAIL or timeout: temporary)."""
        try:
            address = str(ipaddress.ip_address(name))
        except ValueError:
            pass
        else:
            return Route(name, (MXHost(name, 0, (address,)),), literal=True)
        try:
            addresses = await self._addresses(name.rstrip(".").lower())
        except _NoName:
            raise MXError(name, True, "5.1.2", "host does not exist (NXDOMAIN)") from None
        except _Transient as e:
            raise MXError(name, False, "4.4.3", f"address lookup failed: {e}") from None
        if not addresses:
            raise MXError(name, True, "5.1.2", "host has no address records")
        return Route(name, (MXHost(name, 0, addresses),), implicit=True)

    async def _host_addresses(self, host: str) -> tuple[str, ...] | None:
        """Addresses of an MX host; () when it has none; None when lookups failed transiently."""
        try:
            return await self._addresses(host)
        except _NoName:
            return ()
        except _Transient:
            return None

    async def _addresses(self, name: str) -> tuple[str, ...]:
        """A and AAAA of ``name``. Raises _NoName, or _Transient if no lookup gave an answer."""
        v4, v6 = await defer.DeferredList(
            [
                defer.ensureDeferred(self._query(name, dns.A)),
                defer.ensureDeferred(self._query(name, dns.AAAA)),
            ],
            consumeErrors=True,
        )
        outcomes = []
        found: dict[int, list[str]] = {dns.A: [], dns.AAAA: []}
        for qtype, (ok, value) in ((dns.A, v4), (dns.AAAA, v6)):
            if ok:
                found[qtype] = [r.dottedQuad() if qtype == dns.A else _v6(r) for r in value]
                outcomes.append("ok")
            elif isinstance(value, Failure) and value.check(_NoData):
                outcomes.append("ok")
            elif isinstance(value, Failure) and value.check(_NoName):
                outcomes.append("noname")
            else:
                outcomes.append("transient")
        addresses = found[dns.A] + found[dns.AAAA]
        if self._prefer_ipv6:
            addresses = found[dns.AAAA] + found[dns.A]
        if addresses:
            return tuple(dict.fromkeys(addresses))
        if "transient" in outcomes:
            raise _Transient("address lookup failed")
        if "noname" in outcomes:
            raise _NoName()
        return ()

    async def _query(self, name: str, qtype: int) -> list[Any]:
        """Records of ``qtype`` for ``name`` from the answer section (CNAMEs already followed)."""
        lookup = {
            dns.MX: self._resolver.lookupMailExchange,
            dns.A: self._resolver.lookupAddress,
            dns.AAAA: self._resolver.lookupIPV6Address,
        }[qtype]
        try:
            d = lookup(name, timeout=self._timeout) if self._timeout is not None else lookup(name)
            if self._clock is not None:
                d.addTimeout(self._deadline, self._clock)
            answers, _auth, _add = await d
        except Exception as e:  # every resolver failure is classified
            raise _classify(e) from None
        records = [rr.payload for rr in answers if rr.type == qtype]
        if not records:
            raise _NoData()
        return records


def apply_loop_rule(route: Route, is_self: Callable[[MXHost], bool]) -> Route:
    """RFC 5321 5.1: when we are one of the domain's MX hosts, keep only hosts with a strictly
    lower preference value than our own (best) entry: the others would hand the mail back to us
    or to a backup that hands it back. None left is a configuration error: MXError 5.4.6
    ("mail loops back to myself"), permanent, so the sender hears of it rather than the mail
    going round until it expires. A route that does not name us is returned unchanged.

    ``is_self`` decides by host name or address (see mailsuite.outbound.relay.SelfCheck).
    An implicit MX or an address literal pointing at us has nothing better: 5.4.6 too.
    """
    mine = [h.preference for h in route.hosts if is_self(h)]
    if not mine:
        return route
    ours = min(mine)
    better = tuple(h for h in route.hosts if h.preference < ours and not is_self(h))
    if not better:
        what = "the domain's address" if route.implicit or route.literal else "MX"
        raise MXError(
            route.domain,
            True,
            "5.4.6",
            f"mail for {route.domain} loops back to myself ({what} "
            f"{', '.join(h.name for h in route.hosts if is_self(h))} is this server, "
            "and no MX host with a better preference exists)",
        )
    return Route(
        route.domain,
        better,
        implicit=route.implicit,
        literal=route.literal,
        unresolved=route.unresolved,
    )


def _v6(record: Any) -> str:
    return str(ipaddress.IPv6Address(record.address))
