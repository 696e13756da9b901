"""A loopback DNS server for tests: twisted.names' server over records held in memory.

Zone description (a dict, or the same as JSON for the subprocess entry point)::

    {
      "origin": "test",                       # optional; names outside it are refused
      "ttl": 300,                             # optional; every record's TTL (default 1 s)
      "also": ["in-addr.arpa"],               # optional; more zones answered NXDOMAIN
      "names": {
        "example.test": {"MX": [[10, "mx1.example.test"], [20, "mx2.example.test"]]},
        "mx1.example.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
        "spf.example.test": {"TXT": [["v=spf1 ", "mx -all"]]},   # one record, two strings
        "_imaps._tcp.example.test": {"SRV": [[0, 1, 993, "mx1.example.test"]]},
        "2.0.0.127.in-addr.arpa": {"PTR": ["mx1.example.test"]},
        "nullmx.test": {"MX": [[0, "."]]},
        "broken.test": "servfail",            # every query for this name answers SERVFAIL
        "slow.test": "timeout"                # ... or is never answered
      }
    }

Names under the origin that are not listed answer NXDOMAIN; listed names without the asked type
answer NOERROR with no records (NODATA).

In a test reactor: ``server = LoopbackDNS(zone); port = server.start(reactor)`` then
``server.stop()``. As a subprocess: ``python -m mailsuite.testing.dns --port 0 --zone FILE``
prints ``ready PORT`` once listening on 127.0.0.1 (UDP and TCP on the same port).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.names import authority, common, dns, error, server
from twisted.python import failure

__all__ = ["LoopbackDNS", "MemoryAuthority", "spawn_dns_server"]

_SOA = dns.Record_SOA(
    mname=b"ns.invalid",
    rname=b"root.invalid",
    serial=1,
    refresh=1,
    retry=1,
    expire=1,
    minimum=1,
    ttl=1,
)


def _records(spec: dict[str, Any], ttl: int = 1) -> list[Any]:
    out: list[Any] = []
    for rtype, values in spec.items():
        for value in values:
            if rtype == "MX":
                pref, exchange = value
                exchange = "" if exchange in (".", "") else exchange
                out.append(dns.Record_MX(int(pref), exchange.encode("ascii"), ttl=ttl))
            elif rtype == "A":
                out.append(dns.Record_A(value, ttl=ttl))
            elif rtype == "AAAA":
                out.append(dns.Record_AAAA(value, ttl=ttl))
            elif rtype == "CNAME":
                out.append(dns.Record_CNAME(value.encode("ascii"), ttl=ttl))
            elif rtype == "TXT":
                out.append(dns.Record_TXT(*(v.encode() for v in value), ttl=ttl))
            elif rtype == "PTR":
                out.append(dns.Record_PTR(value.encode("ascii"), ttl=ttl))
            elif rtype == "SRV":
                priority, weight, port, target = value
                target = "" if target in (".", "") else target
                out.append(
                    dns.Record_SRV(
                        int(priority), int(weight), int(port), target.encode("ascii"), ttl=ttl
                    )
                )
            else:
                raise ValueError(f"unsupported record type {rtype!r}")
    return out


class MemoryAuthority(authority.FileAuthority):
    """A FileAuthority whose records come from a dict, with per-name failure modes.

    It is an IResolver itself, so unit tests may hand it straight to the code under test.
    """

    def __init__(self, zone: dict[str, Any]) -> None:
        common.ResolverBase.__init__(self)
        origin: bytes = zone.get("origin", "test").encode("ascii")
        self.origin = origin
        # FileAuthority's _lookup reads these two; Twisted declares them None until a zone
        # file is loaded, which is the one thing this authority never does
        self.soa = (origin, _SOA)  # type: ignore[assignment]
        self.also = [z.rstrip(".").lower().encode("ascii") for z in zone.get("also", [])]
        self.records: dict[bytes, list[Any]] = {}  # type: ignore[assignment]
        self.modes: dict[bytes, str] = {}
        self.pending: list[defer.Deferred[Any]] = []
        for name, spec in zone.get("names", {}).items():
            key = name.rstrip(".").lower().encode("ascii")
            if isinstance(spec, str):
                if spec not in ("servfail", "timeout"):
                    raise ValueError(f"unknown mode {spec!r} for {name}")
                self.modes[key] = spec
            else:
                self.records[key] = _records(spec, int(zone.get("ttl", 1)))
        # FileAuthority only answers NODATA for a name with some record; give the apex its SOA.
        self.records.setdefault(origin.lower(), []).append(_SOA)

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any = None) -> Any:
        mode = self.modes.get(name.lower())
        if mode == "servfail":
            return defer.fail(failure.Failure(RuntimeError("scripted SERVFAIL")))
        if mode == "timeout":
            d: defer.Deferred[Any] = defer.Deferred()
            self.pending.append(d)  # never fired: the query goes unanswered
            return d
        if name.lower() not in self.records:
            if any(dns._isSubdomainOf(name, z) for z in self.also):
                return defer.fail(failure.Failure(dns.AuthoritativeDomainError(name)))
            if not dns._isSubdomainOf(name, self.origin):
                return defer.fail(failure.Failure(error.DomainError(name)))
        return authority.FileAuthority._lookup(self, name, cls, type, timeout)


class LoopbackDNS:
    """The authority served over UDP and TCP on 127.0.0.1 (port 0 = any free port)."""

    def __init__(self, zone: dict[str, Any]) -> None:
        self.authority = MemoryAuthority(zone)
        self.factory = server.DNSServerFactory(authorities=[self.authority])
        self.port = 0
        self._listeners: list[Any] = []

    def start(self, reactor: Any, port: int = 0, interface: str = "127.0.0.1") -> int:
        """Listen and return the port (UDP and TCP share it)."""
        for _attempt in range(20):
            tcp = reactor.listenTCP(port, self.factory, interface=interface)
            bound: int = tcp.getHost().port
            try:
                udp = reactor.listenUDP(
                    bound, dns.DNSDatagramProtocol(self.factory), interface=interface
                )
            except Exception:
                tcp.stopListening()
                if port:
                    raise
                continue
            self._listeners = [tcp, udp]
            self.port = bound
            return bound
        raise RuntimeError("no free port for UDP and TCP")

    def stop(self) -> defer.Deferred[Any]:
        listeners, self._listeners = self._listeners, []
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in listeners])

    @property
    def nameserver(self) -> str:
        """``"127.0.0.1:PORT"``, the string form ``make_resolver`` takes."""
        return f"127.0.0.1:{self.port}"


def spawn_dns_server(zone_file: str, port: int = 0) -> tuple[subprocess.Popen[str], int]:
    """Run ``python -m mailsuite.testing.dns`` and wait for it; returns (process, port)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailsuite.testing.dns", "--port", str(port), "--zone", zone_file],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("ready "):
        proc.kill()
        raise RuntimeError(f"DNS server did not start: {line!r}")
    return proc, int(line.split()[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="loopback DNS server for tests")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--zone", required=True, help="JSON file (see module docstring)")
    parser.add_argument("--interface", default="127.0.0.1")
    args = parser.parse_args(argv)
    with Path(args.zone).open(encoding="utf-8") as f:
        zone = json.load(f)
    from twisted.internet import reactor

    dns_server = LoopbackDNS(zone)
    port = dns_server.start(reactor, args.port, args.interface)
    print(f"ready {port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
