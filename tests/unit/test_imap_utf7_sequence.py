"""Unit tests for modified UTF-7 and sequence sets."""

import pytest

from mailsuite.imap.sequence import SequenceSet, compress, ranges_contain
from mailsuite.store import mailbox_names as utf7


@pytest.mark.parametrize(
    "plain, wire",
    [
        ("INBOX", "INBOX"),
        ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
        ("A&B", "A&-B"),
        ("Entwürfe", "Entw&APw-rfe"),
        ("Gesendete Objekte", "Gesendete Objekte"),
        ("😀", "&2D3eAA-"),
        ("", ""),
    ],
)
def test_utf7_known(plain, wire):
    assert utf7.encode(plain) == wire
    assert utf7.decode(wire) == plain
    assert utf7.decode(wire.encode()) == plain


@pytest.mark.parametrize(
    "bad",
    [
        "&",  # unterminated
        "&Jjo",  # unterminated
        "&Jjo!-",  # bad base64 char
        "&AGE-",  # encodes printable 'a'
        "&ZeVnLIqe-&ZeVnLIqe-",  # adjacent shifts
        "&2D0-",  # lone high surrogate
        "&ZeV-",  # odd number of bytes / non-zero bits
        "&AOl-",  # non-zero padding bits
        "caf\xe9",  # non-ASCII
        "a\x01b",  # control
        "&A-",  # truncated
    ],
)
def test_utf7_strict(bad):
    with pytest.raises(ValueError):
        utf7.decode(bad)


def test_sequence_parse_and_resolve():
    s = SequenceSet.parse("1:*,5,7:3")
    assert s.resolve(10) == [(1, 10)]
    assert SequenceSet.parse("7:3,9").resolve(10) == [(3, 7), (9, 9)]
    assert SequenceSet.parse("2,4:5,3").resolve(10) == [(2, 5)]
    assert SequenceSet.parse("1:*").resolve(0) == []
    assert str(s) == "1:*,5,7:3"


def test_sequence_star_when_n_above_max():
    # RFC 3501 6.4.8: "UID n:*" with n > max still includes the max UID
    assert SequenceSet.parse("500:*").resolve(300) == [(300, 300)]
    assert SequenceSet.parse("500").resolve(300) == []
    assert SequenceSet.parse("*").resolve(42) == [(42, 42)]


@pytest.mark.parametrize(
    "bad", ["", "0", "01", "1:", ":1", "a", "1,,2", "4294967296", "1:2:3", "-1"]
)
def test_sequence_bad(bad):
    with pytest.raises(ValueError):
        SequenceSet.parse(bad)


def test_sequence_exceeds():
    assert SequenceSet.parse("1:5").exceeds(4)
    assert not SequenceSet.parse("1:*").exceeds(4)
    assert not SequenceSet.parse("4").exceeds(4)


def test_select_sorted_large():
    uids = list(range(1, 200001, 2))  # 100,000 odd uids
    s = SequenceSet.parse("10:20,199990:*")
    assert s.select_sorted(uids) == [11, 13, 15, 17, 19, 199991, 199993, 199995, 199997, 199999]
    assert s.select_indices(uids)[:2] == [5, 6]
    assert len(SequenceSet.parse("1:*").select_sorted(uids)) == 100000
    assert SequenceSet.parse("300000:*").select_sorted(uids) == [199999]
    assert SequenceSet.parse("5").select_sorted([]) == []


def test_contains_and_iter():
    s = SequenceSet.parse("3:5,9")
    r = s.resolve(100)
    assert [n for n in range(12) if ranges_contain(r, n)] == [3, 4, 5, 9]
    assert list(s.iter_numbers(100)) == [3, 4, 5, 9]
    assert s.contains(9, 100) and not s.contains(6, 100)


def test_compress():
    assert compress([]) == ""
    assert compress([5]) == "5"
    assert compress([1, 2, 3, 5, 7, 6, 3]) == "1:3,5:7"
    assert compress(range(1, 100001)) == "1:100000"
