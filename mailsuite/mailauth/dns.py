"""DNS for mail authentication and the DNS doctor, over the server's one twisted.names resolver.

Why a layer over the resolver: SPF, DKIM and DMARC need three things twisted.names does not give
together.  A deadline per query (a name server that never answers must become a temperror
within seconds, RFC 7208 4.6.4 / RFC 6376 6.1.2, not after twisted's minute of retries).  A
small cache with the records' TTLs, bounded in size (the same SPF includes and DKIM keys are
asked for again and again; twisted's own CacheResolver never forgets anything, and is not in
the chain at all when ``[dns] nameservers`` is set).  And one clear split between *permanent*
answers (NXDOMAIN, no records of the type: "none"/"permerror" for SPF and DKIM) and *temporary*
failures (SERVFAIL, REFUSED, timeout: "temperror", which must never cause a reject).

:class:`DNSClient` runs on the reactor.  :class:`BlockingDNS` is the same client for code in
worker threads (dkimpy's ``dnsfunc``, pyspf's ``DNSLookup``): it hands the query to the reactor
and waits for the answer, at most its deadline.  On the reactor thread it only answers from the
cache, inside :meth:`BlockingDNS.cached_only` (checks run there when every answer they need is
cached; a miss abandons the attempt, see :class:`NotCached`).
"""

from __future__ import annotations

import functools
import ipaddress
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.names import dns, error
from twisted.python import threadable
from twisted.python.failure import Failure

from mailsuite.mailauth.workers import Lane
from mailsuite.outbound.mx import make_resolver

__all__ = [
    "QTYPES",
    "Answer",
    "AnswerBoundCache",
    "BlockingDNS",
    "CacheProbe",
    "DNSClient",
    "DNSTempError",
    "NotCached",
    "normalize_name",
    "server_resolver",
]

#: Query types this layer asks for, by name.
QTYPES = {
    "A": dns.A,
    "AAAA": dns.AAAA,
    "MX": dns.MX,
    "TXT": dns.TXT,
    "PTR": dns.PTR,
    "SRV": dns.SRV,
}

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

CACHE_SIZE = 4096  # answers kept; the least recently used goes first
MAX_TTL = 3600  # seconds an answer is kept at most, whatever its TTL says
NEGATIVE_TTL = 60  # NXDOMAIN/NODATA without an SOA to say how long (RFC 2308 5)
MAX_NEGATIVE_TTL = 300


class DNSTempError(Exception):
    """No usable answer now (SERVFAIL, REFUSED, timeout): a lookup that may succeed later."""


@dataclass(frozen=True)
class Answer:
    """Records of one type at one name, decoded; ``nxdomain`` when the name does not exist.

    Record values: A/AAAA ``"192.0.2.1"``; MX ``(preference, "host")`` ("" for a null MX);
    TXT a tuple of the record's strings (bytes; join them for SPF/DKIM/DMARC); PTR ``"host"``;
    SRV ``(priority, weight, port, "target")``.  No records and not ``nxdomain`` is NODATA.
    """

    name: str
    qtype: str
    records: tuple[Any, ...] = ()
    nxdomain: bool = False

    def texts(self) -> list[bytes]:
        """TXT records with their strings joined (RFC 7208 3.3, RFC 6376 3.6.2.2)."""
        return [b"".join(r) for r in self.records]


def server_resolver(nameservers: tuple[str, ...] | None, reactor: Any) -> Any:
    """The one twisted.names IResolver of the server: ``[dns] nameservers``, or the system's."""
    return make_resolver(list(nameservers) if nameservers else None, reactor)


@functools.lru_cache(maxsize=4096)
def normalize_name(name: str) -> str | None:
    """Lower-case A-label form without the final dot; None when it cannot be a DNS name
    (empty label, label over 63 or name over 253 octets, RFC 1035 2.3.4).  Kept for the
    names last seen: a message's checks ask for the same few names about ten times."""
    name = name.strip().rstrip(".").lower()
    if not name:
        return None
    try:
        name.encode("ascii")
    except UnicodeEncodeError:
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if len(name) > 253 or any(not 0 < len(label) < 64 for label in name.split(".")):
        return None
    return name


def _decode(qtype: int, record: Any) -> Any:
    if qtype == dns.A:
        return record.dottedQuad()
    if qtype == dns.AAAA:
        return str(ipaddress.IPv6Address(record.address))
    if qtype == dns.MX:
        return int(record.preference), _host(record.name)
    if qtype == dns.TXT:
        return tuple(record.data)
    if qtype == dns.PTR:
        return _host(record.name)
    if qtype == dns.SRV:
        return int(record.priority), int(record.weight), int(record.port), _host(record.target)
    raise ValueError(f"unsupported type {qtype}")


def _host(name: Any) -> str:
    return bytes(name.name).decode("ascii", "replace").rstrip(".").lower()


def _negative_ttl(authority: Any) -> int:
    """RFC 2308 5: a negative answer may be kept for min(SOA TTL, SOA MINIMUM)."""
    for rr in authority or ():
        if rr.type == dns.SOA:
            return max(0, min(int(rr.ttl), int(rr.payload.minimum), MAX_NEGATIVE_TTL))
    return NEGATIVE_TTL


class DNSClient:
    """Lookups with a deadline and a bounded TTL cache, on the reactor thread.

    ``resolver`` is any twisted.names IResolver (the server's, or a MemoryAuthority in tests),
    ``clock`` the reactor (``task.Clock`` in tests).  Only used from the reactor thread, except
    :meth:`peek`.  Concurrent lookups of one name and type share one query (a burst of mail
    from one domain asks for its SPF, DKIM key and DMARC policy once, not once per message).
    """

    def __init__(
        self, resolver: Any, clock: Any, timeout: float = 10.0, cache_size: int = CACHE_SIZE
    ) -> None:
        self.resolver = resolver
        self.clock = clock
        self.timeout = timeout
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], tuple[float, Answer]] = OrderedDict()
        self._inflight: dict[tuple[str, str], list[Deferred[Answer]]] = {}
        self.queries = 0  # sent to the resolver (not answered from the cache); for tests

    def peek(self, name: str, qtype: str) -> Answer | None:
        """The cached answer, if there is a fresh one; None otherwise.  Safe in any thread:
        one ``get`` on the cache and no change to it (the answer is immutable), so a worker
        thread reads a hit without a round trip through the reactor."""
        clean = normalize_name(name)
        if clean is None or qtype not in QTYPES:
            return None
        hit = self._cache.get((clean, qtype))
        if hit is not None and hit[0] > self.clock.seconds():
            return hit[1]
        return None

    def expiry(self, name: str, qtype: str, answer: Answer) -> float | None:
        """When ``answer`` (one this client gave) leaves the cache, on ``clock``; None when
        the cache does not hold that very answer (never stored: a TTL of 0, or not a DNS
        name; or replaced since).  Safe in any thread, like :meth:`peek`: for results
        computed from answers, kept no longer than the answers they came from."""
        clean = normalize_name(name)
        hit = self._cache.get((clean, qtype)) if clean is not None else None
        return hit[0] if hit is not None and hit[1] is answer else None

    def lookup(self, name: str, qtype: str) -> Deferred[Answer]:
        """Fire with an :class:`Answer`, or fail with :class:`DNSTempError`."""
        return defer.ensureDeferred(self.lookup_async(name, qtype))

    async def lookup_async(self, name: str, qtype: str) -> Answer:
        if qtype not in QTYPES:
            raise KeyError(qtype)
        clean = normalize_name(name)
        if clean is None:  # not a DNS name: nothing can exist there
            return Answer(name, qtype, nxdomain=True)
        key = (clean, qtype)
        now = self.clock.seconds()
        hit = self._cache.get(key)
        if hit is not None:
            if hit[0] > now:
                self._cache.move_to_end(key)
                return hit[1]
            del self._cache[key]
        waiting = self._inflight.get(key)
        if waiting is not None:  # the same question is out already: share its answer
            d: Deferred[Answer] = Deferred()
            waiting.append(d)
            return await d
        waiting = self._inflight[key] = []
        try:
            result = await self._query(key)
        except Exception:
            failure = Failure()
            del self._inflight[key]
            for d in waiting:
                d.errback(failure)
            raise
        del self._inflight[key]
        for d in waiting:
            d.callback(result)
        return result

    async def _query(self, key: tuple[str, str]) -> Answer:
        clean, qtype = key
        code = QTYPES[qtype]
        self.queries += 1
        try:
            d = self._method(code)(clean)
            d.addTimeout(self.timeout, self.clock)
            answers, authority, _additional = await d
        except (error.DNSNameError, error.AuthoritativeDomainError) as e:
            message = e.args[0] if e.args and isinstance(e.args[0], dns.Message) else None
            result = Answer(clean, qtype, nxdomain=True)
            self._store(key, result, _negative_ttl(message.authority if message else ()))
            return result
        except defer.TimeoutError:
            raise DNSTempError(f"{qtype} {clean}: no answer within {self.timeout:g} s") from None
        except error.DNSServerError:
            raise DNSTempError(f"{qtype} {clean}: SERVFAIL") from None
        except error.DNSQueryRefusedError:
            raise DNSTempError(f"{qtype} {clean}: REFUSED") from None
        except Exception as e:  # any other resolver failure is temporary
            raise DNSTempError(f"{qtype} {clean}: {type(e).__name__} {e}".rstrip()) from None
        matching = [rr for rr in answers if rr.type == code]
        try:
            records = tuple(_decode(code, rr.payload) for rr in matching)
        except Exception as e:  # a record we cannot decode is a server fault
            raise DNSTempError(f"{qtype} {clean}: undecodable record ({e})") from None
        result = Answer(clean, qtype, records)
        ttl = min(int(rr.ttl) for rr in matching) if matching else _negative_ttl(authority)
        self._store(key, result, ttl)
        return result

    def _method(self, code: int) -> Callable[..., Deferred[Any]]:
        r = self.resolver
        return {  # type: ignore[no-any-return]
            dns.A: r.lookupAddress,
            dns.AAAA: r.lookupIPV6Address,
            dns.MX: r.lookupMailExchange,
            dns.TXT: r.lookupText,
            dns.PTR: r.lookupPointer,
            dns.SRV: r.lookupService,
        }[code]

    def _store(self, key: tuple[str, str], answer: Answer, ttl: int) -> None:
        ttl = min(ttl, MAX_TTL)
        if ttl <= 0:
            return
        self._cache[key] = (self.clock.seconds() + ttl, answer)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)


class AnswerBoundCache(Generic[K, V]):
    """Values computed from DNS answers (an SPF result, a domain's DMARC policy), each kept
    until the first of its answers leaves ``client``'s cache (:meth:`DNSClient.expiry`): so
    it is the value a new computation from the cache would give, and never outlives a TTL.
    Bounded (the least recently used goes); safe across worker threads."""

    def __init__(self, client: DNSClient, size: int = 4096) -> None:
        self.client = client
        self.size = size
        self._lock = threading.Lock()
        self._values: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self.hits = 0  # for tests and benchmarks

    def __len__(self) -> int:
        return len(self._values)

    def get(self, key: K) -> V | None:
        with self._lock:
            found = self._values.get(key)
            if found is None:
                return None
            if found[0] <= self.client.clock.seconds():
                del self._values[key]
                return None
            self._values.move_to_end(key)
            self.hits += 1
            return found[1]

    def put(self, key: K, value: V, seen: Iterable[tuple[str, str, Answer]]) -> bool:
        """Keep ``value``, computed from the answers ``seen`` (``(name, qtype, answer)``),
        until the first of them expires; not when one of them is not in the cache (a TTL of
        0, or replaced since), or when there were none.  Whether it was kept."""
        until: float | None = None
        for name, qtype, answer in seen:
            expires = self.client.expiry(name, qtype, answer)
            if expires is None:
                return False
            until = expires if until is None else min(until, expires)
        if until is None:
            return False
        with self._lock:
            self._values[key] = (until, value)
            self._values.move_to_end(key)
            while len(self._values) > self.size:
                self._values.popitem(last=False)
        return True


class NotCached(BaseException):
    """A lookup inside :meth:`BlockingDNS.cached_only` whose answer is not in the cache.

    A ``BaseException``, so that the ``except Exception`` of dkimpy, pyspf and our own checks
    cannot turn it into a result (permerror, temperror).  Their bare ``except:`` can, which
    is why the :class:`CacheProbe` also records the miss: whatever was computed after one is
    thrown away, never used or kept."""


class CacheProbe:
    """Whether a lookup inside :meth:`BlockingDNS.cached_only` missed the cache."""

    __slots__ = ("missed",)

    def __init__(self) -> None:
        self.missed = False


class _CachedOnly:
    """:meth:`BlockingDNS.cached_only`'s context manager: a class, not a generator (once per
    checked message on the reactor, where contextlib's machinery cost more than the rest)."""

    __slots__ = ("local", "outer", "probe")

    def __init__(self, local: threading.local) -> None:
        self.local = local
        self.probe = CacheProbe()
        self.outer: CacheProbe | None = None

    def __enter__(self) -> CacheProbe:
        self.outer = getattr(self.local, "probe", None)
        self.local.probe = self.probe
        return self.probe

    def __exit__(self, *_exc: object) -> None:
        self.local.probe = self.outer


class BlockingDNS:
    """:class:`DNSClient` for worker threads: each call waits for the reactor's answer.

    Like ``blockingCallFromThread`` but with a deadline: if no answer comes within
    ``deadline`` seconds (a wedged or stopping reactor) the call raises :class:`DNSTempError`
    rather than holding the worker forever.  While it waits it gives up the worker pool's
    ``lane`` (see :mod:`~mailsuite.mailauth.workers`).  Never call it on the reactor thread.
    """

    def __init__(
        self,
        client: DNSClient,
        reactor: Any,
        deadline: float | None = None,
        lane: Lane | None = None,
    ) -> None:
        self.client = client
        self.reactor = reactor
        self.deadline = deadline if deadline is not None else client.timeout + 1.0
        self.lane = lane
        self._local = threading.local()

    def cached_only(self) -> _CachedOnly:
        """In this thread, for the duration (a ``with`` block, giving a :class:`CacheProbe`):
        answers from the cache only; a lookup that would have to ask raises
        :class:`NotCached` and sets the probe's ``missed``.  For running checks on the
        reactor thread, which must never wait for DNS."""
        return _CachedOnly(self._local)

    def missed(self) -> bool:
        """Whether a lookup in this thread's :meth:`cached_only` scope has missed the cache
        (so that a result computed after it is not kept, e.g. by the SPF result cache)."""
        probe: CacheProbe | None = getattr(self._local, "probe", None)
        return probe is not None and probe.missed

    def _abandon_if_cached_only(self, what: str) -> None:
        """Inside :meth:`cached_only`, a cache miss: note it and raise :class:`NotCached`
        (the checks go to a worker, which asks); elsewhere nothing."""
        probe: CacheProbe | None = getattr(self._local, "probe", None)
        if probe is not None:
            probe.missed = True
            raise NotCached(what)

    def lookup(self, name: str, qtype: str) -> Answer:
        hit = self.client.peek(name, qtype)
        if hit is not None:
            return hit
        self._abandon_if_cached_only(f"{qtype} {name}")
        if threadable.isInIOThread():  # type: ignore[no-untyped-call]
            raise RuntimeError("BlockingDNS.lookup called on the reactor thread")
        box: queue.SimpleQueue[Answer | Failure] = queue.SimpleQueue()

        def start() -> None:
            defer.maybeDeferred(self.client.lookup, name, qtype).addBoth(box.put)

        self.reactor.callFromThread(start)
        try:
            with self.lane.released() if self.lane is not None else nullcontext():
                result = box.get(timeout=self.deadline)
        except queue.Empty:
            raise DNSTempError(f"{qtype} {name}: no answer within {self.deadline:g} s") from None
        if isinstance(result, Failure):
            if isinstance(result.value, DNSTempError):
                raise result.value
            raise DNSTempError(f"{qtype} {name}: {result.getErrorMessage()}")
        return result

    def prefetch(self, questions: list[tuple[str, str]]) -> None:
        """Start lookups of ``(name, qtype)`` without waiting (answers go to the cache, and a
        later :meth:`lookup` of one still under way joins it): a check that knows the names
        it will ask for has them answered in parallel, not one after the other."""
        wanted = [q for q in questions if self.client.peek(*q) is None]
        if not wanted:
            return
        self._abandon_if_cached_only(f"{len(wanted)} names")

        def start() -> None:
            for name, qtype in wanted:
                self.client.lookup(name, qtype).addErrback(lambda _f: None)

        self.reactor.callFromThread(start)

    def txt(self, name: str) -> list[bytes]:
        """TXT records at ``name``, strings joined; [] for NXDOMAIN or none."""
        return self.lookup(name, "TXT").texts()
