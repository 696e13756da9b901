"""The sliced body canonicalization gives exactly dkimpy's bytes (RFC 6376 3.4.3, 3.4.4),
whatever the body, the slice size and the l= limit."""

from __future__ import annotations

import dkim
import pytest
from dkim.canonicalization import Relaxed, Simple
from hypothesis import given, settings
from hypothesis import strategies as st

from mailsuite.mailauth import canon

pieces = st.lists(
    st.sampled_from(
        [
            b"a",
            b"xyz",
            b" ",
            b"\t",
            b"\r",
            b"\n",
            b"\r\n",
            b"  \r\n",
            b"\n\n",
            b"\xc3\xa9",
            b".",
            b"\x00",
        ]
    ),
    max_size=60,
).map(b"".join)


def dkimpy_body(body: bytes, relaxed: bool) -> bytes:
    _, parsed = dkim.rfc822_parse(b"A: b\r\n\r\n" + body)
    return (Relaxed if relaxed else Simple).canonicalize_body(parsed)


@settings(max_examples=500)
@given(
    pieces,
    st.booleans(),
    st.integers(min_value=1, max_value=12),
    st.one_of(st.none(), st.integers(min_value=0, max_value=80)),
)
def test_same_bytes_as_dkimpy(body, relaxed, slice_size, limit):
    want = dkimpy_body(body, relaxed)
    if limit is not None:
        want = want[:limit]
    got: list[bytes] = []
    saved = canon.SLICE
    canon.SLICE = slice_size
    try:
        canon.canonical_body(body, relaxed, got.append, limit)
    finally:
        canon.SLICE = saved
    assert b"".join(got) == want


@pytest.mark.parametrize("relaxed", [True, False])
def test_large_body(relaxed):
    body = b"".join(b"line %d \t with  text  \r\n" % i for i in range(20000)) + b"\r\n\r\n"
    got: list[bytes] = []
    canon.canonical_body(body, relaxed, got.append)
    assert b"".join(got) == dkimpy_body(body, relaxed)
    assert len(got) > 10  # it really went in slices


@settings(max_examples=500)
@given(
    pieces.map(lambda b: b.replace(b"\r", b"")),
    st.booleans(),
    st.integers(min_value=1, max_value=12),
)
def test_the_stored_form_gives_dkimpys_bytes(body, relaxed, slice_size):
    """Bodies as the server stores them (LF line ends, no CR anywhere) take their own path
    (relaxed rules on the LF form, then LF -> CRLF): same bytes as dkimpy's."""
    got: list[bytes] = []
    saved = canon.SLICE
    canon.SLICE = slice_size
    try:
        canon.canonical_body(body, relaxed, got.append)
    finally:
        canon.SLICE = saved
    assert b"".join(got) == dkimpy_body(body, relaxed)
