"""What the sandbox digs out of messages: links, one-time codes, snippets, and the MIME parts
(Mailpit's body/attachment/inline split, IMAP part numbers, header field names)."""

from __future__ import annotations

import base64
import hashlib

from mailsuite.sandbox import extract, mime


def test_links_from_html_hrefs_then_text_in_order_each_once() -> None:
    html = (
        '<p><a href="https://example.com/verify?t=1&amp;u=2">Verify</a>'
        '<img src="https://tracker.example/p.gif"><a href="mailto:x@y">mail</a>'
        '<area href="http://example.net/map"></p>'
    )
    text = (
        "Open https://example.com/verify?t=1&u=2. Or (see https://example.org/a_b)! "
        "and http://example.net/map"
    )
    assert extract.links(text, html) == [
        "https://example.com/verify?t=1&u=2",
        "http://example.net/map",
        "https://example.org/a_b",
    ]


def test_codes_near_a_code_word_and_nothing_else() -> None:
    text = (
        "Your verification code is 482913.\n"
        "It expires at 10:45 on 2024-05-01. Order 88123456 ships soon.\n"
        "(c) 2024 Example Security Ltd, +1 555 0100, total $1234.50"
    )
    assert extract.codes(text, "") == ["482913"]
    assert extract.codes("Use 482 913 to sign in", "") == ["482913"]
    assert extract.codes("PIN: 4821", "") == ["4821"]
    assert extract.codes("code 2024", "") == ["2024"]  # a year right after "code" is one
    assert extract.codes("", "<p>Your one-time passcode: <b>731 044</b></p>") == ["731044"]
    assert extract.codes("Visit https://x.test/code/123456 now", "") == []
    assert extract.codes("Invoice 123456 attached", "") == []


def test_snippet_and_visible_text() -> None:
    html = (
        "<html><head><title>T</title><style>p{color:red}</style></head>"
        "<body><p>Hello   <b>world</b></p><script>x()</script><p>again &amp; again</p>"
    )
    assert extract.html_text(html) == "Hello world\nagain & again"
    assert extract.snippet("", html) == "Hello world again & again"
    assert extract.snippet("  a\n\nb  ", html) == "a b"
    long = "word " * 100
    snip = extract.snippet(long, "")
    assert len(snip) <= 253 and snip.endswith("...")


RELATED = (
    b"""From: =?utf-8?q?J=C3=BCrgen?= <j@example.org>
To: a@example.com, "Smith, B" <b@example.com>
Subject: =?utf-8?b?R3LDvMOfZQ==?=
message-id: <m1@example.org>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="outer"

--outer
Content-Type: multipart/related; boundary="rel"

--rel
Content-Type: multipart/alternative; boundary="alt"

--alt
Content-Type: text/plain; charset=iso-8859-1
Content-Transfer-Encoding: quoted-printable

Gr=FC=DFe
--alt
Content-Type: text/html; charset=utf-8

<p>Hi <img src="cid:logo@x"></p>
--alt--
--rel
Content-Type: image/png
Content-ID: <logo@x>
Content-Transfer-Encoding: base64

"""
    + base64.b64encode(b"\x89PNG fake")
    + b"""
--rel--
--outer
Content-Type: application/pdf
Content-Disposition: attachment; filename*=utf-8''r%C3%A9sum%C3%A9.pdf
Content-Transfer-Encoding: base64

"""
    + base64.b64encode(b"%PDF-1.4 fake")
    + b"""
--outer--
"""
)


def test_mime_parts_numbered_like_imap_and_split_like_mailpit() -> None:
    mail = mime.parse(RELATED)
    assert mail.text == "Grüße"
    assert mail.html.strip() == '<p>Hi <img src="cid:logo@x"></p>'
    assert sorted(mail.parts) == ["1.1.1", "1.1.2", "1.2", "2"]
    (inline,) = mail.inline
    assert (inline.part_id, inline.content_id, inline.content) == ("1.2", "logo@x", b"\x89PNG fake")
    (att,) = mail.attachments
    summary = att.summary()
    assert summary["FileName"] == "résumé.pdf" and summary["PartID"] == "2"
    assert summary["ContentType"] == "application/pdf" and summary["Size"] == 13
    assert summary["Checksums"]["SHA256"] == hashlib.sha256(b"%PDF-1.4 fake").hexdigest()
    assert mail.decoded("Subject") == "Grüße"
    assert mail.addresses("From") == [{"Name": "Jürgen", "Address": "j@example.org"}]
    assert mail.addresses("To") == [
        {"Name": "", "Address": "a@example.com"},
        {"Name": "Smith, B", "Address": "b@example.com"},
    ]
    assert mail.header("Message-ID") == "<m1@example.org>"
    assert ("message-id", "<m1@example.org>") in mail.fields


def test_garbage_gives_a_result_not_an_exception() -> None:
    for raw in (
        b"",
        b"\x00\xff" * 50,
        b"Content-Type: multipart/mixed; boundary=x\n\n--x\n",
        b"From: <<<\nTo: ,,,\n\nbody",
    ):
        mail = mime.parse(raw)
        assert isinstance(mail.text, str)


def test_canonical_header_keys_as_go_writes_them() -> None:
    assert mime.canonical_key("message-id") == "Message-Id"
    assert mime.canonical_key("X-MAILER") == "X-Mailer"
    assert mime.canonical_key("dkim-signature") == "Dkim-Signature"
