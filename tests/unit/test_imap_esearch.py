"""ESEARCH responses (RFC 4731) and the MODSEQ they report (RFC 7162 3.1.5, issue 9)."""

from __future__ import annotations

import pytest

from mailsuite.imap.message_commands import _esearch
from mailsuite.imap.parser import Command

RESULT = [(1, 11), (2, 12), (3, 13)]  # (seq, uid)
MODSEQS = {11: 5, 12: 9, 13: 7}


def esearch(returns: set[str], uid: bool = False, modseq: bool = True) -> bytes:
    cmd = Command("t", "SEARCH", uid, [])
    nums = [u if uid else s for s, u in RESULT]
    return _esearch(cmd, returns, nums, modseq, MODSEQS, RESULT)


@pytest.mark.parametrize(
    ("returns", "expected"),
    [
        ({"MIN"}, b"MIN 1 MODSEQ 5"),  # the message MIN returns, not the highest match (9)
        ({"MAX"}, b"MAX 3 MODSEQ 7"),
        ({"MIN", "MAX"}, b"MIN 1 MAX 3 MODSEQ 7"),  # the higher of the two returned
        ({"COUNT"}, b"COUNT 3 MODSEQ 9"),  # every match
        ({"MIN", "COUNT"}, b"MIN 1 COUNT 3 MODSEQ 9"),
        ({"ALL"}, b"ALL 1:3 MODSEQ 9"),
    ],
)
def test_modseq_is_that_of_the_messages_returned(returns: set[str], expected: bytes) -> None:
    assert esearch(returns) == b'* ESEARCH (TAG "t") ' + expected + b"\r\n"


def test_uid_search_and_no_modseq_key() -> None:
    assert esearch({"MIN"}, uid=True) == b'* ESEARCH (TAG "t") UID MIN 11 MODSEQ 5\r\n'
    assert esearch({"MIN"}, modseq=False) == b'* ESEARCH (TAG "t") MIN 1\r\n'


def test_no_match_gives_count_only() -> None:
    cmd = Command("t", "SEARCH", False, [])
    assert _esearch(cmd, {"MIN", "COUNT"}, [], True, MODSEQS, []) == (
        b'* ESEARCH (TAG "t") COUNT 0\r\n'
    )
