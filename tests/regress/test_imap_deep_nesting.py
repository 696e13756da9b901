"""Regression (issue 10): a SEARCH with a 2,000-term OR chain answered ``NO [SERVERBUG]`` and
logged a RecursionError traceback at critical level, each time (any user could fill the log).
It is bad syntax beyond a fixed depth: ``BAD``, nothing logged.  The other nested inputs a
client controls are checked the same way against the real server: a message of 10,000 nested
multiparts (FETCH BODYSTRUCTURE, deep sections, SEARCH TEXT), deeply nested parentheses and a
huge sequence set.  The harness fails the test if the server log shows a traceback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.clients import IMAPClient
from tests.harness import Server, ServerFactory
from tests.imap_helpers import nested_message

USER = "deep@example.test"


@pytest.fixture(scope="module")
def srv(module_servers: ServerFactory) -> Server:
    return module_servers(("imap",), users=(USER,), extra_toml="[auth]\nallow_plaintext = true\n")


class Client(IMAPClient):
    """Commands with the test's own tags; each returns (untagged lines, tagged line)."""

    def command(self, tag: bytes, text: bytes) -> tuple[list[bytes], bytes]:
        self.send(tag + b" " + text + b"\r\n")
        lines = self.until(tag)
        return lines[:-1], lines[-1]

    def append(self, message: bytes) -> None:
        _untagged, ok = self.command(b"ap", b"APPEND INBOX {%d+}\r\n" % len(message) + message)
        assert ok.startswith(b"ap OK"), ok


@pytest.fixture
def imap(srv: Server) -> Iterator[Client]:
    c = Client(srv.port("imap"), USER, timeout=60)
    yield c
    c.close()


def test_a_2000_term_or_chain_is_bad_not_a_server_bug(imap: Client) -> None:
    imap.append(b"Subject: hello\r\n\r\nbody\r\n")
    _, ok = imap.command(b"s", b"SELECT INBOX")
    assert ok.startswith(b"s OK")
    _, tagged = imap.command(b"o", b"SEARCH " + b"OR SEEN " * 1999 + b"ALL")
    assert tagged.startswith(b"o BAD "), tagged
    _, tagged = imap.command(b"n", b"UID SEARCH " + b"NOT " * 2000 + b"ALL")
    assert tagged.startswith(b"n BAD "), tagged
    # a real client's nesting still works, and the session goes on
    untagged, tagged = imap.command(b"r", b"SEARCH OR (SUBJECT hello) (OR FROM x NOT SEEN)")
    assert tagged.startswith(b"r OK") and untagged == [b"* SEARCH 1"]


def test_ten_thousand_nested_multiparts(imap: Client) -> None:
    imap.append(nested_message(10_000, "multipart", same_boundary=False))
    imap.append(nested_message(10_000, "mixed", same_boundary=True))
    _, ok = imap.command(b"s", b"SELECT INBOX")
    assert ok.startswith(b"s OK")
    for item in (b"BODYSTRUCTURE", b"BODY", b"BODY.PEEK[" + b"1." * 5000 + b"1]"):
        untagged, tagged = imap.command(b"f", b"FETCH 1:* (" + item + b")")
        assert tagged.startswith(b"f OK"), (item[:20], tagged)
        assert untagged
    untagged, tagged = imap.command(b"t", b"SEARCH TEXT leaf")
    assert tagged.startswith(b"t OK"), tagged


def test_deep_parentheses_and_long_sequence_sets(imap: Client) -> None:
    _, ok = imap.command(b"s", b"SELECT INBOX")
    assert ok.startswith(b"s OK")
    _, tagged = imap.command(b"p", b"SEARCH " + b"(" * 5000 + b"ALL" + b")" * 5000)
    assert tagged.startswith(b"p BAD"), tagged
    _, tagged = imap.command(b"q", b"FETCH 1 (FLAGS " + b"(" * 5000 + b")" * 5000 + b")")
    assert tagged.startswith(b"q BAD"), tagged
    seqs = b",".join(b"%d:%d" % (i, i + 1) for i in range(1, 12000, 3))  # ~50 KB
    _, tagged = imap.command(b"u", b"UID FETCH " + seqs + b" (FLAGS)")
    assert tagged.startswith(b"u OK"), tagged
    _, tagged = imap.command(b"v", b"UID SEARCH UID " + seqs)
    assert tagged.startswith(b"v OK"), tagged
