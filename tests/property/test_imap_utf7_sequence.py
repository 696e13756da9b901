"""Property tests: modified UTF-7 round trips, sequence-set resolution matches a naive model."""

import contextlib

from hypothesis import given
from hypothesis import strategies as st

from mailsuite.imap.sequence import SequenceSet, compress
from mailsuite.store import mailbox_names as utf7

names = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@given(names)
def test_utf7_roundtrip(name):
    wire = utf7.encode(name)
    assert wire.isascii()
    assert utf7.decode(wire) == name


@given(st.text(alphabet="&-AZaz09+,/ .!", max_size=20))
def test_utf7_decode_canonical(wire):
    try:
        plain = utf7.decode(wire)
    except ValueError:
        return
    assert utf7.encode(plain) == wire


@given(st.binary(max_size=30))
def test_utf7_decode_only_valueerror(data):
    with contextlib.suppress(ValueError):
        utf7.decode(data)


num = st.one_of(st.just("*"), st.integers(1, 60).map(str))
item = st.one_of(num, st.tuples(num, num).map(lambda t: f"{t[0]}:{t[1]}"))


@given(st.lists(item, min_size=1, max_size=6), st.integers(0, 50))
def test_resolve_matches_model(items, largest):
    s = SequenceSet.parse(",".join(items))
    expected = set()
    if largest:
        for it in items:
            a, _, b = it.partition(":")
            b = b or a
            x = largest if a == "*" else int(a)
            y = largest if b == "*" else int(b)
            lo, hi = min(x, y), max(x, y)
            if lo <= largest:
                expected.update(range(lo, min(hi, largest) + 1))
    got = set(s.iter_numbers(largest))
    assert got == expected
    if got:
        assert set(SequenceSet.parse(compress(got)).iter_numbers(10**6)) == got
    else:
        assert compress(got) == ""
    uids = sorted(st_uids := {3 * k for k in range(1, 20)})
    assert set(s.select_sorted(uids, largest)) == expected & st_uids
