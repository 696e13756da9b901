"""SPF (RFC 7208) with pyspf, asking DNS through the server's resolver.

pyspf does its lookups through the module-level function ``spf.DNSLookup``; that function is
replaced here, once, by one that sends each query to the :class:`BlockingDNS` bound to the
calling worker thread.  A thread with nothing bound gets a temperror, so pyspf can never fall
back to a resolver of its own.  pyspf counts the limits of RFC 7208 4.6.4 itself (10 lookups
of include/a/mx/ptr/exists/redirect, 2 void lookups; both permerror), and the tests check it.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import threading
from dataclasses import dataclass
from typing import Any

import spf as pyspf
from twisted.logger import Logger

from mailsuite.mailauth.dns import (
    Answer,
    AnswerBoundCache,
    BlockingDNS,
    DNSTempError,
    normalize_name,
)

__all__ = ["SPFCache", "SPFResult", "check_spf"]

log = Logger(namespace="mailsuite.mailauth.spf")

#: RFC 7208 4.6.4: an SPF evaluation may be given up (temperror) after at least 20 seconds.
OVERALL_TIMEOUT = 20

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")

_bound = threading.local()
_HOSTNAME = re.compile(
    r"^[a-z0-9_](?:[a-z0-9_-]*[a-z0-9])?(?:\.[a-z0-9_](?:[a-z0-9_-]*"
    r"[a-z0-9])?)*$"
)


def _lookup(name: str, qtype: str, strict: Any = True, timeout: Any = None) -> list[Any]:
    """pyspf's DNS hook: ``[((name, type), value), ...]``; [] for NXDOMAIN and NODATA (void)."""
    dns: BlockingDNS | None = getattr(_bound, "dns", None)
    if dns is None:
        raise pyspf.TempError("DNS: no resolver bound to this thread")
    if qtype not in ("A", "AAAA", "MX", "PTR", "TXT"):
        return []  # type SPF (99) is obsolete (RFC 7208 3.1); nothing else is asked
    seen: list[tuple[str, str, Answer]] | None = getattr(_bound, "seen", None)
    try:
        answer = dns.lookup(name, qtype)
    except DNSTempError as e:
        if seen is not None:
            _bound.seen = None  # a result that met a temporary failure is not kept
        raise pyspf.TempError(f"DNS {e}") from None
    if seen is not None:
        seen.append((name, qtype, answer))
    if qtype == "TXT":
        return [((name, qtype), list(strings)) for strings in answer.records]
    return [((name, qtype), value) for value in answer.records]


pyspf.DNSLookup = _lookup


@dataclass(frozen=True)
class SPFResult:
    """``result`` is one of RESULTS; ``domain`` the domain checked; ``identity`` "mailfrom" or
    "helo" (RFC 7208 2.3/2.4); ``address`` the MAIL FROM address (or postmaster@HELO)."""

    result: str
    domain: str | None
    identity: str
    address: str
    reason: str = ""


class SPFCache(AnswerBoundCache[tuple[str, str, str], SPFResult]):
    """Results of check_host() kept as long as the DNS answers they were computed from.

    A result is a function of the client address, the sender, the HELO name and the DNS
    answers (RFC 7208 4), and nothing else but the time macro ``%{t}`` (7.2, explanations
    only).  Mail comes in runs from the same sender and address (a list, a provider's
    outbound host); pyspf costs ~0.15 ms of Python a message on the worker thread even when
    every answer is cached, where this costs a dictionary lookup.  A result is kept until the
    first of its answers leaves the DNS cache (:class:`~mailsuite.mailauth.dns
    .AnswerBoundCache`), so it is the one a new evaluation would give; one that met a
    temporary failure, an answer the cache did not keep, or a record with ``%{t}`` is not
    kept.
    """

    def put_result(
        self, key: tuple[str, str, str], result: SPFResult, seen: list[tuple[str, str, Answer]]
    ) -> None:
        """Keep ``result`` until the first of the answers in ``seen`` expires."""
        if result.result == "temperror":
            return
        for _name, qtype, answer in seen:
            if qtype == "TXT" and any(b"%{t" in t.lower() for t in answer.texts()):
                return
        self.put(key, result, seen)


@functools.lru_cache(maxsize=1024)
def _client_ip(ip: str) -> str | None:
    """The client address as pyspf takes it (kept: ``ipaddress`` parsing is most of what
    a cached result costs)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def check_spf(
    client_ip: str,
    mail_from: str,
    helo: str,
    dns: BlockingDNS,
    timeout: float = OVERALL_TIMEOUT,
    cache: SPFCache | None = None,
) -> SPFResult:
    """check_host() for MAIL FROM, or for the HELO name when the sender is null (RFC 7208
    2.4), or the same result from ``cache`` while its DNS answers are.  Blocks on DNS: call
    it in a worker thread."""
    if mail_from:
        identity = "mailfrom"
        local, _, domain = mail_from.rpartition("@")
        address = mail_from
    else:
        identity = "helo"
        local, domain = "postmaster", helo.strip()  # RFC 7208 2.3
        address = f"postmaster@{domain}"
    clean = normalize_name(domain)
    ip = _client_ip(client_ip)
    if clean is None or "." not in clean or not _HOSTNAME.match(clean):
        # RFC 7208 4.3: a malformed or single-label domain (or an address literal) -> none
        return SPFResult("none", clean or domain or None, identity, address, "no checkable domain")
    if ip is None:
        return SPFResult("temperror", clean, identity, address, f"bad client address {client_ip!r}")
    key = (ip, f"{local or 'postmaster'}@{clean}", helo or clean)  # what pyspf is given
    if cache is not None:
        found = cache.get(key)
        if found is not None:
            if found.domain == clean and found.address == address and found.identity == identity:
                return found  # (the result kept is the one for these very inputs)
            return SPFResult(found.result, clean, identity, address, found.reason)
    _bound.dns = dns
    _bound.seen = [] if cache is not None else None
    try:
        query = pyspf.query(i=key[0], s=key[1], h=key[2], querytime=timeout)
        result, _code, explanation = query.check()
    except Exception as e:  # a library fault must not lose the message
        log.error(
            "SPF check of {domain} for {ip} failed inside pyspf: {error!r}",
            domain=clean,
            ip=ip,
            error=e,
        )
        return SPFResult("temperror", clean, identity, address, "internal error")
    finally:
        _bound.dns = None
        seen, _bound.seen = _bound.seen, None
    result = str(result).lower()
    if result not in RESULTS:
        result = "temperror"
    out = SPFResult(result, clean, identity, address, str(explanation or ""))
    if cache is not None and seen is not None and not dns.missed():
        # (after a miss in BlockingDNS.cached_only, pyspf may have made a result of it)
        cache.put_result(key, out, seen)
    return out
