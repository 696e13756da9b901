"""Passwords and logins shared by SMTP AUTH, IMAP and POP3.

Passwords are stored only as argon2id hashes (argon2-cffi).  Checking one costs tens of
milliseconds of CPU, so it runs in Twisted's thread pool, never in the reactor.

Failed logins are throttled two ways (DESIGN.md, brief: "without blocking the legitimate user
elsewhere"):

* per client IP: every failure adds a growing delay before the "wrong password" answer, and
  past ``max_failures_per_ip`` in ``window`` seconds the IP is refused outright until the
  window passes (a temporary failure, logged with the IP);
* per account: past ``max_failures_per_user`` the account is refused only to IPs that have
  themselves failed recently, so a guesser spread over many IPs is slowed down while the
  owner, logging in from an address with no failures, still gets in.

The protocols use the :class:`Authenticator` through a ``twisted.cred`` portal so that
checker and realm stay the standard Twisted shapes.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from twisted.cred import credentials, error, portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer, interfaces, threads
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from mailsuite.config import AuthConfig
from mailsuite.directory import Directory, normalize

# re-exported: the adapters name a login's result through this module too
from mailsuite.login import LoginResult as LoginResult
from mailsuite.login import Outcome as Outcome
from mailsuite.shared.counters import SharedFailureLog

log = Logger(namespace="mailsuite.auth")
_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters

#: A hash that is checked when the user does not exist, so timing does not reveal accounts.
_DUMMY_HASH = _hasher.hash("not a real password")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(stored_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(stored_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


class FailureLog:
    """Sliding-window failure counts per IP and per account, with no I/O (pure, testable)."""

    def __init__(self, cfg: AuthConfig, now: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.now = now
        self.by_ip: dict[str, deque[float]] = {}
        self.by_user: dict[str, deque[float]] = {}

    def _count(self, table: dict[str, deque[float]], key: str) -> int:
        q = table.get(key)
        if not q:
            return 0
        horizon = self.now() - self.cfg.window
        while q and q[0] < horizon:
            q.popleft()
        if not q:
            del table[key]
            return 0
        return len(q)

    def record(self, ip: str, user: str) -> None:
        t = self.now()
        self.by_ip.setdefault(ip, deque()).append(t)
        self.by_user.setdefault(user, deque()).append(t)
        if len(self.by_ip) > 100_000:  # bound memory under a wide spray
            self.by_ip.pop(next(iter(self.by_ip)))
        if len(self.by_user) > 100_000:  # many made-up user names
            self.by_user.pop(next(iter(self.by_user)))

    def blocked(self, ip: str, user: str, in_flight: int = 0) -> bool:
        """``in_flight``: attempts from ``ip`` whose password is still being checked.

        Once an IP has failed, its in-flight attempts count as failures, so that many
        parallel connections cannot all guess before the first failure is recorded.  An IP
        with no failures is never refused here (an office behind NAT opening many IMAP
        connections at once); :class:`Authenticator` only bounds how many of its checks run
        at the same time.
        """
        recorded = self._count(self.by_ip, ip)
        ip_fails = recorded + in_flight if recorded else 0
        if ip_fails >= self.cfg.max_failures_per_ip:
            return True
        return ip_fails > 0 and self._count(self.by_user, user) >= self.cfg.max_failures_per_user

    def delay(self, ip: str) -> float:
        """Seconds to wait before answering a failure: 0.5, 1, 2, 4 ... capped at 8."""
        n = self._count(self.by_ip, ip)
        return min(0.5 * 2 ** max(n - 1, 0), 8.0) if n else 0.0

    def clear(self, ip: str) -> None:
        self.by_ip.pop(ip, None)

    def throttled_ips(self) -> int:
        """How many client addresses are refused now (``max_failures_per_ip`` failures in
        the window).  Only reads (copies taken under the GIL), so the metrics thread may call
        it while the reactor thread records failures."""
        horizon = self.now() - self.cfg.window
        limit = self.cfg.max_failures_per_ip
        count = 0
        for q in list(self.by_ip.values()):
            if sum(1 for t in tuple(q) if t >= horizon) >= limit:
                count += 1
        return count

    def check_started(self, ip: str) -> None:
        """A password check for ``ip`` began (the caller passes its count to :meth:`blocked`;
        the shared log of :mod:`mailsuite.shared.counters` keeps every worker's here)."""

    def check_finished(self, ip: str) -> None:
        """The check :meth:`check_started` announced has its answer."""

    def try_start(self, ip: str, user: str, in_flight: int = 0) -> bool:
        """:meth:`blocked`, else :meth:`check_started`: False when the attempt is refused.
        One step, so that with several processes (:mod:`mailsuite.shared.counters`) no two
        attempts both pass on the same count."""
        if self.blocked(ip, user, in_flight):
            return False
        self.check_started(ip)
        return True

    def finish(self, ip: str, user: str, failed: bool) -> None:
        """A check's answer: the failure recorded (when it failed) before the check stops
        counting as in flight, so that no attempt sees neither."""
        if failed:
            self.record(ip, user)
        self.check_finished(ip)


@implementer(ICredentialsChecker)
class Argon2Checker:
    """twisted.cred checker over the directory's argon2id hashes (verification in a thread)."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    #: How long a verified password is remembered (mail clients log in again and again, and
    #: one argon2id check costs tens of milliseconds of CPU), and for how many accounts.
    CACHE_SECONDS = 600.0
    CACHE_SIZE = 10_000

    def __init__(
        self,
        directory: Directory,
        reactor: interfaces.IReactorThreads,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = directory
        self.reactor = reactor
        self.now = now
        # user -> (keyed digest of the password, stored hash it was checked against, expiry).
        # The key lives only in this process, so the cache never holds a usable secret and a
        # password change (a new stored hash) invalidates the entry at once.
        self._key = secrets.token_bytes(32)
        self._verified: dict[str, tuple[bytes, str, float]] = {}

    def _digest(self, password: str) -> bytes:
        return hmac.new(self._key, password.encode("utf-8", "surrogatepass"), "sha256").digest()

    def _cached(self, user: str, stored: str, password: str) -> bool:
        entry = self._verified.get(user)
        if entry is None:
            return False
        digest, stored_then, expiry = entry
        if stored_then != stored or expiry < self.now():
            del self._verified[user]
            return False
        return hmac.compare_digest(digest, self._digest(password))

    def _remember(self, user: str, stored: str, password: str) -> None:
        if len(self._verified) >= self.CACHE_SIZE:
            self._verified.pop(next(iter(self._verified)))
        self._verified[user] = (self._digest(password), stored, self.now() + self.CACHE_SECONDS)

    def requestAvatarId(  # twisted.cred's name
        self, creds: credentials.IUsernamePassword
    ) -> defer.Deferred[bytes | tuple[()]]:
        """The canonical address (UTF-8, the avatar ID twisted.cred passes to the realm) once
        the password is right; fails with UnauthorizedLogin otherwise."""
        try:
            user = normalize(
                creds.username.decode("utf-8")
                if isinstance(creds.username, bytes)
                else creds.username
            )
        except (ValueError, UnicodeDecodeError):
            user = ""
        stored = self.directory.password_hash(user) if user else None
        given: bytes | str = creds.password
        password = given.decode("utf-8", "replace") if isinstance(given, bytes) else given
        if stored is not None and self._cached(user, stored, password):
            return defer.succeed(user.encode("utf-8"))
        d = threads.deferToThreadPool(
            self.reactor,
            self.reactor.getThreadPool(),
            verify_password,
            stored or _DUMMY_HASH,
            password,
        )

        def checked(ok: bool) -> bytes | tuple[()]:
            if ok and stored is not None:
                self._remember(user, stored, password)
                return user.encode("utf-8")
            raise error.UnauthorizedLogin()

        return d.addCallback(checked)


#: What a portal login gives: (interface, avatar, logout).
Login = tuple[type[Interface], object, Callable[[], None]]


@implementer(portal.IRealm)
class _Realm:
    """The avatar is simply the canonical account address (str); protocols open the store
    by it."""

    def requestAvatar(  # twisted.cred's name
        self, avatarId: bytes | tuple[()], mind: object, *interfaces_: type[Interface]
    ) -> Login:
        assert isinstance(avatarId, bytes)  # Argon2Checker's IDs are never anonymous
        return (interfaces_[0], avatarId.decode("utf-8"), lambda: None)


class Authenticator:
    """One login attempt, throttled, for any protocol: ``login(user, password, ip)``."""

    def __init__(
        self,
        directory: Directory,
        cfg: AuthConfig,
        reactor: Any,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reactor = reactor
        #: the failure counts: this process's :class:`FailureLog`, or with several worker
        #: processes the shared one (:meth:`share_failures`)
        self.failures: FailureLog | SharedFailureLog = FailureLog(cfg, now)
        self.in_flight: dict[str, int] = {}  # per IP: password checks not answered yet
        #: per IP: at most this many password checks run at once; more wait their turn, so a
        #: burst from one address cannot take the whole CPU, yet nobody is refused for it.
        self.max_parallel = 2 * cfg.max_failures_per_ip
        self._slots: dict[str, defer.DeferredSemaphore] = {}
        self.checker = Argon2Checker(directory, reactor, now)
        self.portal = portal.Portal(_Realm(), [self.checker])
        #: called with (protocol, outcome value) for every answered attempt (the metrics)
        self.observe: Callable[[str, str], None] | None = None

    def _observed(self, protocol: str, result: LoginResult) -> LoginResult:
        if self.observe is not None:
            self.observe(protocol, result.outcome.value)
        return result

    def share_failures(self, failures: SharedFailureLog) -> None:
        """Count failures with every worker process of the server (an attacker must not get
        one allowance per worker)."""
        self.failures = failures

    def login(
        self, username: str, password: str, ip: str, protocol: str
    ) -> defer.Deferred[LoginResult]:
        try:
            user = normalize(username)
        except ValueError:
            user = username.lower()
        if not self.failures.try_start(ip, user, self.in_flight.get(ip, 0)):
            log.warn(
                "{protocol}: login for {user!r} from {ip} refused: too many failures",
                protocol=protocol,
                user=user,
                ip=ip,
            )
            return defer.succeed(self._observed(protocol, LoginResult(Outcome.THROTTLED)))
        creds = credentials.UsernamePassword(
            user.encode("utf-8"), password.encode("utf-8", "surrogatepass")
        )
        self.in_flight[ip] = self.in_flight.get(ip, 0) + 1
        slots = self._slots.get(ip)
        if slots is None:
            slots = self._slots[ip] = defer.DeferredSemaphore(self.max_parallel)
        d: defer.Deferred[Login] = slots.run(self.portal.login, creds, None, Interface)

        def checked(result: Login | Failure) -> Login | Failure:
            self.failures.finish(ip, user, failed=isinstance(result, Failure))
            n = self.in_flight.get(ip, 1) - 1
            if n <= 0:
                self.in_flight.pop(ip, None)
                if not slots.waiting and slots.tokens == slots.limit:
                    self._slots.pop(ip, None)
            else:
                self.in_flight[ip] = n
            return result

        d.addBoth(checked)

        def ok(result: Login) -> LoginResult:
            avatar = str(result[1])
            log.info(
                "{protocol}: {user} logged in from {ip}", protocol=protocol, user=avatar, ip=ip
            )
            return LoginResult(Outcome.OK, avatar)

        def failed(f: Failure) -> defer.Deferred[LoginResult]:
            log.warn(
                "{protocol}: failed login for {user!r} from {ip}",
                protocol=protocol,
                user=user,
                ip=ip,
            )
            wait = self.failures.delay(ip)
            return defer.Deferred.fromCoroutine(self._after(wait))

        return d.addCallbacks(ok, failed).addCallback(lambda r: self._observed(protocol, r))

    async def _after(self, wait: float) -> LoginResult:
        await deferLater(self.reactor, wait, lambda: None)
        return LoginResult(Outcome.BAD_CREDENTIALS)
