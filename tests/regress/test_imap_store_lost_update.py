"""Regression (issue 15): STORE +FLAGS undid a flag change another process had just made.

The session computed each message's new flags from its folder's copy in memory (``old |
flags``) and wrote that set under the folder lock; a change made meanwhile by another process
(a second worker, mutt, a sieve filter) that this copy had not caught up with yet was
overwritten: the other client was told OK and its flag was gone.  Found while moving STOREs
that meet a busy lock to a worker thread, which widens that window inside one process too.
Now +FLAGS / -FLAGS are applied to the flags the index holds under the lock.  The tests only
ever changed flags from one process, through the same open folder.
"""

from __future__ import annotations

import pytest

from mailsuite.store.index import FolderIndex
from tests.clients import IMAPClient
from tests.harness import Server, ServerFactory

USER = "flags@example.test"
MSG = b"From: a@example.org\r\nSubject: flags\r\n\r\nbody\r\n"


@pytest.fixture(scope="module")
def server(module_servers: ServerFactory) -> Server:
    return module_servers(("imap",), users=(USER,), extra_toml="[auth]\nallow_plaintext = true\n")


def test_store_plus_flags_keeps_another_process_change(server: Server) -> None:
    c = IMAPClient(server.port("imap"), USER, timeout=15)
    c.ok("CREATE Flags")
    for _ in range(2):
        c.send(b"x APPEND Flags {%d+}\r\n" % len(MSG) + MSG + b"\r\n")
        assert c.until(b"x")[-1].startswith(b"x OK")
    c.ok("SELECT Flags")
    # another process flags message 1 (through the index, under the folder lock)
    other = FolderIndex(server.maildir(USER, "Flags"))
    try:
        other.store_flags([(1, frozenset({"\\Flagged"}))])
        other.store_flags([(2, frozenset({"\\Seen", "\\Answered"}))])
    finally:
        other.close()
    # ... and this session, which has not heard of it yet, adds and removes flags
    c.ok("STORE 1 +FLAGS (\\Seen)")
    c.ok("STORE 2 -FLAGS (\\Seen)")
    got = c.ok("FETCH 1:2 (FLAGS)")
    flags = {line.split()[1]: line for line in got if b" FETCH " in line}
    assert b"\\Flagged" in flags[b"1"] and b"\\Seen" in flags[b"1"], got
    assert b"\\Answered" in flags[b"2"] and b"\\Seen" not in flags[b"2"], got
    c.close()
