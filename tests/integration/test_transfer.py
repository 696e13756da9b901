"""``mailsuite import``, ``export`` and ``reindex`` as a person runs them, with the mail read
back over IMAP from the real server."""

from __future__ import annotations

import calendar
import imaplib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailsuite.store.index import FolderIndex
from tests.harness import PASSWORD, Server, ServerFactory

PROGRESS = re.compile(
    r"^(import|export|reindex): [\d,]+(/[\d,]+)? messages, [\d.,]+(/[\d.,]+)? MB, [\d,]+ msg/s"
    r"(, [\d,]+ already there)?(, ETA \d+:\d\d:\d\d)?$"
)
BASE = calendar.timegm((2020, 3, 1, 12, 0, 0, 0, 0, 0))


@pytest.fixture(scope="module")
def server(module_servers: ServerFactory) -> Server:
    return module_servers(("imap",), extra_toml="[auth]\nallow_plaintext = true\n")


def make_mbox(path: Path, count: int) -> list[bytes]:
    """An mboxrd file of ``count`` messages; returns the messages as they should be stored."""
    stored = []
    with path.open("wb") as f:
        for i in range(count):
            when = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(BASE + i * 60))
            status = b"Status: RO\n" if i % 2 == 0 else b""
            xstatus = b"X-Status: F\n" if i % 5 == 0 else b""
            body = b"line one\nFrom the start of a line\n>From quoted already\n"
            message = (
                b"From: a@example.org\nSubject: msg %d\n" % i + status + xstatus + b"\n" + body
            )
            stored.append(message)
            quoted = re.sub(rb"(?m)^(>*From )", rb">\1", message)
            f.write(f"From a@example.org {when}\n".encode() + quoted + b"\n")
    return stored


def login(srv: Server, user: str) -> imaplib.IMAP4:
    m = imaplib.IMAP4("127.0.0.1", srv.port("imap"))
    m.login(user, PASSWORD)
    return m


def fetch_all(m: imaplib.IMAP4, folder: str) -> list[tuple[int, frozenset[str], float, bytes]]:
    """(uid, flags, internal date, message) of every message of ``folder``, by UID."""
    typ, _ = m.select(f'"{folder}"', readonly=True)
    assert typ == "OK", folder
    typ, data = m.uid("FETCH", "1:*", "(UID FLAGS INTERNALDATE BODY.PEEK[])")
    assert typ == "OK"
    out = []
    for item in data:
        if not isinstance(item, tuple):
            continue
        head = item[0]
        uid = int(re.search(rb"UID (\d+)", head).group(1))  # type: ignore[union-attr]
        flags = frozenset(f.decode() for f in imaplib.ParseFlags(head)) - {"\\Recent"}
        idate = time.mktime(imaplib.Internaldate2tuple(head))  # type: ignore[arg-type]
        out.append((uid, flags, idate, item[1].replace(b"\r\n", b"\n")))
    return sorted(out)


def uidvalidity(m: imaplib.IMAP4, folder: str) -> int:
    _typ, data = m.status(f'"{folder}"', "(UIDVALIDITY)")
    return int(re.search(rb"UIDVALIDITY (\d+)", data[0]).group(1))  # type: ignore[union-attr]


def check_progress(stderr: str, what: str) -> None:
    lines = stderr.splitlines()
    assert lines and "\r" not in stderr, stderr
    for line in lines:
        assert PROGRESS.match(line) and line.startswith(what), line


def test_import_mbox_then_read_it_over_imap_and_import_again(
    server: Server, tmp_path: Path
) -> None:
    user = "mbox@example.test"
    server.add_user(user)
    mbox = tmp_path / "old.mbox"
    stored = make_mbox(mbox, 40)
    done = server.cli("import", user, str(mbox))
    check_progress(done.stderr, "import")  # not a terminal: plain lines
    assert done.stdout.startswith("import: 40 messages (")
    assert done.stdout.splitlines()[-1] == f"into {user}: INBOX"

    m = login(server, user)
    got = fetch_all(m, "INBOX")
    assert [uid for uid, *_ in got] == list(range(1, 41))  # UIDs in mbox order
    assert [body for *_, body in got] == stored  # >From unquoted once, nothing else touched
    for i, (_, flags, idate, _) in enumerate(got):
        expected = {"\\Seen"} if i % 2 == 0 else set()
        if i % 5 == 0:
            expected.add("\\Flagged")
        assert flags == expected, i
        assert idate == BASE + i * 60  # the From line's date
    again = server.cli("import", user, str(mbox))
    assert "40 were there already" in again.stdout
    assert len(fetch_all(m, "INBOX")) == 40
    into = server.cli("import", user, str(mbox), "--folder", "Archive.2020")
    assert f"into {user}: Archive.2020 (created: Archive.2020)" in into.stdout
    _typ, listing = m.list('""', "Archive*")
    assert any(b'"Archive.2020"' in line or b" Archive.2020" in line for line in listing)
    assert [body for *_, body in fetch_all(m, "Archive.2020")] == stored
    m.logout()


def test_import_is_held_to_the_quota_and_resumes_once_it_is_raised(
    server: Server, tmp_path: Path
) -> None:
    """A user with a limit gets what fits, in order, and a message that says how to go on;
    the rest comes in once the limit is raised (no duplicates); ``--ignore-quota`` imports
    past it for an administrator moving an account."""
    user = "quota-import@example.test"
    server.add_user(user)
    server.cli("user", "quota", user, "2K")
    mbox = tmp_path / "big.mbox"
    stored = make_mbox(mbox, 40)
    stopped = server.cli("import", user, str(mbox), check=False)
    assert stopped.returncode == 1, stopped
    m = re.search(r"stopped after (\d+) messages", stopped.stderr)
    assert m and "would exceed the quota" in stopped.stderr, stopped.stderr
    assert f"mailsuite user quota {user} SIZE" in stopped.stderr
    got = int(m.group(1))
    assert 0 < got < 40
    login_ = login(server, user)
    assert [body for *_, body in fetch_all(login_, "INBOX")] == stored[:got]
    assert "of 2K used" in server.cli("user", "quota", user).stdout
    limit, used = (
        2048,
        sum(
            int(line.split()[0])
            for line in (server.maildir(user) / "maildirsize").read_text().splitlines()[1:]
        ),
    )
    assert used <= limit
    server.cli("user", "quota", user, "1M")
    rest = server.cli("import", user, str(mbox))
    assert f"{got} were there already" in rest.stdout, rest.stdout
    assert [body for *_, body in fetch_all(login_, "INBOX")] == stored
    login_.logout()

    other = "quota-ignored@example.test"
    server.add_user(other)
    server.cli("user", "quota", other, "1K")
    forced = server.cli("import", other, str(mbox), "--ignore-quota")
    assert forced.stdout.startswith("import: 40 messages (")


def test_an_import_killed_midway_resumes_without_duplicates(server: Server, tmp_path: Path) -> None:
    user = "killed@example.test"
    server.add_user(user)
    mbox = tmp_path / "big.mbox"
    stored = make_mbox(mbox, 3000)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mailsuite.cli",
            "--config",
            str(server.config),
            "import",
            user,
            str(mbox),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    first = proc.stderr.readline()  # the first tenth is in
    assert first.startswith("import: "), first
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    box = server.maildir(user)
    partial = len(list((box / "cur").iterdir())) + len(list((box / "new").iterdir()))
    assert 0 < partial < 3000
    rest = server.cli("import", user, str(mbox))
    assert "were there already" in rest.stdout
    index = FolderIndex(box)
    try:
        index.sync()
        messages = index.messages()
        assert len(messages) == 3000
        bodies = [(box / msg.name).read_bytes() for msg in messages]  # UID order
    finally:
        index.close()
    assert bodies == stored


def _maildir_file(folder: Path, sub: str, name: str, data: bytes, mtime: float) -> None:
    path = folder / sub / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))


def make_maildir_tree(src: Path) -> None:
    """A Dovecot Maildir++ tree: folders, flags, keywords, a dovecot-uidlist order."""
    for folder in (src, src / ".Sent", src / ".Work", src / ".Work.Projects"):
        for sub in ("cur", "new", "tmp"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
    # INBOX: dovecot-uidlist says b comes before a (names alone would say the opposite)
    _maildir_file(src, "cur", "1600000001.M1P1.host,S=30:2,S", b"Subject: a\r\n\r\nfirst\r\n", BASE)
    _maildir_file(src, "cur", "1600000002.M1P1.host,S=30:2,FR", b"Subject: b\n\nsecond\n", BASE + 1)
    _maildir_file(src, "new", "1600000003.M1P1.host,S=30", b"Subject: c\n\nunseen\n", BASE + 2)
    (src / "dovecot-uidlist").write_text(
        "3 V1600000000 N4 G00\n1 :1600000002.M1P1.host,S=30\n2 :1600000001.M1P1.host,S=30\n"
    )
    (src / "tmp" / "partial").write_bytes(b"half a message")
    (src / "dovecot.index.log").write_bytes(b"\0\1")
    _maildir_file(
        src / ".Sent", "cur", "1600000010.M1P1.host:2,RS", b"Subject: sent\n\nx\n", BASE + 10
    )
    _maildir_file(
        src / ".Work.Projects",
        "cur",
        "1600000020.M1P1.host:2,Sab",
        b"Subject: labelled\n\ny\n",
        BASE + 20,
    )
    _maildir_file(
        src / ".Work.Projects",
        "cur",
        "1600000021.M1P1.host:2,Pb",
        b"Subject: forwarded\n\nz\n",
        BASE + 21,
    )
    (src / ".Work.Projects" / "dovecot-keywords").write_text("0 $Label1\n1 Important\n")


def test_import_maildir_tree_with_folders_flags_and_keywords(
    server: Server, tmp_path: Path
) -> None:
    user = "tree@example.test"
    server.add_user(user)
    src = tmp_path / "Maildir"
    make_maildir_tree(src)
    done = server.cli("import", user, str(src))
    check_progress(done.stderr, "import")
    assert done.stdout.startswith("import: 6 messages")
    assert (
        f"into {user}: INBOX, Sent, Work, Work.Projects (created: Work, Work.Projects)"
        in done.stdout
    )

    m = login(server, user)
    inbox = fetch_all(m, "INBOX")
    assert [(flags, idate, body) for _, flags, idate, body in inbox] == [
        (frozenset({"\\Flagged", "\\Answered"}), BASE + 1, b"Subject: b\n\nsecond\n"),
        (frozenset({"\\Seen"}), BASE, b"Subject: a\n\nfirst\n"),
        (frozenset(), BASE + 2, b"Subject: c\n\nunseen\n"),
    ]
    assert [(f, b) for _, f, _, b in fetch_all(m, "Sent")] == [
        (frozenset({"\\Answered", "\\Seen"}), b"Subject: sent\n\nx\n")
    ]
    assert fetch_all(m, "Work") == []
    assert [(f, d) for _, f, d, _ in fetch_all(m, "Work.Projects")] == [
        (frozenset({"\\Seen", "$Label1", "Important"}), BASE + 20),
        (frozenset({"$Forwarded", "Important"}), BASE + 21),
    ]
    _typ, subscribed = m.lsub('""', "*")
    assert any(b"Work.Projects" in line for line in subscribed)
    m.logout()


def test_export_is_read_back_by_import(server: Server, tmp_path: Path) -> None:
    alice, bob = "alice.x@example.test", "bob.x@example.test"
    server.add_user(alice)
    server.add_user(bob)
    src = tmp_path / "Maildir"
    make_maildir_tree(src)
    server.cli("import", alice, str(src))
    m = login(server, alice)
    m.select("INBOX")
    m.uid("STORE", "3", "+FLAGS", "(\\Seen NonJunk)")  # a keyword set over IMAP
    m.logout()

    out = tmp_path / "export"
    done = server.cli("export", alice, str(out))
    check_progress(done.stderr, "export")
    assert done.stdout.startswith("export: 6 messages")
    assert (out / ".Work.Projects" / "maildirfolder").exists()
    assert not (out / "maildirfolder").exists()
    keywords = (out / ".Work.Projects" / "dovecot-keywords").read_text()
    assert keywords == "0 $Forwarded\n1 $Label1\n2 Important\n"
    assert sorted(p.name.split(":2,")[1] for p in (out / ".Work.Projects" / "cur").iterdir()) == [
        "Sbc",  # \Seen $Label1 Important
        "ac",  # $Forwarded Important
    ]
    assert "NonJunk" in (out / "dovecot-keywords").read_text()
    assert (out / "dovecot-uidlist").read_text().startswith("3 V")
    assert "Work.Projects" in (out / "subscriptions").read_text().split()
    assert len(list((out / "cur").iterdir())) == 3  # all seen by a session now
    assert server.cli("export", alice, str(out), check=False).returncode != 0  # not empty

    server.cli("import", bob, str(out))
    ma, mb = login(server, alice), login(server, bob)
    for folder in ("INBOX", "Archive", "Drafts", "Junk", "Sent", "Trash", "Work", "Work.Projects"):
        a = [(f, d, body) for _, f, d, body in fetch_all(ma, folder)]
        b = [(f, d, body) for _, f, d, body in fetch_all(mb, folder)]
        assert a == b, folder
    assert any("NonJunk" in f for f, _, _ in [(f, d, b) for _, f, d, b in fetch_all(mb, "INBOX")])
    ma.logout()
    mb.logout()


def test_reindex_keeps_uids_rebuild_gives_new_ones_and_a_damaged_index_is_replaced(
    server: Server, tmp_path: Path
) -> None:
    user = "reindex@example.test"
    server.add_user(user)
    make_mbox(tmp_path / "m", 30)
    server.cli("import", user, str(tmp_path / "m"))
    m = login(server, user)
    before = fetch_all(m, "INBOX")
    valid = uidvalidity(m, "INBOX")

    checked = server.cli("reindex", user)
    check_progress(checked.stderr, "reindex")
    assert f"{user} INBOX: 30 messages, UIDVALIDITY {valid} (checked, UIDs kept)" in checked.stdout
    assert fetch_all(m, "INBOX") == before and uidvalidity(m, "INBOX") == valid

    rebuilt = server.cli("reindex", user, "--rebuild")
    assert "(rebuilt, new UIDVALIDITY)" in rebuilt.stdout
    # the running server sees it: the session that had INBOX selected is told to start over
    with pytest.raises(imaplib.IMAP4.abort, match="UIDVALIDITY changed"):
        m.noop()
    m = login(server, user)
    assert uidvalidity(m, "INBOX") > valid
    assert fetch_all(m, "INBOX") == before  # the same UIDs again: files in delivery order

    box = server.maildir(user, "Sent")
    (box / "mailsuite-index.sqlite").write_bytes(b"this is not a database" * 100)
    replaced = server.cli("reindex", user)
    assert f"{user} Sent: 0 messages" in replaced.stdout and "damaged: replaced" in replaced.stdout
    m.logout()
    unknown = server.cli("reindex", "nobody@example.test", check=False)
    assert unknown.returncode == 2 and "not a user here" in unknown.stderr
