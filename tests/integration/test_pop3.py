"""POP3 against the real server (twistd on loopback) with poplib and raw sockets.

Covers every command and response code the service offers: CAPA before/after STLS, STLS
(with pipelined input discarded), USER/PASS and AUTH PLAIN, STAT LIST UIDL TOP RETR DELE
RSET NOOP QUIT, [AUTH] [IN-USE] [SYS/TEMP] [LOGIN-DELAY], EXPIRE, deletion only at QUIT,
dropped connections, UIDL stability, \\Seen on RETR, and deletion seen through the store.
"""

from __future__ import annotations

import base64
import imaplib
import importlib.util
import itertools
import os
import poplib
import socket

import pytest

from mailsuite.pop3.maildrop import LOGIN_STAMP_NAME
from mailsuite.pop3.session import STREAM_THRESHOLD
from mailsuite.store.index import FolderIndex
from mailsuite.store.write import write_message
from tests.harness import ALICE, BOB, PASSWORD, Server, ServerFactory, wait_until
from tests.tls_helpers import CertAuthority


@pytest.fixture
def server(servers: ServerFactory) -> Server:
    """A server of the test's own: for tests that restart it, fail logins (which slow the
    next ones from the address down) or look at what a login leaves behind."""
    return servers(("pop3", "pop3s"), tls=True, users=(ALICE, BOB))


@pytest.fixture(scope="module")
def shared(module_servers: ServerFactory) -> Server:
    """One server for the other tests, each with users of its own (``user``, ``other``):
    a server start each cost ~1.5 s of CPU, three processes' worth with workers."""
    return module_servers(("pop3", "pop3s"), tls=True)


_users = itertools.count()


def _new_user(server: Server) -> str:
    name = f"u{next(_users)}@example.test"
    server.add_user(name)
    return name


@pytest.fixture
def user(shared: Server) -> str:
    """A user of ``shared`` no other test logs in as: an empty maildrop, no lock held."""
    return _new_user(shared)


@pytest.fixture
def other(shared: Server) -> str:
    """A second fresh user of ``shared``."""
    return _new_user(shared)


def deliver(server: Server, user: str, bodies: list[bytes]) -> None:
    """Write ``bodies`` into ``user``'s INBOX in this order (the Maildir names written by one
    process sort in the order they were made: time, then a per-process counter)."""
    box = server.maildir(user)
    for body in bodies:
        write_message(box, [body])


def stls_login(server: Server, ca: CertAuthority, user: str = ALICE) -> poplib.POP3:
    p = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=10)
    p.stls(ca.client_context())
    p.user(user)
    p.pass_(PASSWORD)
    return p


def pop3s(server: Server, ca: CertAuthority) -> poplib.POP3_SSL:
    """A POP3 client over implicit TLS, not logged in."""
    return poplib.POP3_SSL(
        "127.0.0.1", server.port("pop3s"), context=ca.client_context(), timeout=10
    )


def ssl_login(server: Server, ca: CertAuthority, user: str = ALICE) -> poplib.POP3_SSL:
    p = pop3s(server, ca)
    p.user(user)
    p.pass_(PASSWORD)
    return p


def err_of(call: object, *args: object) -> bytes:
    with pytest.raises(poplib.error_proto) as info:
        call(*args)  # type: ignore[operator]
    return info.value.args[0]


MESSAGES = [
    b"From: a@example.org\nSubject: one\n\nfirst body\n.leading dot\n..two dots\n.\nend\n",
    b"From: b@example.org\nSubject: two\n\nsecond\r\nwith crlf\r\n",
    b"From: c@example.org\nSubject: three\n\n" + b"".join(b"line %d\n" % i for i in range(50)),
]


def crlf(b: bytes) -> bytes:
    return b.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def test_capa_and_plaintext_refused_before_stls(
    shared: Server, ca: CertAuthority, user: str
) -> None:
    p = poplib.POP3("127.0.0.1", shared.port("pop3"), timeout=10)
    assert p.getwelcome().startswith(b"+OK")
    capa = p.capa()
    assert "STLS" in capa and "USER" not in capa and "SASL" not in capa
    for cap in ("TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"):
        assert cap in capa
    assert err_of(p.user, user).startswith(b"-ERR [AUTH]")
    assert err_of(
        p._shortcmd, "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{PASSWORD}".encode()).decode()
    ).startswith(b"-ERR [AUTH]")
    assert p.stls(ca.client_context()).startswith(b"+OK")
    capa = p.capa()
    assert "STLS" not in capa and "USER" in capa and capa["SASL"] == ["PLAIN"]
    assert err_of(p._shortcmd, "STLS").startswith(b"-ERR")
    p.user(user)
    assert p.pass_(PASSWORD).startswith(b"+OK")
    assert "STLS" not in p.capa()  # CAPA in the TRANSACTION state too
    p.quit()


def test_every_transaction_command(shared: Server, ca: CertAuthority, user: str) -> None:
    deliver(shared, user, MESSAGES)
    p = stls_login(shared, ca, user)
    sizes = [len(crlf(m)) for m in MESSAGES]
    assert p.stat() == (3, sum(sizes))
    resp, lines, _ = p.list()
    assert lines == [b"%d %d" % (i + 1, s) for i, s in enumerate(sizes)]
    assert p.list(2) == b"+OK 2 %d" % sizes[1]
    uidl = [line.split()[1] for line in p.uidl()[1]]
    assert len(set(uidl)) == 3 and all(0 < len(u) <= 70 for u in uidl)
    assert p.uidl(3).split()[2] == uidl[2]
    # RETR: exact content (poplib undoes the dot-stuffing) and the announced octet count
    for i, m in enumerate(MESSAGES, 1):
        resp, lines, _octets = p.retr(i)
        assert b"\r\n".join(lines) + b"\r\n" == crlf(m)
        assert resp.startswith(b"+OK %d" % sizes[i - 1])
    resp, lines, _ = p.top(3, 2)
    assert lines == [b"From: c@example.org", b"Subject: three", b"", b"line 0", b"line 1"]
    assert p.top(1, 0)[1] == [b"From: a@example.org", b"Subject: one", b""]
    assert p.noop().startswith(b"+OK")
    assert p.dele(1).startswith(b"+OK")
    assert err_of(p.dele, 1).startswith(b"-ERR")
    assert err_of(p.retr, 1).startswith(b"-ERR")
    assert err_of(p.dele, 0).startswith(b"-ERR")  # twisted.mail.pop3 deleted the last one
    assert err_of(p.dele, 4).startswith(b"-ERR")
    assert p.stat() == (2, sizes[1] + sizes[2])
    assert p.rset().startswith(b"+OK")
    assert p.stat() == (3, sum(sizes))
    p.dele(2)
    assert err_of(p._shortcmd, "FROB").startswith(b"-ERR")
    # nothing is deleted before QUIT
    assert len(shared.messages(user)) == 3
    assert p.quit().startswith(b"+OK")
    left = shared.messages(user)
    assert len(left) == 2 and all(b"Subject: two" not in m for m in left)


def test_raw_wire_format_dot_stuffing(shared: Server, ca: CertAuthority, user: str) -> None:
    deliver(shared, user, [b"Subject: x\n\n.\n+OK forged\n"])
    with socket.create_connection(("127.0.0.1", shared.port("pop3s")), timeout=10) as raw:
        tls = ca.client_context().wrap_socket(raw, server_hostname="localhost")
        f = tls.makefile("rb")
        f.readline()
        tls.sendall(f"USER {user}\r\nPASS {PASSWORD}\r\nRETR 1\r\nNOOP\r\n".encode())
        got = [f.readline() for _ in range(8)]
    assert got[2].startswith(b"+OK")
    assert got[3:8] == [b"Subject: x\r\n", b"\r\n", b"..\r\n", b"+OK forged\r\n", b".\r\n"]


def test_pipelined_commands_answered_in_order(shared: Server, ca: CertAuthority, user: str) -> None:
    deliver(shared, user, MESSAGES)
    with socket.create_connection(("127.0.0.1", shared.port("pop3s")), timeout=10) as raw:
        tls = ca.client_context().wrap_socket(raw, server_hostname="localhost")
        f = tls.makefile("rb")
        f.readline()
        tls.sendall(
            f"USER {user}\r\nPASS {PASSWORD}\r\nSTAT\r\nDELE 0\r\nLIST 1\r\nQUIT\r\n".encode()
        )
        got = f.read()
    lines = got.split(b"\r\n")
    assert lines[0].startswith(b"+OK") and lines[1].startswith(b"+OK Logged in")
    assert lines[2] == b"+OK 3 %d" % sum(len(crlf(m)) for m in MESSAGES)
    assert lines[3].startswith(b"-ERR") and lines[4].startswith(b"+OK 1 ")
    assert lines[5].startswith(b"+OK") and lines[6] == b""


def test_stls_discards_pipelined_commands(shared: Server, ca: CertAuthority, user: str) -> None:
    with socket.create_connection(("127.0.0.1", shared.port("pop3")), timeout=10) as raw:
        f = raw.makefile("rb")
        f.readline()
        raw.sendall(f"STLS\r\nUSER {user}\r\n".encode())  # USER is injected before TLS
        assert f.readline() == b"+OK Begin TLS negotiation\r\n"
        tls = ca.client_context().wrap_socket(raw, server_hostname="localhost")
        tf = tls.makefile("rb")
        tls.sendall(f"PASS {PASSWORD}\r\n".encode())
        assert tf.readline().startswith(b"-ERR")  # the USER before TLS was dropped
        tls.sendall(f"USER {user}\r\nPASS {PASSWORD}\r\n".encode())
        assert tf.readline().startswith(b"+OK")
        assert tf.readline().startswith(b"+OK Logged in")


def test_auth_plain_and_auth_response_codes(server: Server, ca: CertAuthority) -> None:
    p = pop3s(server, ca)
    assert "STLS" not in p.capa()
    bad = base64.b64encode(f"\0{ALICE}\0wrong".encode()).decode()
    assert err_of(p._shortcmd, f"AUTH PLAIN {bad}").startswith(b"-ERR [AUTH]")
    assert p._shortcmd("AUTH PLAIN") == b"+ "
    assert err_of(p._shortcmd, "*").startswith(b"-ERR")
    assert p._shortcmd("AUTH PLAIN") == b"+ "
    good = base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode()).decode()
    assert p._shortcmd(good).startswith(b"+OK")
    assert p.stat() == (0, 0)
    p.quit()
    p = pop3s(server, ca)
    p.user(ALICE)
    assert err_of(p.pass_, "wrong").startswith(b"-ERR [AUTH]")
    p.user("nobody@example.test")
    assert err_of(p.pass_, PASSWORD).startswith(b"-ERR [AUTH]")
    p.quit()


def test_in_use_lock_and_dropped_connection_deletes_nothing(
    shared: Server, ca: CertAuthority, user: str, other: str
) -> None:
    deliver(shared, user, MESSAGES)
    first = stls_login(shared, ca, user)
    assert first.stat()[0] == 3
    second = pop3s(shared, ca)
    second.user(user)
    assert err_of(second.pass_, PASSWORD).startswith(b"-ERR [IN-USE]")
    # another user is not affected
    elsewhere = ssl_login(shared, ca, other)
    elsewhere.quit()
    for n in (1, 2, 3):
        first.dele(n)
    first.sock.shutdown(socket.SHUT_RDWR)  # dropped without QUIT
    first.sock.close()
    first.file.close()

    def logged_in() -> bool:  # the lock goes when the server sees the connection close
        second.user(user)
        try:
            second.pass_(PASSWORD)
        except poplib.error_proto as e:
            assert e.args[0].startswith(b"-ERR [IN-USE]")
            return False
        return True

    wait_until(logged_in, 5, "the lock of the dropped session to go", interval=0.1)
    assert second.stat()[0] == 3
    second.quit()
    assert len(shared.messages(user)) == 3


def test_lock_released_when_server_is_killed(server: Server, ca: CertAuthority) -> None:
    deliver(server, ALICE, MESSAGES[:1])
    p = stls_login(server, ca)
    p.dele(1)
    server.kill9()
    server.start()
    q = ssl_login(server, ca)
    assert q.stat()[0] == 1
    q.quit()


def test_deletion_seen_by_a_separate_store_reader(
    shared: Server, ca: CertAuthority, user: str
) -> None:
    deliver(shared, user, MESSAGES)
    index = FolderIndex(shared.maildir(user))
    index.sync(force=True)
    uids = [m.uid for m in index.messages()]
    p = ssl_login(shared, ca, user)
    p.dele(2)
    p.quit()
    # An IMAP session keeps the UIDs it announced and compares them with the shared index
    # (which POP3 updated): the missing UID is what it reports as EXPUNGE.
    index.sync(force=True)
    now = [m.uid for m in index.messages()]
    assert now == [uids[0], uids[2]]
    assert sorted(set(uids) - set(now)) == [uids[1]]
    index.close()


def test_uidl_stable_and_unique(server: Server, ca: CertAuthority) -> None:
    deliver(server, ALICE, MESSAGES)
    p = ssl_login(server, ca)
    before = p.uidl()[1]
    p.quit()
    box = server.maildir(ALICE)
    # a flag change over IMAP (through the shared index) and a rename by another Maildir tool
    index = FolderIndex(box)
    index.sync(force=True)
    msgs = index.messages()
    index.set_flags(msgs[0].uid, {"\\Flagged"})
    index.close()
    name = next((box / "new").iterdir())
    name.rename(box / "cur" / (name.name + ":2,RS"))
    server.stop()
    server.start()
    p = ssl_login(server, ca)
    assert p.uidl()[1] == before
    p.dele(3)
    p.quit()
    deliver(server, ALICE, [MESSAGES[2]])  # same content, new message: a new UIDL
    p = ssl_login(server, ca)
    after = [line.split()[1] for line in p.uidl()[1]]
    p.quit()
    old = [line.split()[1] for line in before]
    assert after[:2] == old[:2] and after[2] not in old


def test_retr_marks_seen_top_does_not(server: Server, ca: CertAuthority) -> None:
    deliver(server, ALICE, MESSAGES[:2])
    p = ssl_login(server, ca)
    p.top(2, 1)
    p.retr(1)
    p.quit()
    index = FolderIndex(server.maildir(ALICE))
    index.sync(force=True)
    flags = [m.flags for m in index.messages()]
    index.close()
    assert flags == [frozenset({"\\Seen"}), frozenset()]
    assert len(server.messages(ALICE)) == 2


def test_errors_line_length_and_error_limit(shared: Server, ca: CertAuthority) -> None:
    with socket.create_connection(("127.0.0.1", shared.port("pop3")), timeout=10) as raw:
        f = raw.makefile("rb")
        f.readline()
        raw.sendall(b"X" * 10_000 + b"\r\n")
        assert f.readline().startswith(b"-ERR")
        assert f.read() == b""  # closed
    with socket.create_connection(("127.0.0.1", shared.port("pop3")), timeout=10) as raw:
        f = raw.makefile("rb")
        f.readline()
        raw.sendall(b"BOGUS\r\n" * 10)
        replies = f.read().split(b"\r\n")
        assert all(r.startswith(b"-ERR") for r in replies if r) and len(replies) >= 10


def test_mark_seen_off_expire_zero_and_login_delay(
    servers: ServerFactory, ca: CertAuthority
) -> None:
    s = servers(
        ("pop3", "pop3s"),
        tls=True,
        users=(ALICE,),
        extra_toml='[pop3]\nmark_seen_on_retr = false\nexpire = "0"\nlogin_delay = 600\n',
    )
    deliver(s, ALICE, MESSAGES)
    p = ssl_login(s, ca)
    capa = p.capa()
    assert capa["EXPIRE"] == ["0"] and capa["LOGIN-DELAY"] == ["600"]
    p.retr(2)
    box = s.maildir(ALICE)
    assert not any(":2,S" in f.name for f in (box / "cur").iterdir())
    p.quit()  # EXPIRE 0: what was retrieved is removed at QUIT
    left = s.messages(ALICE)
    assert len(left) == 2 and all(b"Subject: two" not in m for m in left)
    q = pop3s(s, ca)
    q.user(ALICE)
    assert err_of(q.pass_, PASSWORD).startswith(b"-ERR [LOGIN-DELAY]")
    # ten minutes pass for the server without the test waiting them: the last login's stamp
    # (what the server compares its clock with) is moved back past the delay
    stamp = box / LOGIN_STAMP_NAME
    last = stamp.stat().st_mtime
    os.utime(stamp, (last - 601, last - 601))
    q.user(ALICE)
    assert q.pass_(PASSWORD).startswith(b"+OK")
    q.quit()


def test_throttled_login_is_sys_temp_and_plaintext_option(
    servers: ServerFactory, ca: CertAuthority
) -> None:
    s = servers(
        ("pop3", "pop3s"),
        tls=True,
        users=(ALICE,),
        extra_toml="[auth]\nmax_failures_per_ip = 2\nallow_plaintext = true\n",
    )
    p = poplib.POP3("127.0.0.1", s.port("pop3"), timeout=30)
    assert "USER" in p.capa()
    for _ in range(2):
        p.user(ALICE)
        assert err_of(p.pass_, "wrong").startswith(b"-ERR [AUTH]")
    p.user(ALICE)
    assert err_of(p.pass_, PASSWORD).startswith(b"-ERR [SYS/TEMP]")
    p.quit()


def test_large_message_streamed_with_dots_at_chunk_boundaries(
    shared: Server, ca: CertAuthority, user: str
) -> None:
    # > 256 KiB is streamed in 64 KiB chunks: put "." lines and CR/LF splits on the edges
    body = bytearray(b"Subject: big\n\n")
    for boundary in range(65536, 6 * 65536 + 1, 65536):
        pad = boundary - len(body) - 1
        body += (b"a" * 70 + b"\n") * (pad // 71) + b"b" * (pad % 71) + b"\n"
        body += b".\n+OK forged\n"
    body += b"tail\n"
    deliver(s := shared, user, [bytes(body)])
    p = ssl_login(s, ca, user)
    _resp, lines, _ = p.retr(1)
    assert b"\r\n".join(lines) + b"\r\n" == crlf(bytes(body))
    assert p.noop().startswith(b"+OK")
    p.quit()


@pytest.mark.skipif(
    importlib.util.find_spec("mailsuite.imap.server") is None,
    reason="the IMAP server (mailsuite/imap/server.py) is not in this tree",
)
def test_pop3_deletion_seen_by_open_imap_session(servers: ServerFactory, ca: CertAuthority) -> None:
    s = servers(("imaps", "pop3s"), tls=True, users=(ALICE,))
    deliver(s, ALICE, MESSAGES)
    im = imaplib.IMAP4_SSL(
        "127.0.0.1", s.port("imaps"), ssl_context=ca.client_context(), timeout=10
    )
    im.login(ALICE, PASSWORD)
    assert im.select("INBOX") == ("OK", [b"3"])
    p = ssl_login(s, ca)
    p.dele(2)
    assert p.uidl(1)  # IMAP keeps working while POP3 holds the maildrop
    assert im.uid("SEARCH", "ALL")[1] == [b"1 2 3"]
    p.quit()
    im.noop()
    assert im.untagged_responses.get("EXPUNGE") == [b"2"]
    assert im.uid("SEARCH", "ALL")[1] == [b"1 3"]
    im.logout()


def test_top_is_the_header_and_the_first_lines_of_retr(server: Server, ca: CertAuthority) -> None:
    """TOP msg n (RFC 1939 7) against the real server: the lines of RETR up to the blank
    line after the header section, and n lines more, dot-stuffed and undone by poplib the
    same way; a message without a blank line is all header.  The last message is over the
    size streamed in pieces (``STREAM_THRESHOLD``), its header section alone too."""
    big_header = b"".join(b"X-Filler-%d: %s\n" % (i, b"y" * 70) for i in range(4000))
    assert len(big_header) > STREAM_THRESHOLD
    bodies = [
        b"From: a@example.org\nSubject: lf\n\n.dot\n..dots\n.\nfour\nfive\n",
        b"From: a@example.org\r\nSubject: crlf\r\n\r\nbody 1\r\n.body 2\r\n\r\nbody 4",
        b"Subject: no blank line\nX-A: b\n",
        b"\nempty header\nsecond\n",
        b"Subject: big\n" + big_header + b"\n" + b"".join(b".%d\n" % i for i in range(5000)),
    ]
    deliver(server, ALICE, bodies)
    p = stls_login(server, ca)
    try:
        for i in range(1, len(bodies) + 1):
            lines = p.retr(i)[1]
            header = lines.index(b"") + 1 if b"" in lines else len(lines)
            for n in (0, 1, 3, 10_000):
                assert p.top(i, n)[1] == lines[: header + n], (i, n)
    finally:
        p.quit()
