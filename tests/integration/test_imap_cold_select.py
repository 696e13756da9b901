"""A first SELECT / EXAMINE of a big folder another program wrote (issue 15): answered from
the listing before the index exists (the UIDs made durable in ``mailsuite-index.uidlist``
first), byte for byte what the same folder indexed answers; the session's next commands,
another session and POP3 opening the folder during the build all get the right folder; a
server killed during the build gives the same UIDs and UIDVALIDITY once restarted."""

from __future__ import annotations

import poplib
import re
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from mailsuite.store.index import INDEX_NAME
from mailsuite.store.maildir import write_keywords
from mailsuite.store.uidlist import UIDLIST_NAME
from tests.clients import IMAPClient
from tests.harness import ALICE, PASSWORD, Server, ServerFactory

#: big enough for the answer before the index (index_build.UIDLIST_MIN) and for a build that
#: takes a while after it (~0.1 s of CPU), small enough to write quickly
N = 20_000
#: the last ones are in new/ (delivered, never read)
IN_NEW = 50


def _flags(i: int) -> str:
    """Message ``i``'s info letters: the first five \\Seen, then a mix with a keyword (``a``:
    $Label1), so the first unseen is message 6."""
    return "S" if i < 5 else ("S", "", "FS", "Sa")[i % 4]


def _fill(box: Path) -> None:
    """``N`` messages straight into the Maildir, as another program writes them; UID i + 1
    is "Subject: m<i>" (delivery order: the seconds in the names)."""
    write_keywords(box, {"a": "$Label1"})
    for i in range(N):
        body = b"From: a@example.org\nSubject: m%d\n\nbody %d\n" % (i, i)
        base = f"{1_700_000_000 + i}.M{i:06d}P7.gen,S={len(body)}"
        path = box / "new" / base if i >= N - IN_NEW else box / "cur" / f"{base}:2,{_flags(i)}"
        path.write_bytes(body)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder written once for the module; each test gets hard links of its files (a
    server renames and unlinks message files, never writes into one): 0.5 s, not 2-4."""
    box = tmp_path_factory.mktemp("cold-template")
    for sub in ("cur", "new", "tmp"):
        (box / sub).mkdir()
    _fill(box)
    return box


def _link_into(template: Path, box: Path) -> None:
    for sub in ("cur", "new"):
        subprocess.run(["cp", "-al", f"{template / sub}/.", f"{box / sub}/"], check=True)
    for f in template.iterdir():
        if f.is_file():
            shutil.copy2(f, box / f.name)


@pytest.fixture
def server(servers: ServerFactory, template: Path) -> Server:
    s = servers(("imap", "pop3"), users=(ALICE,), extra_toml="[auth]\nallow_plaintext = true\n")
    _link_into(template, s.maildir(ALICE))
    return s


def _building(box: Path) -> bool:
    """The build is under way: the UIDs are in the uidlist, the index is not there yet."""
    return (box / UIDLIST_NAME).exists() and not (box / INDEX_NAME).exists()


def _answer(lines: list[bytes]) -> list[bytes]:
    """A SELECT's reply without its tag."""
    return [*lines[:-1], lines[-1].split(b" ", 1)[1]]


def _value(lines: list[bytes], pattern: bytes) -> int:
    for line in lines:
        m = re.search(pattern, line)
        if m:
            return int(m.group(1))
    raise AssertionError(f"{pattern!r} not in {lines}")


@pytest.mark.parametrize("command", ["SELECT", "EXAMINE"])
def test_first_open_is_answered_before_the_index_and_equals_the_indexed_answer(
    server: Server, command: str
) -> None:
    box = server.maildir(ALICE)
    c = IMAPClient(server.port("imap"), ALICE)
    cold = c.cmd(f"{command} INBOX")
    assert _building(box)  # answered from the listing
    c.ok("NOOP")  # waits for the build
    assert (box / INDEX_NAME).exists() and not (box / UIDLIST_NAME).exists()
    c.close()
    assert b"* %d EXISTS" % N in cold and b"* %d RECENT" % N in cold
    assert b"* OK [UNSEEN 6] First unseen" in cold
    assert b"$Label1" in cold[0]
    assert _value(cold, rb"UIDNEXT (\d+)") == N + 1
    server.stop()
    if command == "SELECT":
        # the \Recent claim undone, so that the indexed folder's SELECT claims them again
        db = sqlite3.connect(box / INDEX_NAME)
        with db:
            db.execute("UPDATE meta SET value = 1 WHERE key = 'recent'")
        db.close()
    server.start()
    c = IMAPClient(server.port("imap"), ALICE)
    indexed = c.cmd(f"{command} INBOX")
    c.close()
    assert _answer(indexed) == _answer(cold)


def test_examine_before_the_index_claims_no_recent(server: Server) -> None:
    c = IMAPClient(server.port("imap"), ALICE)
    assert b"* %d RECENT" % N in c.cmd("EXAMINE INBOX")
    c.ok("NOOP")
    c.close()
    c = IMAPClient(server.port("imap"), ALICE)
    assert b"* %d RECENT" % N in c.cmd("SELECT INBOX")
    c.close()


def test_the_next_commands_after_an_early_answer(server: Server) -> None:
    """FETCH, UID SEARCH, STORE and EXPUNGE right after the answer (pipelined with it):
    they wait for the build and see the folder as told."""
    box = server.maildir(ALICE)
    c = IMAPClient(server.port("imap"), ALICE)
    c.send(
        b"s1 SELECT INBOX\r\n"
        b"f1 FETCH 1:6 (UID FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n"
        b"u1 UID SEARCH UNSEEN\r\n"
    )
    selected = c.until(b"s1")
    assert selected[-1] == b"s1 OK [READ-WRITE] SELECT completed"
    fetched = c.until(b"f1")
    assert fetched[-1].startswith(b"f1 OK"), fetched
    got = re.findall(rb"\* (\d+) FETCH \(UID (\d+) FLAGS \(([^)]*)\)", b"\n".join(fetched))
    assert [(int(s), int(u)) for s, u, _ in got] == [(i, i) for i in range(1, 7)]
    assert [f for _, _, f in got] == [b"\\Seen \\Recent"] * 5 + [b"\\Recent"]
    subjects = re.findall(rb"Subject: (m\d+)", b"\n".join(fetched))
    assert subjects == [b"m%d" % i for i in range(6)]
    searched = c.until(b"u1")
    unseen = [i + 1 for i in range(N) if i >= N - IN_NEW or "S" not in _flags(i)]
    assert searched[0] == b"* SEARCH " + b" ".join(b"%d" % u for u in unseen)
    assert c.ok("STORE 6 +FLAGS (\\Deleted)") == [b"* 6 FETCH (FLAGS (\\Deleted \\Recent))"]
    assert c.ok("EXPUNGE") == [b"* 6 EXPUNGE"]
    assert c.ok("UID FETCH 7 (FLAGS)") == [b"* 6 FETCH (UID 7 FLAGS (\\Flagged \\Seen \\Recent))"]
    c.close()
    assert not (box / UIDLIST_NAME).exists()


def test_another_session_and_pop3_opening_the_folder_during_the_build(server: Server) -> None:
    """They wait for the build (the folder lock) and get the index it made: the same UIDs,
    UIDVALIDITY and messages; \\Recent went to the session that selected first."""
    box = server.maildir(ALICE)
    a = IMAPClient(server.port("imap"), ALICE)
    b = IMAPClient(server.port("imap"), ALICE)
    p = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=20)
    p.user(ALICE)
    first = a.cmd("SELECT INBOX")
    assert _building(box)
    b.send(b"b1 SELECT INBOX\r\n")
    p.pass_(PASSWORD)  # the maildrop opens the folder at login
    second = b.until(b"b1")
    assert b"* %d EXISTS" % N in second and b"* 0 RECENT" in second
    for code in (rb"UIDVALIDITY (\d+)", rb"UIDNEXT (\d+)", rb"HIGHESTMODSEQ (\d+)"):
        assert _value(second, code) == _value(first, code)
    assert p.stat()[0] == N
    assert b"Subject: m0" in p.retr(1)[1]
    assert b"Subject: m%d" % (N - 1) in p.retr(N)[1]
    p.quit()  # (RETR marked message N \Seen: both sessions hear of it)
    assert b"* 1 FETCH (UID 1 FLAGS (\\Seen))" in b.ok("UID FETCH 1 (FLAGS)")
    assert b"* 1 FETCH (UID 1 FLAGS (\\Seen \\Recent))" in a.ok("UID FETCH 1 (FLAGS)")
    a.close()
    b.close()


def test_a_server_killed_during_the_build_keeps_the_uids_it_told(server: Server) -> None:
    box = server.maildir(ALICE)
    c = IMAPClient(server.port("imap"), ALICE)
    told = c.cmd("SELECT INBOX")
    assert _building(box)
    server.kill9()  # in the build: the index is not there yet
    assert _building(box)
    server.start()
    c = IMAPClient(server.port("imap"), ALICE)
    again = c.cmd("SELECT INBOX")
    for code in (rb"UIDVALIDITY (\d+)", rb"UIDNEXT (\d+)", rb"\* (\d+) EXISTS"):
        assert _value(again, code) == _value(told, code)
    fetched = b"\n".join(c.ok(f"UID FETCH 1,2,{N} (BODY.PEEK[HEADER.FIELDS (SUBJECT)])"))
    assert re.findall(rb"UID (\d+)", fetched) == [b"1", b"2", b"%d" % N]
    assert re.findall(rb"Subject: (m\d+)", fetched) == [b"m0", b"m1", b"m%d" % (N - 1)]
    c.close()
    assert not (box / UIDLIST_NAME).exists()


def test_select_with_qresync_of_a_folder_new_to_us_is_answered_from_the_index(
    server: Server,
) -> None:
    """QRESYNC parameters need the index's expunge history (RFC 7162 3.2.5): that SELECT
    waits for the build, as before; its answer names the folder's new UIDVALIDITY, so the
    client's cache (another UIDVALIDITY) gets no VANISHED."""
    box = server.maildir(ALICE)
    c = IMAPClient(server.port("imap"), ALICE)
    c.ok("ENABLE QRESYNC")
    lines = c.ok("SELECT INBOX (QRESYNC (1 1))")
    assert (box / INDEX_NAME).exists() and not (box / UIDLIST_NAME).exists()
    assert b"* %d EXISTS" % N in lines
    assert not [line for line in lines if b"VANISHED" in line or b"FETCH" in line]
    c.close()
