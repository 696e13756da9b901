"""Regression (issue 15): one session waiting for the folder lock stalled every session.

Every change to a folder's index is made under its ``flock``.  The event loop's thread took
it for a STORE, an EXPUNGE (which also unlinked the files and ``fsync``\\ ed their
directories there), a \\Recent claim and any sync that had to list the directory, so while a
writer held it -- an APPEND in a worker thread or another process, across its own ``fsync`` --
no session of the process was served: under the IMAP stress mix that was a wait of
milliseconds per APPEND and EXPUNGE for all ten clients.  Now the event loop's thread never
waits for the lock: a sync that finds it taken leaves the listing for later, a STORE that
finds it taken waits in a worker thread, an EXPUNGE always runs in one.  The tests held no
lock from outside the server, so a blocked loop never showed.

Here the test process holds the lock (another program's writer, mid-change) while one
session's STORE and EXPUNGE wait for it: another session must be served meanwhile, and once
the lock is free the waiting commands answer in order with their untagged responses.
"""

from __future__ import annotations

import fcntl

import pytest

from mailsuite.store.index import LOCK_NAME
from mailsuite.store.write import write_message
from tests.clients import IMAPClient
from tests.harness import Server, ServerFactory

USER = "lock@example.test"
MSG = b"From: a@example.org\r\nSubject: lock %d\r\n\r\nbody\r\n"


@pytest.fixture(scope="module")
def server(module_servers: ServerFactory) -> Server:
    return module_servers(("imap",), users=(USER,), extra_toml="[auth]\nallow_plaintext = true\n")


def _append(c: IMAPClient, folder: str, n: int) -> None:
    for i in range(n):
        msg = MSG % i
        c.send(b"x APPEND %s {%d+}\r\n" % (folder.encode(), len(msg)) + msg + b"\r\n")
        assert c.until(b"x")[-1].startswith(b"x OK")


def test_other_sessions_are_served_while_the_folder_lock_is_held(server: Server) -> None:
    a = IMAPClient(server.port("imap"), USER, timeout=15)
    b = IMAPClient(server.port("imap"), USER, timeout=15)
    a.ok("CREATE Locked")
    _append(a, "Locked", 3)
    a.ok("SELECT Locked")
    b.ok("SELECT Locked")
    a.ok("STORE 3 +FLAGS (\\Deleted)")
    box = server.maildir(USER, "Locked")
    with (box / LOCK_NAME).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process's writer, in the middle of a change
        try:
            # another program delivers: the next sync would list new/, which needs the lock
            write_message(box, [b"Subject: from elsewhere\n\nhi\n"])
            # a STORE and a pipelined EXPUNGE that must wait for the lock
            a.send(b"s1 STORE 1 +FLAGS (\\Seen)\r\ns2 EXPUNGE\r\n")
            # ... while the other session is served (before: no answer until the lock was
            # free, and the read below timed out)
            for _ in range(3):
                b.ok("NOOP")
                fetched = b.ok("FETCH 1:* (FLAGS)")
                assert len([x for x in fetched if b" FETCH " in x]) == 3, fetched
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    lines = a.until(b"s2")
    tagged = [x for x in lines if x.startswith(b"s")]
    assert [x.split()[:2] for x in tagged] == [[b"s1", b"OK"], [b"s2", b"OK"]], lines
    i1, i2 = lines.index(tagged[0]), lines.index(tagged[1])
    assert any(x.startswith(b"* 1 FETCH") and b"\\Seen" in x for x in lines[:i1]), lines
    assert b"* 3 EXPUNGE" in lines[i1:i2], lines  # the EXPUNGE's own, before its OK
    # the other session hears of all of it at its next command
    seen = b.ok("NOOP")
    assert b"* 3 EXPUNGE" in seen, seen
    assert any(x.startswith(b"* 1 FETCH") and b"\\Seen" in x for x in seen), seen
    assert b"* 3 EXISTS" in seen, seen  # 3 - 1 expunged + 1 delivered
    a.close()
    b.close()
