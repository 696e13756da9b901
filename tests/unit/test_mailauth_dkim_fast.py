"""The DKIM fast path (mailsuite/mailauth/dkim_fast.py): what it answers itself, what it
leaves to dkimpy, and that both give dkimpy's results.  The random comparison with dkimpy is
tests/property/test_mailauth_dkim_fast.py; here are the cases a generator seldom makes."""

from __future__ import annotations

import base64
import hashlib
import re
import time

import dkim
import dkim.crypto
import pytest

from mailsuite.mailauth.dkim_verify import verify_dkim
from tests.mailauth_helpers import Keys, dkim_sign, ed25519_key, fast_answers, message, rsa_key


def dkimpy(signed: bytes, keys: Keys) -> bool:
    return bool(dkim.DKIM(signed).verify(0, dnsfunc=lambda n, timeout=5: keys(n.decode("ascii"))))


RSA = Keys({"r._domainkey.example.org": rsa_key().record})
ED = Keys({"e._domainkey.example.org": ed25519_key().record})


@pytest.mark.parametrize(
    "selector,key,keys", [("r", rsa_key(), RSA), ("e", ed25519_key(), ED)], ids=["rsa", "ed"]
)
def test_common_case_answered_without_dkimpy(selector, key, keys):
    signed = dkim_sign(message("alice@example.org"), "example.org", selector, key)
    with fast_answers() as seen:
        [r] = verify_dkim(signed, keys)[0]
    assert r.result == "pass" and seen == [("pass", "")]
    forged = signed.replace(b"Subject: hello", b"Subject: hullo")
    with fast_answers() as seen:
        [r] = verify_dkim(forged, keys)[0]
    assert (r.result, r.reason) == ("fail", "signature did not verify") and seen[0] is not None
    assert not dkimpy(forged, keys)


def _resign_with(signed: bytes, change: bytes, to: bytes) -> bytes:
    return signed.replace(change, to, 1)


@pytest.mark.parametrize(
    "change,to,want",
    [
        # an unknown tag, z= (copied headers): dkimpy decides; the signature covers the tag,
        # so changing the list of tags is a fail in both
        (b"v=1;", b"v=1; z=From:x;", "fail"),
        (b"v=1;", b"v=1; foo=bar;", "fail"),
        (b"c=relaxed/relaxed", b"c=Relaxed/relaxed", "permerror"),  # dkimpy: invalid c=
        (b"v=1;", b"v=1; l=;", "permerror"),  # an empty l=: dkimpy cannot read it
        (b"a=rsa-sha256", b"a=rsa-sha512", "permerror"),
        (b"d=example.org", b"d=example.org; d=example.org", "permerror"),  # duplicate tag
    ],
)
def test_unusual_signatures_go_to_dkimpy(change, to, want):
    signed = _resign_with(
        dkim_sign(message("alice@example.org"), "example.org", "r", rsa_key()), change, to
    )
    assert to in signed
    with fast_answers() as seen:
        [r] = verify_dkim(signed, RSA)[0]
    assert r.result == want, r
    assert seen == [None] or seen == []  # left to dkimpy


def test_unusual_keys_go_to_dkimpy():
    signed = dkim_sign(message("alice@example.org"), "example.org", "r", rsa_key())
    for record, want in (
        (rsa_key().record + "; s=tlsrpt", "permerror"),  # TLS reports only (RFC 8460)
        (rsa_key().record + "; s=email", "pass"),
        (ed25519_key().record, "permerror"),  # a key of the other algorithm
        ("v=DKIM2; " + rsa_key().record[9:], "permerror"),
    ):
        keys = Keys({"r._domainkey.example.org": record})
        with fast_answers() as seen:
            [r] = verify_dkim(signed, keys)[0]
        assert r.result == want, (record, r)
        if want != "pass":
            assert seen == [None], record
        assert keys.asked == ["r._domainkey.example.org"]  # once, for both paths


def test_a_name_server_that_does_not_answer_is_asked_once_per_message():
    """Fast path and dkimpy share the lookups of a message: a temporary failure costs one
    DNS deadline, not one per attempt, and two signatures with one key ask once."""
    msg = message("alice@example.org")
    signed = dkim_sign(dkim_sign(msg, "example.org", "s", rsa_key()), "example.org", "s", rsa_key())
    keys = Keys({"s._domainkey.example.org": "servfail"})
    results, _ = verify_dkim(signed, keys)
    assert [r.result for r in results] == ["temperror", "temperror"]
    assert keys.asked == ["s._domainkey.example.org"]


def test_mbox_from_line_and_odd_header_lines_go_to_dkimpy():
    signed = dkim_sign(message("alice@example.org"), "example.org", "r", rsa_key())
    for extra, want in ((b"From alice Tue Oct  1\r\n", "pass"), (b"Odd line\r\n", "permerror")):
        with fast_answers() as seen:
            [r] = verify_dkim(extra + signed, RSA)[0]
        assert r.result == want and seen == []


def test_length_tag_counts_canonical_octets():
    """l= (RFC 6376 3.5): what follows the counted octets is not signed, in both paths."""
    msg = message("alice@example.org", body="Signed part.\r\n")
    sig = dkim.sign(
        msg,
        b"r",
        b"example.org",
        rsa_key().private,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[b"from", b"subject"],
        length=True,
    )
    signed = sig + msg
    with fast_answers() as seen:
        assert verify_dkim(signed + b"Appended by a list.\r\n", RSA)[0][0].result == "pass"
        assert verify_dkim(signed.replace(b"Signed", b"signed"), RSA)[0][0].result == "fail"
    assert seen[0] == ("pass", "") and seen[1] is not None


def test_second_from_field_is_counted_as_dkimpy_does():
    signed = dkim_sign(message("alice@example.org"), "example.org", "r", rsa_key())
    above = re.sub(rb"(?m)^To:", b"From: mallory@evil.example\r\nTo:", signed, count=1)
    with fast_answers() as seen:
        [r] = verify_dkim(above, RSA)[0]
    assert r.result == "fail" and seen[0] == ("fail", "signature did not verify")
    assert not dkimpy(above, RSA)


def _signed_with_tags(
    extra: list[tuple[bytes, bytes]], headers: tuple[bytes, ...] = (b"from", b"to", b"subject")
) -> bytes:
    """A valid rsa-sha256 signature by dkimpy's own header signer with tags its ``sign``
    will not write (x=, a chosen t=) or a header list it refuses (no From)."""
    msg = message("alice@example.org")
    d = dkim.DKIM(msg)
    d.signature_algorithm = b"rsa-sha256"
    d.hasher = hashlib.sha256
    canon = dkim.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    bh = base64.b64encode(hashlib.sha256(canon.canonicalize_body(d.body)).digest())
    fields = [
        (b"v", b"1"),
        (b"a", b"rsa-sha256"),
        (b"c", b"relaxed/relaxed"),
        (b"d", b"example.org"),
        (b"s", b"r"),
        *extra,
        (b"h", b" : ".join(headers)),
        (b"bh", bh),
        (b"b", b"0" * 60),
    ]
    pk = dkim.crypto.parse_pem_private_key(rsa_key().private)
    return b"DKIM-Signature: " + d.gen_header(fields, headers, canon, b"DKIM-Signature", pk) + msg


NOW = int(time.time())


@pytest.mark.parametrize(
    "extra,headers,want,reason",
    [
        ([(b"t", b"%d" % (NOW - 60)), (b"x", b"%d" % (NOW + 86400))], None, "pass", ""),
        ([(b"x", b"%d" % (NOW - 2 * 86400))], None, "permerror", "x= value is past"),
        ([(b"t", b"%d" % (NOW + 2 * 86400))], None, "permerror", "t= value is in the future"),
        (
            [(b"t", b"%d" % (NOW - 60)), (b"x", b"%d" % (NOW - 120))],
            None,
            "permerror",
            "x= value is less than t= value",
        ),
    ],
    ids=["valid-times", "expired", "t-future", "x-before-t"],
)
def test_time_tags_as_dkimpy_judges_them(extra, headers, want, reason):
    """RFC 6376 3.5: x= past and t= in the future (beyond dkimpy's leeway of 10 hours) are
    not verifiable: permerror with dkimpy's reason; only the valid case is answered by the
    fast path."""
    signed = _signed_with_tags(extra, *(() if headers is None else (headers,)))
    with fast_answers() as seen:
        [r] = verify_dkim(signed, RSA)[0]
    assert r.result == want, r
    assert reason.lower() in r.reason.lower()
    try:
        assert dkimpy(signed, RSA) == (want == "pass")
    except dkim.ValidationError as e:
        assert want == "permerror" and reason in str(e)
    assert seen == ([("pass", "")] if want == "pass" else [None])


def test_a_signature_that_does_not_cover_from_is_permerror():
    """RFC 6376 6.1.1: "If the h= tag does not include the From header field, the Verifier
    MUST ignore the DKIM-Signature header field and return PERMFAIL (From field not
    signed)."  dkimpy's verify does not check it (its sign refuses to make one), and both
    paths used to say pass: a signature of anyone's domain, with a From it never covered."""
    for headers in ((b"to", b"subject"), (b"to", b"fromx", b"subject")):
        signed = _signed_with_tags([], headers)
        assert dkimpy(signed, RSA)  # (dkimpy alone passes it)
        with fast_answers() as seen:
            [r] = verify_dkim(signed, RSA)[0]
        assert (r.result, r.reason) == ("permerror", "From field not signed"), r
        assert seen == []  # decided before either path
