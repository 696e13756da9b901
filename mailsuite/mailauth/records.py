"""The DNS records a mail domain needs, and a doctor that compares them with what DNS says.

``expected_records`` is the list ``mailsuite dns records DOMAIN`` prints as zone-file lines: MX,
the server name's addresses (when known), SPF, DKIM per selector, DMARC (p=quarantine, reports
to postmaster), SRV for client set-up (RFC 6186, and RFC 8314 for implicit-TLS submission;
"0 0 0 ." for a service that is not offered) and the PTR to ask the hosting provider for.
:class:`Doctor` asks DNS, through the server's resolver settings, about each and says ok,
missing or different, with the change to make (``mailsuite dns check DOMAIN``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from dkim.util import InvalidTagValueList, parse_tag_value
from twisted.internet import defer

from mailsuite.config import Config
from mailsuite.mailauth.dkim_keys import DKIMKey, zone_txt
from mailsuite.mailauth.dmarc import DMARCError, parse_record
from mailsuite.mailauth.dns import Answer, BlockingDNS, DNSClient, DNSTempError
from mailsuite.mailauth.inbound import first_key_record
from mailsuite.mailauth.spf import check_spf
from mailsuite.mailauth.workers import WorkerPool

__all__ = ["Doctor", "Expected", "Finding", "expected_records", "listen_port"]

OK, MISSING, DIFFERENT, ERROR = "ok", "missing", "different", "error"

#: (config service, SRV owner label), in the order clients should prefer them (RFC 8314 5.1)
SRV_SERVICES = (
    ("submissions", "_submissions._tcp"),
    ("submission", "_submission._tcp"),
    ("imaps", "_imaps._tcp"),
    ("imap", "_imap._tcp"),
    ("pop3s", "_pop3s._tcp"),
    ("pop3", "_pop3._tcp"),
)


@dataclass(frozen=True)
class Expected:
    """One record to publish.  ``required`` False: reported, but not counted as wrong."""

    kind: str  # MX, A, AAAA, SPF, DKIM, DMARC, SRV, PTR
    owner: str  # with the final dot
    rtype: str
    value: str  # zone-file presentation of the data ("" for "any address")
    required: bool = True
    note: str = ""

    def zone_line(self) -> str:
        if self.rtype == "TXT":
            return zone_txt(self.owner, self.value)
        return f"{self.owner} IN {self.rtype} {self.value}"


@dataclass(frozen=True)
class Finding:
    expected: Expected
    status: str  # ok, missing, different, error
    found: str = ""
    advice: str = ""

    @property
    def wrong(self) -> bool:
        return self.status != OK and self.expected.required


def listen_port(desc: str) -> tuple[int | None, bool]:
    """(port, loopback only) of a server endpoint description such as ``tcp:587`` or
    ``tcp:2587:interface=127.0.0.1``; port None when the description does not say."""
    parts = desc.split(":")
    if parts[0] not in ("tcp", "tcp6", "ssl") or len(parts) < 2:
        return None, False
    port_text = parts[1].split("=", 1)[1] if parts[1].startswith("port=") else parts[1]
    loopback = False
    for part in parts[2:]:
        key, _, value = part.partition("=")
        if key == "interface":
            try:
                loopback = ipaddress.ip_address(value.strip("[]")).is_loopback
            except ValueError:
                loopback = value == "localhost"
    return (int(port_text) if port_text.isdigit() else None), loopback


def _fqdn(name: str) -> str:
    return name.rstrip(".") + "."


def expected_records(
    config: Config,
    domain: str,
    keys: Sequence[DKIMKey],
    signing: dict[str, str],
    addresses: Sequence[str] = (),
) -> list[Expected]:
    """Everything ``domain`` needs for mail to and from this server.  ``addresses`` are the
    server's public addresses (``--ip``); without them A/AAAA and PTR cannot be written out."""
    host = _fqdn(config.hostname)
    d = _fqdn(domain)
    out = [Expected("MX", d, "MX", f"10 {host}")]
    for address in addresses:
        rtype = "AAAA" if ipaddress.ip_address(address).version == 6 else "A"
        out.append(Expected(rtype, host, rtype, address))
    spf_note = ""
    if config.relay.smarthost:
        spf_note = (
            f"mail leaves through the smarthost {config.relay.smarthost}: add its SPF "
            "include (see the provider's documentation) before -all"
        )
    out.append(Expected("SPF", d, "TXT", "v=spf1 mx -all", note=spf_note))
    for key in keys:
        signs = signing.get(key.kind) == key.selector
        out.append(
            Expected(
                "DKIM",
                key.owner,
                "TXT",
                key.record(),
                required=signs,
                note=""
                if signs
                else "not signing: keep it published while mail "
                "signed with it may still be checked, then remove it",
            )
        )
    out.append(
        Expected(
            "DMARC", f"_dmarc.{d}", "TXT", f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}"
        )
    )
    for service, label in SRV_SERVICES:
        descs = config.listen.get(service, ())
        ports = [listen_port(x) for x in descs]
        public = [p for p, loop in ports if p is not None and not loop]
        local = [p for p, loop in ports if p is not None and loop]
        chosen = public or local
        port = chosen[0] if chosen else None
        if port is None:
            note = (
                "not offered (RFC 6186: target '.' says so)"
                if not descs
                else "listens on a socket whose port is not known here"
            )
            out.append(Expected("SRV", f"{label}.{d}", "SRV", "0 0 0 .", required=False, note=note))
            continue
        note = "" if public else f"[listen] {service} is bound to loopback only"
        out.append(Expected("SRV", f"{label}.{d}", "SRV", f"0 1 {port} {host}", note=note))
    for address in addresses:
        reverse = ipaddress.ip_address(address).reverse_pointer
        out.append(
            Expected(
                "PTR",
                _fqdn(reverse),
                "PTR",
                host,
                note="set by whoever owns the address: ask your hosting provider",
            )
        )
    return out


def _quote(texts: Sequence[str]) -> str:
    return ", ".join(f'"{t}"' for t in texts)


class Doctor:
    """Checks each :class:`Expected` against DNS (on the reactor; SPF in a worker)."""

    def __init__(
        self, config: Config, client: DNSClient, workers: WorkerPool, blocking: BlockingDNS
    ) -> None:
        self.config = config
        self.client = client
        self.workers = workers
        self.blocking = blocking
        self.host = config.hostname.rstrip(".").lower()

    async def _lookup(self, name: str, qtype: str) -> Answer:
        return await self.client.lookup(name, qtype)

    async def check(
        self, domain: str, expected: list[Expected], addresses: Sequence[str]
    ) -> list[Finding]:
        """Findings in the order of ``expected``; with no ``addresses`` given, the server
        name's A/AAAA records found in DNS stand in for them (for SPF and PTR)."""
        findings: list[Finding] = []
        known = list(addresses)
        if not addresses:
            finding, known = await self._any_address()
            findings.append(finding)
            for address in known:
                reverse = ipaddress.ip_address(address).reverse_pointer
                expected.append(
                    Expected(
                        "PTR",
                        _fqdn(reverse),
                        "PTR",
                        _fqdn(self.host),
                        note="set by whoever owns the address: ask your hosting provider",
                    )
                )
        for e in expected:
            try:
                findings.append(await self._one(domain, e, known))
            except DNSTempError as err:
                findings.append(
                    Finding(
                        e,
                        ERROR,
                        advice=f"DNS did not answer ({err}); try again, or check [dns] nameservers",
                    )
                )
        return findings

    async def _any_address(self) -> tuple[Finding, list[str]]:
        e = Expected("A", _fqdn(self.host), "A", "", note="the name in [server] hostname")
        try:
            v4 = await self._lookup(self.host, "A")
            v6 = await self._lookup(self.host, "AAAA")
        except DNSTempError as err:
            return Finding(e, ERROR, advice=f"DNS did not answer ({err})"), []
        found = list(v4.records) + list(v6.records)
        if not found:
            return Finding(
                e,
                MISSING,
                advice=f"publish the server's public address: "
                f"{_fqdn(self.host)} IN A <address> (and AAAA for IPv6); "
                "give --ip ADDRESS to check SPF and PTR against it",
            ), []
        return Finding(e, OK, ", ".join(found)), found

    async def _one(self, domain: str, e: Expected, addresses: Sequence[str]) -> Finding:
        if e.kind == "MX":
            return await self._mx(domain, e)
        if e.kind in ("A", "AAAA"):
            return await self._address(e)
        if e.kind == "SPF":
            return await self._spf(domain, e, addresses)
        if e.kind == "DKIM":
            return await self._dkim(e)
        if e.kind == "DMARC":
            return await self._dmarc(e)
        if e.kind == "SRV":
            return await self._srv(e)
        return await self._ptr(e)

    async def _mx(self, domain: str, e: Expected) -> Finding:
        answer = await self._lookup(domain, "MX")
        found = ", ".join(f"{p} {h or '.'}" for p, h in sorted(answer.records))
        if any(h == self.host for _p, h in answer.records):
            return Finding(e, OK, found)
        if not answer.records:
            return Finding(e, MISSING, advice=f"publish: {e.zone_line()}")
        return Finding(
            e,
            DIFFERENT,
            found,
            f"mail for {domain} goes to {found}, not to this server; change to: {e.zone_line()}",
        )

    async def _address(self, e: Expected) -> Finding:
        answer = await self._lookup(e.owner, e.rtype)
        if e.value in answer.records:
            return Finding(e, OK, e.value)
        if not answer.records:
            return Finding(e, MISSING, advice=f"publish: {e.zone_line()}")
        return Finding(
            e, DIFFERENT, ", ".join(answer.records), f"change to (or add): {e.zone_line()}"
        )

    async def _spf(self, domain: str, e: Expected, addresses: Sequence[str]) -> Finding:
        texts = [t.decode("utf-8", "replace") for t in (await self._lookup(domain, "TXT")).texts()]
        records = [
            t for t in texts if t.lower().startswith("v=spf1") and (len(t) == 6 or t[6] == " ")
        ]
        if not records:
            return Finding(e, MISSING, advice=f"publish: {e.zone_line()}")
        if len(records) > 1:
            return Finding(
                e,
                DIFFERENT,
                _quote(records),
                "more than one SPF record is a "
                f"permerror everywhere (RFC 7208 4.5); merge them into one, e.g. "
                f"{e.zone_line()}",
            )
        if not addresses:
            if records[0] == e.value:
                return Finding(e, OK, _quote(records))
            return Finding(
                e,
                DIFFERENT,
                _quote(records),
                "cannot test it without the server's "
                f"address (give --ip); the suggested record is {e.zone_line()}",
            )
        refused = []
        for address in addresses:
            r = await self.workers.run(
                check_spf, address, f"postmaster@{domain}", self.host, self.blocking
            )
            if r.result != "pass":
                refused.append(f"{address} ({r.result})")
        if refused:
            return Finding(
                e,
                DIFFERENT,
                _quote(records),
                "it does not let this server send: "
                f"{', '.join(refused)}; change to: {e.zone_line()}",
            )
        return Finding(e, OK, _quote(records))

    async def _dkim(self, e: Expected) -> Finding:
        record = first_key_record((await self._lookup(e.owner, "TXT")).texts())
        if record is None:
            return Finding(e, MISSING, advice=f"publish: {e.zone_line()}")
        text = record.decode("utf-8", "replace")
        try:
            tags = parse_tag_value(record)
        except (InvalidTagValueList, ValueError, IndexError):
            tags = {}
        ours = parse_tag_value(e.value.encode())
        same_key = b"".join(tags.get(b"p", b"").split()) == ours[b"p"]
        same_kind = tags.get(b"k", b"rsa").strip() == ours[b"k"]
        if same_key and same_kind:
            return Finding(e, OK, f'"{text[:60]}..."')
        return Finding(
            e,
            DIFFERENT,
            f'"{text[:60]}..."',
            f"the published key is not this selector's key; replace it with: {e.zone_line()}",
        )

    async def _dmarc(self, e: Expected) -> Finding:
        texts = [t.decode("utf-8", "replace") for t in (await self._lookup(e.owner, "TXT")).texts()]
        records = [t for t in texts if t.replace(" ", "").startswith("v=DMARC1")]
        if not records:
            return Finding(e, MISSING, advice=f"publish: {e.zone_line()}")
        if len(records) > 1:
            return Finding(
                e,
                DIFFERENT,
                _quote(records),
                f"receivers ignore a domain with several DMARC records; keep one: {e.zone_line()}",
            )
        try:
            record = parse_record(records[0])
        except DMARCError as err:
            return Finding(e, DIFFERENT, _quote(records), f"{err}; change to: {e.zone_line()}")
        if record.p == "none":
            return Finding(
                e,
                DIFFERENT,
                _quote(records),
                "p=none only monitors: spoofed mail "
                "is still delivered; once the reports show your own mail passing, "
                f"change to: {e.zone_line()}",
            )
        return Finding(e, OK, _quote(records))

    async def _srv(self, e: Expected) -> Finding:
        answer = await self._lookup(e.owner, "SRV")
        found = ", ".join(f"{p} {w} {port} {t or '.'}" for p, w, port, t in answer.records)
        _priority, _weight, port_text, target = e.value.split()
        target = target.rstrip(".").lower()
        if any(port == int(port_text) and t == target for _p, _w, port, t in answer.records):
            return Finding(e, OK, found)
        if not answer.records:
            return Finding(e, MISSING, advice=f"publish: {e.zone_line()}")
        return Finding(e, DIFFERENT, found, f"change to: {e.zone_line()}")

    async def _ptr(self, e: Expected) -> Finding:
        answer = await self._lookup(e.owner, "PTR")
        if self.host in answer.records:
            return Finding(e, OK, self.host)
        advice = (
            f"ask the provider of this address to set its reverse DNS to {self.host} "
            f"({e.zone_line()}); many receivers refuse mail without it"
        )
        if not answer.records:
            return Finding(e, MISSING, advice=advice)
        return Finding(e, DIFFERENT, ", ".join(answer.records), advice)


async def run_checks(
    config: Config, domain: str, expected: list[Expected], addresses: Sequence[str], reactor: object
) -> list[Finding]:
    """Build the DNS client and a small worker pool, check, and stop the pool."""
    from mailsuite.mailauth.dns import server_resolver

    client = DNSClient(
        server_resolver(config.nameservers, reactor), reactor, timeout=config.dns.timeout
    )
    workers = WorkerPool(reactor, 2, name="dns-check")
    workers.startService()
    try:
        doctor = Doctor(config, client, workers, BlockingDNS(client, reactor, lane=workers.lane))
        return await doctor.check(domain, expected, addresses)
    finally:
        await defer.maybeDeferred(workers.stopService)
