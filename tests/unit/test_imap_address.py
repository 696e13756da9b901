"""RFC 5322 address lists for ENVELOPE and SEARCH (issue 9: names in comment form, comments
inside addresses)."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from mailsuite.imap.address import Address, address_text, parse_address_list
from mailsuite.imap.message import envelope
from mailsuite.imap.parser import NIL
from mailsuite.store.index import FolderIndex, NewFile
from mailsuite.store.maildir import ensure_folder
from mailsuite.store.write import write_tmp
from tests.imap_helpers import wire


def from_of(field: bytes) -> object:
    return wire(envelope(b"From: " + field + b"\nSubject: x\n\n"))[2]


def test_envelope_takes_the_name_from_a_comment_when_there_is_no_phrase() -> None:
    # issue 9: the name was NIL
    assert from_of(b"user@domain (Real Name)") == [[b"Real Name", NIL, b"user", b"domain"]]
    assert from_of(b"(Real Name) user@domain") == [[b"Real Name", NIL, b"user", b"domain"]]
    assert from_of(b"<user@domain> (Real  Name)") == [[b"Real Name", NIL, b"user", b"domain"]]
    # folded, nested, quoted pairs
    assert from_of(b"user@domain (Real\n (the) \\) Name)") == [
        [b"Real (the) ) Name", NIL, b"user", b"domain"]
    ]
    # a phrase wins over a comment; an empty comment names nothing
    assert from_of(b'"Smith, John" <js@x.test> (work)') == [[b"Smith, John", NIL, b"js", b"x.test"]]
    assert from_of(b"user@domain ()") == [[NIL, NIL, b"user", b"domain"]]
    # several addresses keep their own comments
    assert from_of(b"a@x.test (A), b@y.test, c@z.test (C)") == [
        [b"A", NIL, b"a", b"x.test"],
        [NIL, NIL, b"b", b"y.test"],
        [b"C", NIL, b"c", b"z.test"],
    ]


def test_comments_inside_an_address_are_not_part_of_it() -> None:
    assert from_of(b"<user-from (comment)@ (comment) domain.org>") == [
        [NIL, NIL, b"user-from", b"domain.org"]
    ]
    assert parse_address_list("<user-from (comment)@ (comment) domain.org>") == [
        Address(None, None, "user-from", "domain.org")
    ]


def test_address_text_is_the_plain_form_search_matches() -> None:
    assert address_text("<user-from (comment)@ (comment) domain.org>") == "user-from@domain.org"
    assert address_text("user@domain (Real Name)") == "Real Name <user@domain>"
    assert (
        address_text('"Joe Q. Public" <john.q.public@example.com>, x@y')
        == "Joe Q. Public <john.q.public@example.com>, x@y"
    )
    assert address_text("Team: a@x.test, B <b@y.test>;") == "Team:, a@x.test, B <b@y.test>, ;"
    assert address_text("<>") == ""
    assert address_text("") == ""


@given(st.text(alphabet=st.sampled_from(list('ab@.<>,:;"()\\[] \t\n=?')), max_size=60))
def test_any_text_parses_without_error(text: str) -> None:
    for a in parse_address_list(text):
        assert isinstance(a, Address)
    address_text(text)
    envelope(b"From: " + text.encode() + b"\n\n")


def test_envelopes_cached_by_older_code_are_computed_again(tmp_path: Path) -> None:
    """The fix must reach messages whose ENVELOPE an older version cached in the index."""
    box = ensure_folder(tmp_path / "box")
    tmp, unique, size, wsize = write_tmp(box, [b"From: user@domain (Real Name)\n\nx\n"])
    index = FolderIndex(box)
    (uid,) = index.add_files([NewFile(tmp, unique, frozenset(), size, wsize, None, b"(old)")])
    assert index.details([uid])[uid][3] == b"(old)"
    index.db.execute("UPDATE meta SET value = 1 WHERE key = 'cache_version'")  # as 1 left it
    index.close()
    index = FolderIndex(box)
    try:
        assert index.details([uid])[uid][3] is None  # FETCH computes it again
        index.store_cached([(uid, "envelope", b"(new)")])
    finally:
        index.close()
    index = FolderIndex(box)  # and only once
    try:
        assert index.details([uid])[uid][3] == b"(new)"
    finally:
        index.close()
