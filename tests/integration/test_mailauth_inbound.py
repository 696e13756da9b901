"""Inbound mail authentication end to end below SMTP: MailAuth (worker pool, DNS client,
blocking facade) against a twisted.names DNS server on 127.0.0.1 serving SPF, DKIM and DMARC
records; messages signed by dkimpy with keys made at test time, and unsigned spoofs.

The Verdict is what the SMTP policy will act on: accept / quarantine (Junk) / reject 550 5.7.26.
"""

from __future__ import annotations

import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dkim
import pytest

from mailsuite.config import parse_config
from mailsuite.mailauth.dkim_keys import txt_strings
from mailsuite.mailauth.inbound import ACCEPT, QUARANTINE, REJECT, Verdict
from mailsuite.mailauth.results import parse_results
from mailsuite.mailauth.service import MailAuth
from mailsuite.testing.dns import LoopbackDNS
from tests.mailauth_helpers import dkim_sign, ed25519_key, message, rsa_key, weak_rsa_key
from tests.reactor_thread import StallProbe, in_reactor

GOOD_IP, OTHER_IP = "127.0.0.1", "127.0.0.9"
HOST = "mx.example.test"


def txt(*texts: str) -> dict:
    """TXT records, each split into 255-octet strings as a zone file must (RFC 1035 3.3.14)."""
    return {"TXT": [txt_strings(t) if len(t) > 255 else [t] for t in texts]}


def zone() -> dict:
    names = {
        "good.test": txt("v=spf1 ip4:127.0.0.1 -all"),
        "_dmarc.good.test": txt("v=DMARC1; p=reject; rua=mailto:dmarc@good.test"),
        "r._domainkey.good.test": txt(rsa_key().record),
        "e._domainkey.good.test": txt(ed25519_key().record),
        "w._domainkey.good.test": txt(weak_rsa_key().record),
        "quar.test": txt("v=spf1 ip4:127.0.0.1 -all"),
        "_dmarc.quar.test": txt("v=DMARC1; p=quarantine"),
        "none.test": txt("v=spf1 ip4:127.0.0.1 -all"),
        "_dmarc.none.test": txt("v=DMARC1; p=none"),
        "nodmarc.test": txt("v=spf1 ip4:127.0.0.1 -all"),
        "_dmarc.pct.test": txt("v=DMARC1; p=reject; pct=0"),
        "_dmarc.np.test": txt("v=DMARC1; p=none; np=reject"),
        "exists.np.test": {"A": ["127.0.0.1"]},
        "_dmarc.sp.test": txt("v=DMARC1; p=none; sp=quarantine"),
        "sub.sp.test": {"A": ["127.0.0.1"]},
        "_dmarc.temp.test": "servfail",
        "attacker.test": txt("v=spf1 ip4:127.0.0.9 -all"),
        "a._domainkey.attacker.test": txt(ed25519_key("attacker").record),
        "fwd.test": txt("v=spf1 ip4:127.0.0.9 -all"),
        "arc._domainkey.fwd.test": txt(rsa_key(2048, "arc").record),
        "garbage.test": txt("v=spf1 ip4:999.0.0.1 include: \u00e9 -all"),
        "_dmarc.garbage.test": txt("v=DMARC1; p=", "v=DMARC1 nonsense \x01"),
        "e._domainkey.garbage.test": txt("v=DKIM1; k=ed25519; p=###"),
    }
    return {"origin": "test", "names": names}


@pytest.fixture(scope="module")
def dns_server(
    reactor: Any, loopback_dns: Callable[[dict[str, Any]], LoopbackDNS]
) -> tuple[Any, LoopbackDNS]:
    return reactor, loopback_dns(zone())


def make_auth(reactor, server, tmp_path: Path, extra: str = "") -> MailAuth:
    text = (
        f'[server]\nhostname = "{HOST}"\ndata_dir = "data"\n'
        f'[dns]\nnameservers = ["{server.nameserver}"]\ntimeout = 2\n{extra}'
    )
    config = parse_config(tomllib.loads(text), None, tmp_path)
    from mailsuite.mailauth.dns import server_resolver

    auth = MailAuth(config, reactor, server_resolver(config.nameservers, reactor))
    auth.startService()
    return auth


@pytest.fixture
def auth(dns_server, tmp_path):
    reactor, server = dns_server
    a = make_auth(reactor, server, tmp_path)
    yield a
    in_reactor(reactor, a.stopService)


def check(
    auth: MailAuth,
    msg: bytes | Path,
    mail_from: str,
    ip: str = GOOD_IP,
    helo: str = "client.example",
) -> Verdict:
    return in_reactor(auth.reactor, auth.check_message, msg, mail_from, helo, ip)


def results(verdict: Verdict) -> dict[str, list[object]]:
    value = verdict.header.decode().replace("\n\t", " ").split(":", 1)[1].strip()
    parsed = parse_results(value)
    assert parsed.authserv_id == HOST
    out: dict[str, list[object]] = {}
    for r in parsed.results:
        out.setdefault(r.method, []).append(r)
    return out


def signed_good(body: str = "Hi.\r\n") -> bytes:
    msg = message("Alice <alice@good.test>", body=body)
    return dkim_sign(dkim_sign(msg, "good.test", "r", rsa_key()), "good.test", "e", ed25519_key())


# ------------------------------------------------------------------ the matrix


def test_legitimate_signed_mail_passes_everything(auth):
    v = check(auth, signed_good(), "alice@good.test")
    assert v.action == ACCEPT and v.reply is None
    r = results(v)
    assert r["spf"][0].result == "pass" and r["spf"][0].smtp_mailfrom == "alice@good.test"
    assert sorted((d.result, d.header_d, d.header_s) for d in r["dkim"]) == [
        ("pass", "good.test", "e"),
        ("pass", "good.test", "r"),
    ]
    assert (r["dmarc"][0].result, r["dmarc"][0].header_from) == ("pass", "good.test")
    assert r["arc"][0].result == "none"


def test_unsigned_spoof_of_a_reject_domain_is_refused_with_5_7_26(auth):
    spoof = message("Your Bank <alerts@good.test>")
    v = check(auth, spoof, "bounce@attacker.test", OTHER_IP)  # the spoofer's own SPF passes
    assert v.action == REJECT
    assert (v.reply.code, v.reply.enhanced) == (550, "5.7.26")
    assert "good.test" in v.reply.text
    r = results(v)
    assert r["spf"][0].result == "pass" and r["dkim"][0].result == "none"
    assert r["dmarc"][0].result == "fail"


def test_reject_can_be_turned_into_quarantine(dns_server, tmp_path):
    reactor, server = dns_server
    a = make_auth(reactor, server, tmp_path, '[mail_auth]\ndmarc_reject = "quarantine"\n')
    try:
        v = check(a, message("alerts@good.test"), "bounce@attacker.test", OTHER_IP)
        assert v.action == QUARANTINE and v.reply is None
    finally:
        in_reactor(reactor, a.stopService)


@pytest.mark.parametrize(
    "author,action,dmarc",
    [
        ("x@quar.test", QUARANTINE, "fail"),
        ("x@none.test", ACCEPT, "fail"),
        ("x@nodmarc.test", ACCEPT, "none"),
        ("x@pct.test", QUARANTINE, "fail"),  # pct=0: reject downgraded to quarantine
        ("x@ghost.np.test", REJECT, "fail"),  # np=reject for a name that does not exist
        ("x@exists.np.test", ACCEPT, "fail"),  # ... but p=none for one that does
        ("x@sub.sp.test", QUARANTINE, "fail"),  # sp for subdomains
        ("x@temp.test", ACCEPT, "temperror"),  # DNS trouble never rejects
        ("x@garbage.test", ACCEPT, "none"),  # unusable DMARC records: no policy
    ],
)
def test_policies(auth, author, action, dmarc):
    v = check(auth, message(author), "bounce@attacker.test", OTHER_IP)
    assert v.action == action
    assert results(v)["dmarc"][0].result == dmarc


def test_aligned_spf_alone_passes_dmarc(auth):
    v = check(auth, message("alice@good.test"), "alice@good.test", GOOD_IP)
    assert v.action == ACCEPT and results(v)["dmarc"][0].result == "pass"


def test_aligned_dkim_alone_passes_from_any_ip(auth):
    # a forwarded message: SPF fails for the forwarder's address, the signature survives
    v = check(auth, signed_good(), "alice@good.test", OTHER_IP)
    r = results(v)
    assert r["spf"][0].result == "fail" and r["dmarc"][0].result == "pass"
    assert v.action == ACCEPT


def test_tampered_body_fails_dkim_and_dmarc(auth):
    tampered = signed_good("Pay 10 EUR.\r\n").replace(b"Pay 10 EUR.", b"Pay 99 EUR.")
    v = check(auth, tampered, "bounce@attacker.test", OTHER_IP)
    r = results(v)
    assert [d.result for d in r["dkim"]] == ["fail", "fail"]
    assert r["dmarc"][0].result == "fail" and v.action == REJECT


def test_weak_keys_and_sha1_fail(auth):
    msg = message("alice@good.test")
    weak = dkim_sign(msg, "good.test", "w", weak_rsa_key())
    sha1 = dkim_sign(msg, "good.test", "r", rsa_key(), b"rsa-sha1")
    for signed in (weak, sha1):
        v = check(auth, signed, "bounce@attacker.test", OTHER_IP)
        assert results(v)["dkim"][0].result == "fail" and v.action == REJECT


def test_garbage_records_give_permerror_not_a_crash(auth):
    msg = dkim_sign(message("x@garbage.test"), "garbage.test", "e", ed25519_key())
    v = check(auth, msg, "x@garbage.test", OTHER_IP)
    r = results(v)
    assert r["spf"][0].result == "permerror"
    assert r["dkim"][0].result == "permerror"
    assert v.action == ACCEPT


def test_message_from_a_file(auth, tmp_path):
    path = tmp_path / "msg.eml"
    path.write_bytes(signed_good().replace(b"\r\n", b"\n"))  # the stored form is LF
    v = check(auth, path, "alice@good.test")
    assert [d.result for d in results(v)["dkim"]] == ["pass", "pass"]


# ------------------------------------------------------------------ forged results, bounds, ARC


def test_forged_authentication_results_are_removed(auth):
    forged = (
        b"Authentication-Results: MX.example.test; dmarc=pass header.from=good.test\r\n"
        b"Authentication-Results: elsewhere.example; spf=pass\r\n" + message("alerts@good.test")
    )
    v = check(auth, forged, "bounce@attacker.test", OTHER_IP)
    out = v.apply(forged)
    headers = out.split(b"\r\n\r\n", 1)[0]
    assert headers.lower().count(b"authentication-results: mx.example.test") == 1
    assert headers.startswith(b"Authentication-Results: mx.example.test;\r\n\tspf=pass")
    assert b"dmarc=pass" not in headers and b"dmarc=fail" in headers
    assert b"Authentication-Results: elsewhere.example; spf=pass\r\n" in headers
    assert out.endswith(b"\r\n\r\nHi.\r\n")


def test_hundred_signatures_bounded_work(auth):
    signed = signed_good()
    for i in range(98):
        signed = dkim_sign(signed, f"s{i}.attacker.test", "a", ed25519_key("attacker"))
    before = auth.dns.queries
    started = time.monotonic()
    v = check(auth, signed, "alice@good.test", OTHER_IP)
    elapsed = time.monotonic() - started
    r = results(v)
    checked = [d for d in r["dkim"] if d.result != "neutral"]
    assert len(checked) == 5  # the cap
    assert {(d.header_d, d.result) for d in checked} >= {("good.test", "pass")}
    assert "95 more" in r["dkim"][-1].reason
    assert r["dmarc"][0].result == "pass"  # the aligned signatures were verified first
    assert auth.dns.queries - before <= 12  # 5 keys + SPF + DMARC, not 100 keys
    assert elapsed < 10


def arc_sealed(results: bytes = b"spf=pass smtp.mailfrom=alice@good.test") -> bytes:
    """signed_good() as fwd.test forwards it: its Authentication-Results, then an ARC set."""
    hop = b"Authentication-Results: fwd.test; " + results + b"\r\n" + signed_good()
    arc_set = dkim.arc_sign(
        hop,
        b"arc",
        b"fwd.test",
        rsa_key(2048, "arc").private,
        b"fwd.test",
        include_headers=[b"from", b"to", b"subject"],
    )
    return b"".join(arc_set) + hop


def test_arc_chain_is_verified_and_recorded(auth):
    sealed = arc_sealed()
    v = check(auth, sealed, "list@fwd.test", OTHER_IP)
    assert results(v)["arc"][0].result == "pass"
    assert b"arc=pass (sets=1)" in v.header
    broken = sealed.replace(b"Subject: hello", b"Subject: changed")
    assert results(check(auth, broken, "list@fwd.test", OTHER_IP))["arc"][0].result == "fail"


def test_too_many_arc_sets_fail_without_work(auth):
    fake = b"".join(
        f"ARC-Seal: i={i}; a=rsa-sha256; cv=pass; d=x.test; s=s; b=AAAA\r\n".encode()
        for i in range(1, 40)
    )
    before = auth.dns.queries
    v = check(auth, fake + message("alice@good.test"), "alice@good.test")
    assert results(v)["arc"][0].result == "fail"
    assert auth.dns.queries - before <= 3


def test_checks_can_be_turned_off(dns_server, tmp_path):
    reactor, server = dns_server
    a = make_auth(
        reactor, server, tmp_path, "[mail_auth]\nspf = false\narc = false\ndmarc = false\n"
    )
    try:
        v = check(a, message("alerts@good.test"), "bounce@attacker.test", OTHER_IP)
        assert v.action == ACCEPT
        assert set(results(v)) == {"dkim"}
        assert not a.applies_to("127.0.0.1", authenticated=True)
    finally:
        in_reactor(reactor, a.stopService)


def test_reactor_keeps_running_while_checks_run(auth):
    """The reactor never waits on DNS or RSA: its longest stall while 20 messages (each with
    two signatures, SPF and DMARC) are checked at once stays small."""
    reactor = auth.reactor
    probe = StallProbe()
    in_reactor(reactor, probe.start)
    try:
        from twisted.internet import defer

        msgs = [signed_good(f"message {i}\r\n") for i in range(20)]
        in_reactor(
            reactor,
            lambda: defer.gatherResults(
                [auth.check_message(m, "alice@good.test", "client.example", OTHER_IP) for m in msgs]
            ),
        )
    finally:
        in_reactor(reactor, probe.stop)
    stall = probe.longest()
    print(f"longest reactor stall: {stall * 1000:.1f} ms")
    assert stall < 0.25


def test_large_message_is_hashed_in_slices_without_stalling_the_reactor(auth):
    """dkimpy canonicalizes a body with whole-body regular expressions (about 0.25 s per MB
    holding the GIL); the body hash is computed in 32 KiB slices instead."""
    body = "".join(f"line {i:07d} with  some   spaces and a tail \t \r\n" for i in range(80000))
    big = dkim_sign(message("alice@good.test", body=body), "good.test", "e", ed25519_key())
    assert len(big) > 3_500_000
    reactor = auth.reactor
    probe = StallProbe()
    in_reactor(reactor, probe.start)
    try:
        v = check(auth, big, "alice@good.test", OTHER_IP)
    finally:
        in_reactor(reactor, probe.stop)
    assert [d.result for d in results(v)["dkim"]] == ["pass"]
    stall = probe.longest()
    print(f"longest reactor stall with a {len(big) // 1_000_000} MB message: {stall * 1000:.1f} ms")
    assert stall < 0.25


def test_a_check_that_raises_is_its_temperror_and_the_others_still_count(auth, monkeypatch):
    """A fault of ours (or a library's) inside one check: that check says temperror
    ("internal error"), the others give their results, and nothing is rejected."""
    import mailsuite.mailauth.inbound as inbound

    def broken(*_args: object, **_kw: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(inbound, "verify_arc", broken)
    v = check(auth, signed_good(), "alice@good.test")
    assert v.action == ACCEPT
    r = results(v)
    assert r["arc"][0].result == "temperror"
    assert r["spf"][0].result == "pass" and r["dmarc"][0].result == "pass"
    assert sorted(d.result for d in r["dkim"]) == ["pass", "pass"]
    monkeypatch.setattr(inbound, "verify_dkim", broken)
    r = results(check(auth, signed_good(), "alice@good.test"))
    assert [d.result for d in r["dkim"]] == ["temperror"]
    assert r["spf"][0].result == "pass"
