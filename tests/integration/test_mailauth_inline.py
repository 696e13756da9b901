"""The same verdict whether a message's checks ran in the worker pool or at once on the reactor
from cached DNS answers: each message of the matrix is checked twice by the real MailAuth
against the loopback DNS server, first with a cold cache (the worker pool asks), then again
(every answer cached: checked at once, the Deferred fired before check_message returns)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from mailsuite.mailauth import inbound as inbound_mod
from mailsuite.mailauth.service import MailAuth
from mailsuite.testing.dns import LoopbackDNS
from tests.integration.test_mailauth_inbound import (  # noqa: F401 (a fixture)
    GOOD_IP,
    OTHER_IP,
    arc_sealed,
    auth,
    check,
    signed_good,
    zone,
)
from tests.mailauth_helpers import dkim_sign, ed25519_key, message, rsa_key, weak_rsa_key
from tests.reactor_thread import StallProbe, in_reactor


@pytest.fixture(scope="module")
def dns_server(
    reactor: Any, loopback_dns: Callable[[dict[str, Any]], LoopbackDNS]
) -> tuple[Any, LoopbackDNS]:
    """test_mailauth_inbound's zone with a TTL of 300 s, as real records have (its 1 s
    would let the answers expire between a test's two checks on a slow machine)."""
    return reactor, loopback_dns({**zone(), "ttl": 300})


CASES = {
    "signed": lambda: (signed_good(), "alice@good.test", GOOD_IP),
    "forwarded": lambda: (signed_good(), "alice@good.test", OTHER_IP),
    "spoof": lambda: (message("Bank <alerts@good.test>"), "bounce@attacker.test", OTHER_IP),
    "tampered": lambda: (
        signed_good("Pay 10 EUR.\r\n").replace(b"Pay 10 EUR.", b"Pay 99 EUR."),
        "bounce@attacker.test",
        OTHER_IP,
    ),
    "weak key": lambda: (
        dkim_sign(message("alice@good.test"), "good.test", "w", weak_rsa_key()),
        "alice@good.test",
        GOOD_IP,
    ),
    "sha1": lambda: (
        dkim_sign(message("alice@good.test"), "good.test", "r", rsa_key(), b"rsa-sha1"),
        "alice@good.test",
        GOOD_IP,
    ),
    "quarantine": lambda: (message("x@quar.test"), "bounce@attacker.test", OTHER_IP),
    "pct": lambda: (message("x@pct.test"), "bounce@attacker.test", OTHER_IP),
    "np": lambda: (message("x@ghost.np.test"), "bounce@attacker.test", OTHER_IP),
    "sp": lambda: (message("x@sub.sp.test"), "bounce@attacker.test", OTHER_IP),
    "garbage": lambda: (
        dkim_sign(message("x@garbage.test"), "garbage.test", "e", ed25519_key()),
        "x@garbage.test",
        OTHER_IP,
    ),
    "arc": lambda: (arc_sealed(b"spf=pass"), "list@fwd.test", OTHER_IP),
    "null sender": lambda: (signed_good(), "", GOOD_IP),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_verdict_in_the_worker_and_at_once(
    auth: MailAuth,  # noqa: F811
    case: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # of the verdicts, not of the budget: the check at once must not be refused because the
    # case before spent the window's budget (10 ms of wall time: a loaded machine's check can)
    monkeypatch.setattr(inbound_mod, "INLINE_BUDGET", 1.0)
    data, sender, ip = CASES[case]()
    inbound = auth.inbound
    first = check(auth, data, sender, ip)
    assert (inbound.inline_checked, inbound.inline_missed) == (0, 1)  # the worker pool asked

    def again() -> object:
        d = auth.check_message(data, sender, "client.example", ip)
        assert d.called  # at once, on the reactor
        return d

    second = in_reactor(auth.reactor, again)
    assert inbound.inline_checked == 1
    assert (second.action, second.reply, second.header) == (first.action, first.reply, first.header)
    assert second.results == first.results


def test_dns_trouble_is_never_checked_at_once(auth: MailAuth) -> None:  # noqa: F811
    """A temporary failure is not cached: each message with it goes to the worker pool,
    which reports temperror (and never rejects)."""
    data = message("x@temp.test")
    for _ in range(2):
        v = check(auth, data, "bounce@attacker.test", OTHER_IP)
        assert b"dmarc=temperror" in v.header and v.action == "accept"
    assert auth.inbound.inline_checked == 0 and auth.inbound.inline_missed == 2


def test_a_burst_is_checked_at_once_only_within_the_budget(auth: MailAuth) -> None:  # noqa: F811
    """200 messages of a cached sender handed over in one reactor turn: the first are
    checked at once until the window's budget is spent, the rest go to the worker pool; the
    reactor's longest stall stays near the budget, not 200 checks long."""
    import time

    from twisted.internet import defer

    msgs = [signed_good(f"message {i}\r\n") for i in range(200)]
    check(auth, signed_good(), "alice@good.test")  # the sender's answers are cached now
    probe = StallProbe()
    in_reactor(auth.reactor, probe.start)
    try:
        started = time.perf_counter()
        verdicts = in_reactor(
            auth.reactor,
            lambda: defer.gatherResults(
                [auth.check_message(m, "alice@good.test", "client.example", GOOD_IP) for m in msgs]
            ),
        )
        elapsed = time.perf_counter() - started
    finally:
        in_reactor(auth.reactor, probe.stop)
    assert all(b"dkim=pass" in v.header and v.action == "accept" for v in verdicts)
    inline = auth.inbound.inline_checked
    assert 0 < inline < len(msgs)  # some at once, the rest in the pool
    # how many fit depends on the machine's speed; never more than the budget's worth
    # (each check costs well over 0.1 ms), unless the whole burst took several windows
    windows = elapsed / inbound_mod.INLINE_WINDOW + 1
    assert inline <= windows * inbound_mod.INLINE_BUDGET / 0.0001
    stall = probe.longest()
    print(f"{inline} of {len(msgs)} at once; longest reactor stall: {stall * 1000:.1f} ms")
    assert stall < 0.25
