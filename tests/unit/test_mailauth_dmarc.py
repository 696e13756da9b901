"""DMARC (RFC 7489): record parsing, alignment and policy, checked against the RFC's own
examples (Appendix B) and the discovery rules of section 6.6.3."""

from __future__ import annotations

import random

import pytest

from mailsuite.mailauth.dmarc import (
    DMARCError,
    aligned,
    check_dmarc,
    discover,
    organizational_domain,
    parse_record,
)
from mailsuite.mailauth.dns import DNSTempError


def zone(records: dict[str, list[str] | str]):
    """A ``txt(name)`` over a dict; the value "servfail" raises DNSTempError."""

    def txt(name: str) -> list[str]:
        value = records.get(name, [])
        if value == "servfail":
            raise DNSTempError(f"TXT {name}: SERVFAIL")
        return list(value)

    return txt


# ------------------------------------------------------------------ B.2: the records


def test_b_2_1_entire_domain_monitoring_only():
    r = parse_record("v=DMARC1; p=none; rua=mailto:dmarc-feedback@example.com")
    assert r.p == "none" and r.pct == 100 and r.adkim == r.aspf == "r"
    assert r.rua == ("mailto:dmarc-feedback@example.com",)


def test_b_2_2_per_message_reports():
    r = parse_record(
        "v=DMARC1; p=none; rua=mailto:dmarc-feedback@example.com; "
        "ruf=mailto:auth-reports@thirdparty.example.net"
    )
    assert r.ruf == ("mailto:auth-reports@thirdparty.example.net",)


def test_b_2_4_subdomain_sampling_and_size_limited_uri():
    text = (
        "v=DMARC1; p=quarantine; rua=mailto:dmarc-feedback@example.com,"
        "mailto:tld-test@thirdparty.example.net!10m; pct=25"
    )
    r = parse_record(text)
    assert r.p == "quarantine" and r.pct == 25
    assert r.rua == ("mailto:dmarc-feedback@example.com", "mailto:tld-test@thirdparty.example.net")
    # published at _dmarc.test.example.com; pct=25: a quarter of failures are quarantined,
    # the rest get the next less strict policy (6.6.4)
    txt = zone({"_dmarc.test.example.com": [text], "_dmarc.example.com": ["v=DMARC1; p=none"]})

    class Fixed(random.Random):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.value = value

        def random(self) -> float:
            return self.value

    sampled = check_dmarc(["test.example.com"], "fail", "x.example.net", [], txt, rng=Fixed(0.2))
    assert (sampled.result, sampled.policy, sampled.disposition) == (
        "fail",
        "quarantine",
        "quarantine",
    )
    assert sampled.record_domain == "test.example.com"
    skipped = check_dmarc(["test.example.com"], "fail", "x.example.net", [], txt, rng=Fixed(0.25))
    assert (skipped.result, skipped.disposition) == ("fail", "none")


def test_b_3_1_smtp_time_processing():
    # _dmarc.example.com "v=DMARC1; p=reject; aspf=r; rua=..."; SPF passed for
    # MAIL FROM sender@example.com and the DKIM signature d=example.com verified
    txt = zone(
        {
            "_dmarc.example.com": [
                "v=DMARC1; p=reject; aspf=r; rua=mailto:dmarc-feedback@example.com"
            ]
        }
    )
    r = check_dmarc(["example.com"], "pass", "example.com", ["example.com"], txt)
    assert r.result == "pass" and r.spf_aligned and r.dkim_aligned and r.disposition == "none"
    # the same record, a forged message: neither aligns -> reject
    r = check_dmarc(["example.com"], "pass", "attacker.example", ["attacker.example"], txt)
    assert (r.result, r.policy, r.disposition) == ("fail", "reject", "reject")


# ------------------------------------------------------------------ B.1: alignment


@pytest.mark.parametrize(
    "identifier,author,relaxed,strict",
    [
        ("example.com", "example.com", True, True),  # B.1.1 ex. 1, B.1.2 ex. 1
        ("child.example.com", "example.com", True, False),  # B.1.1 ex. 2
        ("example.net", "child.example.com", False, False),  # B.1.1 ex. 3
        ("example.com", "child.example.com", True, False),  # B.1.2 ex. 2
        ("sample.net", "example.com", False, False),  # B.1.2 ex. 3
        ("EXAMPLE.com.", "example.COM", True, True),  # case and the root dot
        ("a.example.co.uk", "b.example.co.uk", True, False),  # the PSL, not "last two labels"
        ("example.co.uk", "other.co.uk", False, False),
        ("alice.github.io", "bob.github.io", False, False),  # a private-section suffix
    ],
)
def test_b_1_alignment(identifier, author, relaxed, strict):
    assert aligned(identifier, author, "r") is relaxed
    assert aligned(identifier, author, "s") is strict


def test_organizational_domain_uses_the_shipped_list():
    assert organizational_domain("mail.sub.example.co.uk") == "example.co.uk"
    assert organizational_domain("x.y.example.test") == "example.test"
    assert organizational_domain("co.uk") == "co.uk"


# ------------------------------------------------------------------ 6.3, 6.6.3: syntax


@pytest.mark.parametrize(
    "text",
    [
        "p=reject; v=DMARC1",  # v must come first
        "v=DMARC2; p=reject",
        "v=dmarc1; p=reject",  # the version value is case-sensitive
        "v=DMARC1",  # no p, no rua
        "v=DMARC1; p=bogus",
        "",
        "v=spf1 -all",
    ],
)
def test_unusable_records(text):
    with pytest.raises(DMARCError):
        parse_record(text)


def test_bad_p_with_rua_acts_as_none():
    assert parse_record("v=DMARC1; p=bogus; rua=mailto:r@example.com").p == "none"
    r = parse_record("v=DMARC1; p=reject; sp=bogus; rua=mailto:r@example.com")
    assert (r.p, r.sp) == ("none", None)


def test_optional_tags_fall_back_to_defaults_and_unknown_tags_are_ignored():
    r = parse_record("v=DMARC1;p=Reject;pct=200;adkim=x;aspf=S;future=1;ri=abc;np=bogus;")
    assert (r.p, r.pct, r.adkim, r.aspf, r.ri, r.np) == ("reject", 100, "r", "s", 86400, None)
    r = parse_record(" v = DMARC1 ; p = quarantine ; sp=none; np=reject ;pct=0")
    assert (r.p, r.sp, r.np, r.pct) == ("quarantine", "none", "reject", 0)


def test_discovery_falls_back_to_the_organizational_domain():
    txt = zone({"_dmarc.example.com": ["v=DMARC1; p=reject; sp=quarantine"]})
    found = discover("a.b.example.com", txt)
    assert found.domain == "example.com" and found.record is not None
    r = check_dmarc(["a.b.example.com"], "none", None, [], txt)
    assert (r.result, r.policy) == ("fail", "quarantine")  # sp for a subdomain


def test_non_dmarc_txt_records_are_skipped_and_two_dmarc_records_mean_none():
    txt = zone(
        {
            "_dmarc.one.example": ["google-site-verification=x", "v=DMARC1; p=reject"],
            "_dmarc.two.example": ["v=DMARC1; p=reject", "v=DMARC1; p=none"],
        }
    )
    assert discover("one.example", txt).record.p == "reject"
    two = check_dmarc(["two.example"], "fail", None, [], txt)
    assert two.result == "none" and "2 DMARC records" in two.reason


def test_np_applies_to_nonexistent_subdomains_only():
    txt = zone({"_dmarc.example.com": ["v=DMARC1; p=none; np=reject"]})
    existing = {"real.example.com"}
    r = check_dmarc(["ghost.example.com"], "none", None, [], txt, exists=lambda n: n in existing)
    assert (r.result, r.policy, r.disposition) == ("fail", "reject", "reject")
    r = check_dmarc(["real.example.com"], "none", None, [], txt, exists=lambda n: n in existing)
    assert (r.result, r.policy) == ("fail", "none")


def test_dns_temporary_failure_is_temperror_never_a_policy():
    r = check_dmarc(["example.com"], "fail", None, [], zone({"_dmarc.example.com": "servfail"}))
    assert r.result == "temperror" and r.disposition == "none"


@pytest.mark.parametrize("p", ["none", "quarantine", "reject"])
@pytest.mark.parametrize(
    "spf,dkim,expected",
    [
        (("pass", "example.com"), [], "pass"),  # SPF aligned
        (("pass", "bounces.example.com"), [], "pass"),  # relaxed SPF alignment
        (("fail", "example.com"), ["example.com"], "pass"),  # DKIM aligned
        (("pass", "example.net"), ["example.net"], "fail"),  # both pass, neither aligned
        (("softfail", "example.com"), [], "fail"),
        (("none", None), [], "fail"),
    ],
)
def test_pass_fail_matrix(p, spf, dkim, expected):
    txt = zone({"_dmarc.example.com": [f"v=DMARC1; p={p}"]})
    r = check_dmarc(["example.com"], spf[0], spf[1], dkim, txt)
    assert r.result == expected
    assert r.disposition == (p if expected == "fail" else "none")


def test_no_record_is_none():
    r = check_dmarc(["example.org"], "fail", None, [], zone({}))
    assert (r.result, r.disposition) == ("none", "none")


def test_every_from_domain_is_evaluated_and_the_strictest_wins():
    txt = zone(
        {"_dmarc.bank.example": ["v=DMARC1; p=reject"], "_dmarc.mine.example": ["v=DMARC1; p=none"]}
    )
    # the attacker's own domain passes; the bank's does not
    r = check_dmarc(["mine.example", "bank.example"], "pass", "mine.example", [], txt)
    assert (r.result, r.author, r.disposition) == ("fail", "bank.example", "reject")


def test_no_from_domain_is_permerror():
    assert check_dmarc(None, "pass", "x.example", [], zone({})).result == "permerror"
    many = [f"d{i}.example" for i in range(6)]
    assert check_dmarc(many, "pass", "x.example", [], zone({})).result == "permerror"
