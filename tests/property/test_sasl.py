"""Property tests for SASL PLAIN/LOGIN decoding (hypothesis)."""

from __future__ import annotations

import base64

from hypothesis import given
from hypothesis import strategies as st

from mailsuite.smtp import sasl

field = st.text(
    alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=60,
)


@given(field, field, st.one_of(st.just(""), field))
def test_plain_roundtrip(user, password, authzid):
    step = sasl.Exchange().start("PLAIN", sasl.encode_plain(user, password, authzid))
    assert step == sasl.Done(sasl.Credentials(user, password, authzid))


@given(field, field)
def test_login_roundtrip(user, password):
    ex = sasl.Exchange()
    assert isinstance(ex.start("LOGIN", None), sasl.Challenge)
    assert isinstance(ex.respond(base64.b64encode(user.encode()).decode()), sasl.Challenge)
    step = ex.respond(base64.b64encode(password.encode()).decode())
    assert step == sasl.Done(sasl.Credentials(user, password))


@given(st.text(max_size=200))
def test_any_text_response_is_a_step_never_an_exception(text):
    ex = sasl.Exchange()
    ex.start("PLAIN", None)
    step = ex.respond(text)
    assert isinstance(step, sasl.Done | sasl.Failed)
    if isinstance(step, sasl.Done):
        assert step.credentials.authcid and step.credentials.password


@given(st.binary(max_size=800))
def test_any_bytes_decode_or_fail_cleanly(raw):
    encoded = base64.b64encode(raw).decode()
    step = sasl.Exchange().start("PLAIN", encoded or "=")
    if isinstance(step, sasl.Done):
        c = step.credentials
        assert f"{c.authzid}\x00{c.authcid}\x00{c.password}".encode() == raw
    else:
        assert isinstance(step, sasl.Failed) and step.kind == "syntax"


@given(
    st.text(
        alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/= \t", max_size=40
    )
)
def test_decode_is_strict_base64(text):
    try:
        out = sasl.decode_response(text)
    except sasl.SASLError:
        return
    assert text == "=" or base64.b64encode(out).decode() == text
