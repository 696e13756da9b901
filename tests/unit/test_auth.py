"""Logins: argon2id verification, the verified-password cache, and throttling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet import task

from mailsuite import auth
from mailsuite.auth import Authenticator, Outcome, hash_password
from mailsuite.config import AuthConfig
from mailsuite.directory import Directory


class SyncPool:
    def callInThreadWithCallback(self, on_result: Any, f: Any, *a: Any, **kw: Any) -> None:  # noqa: N802
        try:
            on_result(True, f(*a, **kw))
        except Exception as e:
            on_result(False, e)


class FakeReactor(task.Clock):
    """A clock whose 'threads' run inline, so a login completes synchronously."""

    def getThreadPool(self) -> SyncPool:  # noqa: N802
        return SyncPool()

    def callFromThread(self, f: Any, *a: Any, **kw: Any) -> None:  # noqa: N802
        f(*a, **kw)


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    d = Directory(tmp_path / "directory.json", tmp_path / "mail", ("example.test",))
    d.add_user("alice@example.test", hash_password("right password"))
    calls = []
    real = auth.verify_password

    def counting(stored: str, password: str) -> bool:
        calls.append(password)
        return real(stored, password)

    monkeypatch.setattr(auth, "verify_password", counting)
    clock = FakeReactor()
    cfg = AuthConfig(max_failures_per_ip=3, max_failures_per_user=5, window=60)
    a = Authenticator(d, cfg, clock, now=clock.seconds)
    return d, a, clock, calls


def login(a: Authenticator, clock: FakeReactor, user: str, pw: str, ip: str) -> Outcome:
    results = []
    a.login(user, pw, ip, "test").addCallback(results.append)
    clock.advance(10)  # let failure delays pass
    return results[0].outcome


def test_right_and_wrong_password(setup) -> None:
    _, a, clock, _ = setup
    assert login(a, clock, "Alice@Example.test", "right password", "10.0.0.1") is Outcome.OK
    assert login(a, clock, "alice@example.test", "wrong", "10.0.0.1") is Outcome.BAD_CREDENTIALS
    assert login(a, clock, "nobody@example.test", "x", "10.0.0.1") is Outcome.BAD_CREDENTIALS


def test_verified_password_is_cached_but_never_loosens_the_check(setup) -> None:
    d, a, clock, calls = setup
    assert login(a, clock, "alice@example.test", "right password", "10.0.0.1") is Outcome.OK
    assert login(a, clock, "alice@example.test", "right password", "10.0.0.2") is Outcome.OK
    assert len(calls) == 1  # the second login did not run argon2 again
    assert login(a, clock, "alice@example.test", "wrong", "10.0.0.3") is Outcome.BAD_CREDENTIALS
    d.set_password("alice@example.test", hash_password("new password"))
    assert (
        login(a, clock, "alice@example.test", "right password", "10.0.0.4")
        is Outcome.BAD_CREDENTIALS
    )
    assert login(a, clock, "alice@example.test", "new password", "10.0.0.4") is Outcome.OK
    clock.advance(auth.Argon2Checker.CACHE_SECONDS + 1)
    before = len(calls)
    assert login(a, clock, "alice@example.test", "new password", "10.0.0.4") is Outcome.OK
    assert len(calls) == before + 1  # expired: verified again


def test_per_ip_throttle_spares_other_ips(setup) -> None:
    _, a, clock, _ = setup
    for _ in range(3):
        assert login(a, clock, "alice@example.test", "guess", "10.6.6.6") is Outcome.BAD_CREDENTIALS
    assert login(a, clock, "alice@example.test", "right password", "10.6.6.6") is Outcome.THROTTLED
    assert login(a, clock, "alice@example.test", "right password", "10.0.0.9") is Outcome.OK
    clock.advance(61)  # the window passes
    assert login(a, clock, "alice@example.test", "right password", "10.6.6.6") is Outcome.OK


def test_per_account_throttle_only_hits_failing_ips(setup) -> None:
    _, a, clock, _ = setup
    for i in range(5):  # a guesser spread over many addresses, two tries each
        login(a, clock, "alice@example.test", "guess", f"10.9.{i}.1")
    assert login(a, clock, "alice@example.test", "guess", "10.9.0.1") is Outcome.THROTTLED
    # the owner, from an address with no failures, still gets in
    assert login(a, clock, "alice@example.test", "right password", "192.0.2.7") is Outcome.OK


def test_many_parallel_logins_from_a_clean_ip_wait_instead_of_failing(setup) -> None:
    _, a, clock, _ = setup
    results: list[Any] = []
    for _ in range(20):  # far more than 2 * max_failures_per_ip at once
        a.login("alice@example.test", "right password", "10.1.1.1", "test").addCallback(
            results.append
        )
    clock.advance(1)
    assert [r.outcome for r in results] == [Outcome.OK] * 20
