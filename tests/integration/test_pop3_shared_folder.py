"""POP3 and IMAP on one folder model (README: "the folder model IMAP and POP3 share"): one
server, one user, both protocols at once.  What one does the other sees -- an IMAP session in
IDLE hears POP3's ``\\Seen`` and deletions as they happen, POP3 leaves out what IMAP flagged
``\\Deleted`` and no longer lists what IMAP expunged -- while POP3 keeps its own rules: a
locked, numbered snapshot per session with stable UIDLs."""

from __future__ import annotations

import poplib
import re

import pytest

from mailsuite.store.write import write_message
from tests.clients import IMAPClient
from tests.harness import ALICE, PASSWORD, Server, ServerFactory

MESSAGES = [b"From: a@example.org\nSubject: m%d\n\nbody %d\n" % (i, i) for i in range(1, 5)]


@pytest.fixture
def server(servers: ServerFactory) -> Server:
    s = servers(("imap", "pop3"), users=(ALICE,), extra_toml="[auth]\nallow_plaintext = true\n")
    box = s.maildir(ALICE)
    for body in MESSAGES:
        write_message(box, [body])  # names carry the time: delivery order is the list's
    return s


class Imap(IMAPClient):
    """IMAP with IDLE (imaplib has none before Python 3.14)."""

    def __init__(self, server: Server) -> None:
        super().__init__(server.port("imap"), ALICE)

    def command(self, text: str) -> list[bytes]:
        """The untagged lines of a command that must succeed."""
        return self.ok(text)

    def idle(self) -> None:
        self.n += 1
        self.send(b"r%d IDLE\r\n" % self.n)
        assert self.readline().startswith(b"+")

    def wait_for(self, pattern: bytes, timeout: float = 10) -> bytes:
        """The next untagged line matching ``pattern`` (each read waits at most ``timeout``:
        a line that never comes fails the test with TimeoutError)."""
        self.sock.settimeout(timeout)
        while True:
            line = self.readline().rstrip(b"\r\n")
            assert line, "connection closed"
            if re.search(pattern, line):
                return line

    def done(self) -> None:
        self.send(b"DONE\r\n")
        self.until(b"r%d" % self.n)


def pop3(server: Server) -> poplib.POP3:
    p = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=10)
    p.user(ALICE)
    p.pass_(PASSWORD)
    return p


def test_imap_idle_hears_pop3_seen_and_deletions(server: Server) -> None:
    im = Imap(server)
    assert b"* 4 EXISTS" in im.command("SELECT INBOX")
    im.idle()
    p = pop3(server)
    p.retr(2)  # marks it \Seen (leave_on_server_mark_seen)
    assert b"\\Seen" in im.wait_for(rb"^\* 2 FETCH \(.*FLAGS")
    p.dele(1)
    p.dele(3)
    p.quit()
    assert im.wait_for(rb"^\* \d EXPUNGE") == b"* 3 EXPUNGE"
    assert im.wait_for(rb"^\* \d EXPUNGE") == b"* 1 EXPUNGE"
    im.done()
    assert im.command("UID SEARCH ALL") == [b"* SEARCH 2 4"]
    im.close()


def test_pop3_leaves_out_imap_deleted_and_expunged(server: Server) -> None:
    p = pop3(server)
    uidls = p.uidl()[1]
    p.quit()
    assert len(uidls) == 4
    im = Imap(server)
    im.command("SELECT INBOX")
    im.command("STORE 2 +FLAGS (\\Deleted)")
    p = pop3(server)
    # flagged \Deleted over IMAP: on its way out, not offered for download again
    assert p.stat()[0] == 3
    assert p.uidl()[1] == [
        b"%d %s" % (i + 1, u.split()[1]) for i, u in enumerate(uidls[:1] + uidls[2:])
    ]
    p.quit()
    im.command("EXPUNGE")
    im.command("STORE 1 +FLAGS (\\Deleted)")  # the first message (was 1) stays, flagged
    im.command("STORE 1 -FLAGS (\\Deleted)")
    p = pop3(server)
    assert p.stat()[0] == 3  # the expunged one is gone, the others keep their UIDLs
    assert [u.split()[1] for u in p.uidl()[1]] == [u.split()[1] for u in uidls[:1] + uidls[2:]]
    p.quit()
    im.close()


def test_pop3_snapshot_is_fixed_while_imap_changes_the_folder(server: Server) -> None:
    p = pop3(server)
    assert p.stat()[0] == 4
    im = Imap(server)
    im.command("SELECT INBOX")
    im.command("STORE 4 +FLAGS (\\Deleted)")
    im.command("EXPUNGE")
    write_message(server.maildir(ALICE), [b"Subject: late\n\nx\n"])
    assert p.stat()[0] == 4  # numbers stay fixed for the session (RFC 1939 5)
    assert p.retr(1)[1][-1] == b"body 1"
    with pytest.raises(poplib.error_proto):
        p.retr(4)  # expunged by IMAP meanwhile: -ERR, and the session goes on
    assert p.noop().startswith(b"+OK")
    p.quit()
    p = pop3(server)
    assert p.stat()[0] == 4  # three left plus the late one
    p.quit()
    im.close()
