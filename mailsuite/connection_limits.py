"""How many connections one service holds: in total, per client IP before login, and per user
and IP after login.  Pure bookkeeping (no Twisted, no I/O); the protocol adapters ask it when
a connection opens, when it logs in and when it closes.

Three numbers per service, each 0 for "no limit":

* ``max_connections``: every open connection of the service (all its listeners together);
* ``max_connections_per_ip``: connections from one address that have not logged in (on the
  MX service, where nobody logs in, simply every connection from that address).  This bounds
  an unauthenticated flood; a connection that logs in leaves this count, so many users behind
  one NAT address are not refused once they are in;
* ``max_userip_connections``: logged-in connections of one user from one address, Dovecot's
  ``mail_max_userip_connections`` (doc.dovecot.org, settings): a client that leaks sessions
  is stopped without touching the user's other devices or other users.

With several worker processes (``[server] workers``) each process keeps these counts for
its own connections and the decision is taken over every worker's through a shared
:class:`ConnectionCounts` (:meth:`ConnectionLimits.share`; the shared-memory table of
:mod:`mailsuite.shared.connection_table`), so a client does not get one allowance per
worker.  Only the keys a limit applies to are counted there (:attr:`Admission.held`): a
service with no limit set makes no shared write per connection.

Why the per-IP count is a pre-login count: IMAP clients keep several connections per account
(Thunderbird up to 5), and an office behind one address reaches any small per-IP limit with
its logged-in sessions alone.  Before login the number of connections a legitimate address
needs is small; after login the user+IP limit takes over.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

__all__ = ["Admission", "ConnectionCounts", "ConnectionLimits", "Refusal", "shared_limits"]

K = TypeVar("K")


class Refusal(enum.Enum):
    """Which limit a connection or login ran into."""

    TOTAL = "max_connections"
    PER_IP = "max_connections_per_ip"
    USER_IP = "max_userip_connections"


class ConnectionCounts(Protocol):
    """Counts kept for several processes (see :mod:`mailsuite.shared.connection_table`)."""

    def acquire(self, add: Sequence[tuple[str, int]], drop: Sequence[str] = ()) -> int | None:
        """Atomically: if every ``add`` key is below its limit (0: none), drop one from each
        ``drop`` key and add one to each ``add`` key (None); else the index of the first
        key at its limit, nothing changed."""
        ...

    def release(self, keys: Sequence[str]) -> None:
        """One less under each key."""
        ...


class ConnectionLimits:
    """The counters of one service.  ``exempt(ip)`` True skips the per-IP limit for that
    address (SMTP: ``[relay] trusted_networks``, the server's own submitting hosts)."""

    def __init__(
        self,
        max_connections: int = 0,
        max_connections_per_ip: int = 0,
        max_userip_connections: int = 0,
        exempt: Callable[[str], bool] | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.max_connections_per_ip = max_connections_per_ip
        self.max_userip_connections = max_userip_connections
        self.exempt = exempt
        self.total = 0
        self.per_ip: dict[str, int] = {}  # connections not logged in, by address
        self.per_userip: dict[tuple[str, str], int] = {}  # logged in, by (user, address)
        #: every worker's counts, when the server runs several (:meth:`share`)
        self.shared: ConnectionCounts | None = None
        self.service = ""

    def share(self, counts: ConnectionCounts, service: str) -> None:
        """Take decisions over ``counts`` too, under keys named for ``service``."""
        self.shared = counts
        self.service = service

    def _ip_key(self, ip: str) -> str:
        return f"{self.service} ip {ip}"

    def _userip_key(self, user: str, ip: str) -> str:
        return f"{self.service} user {user} {ip}"

    def admit(self, ip: str) -> Admission:
        """Count a new connection from ``ip``, or refuse it (``Admission.refused`` set, and
        nothing counted).  Always hold on to the result and :meth:`Admission.release` it."""
        if self.max_connections and self.total >= self.max_connections:
            return Admission(self, ip, refused=Refusal.TOTAL)
        n = self.per_ip.get(ip, 0)
        if (
            self.max_connections_per_ip
            and n >= self.max_connections_per_ip
            and not (self.exempt is not None and self.exempt(ip))
        ):
            return Admission(self, ip, refused=Refusal.PER_IP)
        held: tuple[str, ...] = ()
        if self.shared is not None:
            # Only the keys a limit applies to go to the shared counts: a key without a
            # limit is never read, and each shared write takes a cross-process lock (a
            # few microseconds): with no limit set, a connection costs none.
            add: list[tuple[str, int, Refusal]] = []
            if self.max_connections:
                add.append((f"{self.service} total", self.max_connections, Refusal.TOTAL))
            if self.max_connections_per_ip and not (self.exempt is not None and self.exempt(ip)):
                add.append((self._ip_key(ip), self.max_connections_per_ip, Refusal.PER_IP))
            if add:
                full = self.shared.acquire([(key, limit) for key, limit, _ in add])
                if full is not None:
                    return Admission(self, ip, refused=add[full][2])
                held = tuple(key for key, _, _ in add)
        self.total += 1
        self.per_ip[ip] = n + 1
        return Admission(self, ip, held=held)


def _decrement(table: dict[K, int], key: K) -> None:
    """One less under ``key``; empty entries are removed so the tables stay small."""
    n = table.get(key, 1) - 1
    if n <= 0:
        table.pop(key, None)
    else:
        table[key] = n


@dataclass(eq=False)
class Admission:
    """One connection's place in the counts: per-IP until :meth:`login`, then per user+IP."""

    limits: ConnectionLimits
    ip: str
    refused: Refusal | None = None
    user: str | None = None
    #: the keys this connection holds in the shared counts (only those with a limit)
    held: tuple[str, ...] = ()
    _open: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self._open = self.refused is None

    def login(self, user: str) -> Refusal | None:
        """The connection logged in as ``user``: move it from the per-IP count to the
        user+IP count, or return :attr:`Refusal.USER_IP` (the connection stays as it was,
        not logged in) when that user already has the maximum from this address."""
        limits = self.limits
        if not self._open or self.user is not None:
            return None
        key = (user.lower(), self.ip)
        n = limits.per_userip.get(key, 0)
        if limits.max_userip_connections and n >= limits.max_userip_connections:
            return Refusal.USER_IP
        held = self.held
        if limits.shared is not None:
            ip_key = limits._ip_key(self.ip)
            drop = [ip_key] if ip_key in held else []
            add: list[tuple[str, int]] = []
            if limits.max_userip_connections:
                add = [(limits._userip_key(key[0], self.ip), limits.max_userip_connections)]
            if add or drop:
                if limits.shared.acquire(add, drop=drop) is not None:
                    return Refusal.USER_IP
                held = tuple(k for k in held if k != ip_key) + tuple(k for k, _ in add)
        self.held = held
        _decrement(limits.per_ip, self.ip)
        limits.per_userip[key] = n + 1
        self.user = user.lower()
        return None

    def release(self) -> None:
        """The connection closed (safe to call more than once, and for a refused one)."""
        if not self._open:
            return
        self._open = False
        limits = self.limits
        limits.total -= 1
        if self.user is None:
            _decrement(limits.per_ip, self.ip)
        else:
            _decrement(limits.per_userip, (self.user, self.ip))
        if limits.shared is not None and self.held:
            limits.shared.release(self.held)


def shared_limits(
    registry: dict[str, ConnectionLimits],
    service: str,
    max_connections: int,
    max_connections_per_ip: int,
    max_userip_connections: int = 0,
    exempt: Callable[[str], bool] | None = None,
) -> ConnectionLimits:
    """The one :class:`ConnectionLimits` of ``service`` in ``registry`` (the runtime's), made
    on first use: the listeners of one service (imap and imaps, say) count together."""
    limits = registry.get(service)
    if limits is None:
        limits = ConnectionLimits(
            max_connections, max_connections_per_ip, max_userip_connections, exempt
        )
        registry[service] = limits
    return limits
