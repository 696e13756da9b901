"""Connection counting: total, per IP before login, per user+IP after login."""

from __future__ import annotations

from mailsuite.connection_limits import ConnectionLimits, Refusal, shared_limits


def test_total_and_per_ip_limits_and_release() -> None:
    limits = ConnectionLimits(max_connections=3, max_connections_per_ip=2)
    a1, a2 = limits.admit("192.0.2.1"), limits.admit("192.0.2.1")
    assert a1.refused is None and a2.refused is None
    assert limits.admit("192.0.2.1").refused is Refusal.PER_IP
    b1 = limits.admit("192.0.2.2")
    assert b1.refused is None
    assert limits.admit("192.0.2.3").refused is Refusal.TOTAL
    a1.release()
    a1.release()  # twice is harmless
    assert limits.total == 2 and limits.per_ip == {"192.0.2.1": 1, "192.0.2.2": 1}
    assert limits.admit("192.0.2.1").refused is None


def test_a_refused_admission_counts_nothing() -> None:
    limits = ConnectionLimits(max_connections_per_ip=1)
    ok = limits.admit("192.0.2.1")
    refused = limits.admit("192.0.2.1")
    refused.release()
    refused.login("alice@example.test")
    assert limits.total == 1 and limits.per_ip == {"192.0.2.1": 1}
    ok.release()
    assert limits.total == 0 and limits.per_ip == {} and limits.per_userip == {}


def test_zero_means_no_limit() -> None:
    limits = ConnectionLimits()
    held = [limits.admit("192.0.2.1") for _ in range(1000)]
    assert all(a.refused is None for a in held)
    assert all(a.login("alice@example.test") is None for a in held)


def test_login_moves_the_connection_to_the_user_ip_count() -> None:
    limits = ConnectionLimits(max_connections_per_ip=2, max_userip_connections=2)
    sessions = []
    for user in ("Alice@example.test", "alice@example.test", "alice@example.test"):
        a = limits.admit("192.0.2.1")
        assert a.refused is None  # the logged-in ones do not fill the pre-login count
        sessions.append(a)
        result = a.login(user)
    assert result is Refusal.USER_IP  # the third of the same user (names compared caseless)
    assert limits.per_ip == {"192.0.2.1": 1}  # it stays a not-logged-in connection
    assert limits.per_userip == {("alice@example.test", "192.0.2.1"): 2}
    assert sessions[2].login("bob@example.test") is None  # other users are not affected
    # the same user from another address is not affected either
    other = limits.admit("192.0.2.9")
    assert other.login("alice@example.test") is None
    sessions[0].release()
    again = limits.admit("192.0.2.1")
    assert again.login("alice@example.test") is None
    for a in [*sessions, other, again]:
        a.release()
    assert limits.total == 0 and limits.per_ip == {} and limits.per_userip == {}


def test_exempt_addresses_skip_the_per_ip_limit_only() -> None:
    limits = ConnectionLimits(
        max_connections=3, max_connections_per_ip=1, exempt=lambda ip: ip == "127.0.0.1"
    )
    assert [limits.admit("127.0.0.1").refused for _ in range(3)] == [None, None, None]
    assert limits.admit("127.0.0.1").refused is Refusal.TOTAL


def test_listeners_of_one_service_share_counters() -> None:
    registry: dict[str, ConnectionLimits] = {}
    imap = shared_limits(registry, "imap", 10, 5, 2)
    assert shared_limits(registry, "imap", 10, 5, 2) is imap
    assert shared_limits(registry, "pop3", 10, 5) is not imap
