"""The trace information: the date made once per second (the same text formatdate gives),
the HELO name made safe, the transaction id."""

from __future__ import annotations

import os
import time
from email.utils import formatdate, parsedate_to_datetime

from mailsuite.smtp.trace import clean_helo, new_id, received_date


def test_received_date_is_formatdate_of_its_second() -> None:
    first = received_date(1_796_000_000.25)
    assert first == formatdate(1_796_000_000, localtime=True)
    assert received_date(1_796_000_000.75) is first  # the same second: the same text
    assert received_date(1_796_000_001.0) == formatdate(1_796_000_001, localtime=True) != first
    assert abs(parsedate_to_datetime(received_date()).timestamp() - time.time()) < 2


def _old_clean_helo(name: str) -> str:
    """The character-by-character definition clean_helo must keep giving."""
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:[]")
    return "".join(c if c in allowed else "_" for c in name[:255]) or "unknown"


def test_clean_helo_as_character_by_character() -> None:
    names = ["mx.example.org", "[192.0.2.1]", "[IPv6:2001:db8::1]", "", "a b", "x\n", "\n"]
    names += ["h(e)lo", "é.example", "a" * 300, "a" * 254 + " b", "ok_name-1.", "\x00"]
    names += [chr(c) + "x" for c in range(0, 256)]
    for name in names:
        assert clean_helo(name) == _old_clean_helo(name), name


def test_new_id_is_base31_time_counter_and_process() -> None:
    a, b = new_id(), new_id()
    assert a != b and len(a) == len(b)
    digits = "0123456789BCDFGHJKLMNPQRSTVWXYZ"
    n = 0
    for c in a[:-3]:
        n = n * 31 + digits.index(c)
    assert abs((n >> 20) - time.time()) < 5
    assert a[-3:] == f"{os.getpid() % 1000:03d}"
