"""DMARC (RFC 7489): the record, alignment, policy discovery and the result for a message.

Written here rather than taken from a library: the evaluation is small, and the libraries on
PyPI either do their own DNS (we must use the server's resolver, with its deadline) or fetch
the Public Suffix List at run time.  The organizational domain comes from the list that the
``publicsuffixlist`` package ships (read from disk once, never downloaded).

Discovery and evaluation are plain functions: DNS comes in as a ``txt(name) -> [str]`` callable
that raises :class:`~mailsuite.mailauth.dns.DNSTempError` (a :class:`BlockingDNS` in a worker
thread, or a dict in unit tests).
"""

from __future__ import annotations

import functools
import random
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from publicsuffixlist import PublicSuffixList

from mailsuite.mailauth.dns import DNSTempError

__all__ = [
    "DMARCError",
    "DMARCRecord",
    "DMARCResult",
    "Discovery",
    "aligned",
    "check_dmarc",
    "discover",
    "discover_all",
    "evaluate",
    "evaluate_all",
    "organizational_domain",
    "parse_record",
]

NONE, QUARANTINE, REJECT = "none", "quarantine", "reject"
POLICIES = (NONE, QUARANTINE, REJECT)
MAX_FROM_DOMAINS = 5  # distinct author domains evaluated; more is a permerror

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$")
_VERSION = re.compile(r"^\s*v\s*=\s*DMARC1\s*(;|$)")

_psl: PublicSuffixList | None = None
_psl_lock = threading.Lock()


def _public_suffixes() -> PublicSuffixList:
    """The shipped list, parsed once per process (~150 ms), on first use."""
    global _psl
    with _psl_lock:
        if _psl is None:
            _psl = PublicSuffixList()
        return _psl


@functools.lru_cache(maxsize=4096)
def organizational_domain(domain: str) -> str:
    """RFC 7489 3.2: the public suffix plus one label; a public suffix itself, or a name the
    list cannot place, is its own organizational domain.  Kept for the names last asked (the
    list does not change while the server runs): each message asks for its author domain and
    its signers' several times (DKIM order, alignment), ~15 us each from the list."""
    domain = domain.lower().rstrip(".")
    return _public_suffixes().privatesuffix(domain) or domain


def aligned(identifier: str, author: str, mode: str) -> bool:
    """RFC 7489 3.1: strict ("s") needs the same name, relaxed ("r") the same organizational
    domain."""
    a, b = identifier.lower().rstrip("."), author.lower().rstrip(".")
    if mode == "s":
        return a == b
    return a == b or organizational_domain(a) == organizational_domain(b)


class DMARCError(ValueError):
    """A TXT record that is not a usable DMARC record (RFC 7489 6.6.3 step 6)."""


@dataclass(frozen=True)
class DMARCRecord:
    """The tags of a DMARC record (RFC 7489 6.3) with their defaults; ``np`` is RFC 9091's
    policy for non-existent subdomains."""

    p: str
    sp: str | None = None
    np: str | None = None
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100
    rua: tuple[str, ...] = ()
    ruf: tuple[str, ...] = ()
    fo: str = "0"
    rf: str = "afrf"
    ri: int = 86400


def _uris(value: str) -> tuple[str, ...]:
    """``mailto:a@b.example!10m, https://...``: the URIs without size limits (RFC 7489 6.2)."""
    out = []
    for part in value.split(","):
        uri = part.strip().split("!", 1)[0].strip()
        if _URI.match(uri):
            out.append(uri)
    return tuple(out)


def parse_record(text: str) -> DMARCRecord:
    """Parse one DMARC TXT record (RFC 7489 6.3, 6.4).

    ``v=DMARC1`` must come first.  Unknown tags are ignored and a bad optional value falls back
    to its default (6.3: "syntax errors in the remainder of the record SHOULD be discarded").
    A missing or bad ``p`` (or a bad ``sp``) with a valid ``rua`` acts as ``p=none``; without
    one the record is unusable (6.6.3 step 6).
    """
    tags: list[tuple[str, str]] = []
    for part in text.split(";"):
        if not part.strip():
            continue
        name, eq, value = part.partition("=")
        if not eq:
            if not tags:
                raise DMARCError("the record does not start with v=DMARC1")
            continue
        tags.append((name.strip().lower(), value.strip()))
    if not tags or tags[0] != ("v", "DMARC1"):
        raise DMARCError("the record does not start with v=DMARC1")
    seen: dict[str, str] = {}
    for name, value in tags[1:]:
        seen.setdefault(name, value)  # the first of a repeated tag counts

    def policy(name: str) -> str | None:
        value = seen.get(name)
        if value is None:
            return None
        value = value.lower()
        return value if value in POLICIES else "invalid"

    def mode(name: str) -> str:
        value = seen.get(name, "r").lower()
        return value if value in ("r", "s") else "r"

    rua = _uris(seen.get("rua", ""))
    p, sp, np = policy("p"), policy("sp"), policy("np")
    if p in (None, "invalid") or sp == "invalid":
        if not rua:
            raise DMARCError("no valid p= tag (and no rua= to fall back to p=none)")
        p, sp = NONE, None
    if np == "invalid":
        np = None
    try:
        pct = int(seen.get("pct", "100"))
    except ValueError:
        pct = 100
    if not 0 <= pct <= 100:
        pct = 100
    try:
        ri = int(seen.get("ri", "86400"))
    except ValueError:
        ri = 86400
    return DMARCRecord(
        p=p,
        sp=sp,
        np=np,
        adkim=mode("adkim"),
        aspf=mode("aspf"),
        pct=pct,
        rua=rua,
        ruf=_uris(seen.get("ruf", "")),
        fo=seen.get("fo", "0"),
        rf=seen.get("rf", "afrf"),
        ri=ri,
    )


#: :func:`parse_record` kept for the records last seen (each message of a domain asks for the
#: same one; the record is immutable); a record that raises is parsed again each time.
_parsed = functools.lru_cache(maxsize=1024)(parse_record)


@dataclass(frozen=True)
class Discovery:
    """Where the policy for an author domain came from (RFC 7489 6.6.3).

    ``record`` None with ``temperror`` False means the domain has no DMARC policy.
    ``nonexistent`` is set when the author domain itself does not exist (RFC 9091 ``np``).
    """

    author: str
    record: DMARCRecord | None = None
    domain: str | None = None
    temperror: bool = False
    nonexistent: bool = False
    reason: str = ""


TxtLookup = Callable[[str], Sequence[str]]
ExistsLookup = Callable[[str], bool]


def _policy_record(txt: TxtLookup, domain: str) -> tuple[DMARCRecord | None, str]:
    """6.6.3 steps 1-4 at one name: exactly one v=DMARC1 record, else none."""
    texts = [t for t in txt(f"_dmarc.{domain}") if _VERSION.match(t)]
    if not texts:
        return None, ""
    if len(texts) > 1:
        return None, f"_dmarc.{domain} has {len(texts)} DMARC records (must be one)"
    try:
        return _parsed(texts[0]), ""
    except DMARCError as e:
        return None, f"_dmarc.{domain}: {e}"


def discover(author: str, txt: TxtLookup, exists: ExistsLookup | None = None) -> Discovery:
    """Find the policy for ``author``: at ``_dmarc.<author>``, else at the organizational
    domain (6.6.3).  DNS temporary failures give ``temperror``."""
    try:
        record, reason = _policy_record(txt, author)
        if record is not None:
            return Discovery(author, record, author)
        org = organizational_domain(author)
        if org == author:
            return Discovery(author, reason=reason or "no DMARC record")
        record, org_reason = _policy_record(txt, org)
        if record is None:
            return Discovery(author, reason=reason or org_reason or "no DMARC record")
        nonexistent = False
        if record.np is not None and exists is not None:
            nonexistent = not exists(author)
        return Discovery(author, record, org, nonexistent=nonexistent)
    except DNSTempError as e:
        return Discovery(author, temperror=True, reason=str(e))


@dataclass(frozen=True)
class DMARCResult:
    """The outcome for one message.

    ``result`` is an RFC 8601 value (pass, fail, none, temperror, permerror); ``policy`` the
    policy the domain asks for (p, sp or np), ``disposition`` what remains after ``pct``
    sampling (RFC 7489 6.6.4) and is what the receiver acts on.
    """

    result: str
    author: str = ""
    policy: str = NONE
    disposition: str = NONE
    record_domain: str | None = None
    spf_aligned: bool = False
    dkim_aligned: bool = False
    reason: str = ""
    authors: tuple[str, ...] = field(default_factory=tuple)


def _downgrade(policy: str) -> str:
    return {REJECT: QUARANTINE, QUARANTINE: NONE}.get(policy, NONE)


def evaluate(
    found: Discovery,
    spf_result: str | None,
    spf_domain: str | None,
    dkim_pass_domains: Sequence[str],
    rng: random.Random | None = None,
) -> DMARCResult:
    """RFC 7489 4.2 and 6.6.2-6.6.4 for one author domain.

    ``spf_domain`` is the domain SPF authenticated (MAIL FROM, or HELO for the null sender),
    ``dkim_pass_domains`` the d= of every DKIM signature that passed.
    """
    author = found.author
    if found.temperror:
        return DMARCResult("temperror", author, reason=found.reason, authors=(author,))
    record = found.record
    if record is None:
        return DMARCResult("none", author, reason=found.reason, authors=(author,))
    spf_ok = (
        spf_result == "pass" and spf_domain is not None and aligned(spf_domain, author, record.aspf)
    )
    dkim_ok = any(aligned(d, author, record.adkim) for d in dkim_pass_domains)
    if found.domain == author:
        policy = record.p
    elif found.nonexistent and record.np is not None:
        policy = record.np
    else:
        policy = record.sp or record.p
    if spf_ok or dkim_ok:
        return DMARCResult(
            "pass", author, policy, NONE, found.domain, spf_ok, dkim_ok, authors=(author,)
        )
    disposition = policy
    if record.pct < 100:
        chooser = rng if rng is not None else random.SystemRandom()
        if chooser.random() * 100 >= record.pct:
            disposition = _downgrade(policy)
    reason = "neither SPF nor DKIM aligned with the From domain"
    return DMARCResult(
        "fail", author, policy, disposition, found.domain, False, False, reason, authors=(author,)
    )


_SEVERITY = {NONE: 0, QUARANTINE: 1, REJECT: 2}


def discover_all(
    authors: Sequence[str] | None, txt: TxtLookup, exists: ExistsLookup | None = None
) -> list[Discovery] | DMARCResult:
    """The policy of every author domain (blocking DNS), or the permerror when the From field
    gives none to look up."""
    if not authors:
        return DMARCResult("permerror", reason="no usable From domain")
    if len(authors) > MAX_FROM_DOMAINS:
        return DMARCResult(
            "permerror", reason=f"more than {MAX_FROM_DOMAINS} From domains", authors=tuple(authors)
        )
    return [discover(a, txt, exists) for a in authors]


def evaluate_all(
    found: list[Discovery] | DMARCResult,
    spf_result: str | None,
    spf_domain: str | None,
    dkim_pass_domains: Sequence[str],
    rng: random.Random | None = None,
) -> DMARCResult:
    """Several author domains are each evaluated and the strictest outcome wins (RFC 7489
    6.6.1), so a second address in From cannot shield a forged first one."""
    if isinstance(found, DMARCResult):
        return found
    results = [evaluate(f, spf_result, spf_domain, dkim_pass_domains, rng) for f in found]
    if len(results) == 1:
        return results[0]
    rank = {"fail": 4, "temperror": 3, "permerror": 2, "none": 1, "pass": 0}
    worst = max(results, key=lambda r: (rank[r.result], _SEVERITY[r.disposition]))
    return DMARCResult(
        worst.result,
        worst.author,
        worst.policy,
        worst.disposition,
        worst.record_domain,
        worst.spf_aligned,
        worst.dkim_aligned,
        worst.reason,
        authors=tuple(f.author for f in found),
    )


def check_dmarc(
    authors: Sequence[str] | None,
    spf_result: str | None,
    spf_domain: str | None,
    dkim_pass_domains: Sequence[str],
    txt: TxtLookup,
    exists: ExistsLookup | None = None,
    rng: random.Random | None = None,
) -> DMARCResult:
    """DMARC for a message whose From field names ``authors`` (see headers.from_domains):
    :func:`discover_all` then :func:`evaluate_all`."""
    return evaluate_all(
        discover_all(authors, txt, exists), spf_result, spf_domain, dkim_pass_domains, rng
    )
