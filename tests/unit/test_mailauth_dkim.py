"""DKIM: the key store, signing (rsa-sha256 + ed25519-sha256) and bounded verification.

Keys are generated at test time (tests/mailauth_helpers.py); DNS is a dict here (the loopback
DNS versions are in tests/integration/test_mailauth_inbound.py)."""

from __future__ import annotations

import json
import stat
import threading

import dkim
import pytest

from mailsuite.mailauth.dkim_keys import KeyStore, KeyStoreError, txt_strings, zone_txt
from mailsuite.mailauth.dkim_sign import Signer
from mailsuite.mailauth.dkim_verify import verify_dkim
from tests.mailauth_helpers import Keys, dkim_sign, ed25519_key, message, rsa_key, weak_rsa_key


def published(*pairs: tuple[str, object]) -> Keys:
    return Keys({name: key.record for name, key in pairs})  # type: ignore[attr-defined]


# ------------------------------------------------------------------ key store


def test_keygen_files_modes_and_first_key_signs(tmp_path):
    store = KeyStore(tmp_path / "dkim")
    key, active = store.generate("Example.ORG", "s2026", "rsa")
    assert active and key.domain == "example.org" and key.bits == 2048
    folder = tmp_path / "dkim" / "example.org"
    assert stat.S_IMODE((folder / "s2026.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert (folder / "s2026.key").read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert json.loads((folder / "_signing.json").read_text()) == {"rsa": "s2026"}
    _second, active2 = store.generate("example.org", "s2027", "rsa")
    assert not active2  # a second key waits for 'dkim use' (publish first)
    ed, active3 = store.generate("example.org", "e2026", "ed25519")
    assert active3 and ed.bits == 256
    assert store.signing("example.org") == {"rsa": "s2026", "ed25519": "e2026"}
    assert [k.selector for k in store.keys("example.org")] == ["e2026", "s2026", "s2027"]
    store.use("example.org", "s2027")
    assert store.signing("example.org")["rsa"] == "s2027"


@pytest.mark.parametrize(
    "domain,selector,kind,needle",
    [
        ("example.org", "../x", "rsa", "not a valid selector"),
        ("example.org", "_signing", "rsa", "not a valid selector"),
        ("example.org", "a b", "rsa", "not a valid selector"),
        ("nodot", "s1", "rsa", "not a valid domain"),
        ("example.org", "s1", "dsa", "unknown algorithm"),
    ],
)
def test_keygen_refuses_bad_names(tmp_path, domain, selector, kind, needle):
    with pytest.raises(KeyStoreError, match=needle):
        KeyStore(tmp_path / "dkim").generate(domain, selector, kind)


def test_keygen_refuses_an_existing_selector_and_use_an_unknown_one(tmp_path):
    store = KeyStore(tmp_path / "dkim")
    store.generate("example.org", "s1", "ed25519")
    with pytest.raises(KeyStoreError, match="already has a selector"):
        store.generate("example.org", "s1", "rsa")
    with pytest.raises(KeyStoreError, match=r"no key with selector 'nope'.*s1"):
        store.use("example.org", "nope")


def test_signing_keys_follow_the_files_without_restart(tmp_path):
    store = KeyStore(tmp_path / "dkim")
    assert store.signing_keys("example.org") == []
    store.generate("example.org", "a1", "ed25519")
    assert [k.selector for k in store.signing_keys("example.org")] == ["a1"]
    other = KeyStore(tmp_path / "dkim")  # the CLI is another process with its own store
    other.generate("example.org", "a2", "ed25519")
    other.use("example.org", "a2")
    assert [k.selector for k in store.signing_keys("example.org")] == ["a2"]
    other.generate("example.org", "r1", "rsa")
    assert sorted(k.kind for k in store.signing_keys("example.org")) == ["ed25519", "rsa"]


def test_txt_strings_split_at_255():
    text = "v=DKIM1; k=rsa; p=" + "A" * 600
    parts = txt_strings(text)
    assert [len(p) for p in parts] == [255, 255, len(text) - 510] and "".join(parts) == text
    assert zone_txt("s._domainkey.a.example.", 'x"y') == 's._domainkey.a.example. IN TXT "x\\"y"'


# ------------------------------------------------------------------ signing


def test_signer_signs_with_both_algorithms_and_oversigns_from(tmp_path):
    store = KeyStore(tmp_path / "dkim")
    rsa_k, _ = store.generate("example.org", "r1", "rsa")
    ed_k, _ = store.generate("example.org", "e1", "ed25519")
    msg = (
        b"From: Alice <alice@example.org>\nTo: bob@example.net\nCc: c@example.net\n"
        b"Subject: hi\nList-Id: <l.example.org>\nReceived: from x\nX-Other: 1\n\nbody  \n"
    )
    headers = Signer(store).signature_headers(msg)
    assert headers.count(b"DKIM-Signature:") == 2 and b"\r" not in headers
    signed = headers + msg
    d = dkim.DKIM(signed)
    keys = Keys({rsa_k.owner.rstrip("."): rsa_k.record(), ed_k.owner.rstrip("."): ed_k.record()})
    assert d.verify(0, dnsfunc=lambda n, timeout=5: keys(n.decode()))
    assert d.verify(1, dnsfunc=lambda n, timeout=5: keys(n.decode()))
    sigs = [dkim.util.parse_tag_value(v) for n, v in d.headers if n == b"DKIM-Signature"]
    assert {s[b"a"] for s in sigs} == {b"rsa-sha256", b"ed25519-sha256"}
    for s in sigs:
        assert s[b"c"] == b"relaxed/relaxed"
        h = [x.strip() for x in s[b"h"].split(b":")]
        assert h == [b"from", b"to", b"cc", b"subject", b"list-id", b"from"]
    # an added From breaks it (over-signing)
    forged = headers + b"From: mallory@evil.example\n" + msg
    assert not dkim.DKIM(forged).verify(0, dnsfunc=lambda n, timeout=5: keys(n.decode()))
    # the wire form (CRLF) verifies the same
    wire = signed.replace(b"\n", b"\r\n")
    assert dkim.verify(wire, dnsfunc=lambda n, timeout=5: keys(n.decode()))


def test_signer_uses_the_parent_domain_within_the_organization(tmp_path):
    store = KeyStore(tmp_path / "dkim")
    store.generate("example.org", "e1", "ed25519")
    signer = Signer(store)
    assert b"d=example.org" in signer.signature_headers(b"From: a@mail.example.org\n\nx\n")
    assert signer.signature_headers(b"From: a@example.net\n\nx\n") == b""
    assert signer.signature_headers(b"To: a@example.org\n\nx\n") == b""  # no From
    assert signer.signature_headers(b"From: a@example.org\nbad header line\n\nx\n") == b""


def test_signer_is_thread_safe(tmp_path):
    store = KeyStore(tmp_path / "dkim")
    store.generate("example.org", "e1", "ed25519")
    signer = Signer(store)
    out: list[bytes] = []
    threads = [
        threading.Thread(
            target=lambda: out.append(signer.signature_headers(message("a@example.org")))
        )
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 8 and all(b"s=e1" in h for h in out)


def test_resign_replaces_only_our_signatures_over_the_changed_body(tmp_path):
    store = KeyStore(tmp_path / "dkim")
    ed_k, _ = store.generate("example.org", "e1", "ed25519")
    signer = Signer(store)
    keys = Keys({ed_k.owner.rstrip("."): ed_k.record()})
    original = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: s\r\n\r\nbody\r\n"
    foreign = b"DKIM-Signature: v=1; a=rsa-sha256; d=other.example; s=x;\r\n\tbh=AA; b=BB\r\n"
    signed = foreign + signer.signature_headers(original, linesep=b"\r\n") + original
    changed = signed.replace(b"body", b"b=6Fdy")  # as a re-encoding changes the body
    assert not dkim.verify(changed, dnsfunc=lambda n, timeout=5: keys(n.decode()))
    again = signer.resign(changed)
    assert again.count(b"DKIM-Signature:") == 2 and foreign in again  # theirs kept, ours new
    d = dkim.DKIM(again)
    ours = [
        i
        for i, (n, v) in enumerate((n, v) for n, v in d.headers if n == b"DKIM-Signature")
        if b"d=example.org" in v
    ]
    assert ours and d.verify(ours[0], dnsfunc=lambda n, timeout=5: keys(n.decode()))
    assert b"\r\n\r\nb=6Fdy" in again  # line ends kept as they were
    # without a signature of ours, nothing changes (the very same object comes back)
    plain = foreign + original
    assert signer.resign(plain) is plain


# ------------------------------------------------------------------ verification


def test_rsa_and_ed25519_pass():
    msg = message("alice@example.org")
    signed = dkim_sign(
        dkim_sign(msg, "example.org", "r", rsa_key()), "example.org", "e", ed25519_key()
    )
    keys = published(
        ("r._domainkey.example.org", rsa_key()), ("e._domainkey.example.org", ed25519_key())
    )
    results, skipped = verify_dkim(signed, keys)
    assert [(r.result, r.selector, r.algorithm) for r in results] == [
        ("pass", "e", "ed25519-sha256"),
        ("pass", "r", "rsa-sha256"),
    ]
    assert skipped == 0


def test_openssl_rsa_check_answers_as_dkimpy_does():
    """rsa_verify (OpenSSL) replaces dkimpy's pure-Python RSASSA-PKCS1-v1_5 check: same
    answer for good, tampered, foreign, short, long and zero-led signatures, both digests."""
    import hashlib

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding
    from dkim.crypto import RSASSA_PKCS1_v1_5_verify, parse_public_key

    from mailsuite.mailauth.dkim_fast import dkimpy_rsa_verify as _dkimpy_rsa_verify
    from mailsuite.mailauth.dkim_fast import rsa_verify

    assert RSASSA_PKCS1_v1_5_verify is _dkimpy_rsa_verify  # the original is kept for fallback
    keys = []
    for name in ("a", "b"):
        private = serialization.load_pem_private_key(rsa_key(name=name).private, None)
        der = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.PKCS1
        )
        keys.append((private, parse_public_key(der)))
    (private, public), (_, foreign) = keys
    for algorithm, chosen in ((hashlib.sha256, hashes.SHA256()), (hashlib.sha1, hashes.SHA1())):
        zero_led = None
        for i in range(10000):  # a signature whose first octet is 0, sent without it
            data = b"message %d" % i
            sig = private.sign(data, padding.PKCS1v15(), chosen)
            if sig[0] == 0:
                zero_led = (data, sig)
                break
        assert zero_led is not None
        data, sig = zero_led
        cases = [
            (data, sig, public),
            (data, sig[1:], public),
            (data + b"x", sig, public),
            (data, sig, foreign),
            (data, sig[:-1], public),
            (data, sig + b"\0", public),
            (data, b"", public),
            (data, bytes(256), public),
            (data, b"\xff" * 256, public),
        ]
        answers = [
            (rsa_verify(algorithm(d), s, k), _dkimpy_rsa_verify(algorithm(d), s, k))
            for d, s, k in cases
        ]
        assert answers[0] == (True, True) and answers[1] == (True, True)
        assert all(ours == theirs for ours, theirs in answers), answers
        assert not any(ours for ours, _ in answers[2:])


def test_tampered_body_fails():
    signed = dkim_sign(
        message("alice@example.org", body="Pay 10 EUR.\r\n"), "example.org", "r", rsa_key()
    )
    tampered = signed.replace(b"Pay 10 EUR.", b"Pay 99 EUR.")
    keys = published(("r._domainkey.example.org", rsa_key()))
    [r] = verify_dkim(tampered, keys)[0]
    assert (r.result, r.reason) == ("fail", "body hash did not verify")
    tampered_header = signed.replace(b"Subject: hello", b"Subject: urgent")
    assert verify_dkim(tampered_header, keys)[0][0].result == "fail"


def test_rsa_sha1_and_short_keys_fail():
    keys = published(
        ("r._domainkey.example.org", rsa_key()), ("w._domainkey.example.org", weak_rsa_key())
    )
    sha1 = dkim_sign(message("alice@example.org"), "example.org", "r", rsa_key(), b"rsa-sha1")
    [r] = verify_dkim(sha1, keys)[0]
    assert r.result == "fail" and "rsa-sha1" in r.reason
    assert keys.asked == []  # refused before any DNS
    weak = dkim_sign(message("alice@example.org"), "example.org", "w", weak_rsa_key())
    [r] = verify_dkim(weak, keys)[0]
    assert r.result == "fail" and "1024" in r.reason


def test_missing_revoked_or_garbage_keys_are_permerror_and_dns_trouble_temperror():
    msg = message("alice@example.org")
    cases = {
        "missing": None,
        "revoked": "v=DKIM1; k=rsa; p=",
        "garbage": "v=DKIM1; k=rsa; p=!!!not base64!!!",
        "wrongtype": "v=DKIM1; k=dsa; p=AAAA",
        "junk": "\x00\xff\xfe nonsense ;;; ==",
        "slow": "servfail",
    }
    keys = Keys({f"{s}._domainkey.example.org": v for s, v in cases.items()})
    expected = {
        "missing": "permerror",
        "revoked": "permerror",
        "garbage": "permerror",
        "wrongtype": "permerror",
        "junk": "permerror",
        "slow": "temperror",
    }
    for selector, result in expected.items():
        signed = dkim_sign(msg, "example.org", selector, rsa_key())
        [r] = verify_dkim(signed, keys)[0]
        assert r.result == result, (selector, r)


def test_malformed_signatures_are_permerror_not_a_crash():
    keys = published(("r._domainkey.example.org", rsa_key()))
    for sig in (
        b"DKIM-Signature: garbage\r\n",
        b"DKIM-Signature: v=1; a=rsa-sha256\r\n",
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=r; h=from; bh=@@; b=@@\r\n",
        b"DKIM-Signature: \xff\xfe=\x00\r\n",
    ):
        results, _ = verify_dkim(sig + message("alice@example.org"), keys)
        assert [r.result for r in results] == ["permerror"], sig


def test_hundred_signatures_bounded_work_aligned_first():
    msg = message("alice@example.org")
    signed = dkim_sign(msg, "example.org", "r", rsa_key())  # the real one, lowest of all
    for i in range(99):
        signed = dkim_sign(signed, f"spam{i}.example", "x", ed25519_key("spam"))
    keys = published(("r._domainkey.example.org", rsa_key()))
    results, skipped = verify_dkim(
        signed, keys, max_signatures=5, prefer=lambda d: d.endswith("example.org")
    )
    assert len(results) == 5 and skipped == 95
    assert len(keys.asked) == 5  # one key lookup per verified signature, no more
    assert results[0].domain == "example.org" and results[0].result == "pass"
    # without a preference the top five are taken
    keys.asked.clear()
    results, skipped = verify_dkim(signed, keys, max_signatures=5)
    assert [r.domain for r in results] == [f"spam{i}.example" for i in range(98, 93, -1)]
    assert len(keys.asked) == 5


def test_no_signature_is_empty():
    assert verify_dkim(message("alice@example.org"), Keys({})) == ([], 0)
