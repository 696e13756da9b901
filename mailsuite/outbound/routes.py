"""Per-domain routes: which configured next hop serves a recipient domain, and its hosts.

``[relay] routes`` maps a recipient domain to a next hop, as Postfix's transport maps
(``smtp:[host]:port``) and mox's routes do; the smarthost is the ``"*"`` route (built by
mailsuite.config).  Precedence, most specific first: the exact domain, then the longest
``.parent`` pattern, then ``"*"``; a domain no route serves goes by its MX records
(mailsuite.outbound.mx).  Local domains never reach the relay.

A route is the postmaster's own configuration, so a next hop that cannot be resolved (no such
host, null MX, MX records that point back at us) keeps the mail queued with a temporary
failure for the postmaster to fix, until ``[relay] lifetime``; it is not the recipient's fault.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from mailsuite.config import RelayRoute
from mailsuite.outbound.mx import MXError, MXHost, MXResolver, apply_loop_rule

__all__ = ["RouteTable", "next_hop_hosts"]


def _ascii(domain: str) -> str:
    """Lower case, no final dot, IDNA (A-label) form when the name has one."""
    name = domain.rstrip(".").lower()
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return name


class RouteTable:
    """The configured routes, looked up by recipient domain or by route key."""

    def __init__(self, routes: Iterable[RelayRoute]) -> None:
        self.exact: dict[str, RelayRoute] = {}
        self.parents: dict[str, RelayRoute] = {}  # ".example.org" -> route, stored without dot
        self.default: RelayRoute | None = None
        self.by_key: dict[str, RelayRoute] = {}
        for route in routes:
            self.by_key[route.key] = route
            if route.pattern == "*":
                self.default = route
            elif route.pattern.startswith("."):
                self.parents[_ascii(route.pattern[1:])] = route
            else:
                self.exact[_ascii(route.pattern)] = route

    def match(self, domain: str) -> RelayRoute | None:
        """The route serving ``domain``, or None for delivery by MX."""
        name = _ascii(domain)
        route = self.exact.get(name)
        if route is not None:
            return route
        labels = name.split(".")
        for i in range(1, len(labels)):  # longest parent first
            route = self.parents.get(".".join(labels[i:]))
            if route is not None:
                return route
        return self.default

    def get(self, key: str) -> RelayRoute | None:
        """The route whose :attr:`RelayRoute.key` is ``key`` (None: ``key`` is a domain)."""
        return self.by_key.get(key)


async def next_hop_hosts(
    route: RelayRoute, mx: MXResolver, is_self: Callable[[MXHost], bool]
) -> tuple[MXHost, ...]:
    """The hosts to try for ``route``, best first.  ``host:port``: the MX hosts of ``host``
    (RFC 5321 5.1, with its loop rule, which applies to MX-derived hosts only), or ``host``'s
    own addresses when it has no MX; ``[host]:port``: ``host``'s A/AAAA records (or the
    address itself), never checked against the loop rule, so a next hop on this machine
    (a content filter on ``[127.0.0.1]:10025``) works.  Any failure is temporary (module
    docstring): :class:`MXError` with ``permanent`` False."""
    try:
        if route.mx:
            found = await mx.resolve_async(route.host)
            if not found.implicit:
                found = apply_loop_rule(found, is_self)
        else:
            found = await mx.host_route(route.host)
    except MXError as e:
        status = "4" + e.status[1:]  # same subject and detail, temporary class (RFC 3463)
        raise MXError(
            route.key, False, status, f"route {route.pattern} to {route.next_hop}: {e.reason}"
        ) from None
    return found.hosts
