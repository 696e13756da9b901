"""Regression: a full disk (issue 10), on a small tmpfs mounted as the server's data folder.

Before: SMTP took every message whole and only then said 451 4.3.0; APPEND answered
``NO [SERVERBUG]`` with a traceback and left its file in ``tmp/``; at 0 bytes free SELECT
failed with ``NO [SERVERBUG]`` ("disk I/O error": SQLite could not create its shared-memory
file) and STORE \\Deleted + EXPUNGE removed nothing, so a user could not free space.

Now: MAIL FROM is answered 452 4.3.1 while less than ``[smtp] min_free_space`` is free; a
message that still meets a full disk during DATA gets 452 4.3.1 and leaves no file; APPEND
gets ``NO [OVERQUOTA]`` and leaves nothing; at 0 bytes free a restarted server opens the
mailbox (the space reserve gives the index room), deletes mail, and keeps the other
messages' flags.  Every 250 and every APPEND OK is a complete message; no traceback is
logged.
"""

from __future__ import annotations

import imaplib
import os
import re
import smtplib
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from tests.harness import PASSWORD, Server, wait_until

USER = "joe@example.test"
RESERVE_NAME = "mailsuite-space-reserve"  # mailsuite.store.space.RESERVE_NAME
DISK = 16 * 1024 * 1024
MIN_FREE = 3 * 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs at ``tmp_path/data`` (the test server's data folder)."""
    data = tmp_path / "data"
    data.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (this test fills a small file system)")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK},mode=0700", "tmpfs", str(data)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield data
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)


def message(n: int, size: int) -> bytes:
    lines = [b"Subject: m%d" % n, b"From: a@example.org", b""]
    total = sum(len(x) + 2 for x in lines)
    i = 0
    while total < size:
        lines.append(b"message %d line %06d %s" % (n, i, os.urandom(20).hex().encode()))
        total += len(lines[-1]) + 2
        i += 1
    return b"\r\n".join(lines) + b"\r\n"


def free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path) -> Path | None:
    """Take every free byte left (a filler file written until ENOSPC)."""
    filler = path / "filler"
    try:
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError:
        return None  # not even a file can be made: the disk is full already
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


def stored(server: Server) -> list[bytes]:
    box = server.maildir(USER)
    return [f.read_bytes() for sub in ("new", "cur") for f in sorted((box / sub).iterdir())]


def smtp_send(server: Server, body: bytes) -> tuple[str, int, bytes]:
    """One transaction: the stage that refused it ("MAIL" or "DATA", "" if none) and the
    code and text of its last reply."""
    c = smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=30)
    try:
        c.ehlo("client.example")
        code, text = c.mail("a@example.org", [f"SIZE={len(body)}"])
        if code != 250:
            return "MAIL", code, text
        code, text = c.rcpt(USER)
        assert code == 250, text
        code, text = c.data(body)
        return "" if code == 250 else "DATA", code, text
    finally:
        c.close()


def mail_until(s: socket.socket, f: BinaryIO, params: bytes, want: bytes) -> bytes:
    """MAIL FROM until its reply starts with ``want`` (the server looks at the disk at most
    once a second), taking each 250 back with RSET; the last reply after 3 s."""
    reply = b""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        s.sendall(b"MAIL FROM:<a@example.org>" + params + b"\r\n")
        reply = f.readline()
        if reply.startswith(want):
            return reply
        if reply.startswith(b"250"):
            s.sendall(b"RSET\r\n")
            f.readline()
        time.sleep(0.2)
    return reply


def login(server: Server) -> imaplib.IMAP4:
    m = imaplib.IMAP4("127.0.0.1", server.port("imap"))
    m.login(USER, PASSWORD)
    return m


def test_full_disk(small_disk: Path, tmp_path: Path) -> None:
    server = Server(
        tmp_path,
        services=("smtp", "imap"),
        extra_toml=(
            "[auth]\nallow_plaintext = true\n"
            f"[smtp]\nmax_message_size = 1048576\nmin_free_space = {MIN_FREE}\n"
        ),
    )
    server.start()
    try:
        server.add_user(USER)
        reserve = small_disk / "mail" / RESERVE_NAME
        accepted: list[bytes] = []

        # 1. a full disk met during DATA: 452 4.3.1, nothing left on disk (a message written
        # while it arrives, then one written at the end)
        for size in (800 * 1024, 100 * 1024):
            c = smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=30)
            c.ehlo("client.example")
            assert c.mail("a@example.org")[0] == 250  # room enough when MAIL came
            assert c.rcpt(USER)[0] == 250
            filler = fill(small_disk)
            code, text = c.data(message(100 + size, size))
            c.close()
            assert (code, text[:5]) == (452, b"4.3.1"), (code, text)
            tmp = server.maildir(USER) / "tmp"
            wait_until(lambda: not list(tmp.iterdir()), 10, "the partial file to go")  # noqa: B023
            assert stored(server) == []
            if filler is not None:
                filler.unlink()

        # 2. SMTP fills the disk up to min_free_space, then MAIL FROM is refused
        refusal = None
        for n in range(40):
            body = message(n, 900 * 1024)
            stage, code, text = smtp_send(server, body)
            if not stage:
                accepted.append(body)
                continue
            refusal = (stage, code, text)
            break
        assert refusal is not None and refusal[:2] == ("MAIL", 452), refusal
        assert refusal[2].startswith(b"4.3.1"), refusal
        assert len(accepted) >= 5
        assert reserve.stat().st_size > 0  # made at start, while there was room

        m = login(server)
        m.select("INBOX")
        assert m.store("1", "+FLAGS", "(\\Flagged)")[0] == "OK"
        m.logout()

        # 3. APPEND until the disk is full: NO [OVERQUOTA], and nothing left behind
        m = login(server)
        appended: list[bytes] = []
        answer = None
        for n in range(40):
            body = message(200 + n, 400 * 1024)
            typ, data = m.append("INBOX", None, None, body)
            if typ == "OK":
                appended.append(body)
                continue
            answer = data[0]
            break
        assert answer is not None and answer.startswith(b"[OVERQUOTA]"), answer
        assert list((server.maildir(USER) / "tmp").iterdir()) == []
        typ, data = m.select("INBOX")
        assert int(data[0]) == len(accepted) + len(appended)  # no index row for the NO
        m.logout()

        # every 250 and every APPEND OK is a complete message
        on_disk = stored(server)
        assert len(on_disk) == len(accepted) + len(appended)
        for body in accepted + appended:
            lf = body.replace(b"\r\n", b"\n")
            assert sum(1 for f in on_disk if f.endswith(lf)) == 1

        # 4. 0 bytes free, server restarted (nothing open): SELECT, delete, EXPUNGE work
        fill(small_disk)
        assert free(small_disk) < 4096
        server.stop()
        server.start()
        m = login(server)
        typ, data = m.select("INBOX")
        assert typ == "OK", data
        total = int(data[0])
        typ, data = m.store(f"2:{total}", "+FLAGS.SILENT", "(\\Deleted)")
        assert typ == "OK", data
        typ, data = m.expunge()
        assert typ == "OK", data
        assert len(data) == total - 1 and data[0] is not None  # the EXPUNGEs were reported
        assert len(stored(server)) == 1  # the OK is true: the files are gone
        assert free(small_disk) > 4 * 1024 * 1024
        m.logout()

        # 5. the index works afterwards and kept the flags of the message left
        m = login(server)
        typ, data = m.select("INBOX")
        assert typ == "OK" and int(data[0]) == 1, data
        typ, data = m.fetch("1", "(FLAGS BODY.PEEK[])")
        assert typ == "OK"
        assert b"\\Flagged" in data[0][0]
        assert data[0][1].endswith(accepted[0])  # after our Return-Path, Received ...
        assert m.append("INBOX", None, None, message(999, 10_000))[0] == "OK"
        m.logout()
    finally:
        server.stop()
    log = server.log.read_text(errors="replace")
    assert "Traceback" not in log, log[log.find("Traceback") - 500 :][:3000]
    assert re.search(r"disk is (nearly )?full", log)


def test_smtp_min_free_space_refuses_at_mail_from(small_disk: Path, tmp_path: Path) -> None:
    """The threshold is checked at MAIL FROM (before any DATA) and counts a declared SIZE."""
    server = Server(
        tmp_path,
        services=("smtp",),
        extra_toml=f"[smtp]\nmax_message_size = 1048576\nmin_free_space = {MIN_FREE}\n",
    )
    server.start()
    try:
        server.add_user(USER)
        with socket.create_connection(("127.0.0.1", server.port("smtp")), timeout=10) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"EHLO client.example\r\n")
            while f.readline()[3:4] == b"-":
                pass
            # leave the threshold and half a megabyte
            with (small_disk / "filler").open("wb") as filler:
                filler.write(b"\0" * (free(small_disk) - MIN_FREE - 512 * 1024))
            assert mail_until(s, f, b" SIZE=600000", b"452").startswith(b"452 4.3.1")
            assert mail_until(s, f, b" SIZE=100000", b"250").startswith(b"250")
            s.sendall(b"RSET\r\n")
            f.readline()
            fill(small_disk)
            assert mail_until(s, f, b"", b"452").startswith(b"452 4.3.1")
            s.sendall(b"QUIT\r\n")
    finally:
        server.stop()


def test_delete_at_zero_bytes_in_an_open_session(small_disk: Path, tmp_path: Path) -> None:
    """The disk fills while a session has INBOX selected (the usual way it happens): at 0
    bytes free STORE \\Deleted + EXPUNGE must really remove the mail and free the space, the
    other messages keep their flags, and the index works afterwards (no [SERVERBUG], no
    traceback).  No ``min_free_space`` here: only what IMAP does on a full disk."""
    server = Server(tmp_path, services=("imap",), extra_toml="[auth]\nallow_plaintext = true\n")
    server.start()
    try:
        server.add_user(USER)
        m = login(server)
        for n in range(4):
            assert m.append("INBOX", None, None, message(n, 1024 * 1024))[0] == "OK"
        typ, data = m.select("INBOX")
        assert typ == "OK" and int(data[0]) == 4, data
        assert m.store("4", "+FLAGS", "(\\Flagged)")[0] == "OK"
        fill(small_disk)
        assert free(small_disk) < 4096
        before = len(stored(server))
        typ, data = m.store("1:3", "+FLAGS", "(\\Deleted)")
        assert typ == "OK", data
        typ, data = m.expunge()
        assert typ == "OK", data
        assert sorted(data) == [b"1", b"2", b"3"], data  # three EXPUNGE responses
        assert (before, len(stored(server))) == (4, 1)  # the OK is true: the files are gone
        assert free(small_disk) > 2 * 1024 * 1024
        typ, data = m.fetch("1", "(FLAGS)")
        assert typ == "OK" and b"\\Flagged" in data[0], data
        m.logout()
        # a new session finds what the first one left
        m = login(server)
        typ, data = m.select("INBOX")
        assert typ == "OK" and int(data[0]) == 1, data
        typ, data = m.fetch("1", "(FLAGS)")
        assert typ == "OK" and b"\\Flagged" in data[0], data
        m.logout()
    finally:
        server.stop()  # fails the test on a traceback in the log


def test_pop3_deletes_at_zero_bytes(small_disk: Path, tmp_path: Path) -> None:
    """POP3 on a full disk: the maildrop opens (its index needs room: the reserve), RETR
    sends the message, DELE + QUIT removes it and frees the space."""
    import poplib

    from mailsuite.store.maildir import ensure_folder
    from mailsuite.store.write import write_message

    server = Server(tmp_path, services=("pop3",), extra_toml="[auth]\nallow_plaintext = true\n")
    server.start()
    try:
        server.add_user(USER)
        box = ensure_folder(server.maildir(USER))
        bodies = [message(n, 1024 * 1024).replace(b"\r\n", b"\n") for n in range(3)]
        for body in bodies:
            write_message(box, [body])
        wait_until(reserve_made(small_disk), 10, "the space reserve")
        fill(small_disk)
        assert free(small_disk) < 4096
        pop = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=30)
        pop.user(USER)
        pop.pass_(PASSWORD)
        assert pop.stat()[0] == 3
        _, lines, _ = pop.retr(1)
        assert b"\n".join(lines) + b"\n" in bodies
        for n in (1, 2):
            assert pop.dele(n).startswith(b"+OK")
        assert pop.quit().startswith(b"+OK")
        assert len(stored(server)) == 1  # the +OK is true: the files are gone
        assert free(small_disk) > 1024 * 1024
    finally:
        server.stop()  # fails the test on a traceback in the log


def reserve_made(disk: Path) -> Callable[[], bool]:
    return lambda: (disk / "mail" / RESERVE_NAME).exists()
