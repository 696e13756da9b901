"""The results kept between messages by the inbound checks (issue 15: a check's cost when
every DNS answer is cached): DMARC policies by From domains and SPF results, each kept while
the DNS answers it came from are (:class:`~mailsuite.mailauth.dns.AnswerBoundCache`), and
the DMARC evaluation of a policy (a pure function of its inputs).  Each must give the verdict
a check without it gives, expire with the first of its answers, and stay bounded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from mailsuite.mailauth.dns import AnswerBoundCache, DNSClient, DNSTempError
from mailsuite.mailauth.inbound import InboundChecker
from mailsuite.testing.dns import MemoryAuthority
from tests.mailauth_helpers import message
from tests.unit.test_mailauth_inline import CACHED, ZONE, checker, signed
from tests.unit.test_mailauth_inline import _whole_budget as _whole_budget  # (autouse)

NAMES = dict(ZONE["names"])
NAMES.update(
    {
        "org.test": {"TXT": [["v=spf1 ip4:127.0.0.1 -all"]]},
        "_dmarc.org.test": {"TXT": [["v=DMARC1; p=reject; np=quarantine; aspf=s"]]},
        "sub.org.test": {"A": ["127.0.0.1"]},
        "half.test": {"TXT": [["v=spf1 -all"]]},
        "_dmarc.half.test": {"TXT": [["v=DMARC1; p=reject; pct=50"]]},
    }
)
ZONE2 = {**ZONE, "names": NAMES}
ABSENT = [  # NXDOMAIN answers the checks read, cached too
    ("_dmarc.sub.org.test", "TXT"),
    ("_dmarc.gone.org.test", "TXT"),
    ("gone.org.test", "A"),
    ("gone.org.test", "TXT"),
    ("nodmarc.test", "TXT"),
    ("_dmarc.nodmarc.test", "TXT"),
]
CACHED2 = (
    CACHED
    + [("other.test", "TXT")]
    + [(n, t) for n in NAMES if n not in ZONE["names"] for t in NAMES[n]]
    + ABSENT
)

#: (From, MAIL FROM): DMARC pass, fail with p=reject, np for a name that does not exist,
#: sp/p for a subdomain that does, no record at all, several authors, no From domain
CASES = [
    ("Alice <alice@good.test>", "alice@good.test"),
    ("Mallory <alice@good.test>", "mallory@inc.test"),
    ("Gone <x@gone.org.test>", "x@gone.org.test"),
    ("Sub <x@sub.org.test>", "x@org.test"),
    ("Nobody <x@nodmarc.test>", "x@nodmarc.test"),
    ("a@good.test, b@inc.test", "a@good.test"),
    ("undisclosed-recipients:;", "x@good.test"),
]


class _Forgetful(dict[Any, Any]):
    def __setitem__(self, key: Any, value: Any) -> None:
        pass


def checked(tmp_path: Path, keep: bool = True) -> InboundChecker:
    c = checker(tmp_path, CACHED2, ZONE2)
    if not keep:
        c.dmarc_cache.size = c.spf_cache.size = 0  # (each value is dropped as it is put)
        c._verdicts = _Forgetful()
    return c


def verdict(c: InboundChecker, msg: bytes, sender: str) -> tuple[str, bytes]:
    v = c.check_now(msg, sender, "client.example", "127.0.0.1")
    assert v is not None, "every answer is cached: judged at once"
    return v.action, v.header


@pytest.mark.parametrize("author, sender", CASES)
def test_kept_results_give_the_verdict_of_a_check_without_them(tmp_path, author, sender):
    kept, fresh = checked(tmp_path / "a"), checked(tmp_path / "b", keep=False)
    msg = message(author)
    first = verdict(kept, msg, sender)
    assert first == verdict(fresh, msg, sender)
    for _ in range(3):
        assert verdict(kept, message(author), sender) == first
    assert len(fresh.dmarc_cache) == len(fresh.spf_cache) == 0 and fresh.dmarc_cache.hits == 0
    if "@" in author:
        assert kept.dmarc_cache.hits == 3 and kept.spf_cache.hits == 3
    assert len(kept._verdicts) == 1 and not fresh._verdicts


def test_signed_mail_is_judged_the_same(tmp_path):
    kept, fresh = checked(tmp_path / "a"), checked(tmp_path / "b", keep=False)
    for _ in range(3):
        msg = signed()
        assert verdict(kept, msg, "alice@good.test") == verdict(fresh, msg, "alice@good.test")
    assert kept.dmarc_cache.hits == 2


def test_a_policy_is_kept_until_its_first_answer_expires(tmp_path):
    c = checked(tmp_path)
    clock = c.dns.client.clock
    verdict(c, message("Gone <x@gone.org.test>"), "x@gone.org.test")
    assert len(c.dmarc_cache) == 1
    # the negative answers (_dmarc.gone.org.test, gone.org.test) are kept for the SOA's
    # minimum, shorter than the record's 300 s: the policy goes with the first of them
    negative = c.dns.client.expiry("gone.org.test", "A", c.dns.client.peek("gone.org.test", "A"))
    assert negative is not None and negative < clock.seconds() + 300
    clock.advance(negative - clock.seconds() - 0.5)
    verdict(c, message("Gone <x@gone.org.test>"), "x@gone.org.test")
    assert c.dmarc_cache.hits == 1
    clock.advance(1)
    assert c.dmarc_cache.get(("gone.org.test",)) is None
    # judged again from DNS: the expired answers are not in the cache, so not at once
    assert (
        c.check_now(message("Gone <x@gone.org.test>"), "x@gone.org.test", "h", "127.0.0.1") is None
    )


def test_a_temporary_failure_is_not_kept(tmp_path, monkeypatch):
    c = checked(tmp_path)
    real = c.dns.lookup

    def failing(name: str, qtype: str) -> Any:
        if name == "gone.org.test":
            raise DNSTempError("A gone.org.test: SERVFAIL")
        return real(name, qtype)

    monkeypatch.setattr(c.dns, "lookup", failing)
    found = c._discover(["gone.org.test"])
    assert isinstance(found, list) and not found[0].nonexistent  # (RFC 9091: it may exist)
    assert len(c.dmarc_cache) == 0

    def servfail(name: str, qtype: str) -> Any:
        raise DNSTempError(f"{qtype} {name}: SERVFAIL")

    monkeypatch.setattr(c.dns, "lookup", servfail)
    found = c._discover(["good.test"])
    assert isinstance(found, list) and found[0].temperror
    assert len(c.dmarc_cache) == 0


def test_sampled_policies_are_evaluated_each_time(tmp_path):
    """pct=50: half the failures are judged by p=, half by the next weaker policy (RFC 7489
    6.6.4): a random draw per message, never kept."""
    c = checked(tmp_path)
    actions = {verdict(c, message("Half <x@half.test>"), "x@half.test")[0] for _ in range(60)}
    assert actions == {"reject", "quarantine"}


def test_answer_bound_cache_is_bounded_and_follows_the_answers():
    clock = Clock()
    clock.advance(1000)
    client = DNSClient(MemoryAuthority(ZONE), clock)
    for name in ("good.test", "inc.test", "other.test"):
        client.lookup(name, "TXT")
    cache: AnswerBoundCache[str, int] = AnswerBoundCache(client, size=2)

    def seen(name: str) -> list[Any]:
        return [(name, "TXT", client.peek(name, "TXT"))]

    assert cache.put("a", 1, seen("good.test")) and cache.put("b", 2, seen("inc.test"))
    assert cache.put("c", 3, seen("other.test"))
    assert len(cache) == 2 and cache.get("a") is None and cache.get("c") == 3
    assert not cache.put("d", 4, [])  # computed from no answer: nothing to bound it
    from mailsuite.mailauth.dns import Answer

    assert not cache.put("e", 5, [("good.test", "TXT", Answer("good.test", "TXT"))])
    clock.advance(300)
    assert cache.get("b") is None and cache.get("c") is None and len(cache) == 0


def test_evaluations_kept_with_a_policy_are_bounded(tmp_path):
    """The evaluations of one kept policy, by SPF result and domain: at most KEPT."""
    from mailsuite.mailauth.inbound import _Discovered

    c = checked(tmp_path)
    verdict(c, message("Alice <alice@good.test>"), "alice@good.test")
    kept = c.dmarc_cache.get(("good.test",))
    assert isinstance(kept, _Discovered) and kept.evaluated is not None
    spf = c.check_now(message("A <a@good.test>"), "a@good.test", "h", "127.0.0.1").results.spf
    for i in range(_Discovered.KEPT + 5):
        other = type(spf)("fail", f"d{i}.example", "mailfrom", f"x@d{i}.example")
        assert c._evaluate(kept, other, ()).result == "fail"
        assert 0 < len(kept.evaluated) <= _Discovered.KEPT
    assert c._evaluate(kept, spf, ()) == c._evaluate(list(kept), spf, ())


def test_verdicts_are_kept_by_their_results_and_bounded(tmp_path, monkeypatch):
    import mailsuite.mailauth.inbound as inbound

    monkeypatch.setattr(inbound, "VERDICTS_KEPT", 4)
    c = checked(tmp_path)
    first = c.check_now(message("A <a@good.test>"), "a@good.test", "h", "127.0.0.1")
    again = c.check_now(message("B <b@good.test>"), "b@good.test", "h", "127.0.0.1")
    assert first is not None and again is not None
    assert again.results.spf != first.results.spf and again.header != first.header
    assert c.check_now(message("A <a@good.test>"), "a@good.test", "h", "127.0.0.1") is first
    for i in range(10):
        v = c.check_now(message("A <a@good.test>"), f"x{i}@good.test", "h", "127.0.0.1")
        assert v is not None and f"x{i}@good.test".encode() in v.header
        assert 0 < len(c._verdicts) <= 4
