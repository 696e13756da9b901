"""SASL PLAIN (RFC 4616) / LOGIN decoding and the From: binding parser, without sockets."""

from __future__ import annotations

import base64

import pytest

from mailsuite.smtp import sasl
from mailsuite.smtp.policy import from_addresses


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def test_plain_initial_response():
    ex = sasl.Exchange()
    step = ex.start("plain", b64(b"\x00alice@example.test\x00pass word"))
    assert step == sasl.Done(sasl.Credentials("alice@example.test", "pass word"))


def test_plain_with_authzid_and_utf8():
    step = sasl.Exchange().start("PLAIN", b64("z\x00jöe\x00pässwörd".encode()))
    assert isinstance(step, sasl.Done)
    assert step.credentials == sasl.Credentials("jöe", "pässwörd", "z")


def test_plain_continuation_and_cancel():
    ex = sasl.Exchange()
    assert ex.start("PLAIN", None) == sasl.Challenge("")
    assert ex.respond("*") == sasl.Failed("cancelled", "Authentication cancelled")
    ex = sasl.Exchange()
    ex.start("PLAIN", None)
    assert isinstance(ex.respond(b64(b"\x00u\x00p")), sasl.Done)


@pytest.mark.parametrize(
    "raw",
    [b"", b"\x00u", b"u\x00p", b"\x00\x00p", b"\x00u\x00", b"a\x00u\x00p\x00x", b"\x00\xff\x00p"],
)
def test_plain_malformed(raw):
    step = sasl.Exchange().start("PLAIN", b64(raw) if raw else "=")
    assert isinstance(step, sasl.Failed) and step.kind == "syntax"


@pytest.mark.parametrize(
    "text", ["not base64!", "YWJj ZA==", "YWJjZA", "YW=jZA==", "é", "A" * 2000]
)
def test_bad_base64(text):
    with pytest.raises(sasl.SASLError):
        sasl.decode_response(text)


def test_field_limits():
    long = b"x" * 256
    with pytest.raises(sasl.SASLError):
        sasl.parse_plain(b"\x00" + long + b"\x00p")
    assert sasl.parse_plain(b"\x00" + b"x" * 255 + b"\x00p").authcid == "x" * 255


def test_login_exchange():
    ex = sasl.Exchange()
    assert ex.start("LOGIN", None) == sasl.Challenge("VXNlcm5hbWU6")
    assert ex.respond(b64(b"alice")) == sasl.Challenge("UGFzc3dvcmQ6")
    assert ex.respond(b64(b"secret")) == sasl.Done(sasl.Credentials("alice", "secret"))
    with pytest.raises(RuntimeError):
        ex.respond("x")


def test_login_with_initial_user_and_cancel():
    ex = sasl.Exchange()
    assert ex.start("LOGIN", b64(b"alice")) == sasl.Challenge("UGFzc3dvcmQ6")
    assert ex.respond("*").kind == "cancelled"  # type: ignore[union-attr]


def test_login_empty_fields_refused():
    ex = sasl.Exchange()
    ex.start("LOGIN", None)
    assert isinstance(ex.respond("="), sasl.Failed)


def test_unknown_mechanism():
    assert sasl.Exchange().start("CRAM-MD5", None).kind == "mechanism"  # type: ignore[union-attr]


def test_credentials_repr_hides_password():
    assert "hunter2" not in repr(sasl.Credentials("u", "hunter2"))


def test_encode_plain_roundtrip():
    assert sasl.parse_plain(base64.b64decode(sasl.encode_plain("u", "p", "z"))) == (
        sasl.Credentials("u", "p", "z")
    )


# --------------------------------------------------------------------------- From: binding


def test_from_simple_and_display_names():
    h = b"From: =?utf-8?q?Al=C3=AFce?= <alice@example.test>\nTo: x@y\nSubject: s"
    assert from_addresses(h) == [["alice@example.test"]]


def test_from_several_fields_and_addresses_folded():
    h = b"From: a@x.test,\n b@x.test\nSubject: s\nfROM :\tc@x.test\r\n"
    assert from_addresses(h) == [["a@x.test", "b@x.test"], ["c@x.test"]]


def test_from_missing_is_empty_list():
    assert from_addresses(b"To: a@x.test\nSubject: no from") == []


@pytest.mark.parametrize("value", [b"From: undisclosed:;", b"From: ", b"From: nobody", b"From: <>"])
def test_from_without_usable_address(value):
    assert from_addresses(value + b"\nSubject: s") is None


def test_from_in_a_continuation_of_another_field_is_not_a_field():
    assert from_addresses(b"Subject: hi\n From: evil@x.test\nFrom: a@x.test") == [["a@x.test"]]
