"""The trace information's date: made once per second, the same text formatdate gives."""

from __future__ import annotations

import time
from email.utils import formatdate, parsedate_to_datetime

from mailsuite.smtp.trace import received_date


def test_received_date_is_formatdate_of_its_second() -> None:
    first = received_date(1_796_000_000.25)
    assert first == formatdate(1_796_000_000, localtime=True)
    assert received_date(1_796_000_000.75) is first  # the same second: the same text
    assert received_date(1_796_000_001.0) == formatdate(1_796_000_001, localtime=True) != first
    assert abs(parsedate_to_datetime(received_date()).timestamp() - time.time()) < 2
