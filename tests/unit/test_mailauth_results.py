"""Authentication-Results (RFC 8601): our header, and removal of forged ones (section 5)."""

from __future__ import annotations

from mailsuite.mailauth.arc import ARCResult
from mailsuite.mailauth.dkim_verify import DKIMResult
from mailsuite.mailauth.dmarc import DMARCResult
from mailsuite.mailauth.headers import fields, from_domains, header_section
from mailsuite.mailauth.results import (
    authserv_id_of,
    parse_results,
    results_header,
    strip_forged_results,
)
from mailsuite.mailauth.spf import SPFResult

ID = "mx.example.test"


def value_of(header: bytes) -> str:
    text = header.decode().replace("\n\t", " ").strip()
    return text.split(":", 1)[1].strip()


def test_one_header_with_every_method():
    header = results_header(
        ID,
        SPFResult("pass", "example.org", "mailfrom", "alice@example.org"),
        [
            DKIMResult("pass", "example.org", "s1", "rsa-sha256"),
            DKIMResult("fail", "example.org", "e1", "ed25519-sha256", "body hash did not verify"),
        ],
        DMARCResult("pass", "example.org", "reject", "none", "example.org"),
        ARCResult("none"),
    )
    assert header.startswith(b"Authentication-Results: mx.example.test;\n\tspf=pass ")
    assert header.endswith(b"\n") and b"\r" not in header
    assert all(len(line) <= 998 for line in header.split(b"\n"))
    parsed = parse_results(value_of(header))
    assert parsed.authserv_id == ID
    methods = [(r.method, r.result) for r in parsed.results]
    assert methods == [
        ("spf", "pass"),
        ("dkim", "pass"),
        ("dkim", "fail"),
        ("dmarc", "pass"),
        ("arc", "none"),
    ]
    spf, dkim1, dkim2, dmarc, _arc = parsed.results
    assert spf.smtp_mailfrom == "alice@example.org"
    assert (dkim1.header_d, dkim1.header_s, dkim1.header_a) == ("example.org", "s1", "rsa-sha256")
    assert dkim2.reason == "body hash did not verify"
    assert dmarc.header_from == "example.org"


def test_null_sender_reports_the_helo_identity_and_no_dkim_is_none():
    header = results_header(
        ID, SPFResult("none", "client.example", "helo", "postmaster@client.example"), []
    )
    parsed = parse_results(value_of(header))
    assert parsed.results[0].smtp_helo == "client.example"
    assert (parsed.results[1].method, parsed.results[1].result) == ("dkim", "none")


def test_checks_turned_off_are_left_out():
    assert results_header(ID) == b"Authentication-Results: mx.example.test; none\n"
    header = results_header(ID, dkim=[DKIMResult("pass", "a.example", "s", "rsa-sha256")])
    assert b"spf=" not in header and b"dmarc=" not in header


def test_sender_controlled_values_cannot_add_clauses():
    # a DKIM-Signature with d=x@y; dkim=pass ... must not write "dkim=pass" into our header
    evil = DKIMResult(
        "fail",
        "evil.example@x; dkim=pass header.d=bank.example",
        "s\r\nX: y",
        "rsa-sha256",
        "reason with @ and ; dkim=pass",
    )
    header = results_header(ID, dkim=[evil])
    parsed = parse_results(value_of(header))
    assert [(r.method, r.result) for r in parsed.results] == [("dkim", "fail")]
    assert header.count(b"\n") == 2 and b"\r" not in header
    assert parsed.results[0].header_d == "invalid"


def test_unchecked_signatures_are_reported_once():
    header = results_header(
        ID, dkim=[DKIMResult("pass", "a.example", "s", "rsa-sha256")], dkim_unchecked=95
    )
    parsed = parse_results(value_of(header))
    assert [r.result for r in parsed.results] == ["pass", "neutral"]
    assert "95 more" in parsed.results[1].reason


# ------------------------------------------------------------------ forged headers

SECTION = (
    b"Received: from a by b\r\n"
    b"Authentication-Results: mx.example.test; dkim=pass header.d=bank.example\r\n"
    b"authentication-results:MX.Example.Test.;\r\n\tspf=pass\r\n"
    b'Authentication-Results: (comment) "mx.example.test" 1; dmarc=pass\r\n'
    b"Authentication-Results: other.example; spf=fail\r\n"
    b"Authentication-Results: mx.example.test.evil; spf=pass\r\n"
    b"ARC-Authentication-Results: i=1; mx.example.test; spf=pass\r\n"
    b"Subject: hi\r\n"
    b"\r\n"
)


def test_forged_results_with_our_id_are_removed_and_others_kept():
    out, removed = strip_forged_results(SECTION, ID)
    assert removed == 3
    assert out == (
        b"Received: from a by b\r\n"
        b"Authentication-Results: other.example; spf=fail\r\n"
        b"Authentication-Results: mx.example.test.evil; spf=pass\r\n"
        b"ARC-Authentication-Results: i=1; mx.example.test; spf=pass\r\n"
        b"Subject: hi\r\n"
        b"\r\n"
    )


def test_authserv_id_extraction():
    assert authserv_id_of(" mx.example.test; spf=pass") == "mx.example.test"
    assert authserv_id_of("(c (nested)) MX.example.test 1 ; none") == "mx.example.test"
    assert authserv_id_of('"mx.example.test"; none') == "mx.example.test"
    assert authserv_id_of("   ") is None


def test_header_helpers():
    section = header_section(b"From: a@b.example\nX: 1\n\nbody\n\nmore")
    assert section == b"From: a@b.example\nX: 1\n\n"
    assert header_section(b"\r\nbody") == b"\r\n"
    assert [f.name for f in fields(b"A: 1\n b\nno colon\nC:3")] == ["A", "", "C"]
    assert from_domains(b"To: x@y.example\n\n") is None
    assert from_domains(b"From: undisclosed\n\n") is None
    assert from_domains("From: =?utf-8?q?J=C3=B6rg?= <j@Bücher.example>\n\n".encode()) == [
        "xn--bcher-kva.example"
    ]


def test_the_smtp_layer_finds_forged_results_in_any_case() -> None:
    """``forged_results`` skips the field split when no field can match (nearly all mail):
    the test for that must not miss a field name in another case, or one folded."""
    from mailsuite.smtp.mailauth_checks import forged_results

    headers = (
        b"Received: from x\n"
        b"authentication-RESULTS: MX.Example.Test.; spf=pass\n\tsmtp.mailfrom=a@b.example\n"
        b"Authentication-Results: other.example; dkim=pass\n"
        b"Subject: about Authentication-Results"
    )
    assert forged_results(headers, "mx.example.test") == (
        b"authentication-RESULTS: MX.Example.Test.; spf=pass\n\tsmtp.mailfrom=a@b.example",
    )
    assert forged_results(b"Subject: hi\nFrom: a@b.example", "mx.example.test") == ()
