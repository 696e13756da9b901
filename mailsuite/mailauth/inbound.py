"""The verdict on one message received on the MX listener: SPF, DKIM, ARC and DMARC together.

The SMTP policy calls :meth:`InboundChecker.check_message` at the end of DATA, before it
answers.  Where the checks run:

- **On the reactor, at once**, when they cannot wait for anything: the message is in memory
  and small (``INLINE_MAX_BYTES``), it has few ARC sets, every DNS answer the checks ask for
  is in the cache (:meth:`BlockingDNS.cached_only`: the first miss abandons the attempt,
  nothing computed after it is used or kept), and the reactor has not spent its budget of
  such work lately (``INLINE_BUDGET`` per ``INLINE_WINDOW``, which bounds the longest stall).
  That is the usual message from a sender seen in the last minutes: about 0.6 ms of CPU
  in a loop (the DKIM common case is ours, RSA and Ed25519 by OpenSSL and libsodium), about
  0.9 ms of the reactor thread's CPU between a loaded server's other work (caches the
  sessions and the disk threads went through, GIL hand-overs).  A worker job costs about
  the same in all (per-thread CPU under bench/mailauth_smtp.py: ~0.8 ms in the worker and
  ~0.3 ms of hand-over on the reactor); sending most messages to the pool (a budget of 0
  or 1 ms) gave 0.71x, 0.77x, 0.77x, 0.69x and 0.69x of checks off against this budget's
  0.68x, 0.68x, 0.70x, 0.75x and 0.82x in the same five runs (interleaved): no gain.
- **In the mail-auth worker pool** otherwise, one job per message, its DNS questions asked
  together at its start so the waits overlap (SPF, DKIM keys and the DMARC policy are
  different names).  The reactor never waits for DNS.

Only the cheap combination of the results runs on the reactor either way.  The
:class:`Verdict` says what to do:

- ``accept``: deliver, with the Authentication-Results header on top;
- ``quarantine``: deliver to the recipients' Junk folder (DMARC p=quarantine, or p=reject with
  ``[mail_auth] dmarc_reject = "quarantine"``);
- ``reject``: answer ``550 5.7.26`` (RFC 7372 3.2) and keep no copy (DMARC p=reject).

Temporary DNS failures never reject (RFC 7489 6.6.3: temperror, deliver).  Neither does a
fault of our own: a check that raises is logged and reported as temperror.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailsuite.config import MailAuthConfig
from mailsuite.mailauth import dmarc as dmarc_mod
from mailsuite.mailauth.arc import ARCResult, verify_arc
from mailsuite.mailauth.dkim_verify import DKIMResult, key_names, verify_dkim
from mailsuite.mailauth.dmarc import MAX_FROM_DOMAINS, Discovery, DMARCResult
from mailsuite.mailauth.dns import Answer, AnswerBoundCache, BlockingDNS, DNSTempError, NotCached
from mailsuite.mailauth.headers import Field, fields, from_domains_in, header_section
from mailsuite.mailauth.results import results_header, strip_forged_results
from mailsuite.mailauth.spf import SPFCache, SPFResult, check_spf
from mailsuite.mailauth.workers import WorkerPool
from mailsuite.smtp.replies import Reply

__all__ = [
    "ACCEPT",
    "QUARANTINE",
    "REJECT",
    "AuthResults",
    "InboundChecker",
    "Verdict",
    "decide",
    "first_key_record",
]

log = Logger(namespace="mailsuite.mailauth.inbound")

ACCEPT, QUARANTINE, REJECT = "accept", "quarantine", "reject"

#: Checks run on the reactor only for messages up to this size (the body hash is linear in
#: it: about 1 ms for 256 KiB), held in memory (a file would mean disk I/O on the reactor).
INLINE_MAX_BYTES = 256 * 1024
#: ... with at most this many ARC sets (each is a dkimpy verification of two signatures).
INLINE_MAX_ARC_SETS = 2
#: ... while the reactor has spent less than INLINE_BUDGET seconds on them in the current
#: INLINE_WINDOW: a burst of messages cannot hold it for longer than about the budget (the
#: rest go to the worker pool), far under the 50 ms stall aim of issue 12.
INLINE_BUDGET = 0.01
INLINE_WINDOW = 0.05
#: Verdicts kept by their results (see InboundChecker._verdict); all go when it is full.
VERDICTS_KEPT = 1024
#: From domains whose DMARC policies are kept (see InboundChecker._discover).
DMARC_KEPT = 1024


def dmarc_rejected(domain: str) -> Reply:
    """RFC 7372 3.2 / RFC 7489 7.3: the reply for a DMARC p=reject failure."""
    return Reply(
        550,
        "5.7.26",
        f"Unauthenticated mail from {domain} refused: it fails DMARC "
        "and the domain's policy is reject",
    )


@dataclass(frozen=True)
class AuthResults:
    """Each method's outcome; None when that check is turned off."""

    spf: SPFResult | None = None
    dkim: list[DKIMResult] | None = None
    dkim_unchecked: int = 0
    dmarc: DMARCResult | None = None
    arc: ARCResult | None = None


@dataclass(frozen=True)
class Verdict:
    """What the SMTP layer does with the message (see the module docstring).

    ``header`` is the Authentication-Results field (LF line ends, the stored form) to put at
    the top; :meth:`rewrite_header_section` also drops the forged ones.
    """

    action: str
    header: bytes
    authserv_id: str
    results: AuthResults = field(default_factory=AuthResults)
    reply: Reply | None = None

    def rewrite_header_section(self, section: bytes) -> bytes:
        """``section`` (a header section, CRLF or LF) with every Authentication-Results of our
        authserv-id removed and ours prepended, in the section's own line ends."""
        stripped, _ = strip_forged_results(section, self.authserv_id)
        header = self.header
        if b"\r\n" in section[:2000]:
            header = header.replace(b"\n", b"\r\n")
        return header + stripped

    def apply(self, message: bytes) -> bytes:
        """The whole message rewritten (for callers that hold it in memory)."""
        section = header_section(message)
        return self.rewrite_header_section(section) + message[len(section) :]


def decide(results: AuthResults, config: MailAuthConfig) -> tuple[str, Reply | None]:
    """The action for a message from its results (only DMARC acts; RFC 7489 6.7)."""
    d = results.dmarc
    if d is None or d.result != "fail":
        return ACCEPT, None
    if d.disposition == dmarc_mod.REJECT:
        if config.dmarc_reject == "reject":
            return REJECT, dmarc_rejected(d.author)
        return QUARANTINE, None
    if d.disposition == dmarc_mod.QUARANTINE:
        return QUARANTINE, None
    return ACCEPT, None


def first_key_record(texts: list[bytes]) -> bytes | None:
    """The DKIM key record among the TXT records at a selector name: the one starting with
    v=DKIM1, else the first (RFC 6376 3.6.2.2 leaves several undefined)."""
    for t in texts:
        if t.lstrip().startswith(b"v=DKIM1"):
            return t
    return texts[0] if texts else None


class InboundChecker:
    """Runs the checks of ``config`` (``[mail_auth]``) for the server named ``authserv_id``.

    ``dns`` is the blocking facade the worker threads use; ``rng`` decides DMARC pct sampling
    (a seeded ``random.Random`` in tests).
    """

    def __init__(
        self,
        config: MailAuthConfig,
        authserv_id: str,
        workers: WorkerPool,
        dns: BlockingDNS,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.authserv_id = authserv_id
        self.workers = workers
        self.dns = dns
        self.rng = rng
        self.spf_cache = SPFCache(dns.client)
        #: the DMARC policies of From domains (see _discover), each with at most
        #: _Discovered.KEPT evaluations: at most DMARC_KEPT * KEPT results in memory
        self.dmarc_cache: AnswerBoundCache[tuple[str, ...], list[Discovery]] = AnswerBoundCache(
            dns.client, DMARC_KEPT
        )
        self._verdicts: dict[tuple[Any, ...], Verdict] = {}  # see _verdict (reactor only)
        # the inline budget's current window (see check_inline), and counts for tests
        self._window_start = 0.0
        self._window_used = 0.0
        self.inline_checked = 0
        self.inline_missed = 0

    # -- blocking helpers handed to dkimpy, pyspf and DMARC ------------------------------------

    def _key_record(self, name: str) -> bytes | None:
        return first_key_record(self.dns.txt(name))

    def _texts(self, name: str) -> list[str]:
        return [t.decode("utf-8", "replace") for t in self.dns.txt(name)]

    def _exists(self, name: str) -> bool:
        """RFC 9091 4: a name that answers NXDOMAIN does not exist (NODATA means it does)."""
        try:
            return not self.dns.lookup(name, "A").nxdomain
        except DNSTempError:
            return True

    def _discover(self, authors: list[str] | None) -> list[Discovery] | DMARCResult:
        """:func:`~mailsuite.mailauth.dmarc.discover_all`, or its result for the same From
        domains from ``dmarc_cache``: a discovery is a function of the author domains and
        the DNS answers it read (RFC 7489 6.6.3, RFC 9091 4), so it is kept while all of
        those answers are in the DNS cache.  One that met a temporary failure (or a miss of
        :meth:`BlockingDNS.cached_only`) is not kept.  The list is shared: read-only."""
        if not authors or len(authors) > MAX_FROM_DOMAINS:  # (a permerror; no DNS)
            return dmarc_mod.discover_all(authors, self._texts, self._exists)
        key = tuple(authors)
        found = self.dmarc_cache.get(key)
        if found is not None:
            return found
        seen: list[tuple[str, str, Answer]] = []
        temporary = False

        def texts(name: str) -> list[str]:
            answer = self.dns.lookup(name, "TXT")  # (DNSTempError: a temperror Discovery)
            seen.append((name, "TXT", answer))
            return [t.decode("utf-8", "replace") for t in answer.texts()]

        def exists(name: str) -> bool:
            nonlocal temporary
            try:
                answer = self.dns.lookup(name, "A")
            except DNSTempError:
                temporary = True
                return True
            seen.append((name, "A", answer))
            return not answer.nxdomain

        discovered = dmarc_mod.discover_all(authors, texts, exists)
        if (
            isinstance(discovered, list)
            and not temporary
            and not self.dns.missed()
            and not any(d.temperror for d in discovered)
        ):
            kept = _Discovered(discovered)
            if self.dmarc_cache.put(key, kept, seen):
                return kept
        return discovered

    # -- the entry point -----------------------------------------------------------------------

    def check_message(
        self,
        message: bytes | Path,
        mail_from: str,
        helo: str,
        client_ip: str,
        inline: bool = True,
    ) -> Deferred[Verdict]:
        """Check one message (its bytes, or the file holding it) received from ``client_ip``
        after ``HELO helo`` / ``MAIL FROM:<mail_from>`` ("" for the null sender): at once
        when it can be (see the module docstring; the Deferred has fired), else in the
        worker pool.  ``inline=False``: straight to the pool (:meth:`check_now` was tried)."""
        if inline and isinstance(message, bytes):
            verdict = self.check_now(message, mail_from, helo, client_ip)
            if verdict is not None:
                return defer.succeed(verdict)
        return defer.ensureDeferred(self._check(message, mail_from, helo, client_ip))

    def check_now(
        self, message: bytes, mail_from: str, helo: str, client_ip: str
    ) -> Verdict | None:
        """The verdict on ``message`` computed in this thread when :meth:`check_inline` can,
        else None (then :meth:`check_message` with ``inline=False``).  For the SMTP server's
        end of data: a message judged at once needs no coroutine, Deferred or reactor turn."""
        checked = self.check_inline(message, mail_from, helo, client_ip)
        return None if checked is None else self._verdict(checked)

    def check_inline(
        self, message: bytes, mail_from: str, helo: str, client_ip: str
    ) -> _Checked | None:
        """The checks of ``message`` run in this thread (the reactor's) from cached DNS
        answers only, or None when they must go to the worker pool: too big, too many ARC
        sets, the inline budget spent, or an answer not in the cache."""
        if len(message) > INLINE_MAX_BYTES:
            return None
        started = time.perf_counter()
        if started - self._window_start >= INLINE_WINDOW:
            self._window_start, self._window_used = started, 0.0
        elif self._window_used >= INLINE_BUDGET:
            return None
        section = header_section(message)
        split = fields(section)  # once: every check of the message reads it
        if self.config.arc:
            seals = sum(1 for f in split if f.lname == "arc-seal")
            if seals > INLINE_MAX_ARC_SETS:
                return None
        try:
            with self.dns.cached_only() as probe:
                checked = self._run(message, section, split, mail_from, helo, client_ip, True)
        except NotCached:
            checked = None
        finally:
            self._window_used += time.perf_counter() - started
        if checked is None or probe.missed:  # (a library's bare except may have eaten it)
            self.inline_missed += 1
            return None
        self.inline_checked += 1
        return checked

    async def _check(
        self, message: bytes | Path, mail_from: str, helo: str, client_ip: str
    ) -> Verdict:
        try:
            checked = await self.workers.run(self._checks, message, mail_from, helo, client_ip)
        except Exception as e:  # a stopped pool, an unreadable file: temperror
            checked = self._fallback(mail_from, f"{type(e).__name__}: {e}")
        return self._verdict(checked)

    def _verdict(self, checked: _Checked) -> Verdict:
        """The combination of a message's results, on the reactor: DMARC, the action, our
        Authentication-Results field."""
        c = self.config
        for what, error in checked.faults:
            log.error("{what} check failed: {error}", what=what, error=error)
        spf, dkim_results, unchecked, arc, found = (
            checked.spf,
            checked.dkim,
            checked.unchecked,
            checked.arc,
            checked.dmarc,
        )
        dmarc = None
        if found is not None:
            passed = tuple(r.domain for r in dkim_results or () if r.result == "pass")
            dmarc = self._evaluate(found, spf, passed)
        # the rest is a function of the results (frozen, compared by value) and the config:
        # the same senders get the same results again, and their verdict is made once
        key = (spf, None if dkim_results is None else tuple(dkim_results), unchecked, dmarc, arc)
        verdict = self._verdicts.get(key)
        if verdict is None:
            results = AuthResults(spf, dkim_results, unchecked, dmarc, arc)
            action, reply = decide(results, c)
            header = results_header(self.authserv_id, spf, dkim_results, dmarc, arc, unchecked)
            verdict = Verdict(action, header, self.authserv_id, results, reply)
            if len(self._verdicts) >= VERDICTS_KEPT:
                self._verdicts.clear()
            self._verdicts[key] = verdict
        return verdict

    def _evaluate(
        self,
        found: list[Discovery] | DMARCResult,
        spf: SPFResult | None,
        passed: tuple[str, ...],
    ) -> DMARCResult:
        """:func:`~mailsuite.mailauth.dmarc.evaluate_all`, or the same evaluation kept with a
        discovery from ``dmarc_cache`` (see :class:`_Discovered`).  On the reactor only."""
        spf_result, spf_domain = (spf.result, spf.domain) if spf is not None else (None, None)
        memo = found.evaluated if isinstance(found, _Discovered) else None
        if memo is None:
            return dmarc_mod.evaluate_all(found, spf_result, spf_domain, passed, self.rng)
        key = (spf_result, spf_domain, passed)
        result = memo.get(key)
        if result is None:
            if len(memo) >= _Discovered.KEPT:
                memo.clear()
            result = memo[key] = dmarc_mod.evaluate_all(found, spf_result, spf_domain, passed)
        return result

    def _checks(self, message: bytes | Path, mail_from: str, helo: str, client_ip: str) -> _Checked:
        """Every check of one message, in one worker job (blocking), or on the reactor from
        cached answers only (:meth:`check_inline`).

        One job, not one per check: each hand-over between the reactor and a worker costs
        the reactor thread more than a cached DNS answer does.  The DNS names the checks will
        ask for are asked all at once first (:meth:`BlockingDNS.prefetch`), so the lookups of
        an uncached sender still overlap.  A check that raises (a bug of ours or a library's)
        becomes its temperror, noted in ``faults`` for the reactor to log: the message is
        delivered, not lost or rejected.
        """
        data = message if isinstance(message, bytes) else message.read_bytes()
        section = header_section(data)
        return self._run(data, section, fields(section), mail_from, helo, client_ip, False)

    def _run(
        self,
        data: bytes,
        section: bytes,
        split: list[Field],
        mail_from: str,
        helo: str,
        client_ip: str,
        inline: bool,
    ) -> _Checked:
        """:meth:`_checks` of a message whose header section is split already (once, for
        every check).  ``inline``: from cached answers only (:meth:`check_inline`), where
        a prefetch would only peek at the cache twice."""
        c = self.config
        out = _Checked()
        authors = from_domains_in(split)
        if not inline:
            questions: list[tuple[str, str]] = []
            if c.spf:
                domain = mail_from.rpartition("@")[2] if mail_from else helo.strip()
                questions.append((domain, "TXT"))
            if c.dkim:
                questions += [(n, "TXT") for n in key_names(section, c.max_signatures, split)]
            if c.dmarc:
                questions += [(f"_dmarc.{a}", "TXT") for a in authors or ()][:MAX_FROM_DOMAINS]
            self.dns.prefetch(questions)
        if c.spf:
            try:
                out.spf = check_spf(client_ip, mail_from, helo, self.dns, cache=self.spf_cache)
            except Exception as e:  # see the docstring
                out.spf = self._fault(out, "SPF", e, mail_from).spf
        if c.dkim:
            try:
                out.dkim, out.unchecked = verify_dkim(
                    data,
                    self._key_record,
                    c.max_signatures,
                    prefer=_Aligned(authors),
                    split=split,
                )
            except Exception as e:
                out.dkim, out.unchecked = self._fault(out, "DKIM", e, mail_from).dkim, 0
        if c.arc:
            try:
                out.arc = verify_arc(data, self._key_record, split=split)
            except Exception as e:
                out.arc = self._fault(out, "ARC", e, mail_from).arc
        if c.dmarc:
            try:
                out.dmarc = self._discover(authors)
            except Exception as e:
                out.dmarc = self._fault(out, "DMARC", e, mail_from).dmarc
        return out

    def _fault(self, out: _Checked, what: str, e: Exception, mail_from: str) -> _Checked:
        """A check raised: noted in ``out.faults`` for the reactor to log; the temperror
        results to take the failed check's from (made only when one fails)."""
        out.faults.append((what, f"{type(e).__name__}: {e}"))
        return self._fallback(mail_from, "")

    def _fallback(self, mail_from: str, error: str) -> _Checked:
        """temperror for every check that is on ("internal error"), with ``error`` logged
        once when given."""
        c = self.config
        return _Checked(
            spf=SPFResult(
                "temperror", None, "mailfrom" if mail_from else "helo", mail_from, "internal error"
            )
            if c.spf
            else None,
            dkim=[DKIMResult("temperror", "", "", "", "internal error")] if c.dkim else None,
            arc=ARCResult("temperror", reason="internal error") if c.arc else None,
            dmarc=DMARCResult("temperror", reason="internal error") if c.dmarc else None,
            faults=[("mail authentication", error)] if error else [],
        )


class _Discovered(list[Discovery]):
    """A discovery kept in ``dmarc_cache``, with the evaluations made of it by (SPF result,
    SPF domain, passing DKIM domains): RFC 7489 6.6.2-6.6.4 is a function of those and the
    policy, but for pct sampling (6.6.4), so none is kept (``evaluated`` None) when a policy
    samples.  At most KEPT evaluations (all go when it is full); read and written on the
    reactor thread only (:meth:`InboundChecker._verdict`)."""

    __slots__ = ("evaluated",)
    KEPT = 16

    def __init__(self, found: list[Discovery]) -> None:
        super().__init__(found)
        sampled = any(d.record is not None and d.record.pct < 100 for d in found)
        self.evaluated: dict[tuple[str | None, str | None, tuple[str, ...]], DMARCResult] | None = (
            None if sampled else {}
        )


class _Aligned:
    """DKIM's ``prefer``: whether a signer's organizational domain is one of the authors'
    (RFC 7489 3.1.1), those signatures being the ones DMARC can use.  The authors'
    organizational domains are found only if some message has a signature to order."""

    __slots__ = ("authors", "orgs")

    def __init__(self, authors: list[str] | None) -> None:
        self.authors = authors
        self.orgs: set[str] | None = None

    def __call__(self, domain: str) -> bool:
        if self.orgs is None:
            self.orgs = {dmarc_mod.organizational_domain(a) for a in self.authors or ()}
        return dmarc_mod.organizational_domain(domain) in self.orgs


@dataclass
class _Checked:
    """What :meth:`InboundChecker._checks` hands back to the reactor thread."""

    spf: SPFResult | None = None
    dkim: list[DKIMResult] | None = None
    unchecked: int = 0
    arc: ARCResult | None = None
    dmarc: list[Discovery] | DMARCResult | None = None
    faults: list[tuple[str, str]] = field(default_factory=list)
