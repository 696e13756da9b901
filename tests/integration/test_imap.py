"""IMAP server end to end: the real twistd on loopback, driven by imaplib and raw sockets."""

from __future__ import annotations

import imaplib
import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from mailsuite.store.maildir import ensure_folder
from mailsuite.store.write import write_message
from tests.clients import IMAPClient, read_line
from tests.harness import (
    PASSWORD,
    Server,
    ServerFactory,
    server_connection_peers,
    wait_until,
)
from tests.tls_helpers import CertAuthority

USER = "joe@example.test"
MSG = b"From: Ann <ann@example.org>\r\nTo: joe@example.test\r\nSubject: hello\r\nDate: Mon, 1 Jan 2024 10:00:00 +0000\r\n\r\nbody text\r\n"
MIME = (
    b"From: a@example.org\r\nSubject: mime\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="XX"\r\n\r\n'
    b"--XX\r\nContent-Type: text/plain\r\n\r\npart one\r\n"
    b"--XX\r\nContent-Type: multipart/alternative; boundary=YY\r\n\r\n"
    b"--YY\r\nContent-Type: text/plain\r\n\r\nalt plain\r\n--YY\r\nContent-Type: text/html\r\n\r\n<b>alt</b>\r\n--YY--\r\n"
    b"--XX--\r\n"
)


@pytest.fixture(scope="module")
def server(module_servers: ServerFactory) -> Server:
    return module_servers(
        ("imap", "imaps", "smtp"),
        tls=True,
        users=(USER, "sam@example.test"),
        extra_toml="[auth]\nallow_plaintext = true\n[imap]\nmax_literal = 100000\n",
    )


def login(server: Server, user: str = USER) -> imaplib.IMAP4:
    m = imaplib.IMAP4("127.0.0.1", server.port("imap"))
    m.login(user, PASSWORD)
    return m


def fresh_folder(m: imaplib.IMAP4, name: str) -> None:
    m.create(name)


def test_capabilities_and_login_plain(server: Server) -> None:
    m = imaplib.IMAP4("127.0.0.1", server.port("imap"))
    assert "STARTTLS" in m.capabilities and "AUTH=PLAIN" in m.capabilities
    typ, _ = m.authenticate("PLAIN", lambda _: f"\0{USER}\0{PASSWORD}".encode())
    assert typ == "OK"
    typ, data = m.capability()
    for cap in (
        b"IDLE",
        b"UIDPLUS",
        b"MOVE",
        b"SPECIAL-USE",
        b"NAMESPACE",
        b"UNSELECT",
        b"ENABLE",
        b"LITERAL+",
        b"ID",
        b"CHILDREN",
        b"CONDSTORE",
        b"QRESYNC",
    ):
        assert cap in data[0]
    assert m.namespace()[1][0] == b'(("" ".")) NIL NIL'
    m.logout()


def test_bad_login(server: Server) -> None:
    m = imaplib.IMAP4("127.0.0.1", server.port("imap"))
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        m.login(USER, "wrong")
    m.logout()


def test_logindisabled_without_tls(servers: ServerFactory, ca: CertAuthority) -> None:
    s = servers(("imap", "imaps"), tls=True, users=(USER,))
    m = imaplib.IMAP4("127.0.0.1", s.port("imap"))
    assert "LOGINDISABLED" in m.capabilities and "AUTH=PLAIN" not in m.capabilities
    with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
        m.login(USER, PASSWORD)
    m.host = "localhost"  # the name starttls() checks the certificate against
    m.starttls(ca.client_context())
    m.login(USER, PASSWORD)
    m.logout()
    m2 = imaplib.IMAP4_SSL("127.0.0.1", s.port("imaps"), ssl_context=ca.client_context())
    m2.login(USER, PASSWORD)
    assert m2.select("INBOX")[0] == "OK"
    m2.logout()


def test_starttls_pipelined_commands_are_discarded(
    servers: ServerFactory, ca: CertAuthority
) -> None:
    s = servers(("imap",), tls=True, users=(USER,))
    sock = socket.create_connection(("127.0.0.1", s.port("imap")), timeout=20)
    assert read_line(sock).startswith(b"* OK")
    sock.sendall(f'a STARTTLS\r\nb LOGIN {USER} "{PASSWORD}"\r\n'.encode())
    # read exactly the STARTTLS reply: a reply to the injected LOGIN sent in clear text
    # after it would be taken as the start of the TLS handshake, and the handshake fail
    assert read_line(sock).startswith(b"a OK")
    tls = ca.client_context().wrap_socket(sock, server_hostname="localhost")
    f = tls.makefile("rb")
    tls.sendall(b"c CAPABILITY\r\nd SELECT INBOX\r\n")
    lines = []
    while not (line := f.readline()).startswith(b"d "):
        assert line, f"connection closed after {lines}"
        lines.append(line)
    # nothing answers the injected LOGIN inside TLS either, and it did not log in: the
    # session is still in the not-authenticated state (RFC 3501 6.3.1 needs a login first)
    assert not any(ln.startswith(b"b ") for ln in lines), lines
    assert lines[-1].startswith(b"c OK"), lines
    assert line.split()[1] in (b"BAD", b"NO"), line
    tls.close()


def test_list_special_use_children_and_escape(server: Server) -> None:
    m = login(server)
    typ, data = m.list()
    text = b"\n".join(data)
    for name, attr in (
        ("Sent", b"\\Sent"),
        ("Drafts", b"\\Drafts"),
        ("Trash", b"\\Trash"),
        ("Junk", b"\\Junk"),
        ("Archive", b"\\Archive"),
    ):
        assert attr in text and name.encode() in text
    assert m.create("Work.Projects")[0] == "OK"
    typ, data = m.list("Work%")
    assert any(b'"Work"' in d and b"\\HasChildren" in d for d in data)
    typ, data = m.list("Work.*")
    assert any(b'"Work.Projects"' in d for d in data)
    for bad in ("../evil", "a/../../b", "~root", "/etc", "a..b"):
        typ, data = m.create(f'"{bad}"')
        assert typ == "NO", bad
    assert not list(server.data.glob("mail/*/evil*"))
    typ, data = m._simple_command(
        "LIST", "(SPECIAL-USE)", '""', '"*"', "RETURN", "(STATUS (MESSAGES UNSEEN))"
    )
    assert typ == "OK"
    assert any(b"MESSAGES" in r for r in m.untagged_responses.get("STATUS", []))
    m.logout()


def test_create_delete_rename_subscribe(server: Server) -> None:
    m = login(server)
    assert m.create("Tmp1")[0] == "OK"
    assert m.create("Tmp1")[0] == "NO"
    assert m.append("Tmp1", None, None, MSG)[0] == "OK"
    assert m.create("Tmp1.Child")[0] == "OK"
    assert m.subscribe("Tmp1")[0] == "OK"
    assert m.rename("Tmp1", "Tmp2")[0] == "OK"
    _typ, data = m.list("Tmp*")
    names = b" ".join(data)
    assert b'"Tmp2"' in names and b'"Tmp2.Child"' in names and b'"Tmp1"' not in names
    assert m.lsub("Tmp*")[1][0] and b"Tmp2" in m.lsub("Tmp*")[1][0]
    assert m.status("Tmp2", "(MESSAGES)")[1][0].endswith(b"(MESSAGES 1)")
    assert m.delete("Tmp2")[0] == "NO"  # has children
    assert m.delete("Tmp2.Child")[0] == "OK"
    assert m.delete("Tmp2")[0] == "OK"
    assert m.delete("INBOX")[0] == "NO"
    m.logout()


def test_rename_inbox_moves_messages(server: Server) -> None:
    m = login(server, "sam@example.test")
    m.append("INBOX", None, None, MSG)
    m.append("INBOX", None, None, MSG)
    assert m.rename("INBOX", "Old")[0] == "OK"
    assert m.status("Old", "(MESSAGES)")[1][0].endswith(b"(MESSAGES 2)")
    assert m.status("INBOX", "(MESSAGES)")[1][0].endswith(b"(MESSAGES 0)")
    m.logout()


def test_select_append_fetch_store_expunge(server: Server) -> None:
    m = login(server)
    m.create("T1")
    typ, data = m.append("T1", "(\\Flagged $Important)", '"01-Feb-2020 21:52:25 -0800"', MSG)
    assert typ == "OK" and b"APPENDUID" in data[0]
    uidvalidity, uid = data[0].split(b"[APPENDUID ")[1].split(b"]")[0].split()
    assert m.append("T1", None, None, MIME)[0] == "OK"  # no flags, no date
    typ, data = m.select("T1")
    assert data == [b"2"]
    assert m.untagged_responses["UIDVALIDITY"] == [uidvalidity]
    assert m.untagged_responses["UIDNEXT"] == [str(int(uid) + 2).encode()]
    assert b"\\*" in m.untagged_responses["PERMANENTFLAGS"][0]
    assert m.untagged_responses["UNSEEN"] == [b"1"]
    typ, data = m.fetch("1", "(FLAGS INTERNALDATE RFC822.SIZE ENVELOPE)")
    line = data[0]
    assert b"\\Flagged" in line and b"$Important" in line
    assert b'INTERNALDATE "02-Feb-2020 05:52:25 +0000"' in line
    assert b"RFC822.SIZE %d" % len(MSG) in line
    assert b'"hello"' in line and b'(("Ann" NIL "ann" "example.org"))' in line
    typ, data = m.fetch(
        "2", "(BODYSTRUCTURE BODY.PEEK[2.1] BODY.PEEK[1]<2.4> BODY.PEEK[HEADER.FIELDS (SUBJECT)])"
    )
    flat = b"".join(x if isinstance(x, bytes) else b"".join(x) for x in data)
    assert b'("text" "html"' in flat and b'"alternative"' in flat and b'"mixed"' in flat
    assert b"alt plain" in flat
    assert b"BODY[1]<2> {4}" in flat and b"rt o" in flat
    assert b"Subject: mime" in flat
    # BODY.PEEK kept it unseen; BODY[] sets \Seen and reports FLAGS
    assert b"\\Seen" not in m.fetch("2", "(FLAGS)")[1][0]
    typ, data = m.fetch("2", "(BODY[TEXT])")
    assert b"\\Seen" in b"".join(x if isinstance(x, bytes) else x[0] for x in data)
    assert b"\\Seen" in m.fetch("2", "(FLAGS)")[1][0]
    assert m.store("1", "+FLAGS", "(\\Deleted)")[0] == "OK"
    assert b"\\Deleted" in m.fetch("1", "(FLAGS)")[1][0]
    typ, data = m.expunge()
    assert data == [b"1"]
    assert m.select("T1")[1] == [b"1"]
    assert m.store("1", "-FLAGS.SILENT", "(\\Seen)")[1] == [None]
    m.logout()


def test_fetch_items_and_errors_keep_session(server: Server) -> None:
    m = login(server)
    m.select("INBOX")
    m.append("INBOX", None, None, MSG)
    m.noop()
    for item in (
        "ALL",
        "FAST",
        "FULL",
        "(RFC822.HEADER)",
        "(BODY)",
        "(RFC822.TEXT)",
        "(BODY.PEEK[1.MIME])",
    ):
        _typ, _ = m.fetch("1", item)
    for args in (
        ("FETCH", "1", "(NOSUCH)"),
        ("FETCH", "999", "(FLAGS)"),
        ("STORE", "1", "+FLAGS", "("),
    ):
        with pytest.raises(imaplib.IMAP4.error, match="BAD"):
            m._simple_command(*args)
    assert m.noop()[0] == "OK"  # the session goes on
    m.logout()


def test_search_keys(server: Server) -> None:
    m = login(server)
    m.create("S1")
    m.append("S1", "(\\Seen)", None, MSG)
    m.append("S1", None, None, MIME)
    m.append(
        "S1",
        "(\\Flagged)",
        None,
        b"From: zed@example.net\r\nSubject: caf\xc3\xa9\r\n\r\nbig " + b"x" * 2000 + b"\r\n",
    )
    m.select("S1")
    assert m.search(None, "UNSEEN")[1] == [b"2 3"]
    assert m.search(None, "SEEN")[1] == [b"1"]
    assert m.search(None, "FROM", "zed")[1] == [b"3"]
    assert m.search(None, "HEADER", "Subject", "mime")[1] == [b"2"]
    assert m.search(None, "BODY", '"alt plain"')[1] == [b"2"]
    assert m.search(None, "TEXT", "hello")[1] == [b"1"]
    assert m.search(None, "LARGER", "1000")[1] == [b"3"]
    assert m.search(None, "OR", "FLAGGED", "SEEN")[1] == [b"1 3"]
    assert m.search(None, "NOT", "SEEN", "SINCE", "1-Jan-2000")[1] == [b"2 3"]
    assert m.search(None, "2:*")[1] == [b"2 3"]
    m.literal = "café".encode()
    assert m.search("UTF-8", "SUBJECT")[1] == [b"3"]
    typ, data = m.uid("SEARCH", "UNSEEN")
    assert len(data[0].split()) == 2
    typ, data = m._simple_command("SEARCH", "CHARSET", "KOI8-R", "ALL")
    assert typ == "NO"
    m.logout()


def test_copy_move_uidplus(server: Server) -> None:
    m = login(server)
    m.create("C1")
    m.create("C2")
    for _ in range(3):
        m.append("C1", "(\\Seen)", None, MSG)
    m.select("C1")
    typ, _data = m.uid("COPY", "1:2", "C2")
    assert typ == "OK" and m.untagged_responses.get("COPYUID")
    m.untagged_responses.clear()
    typ, _data = m.copy("1", "NoSuchBox")
    assert typ == "NO" and "TRYCREATE" in m.untagged_responses
    typ, _data = m._simple_command("MOVE", "3", "C2")
    assert typ == "OK"
    assert m.untagged_responses.get("COPYUID")
    assert m.untagged_responses.get("EXPUNGE") == [b"3"]
    assert m.status("C2", "(MESSAGES)")[1][0].endswith(b"(MESSAGES 3)")
    typ, _ = m.store("1:2", "+FLAGS", "(\\Deleted)")
    m.untagged_responses.clear()
    typ, _data = m.uid("EXPUNGE", "1")
    assert typ == "OK" and m.untagged_responses.get("EXPUNGE") == [b"1"]
    assert m.search(None, "ALL")[1] == [b"1"]
    m.logout()


def test_condstore_qresync(server: Server) -> None:
    m = login(server)
    m.create("Q1")
    for _ in range(3):
        m.append("Q1", None, None, MSG)
    m._simple_command("ENABLE", "QRESYNC")
    m.select("Q1")
    hms = int(m.untagged_responses["HIGHESTMODSEQ"][0])
    uidv = int(m.untagged_responses["UIDVALIDITY"][0])
    m.store("2", "+FLAGS", "(\\Flagged)")
    typ, data = m.uid("FETCH", "1:*", f"(FLAGS) (CHANGEDSINCE {hms})")
    assert len([d for d in data if d]) == 1 and b"MODSEQ" in data[0]
    typ, data = m.store("1", "(UNCHANGEDSINCE 1) +FLAGS", "(\\Seen)")
    assert typ == "OK" and m.untagged_responses.get("MODIFIED") == [b"1"]
    m.store("3", "+FLAGS", "(\\Deleted)")
    m.expunge()
    m.close()
    typ, data = m._simple_command("SELECT", "Q1", f"(QRESYNC ({uidv} {hms}))")
    assert typ == "OK"
    assert m.untagged_responses.get("VANISHED")[-1] == b"(EARLIER) 3"
    # RFC 7162 3.2.6: UID FETCH ... (CHANGEDSINCE m VANISHED) reports it too, only within the set
    m.state = "SELECTED"  # imaplib does not see a SELECT sent with _simple_command
    m.untagged_responses.pop("VANISHED", None)
    typ, data = m.uid("FETCH", "1:*", f"(FLAGS) (CHANGEDSINCE {hms} VANISHED)")
    assert typ == "OK" and m.untagged_responses.get("VANISHED")[-1] == b"(EARLIER) 3"
    m.untagged_responses.pop("VANISHED", None)
    typ, data = m.uid("FETCH", "1:2", f"(FLAGS) (CHANGEDSINCE {hms} VANISHED)")
    assert typ == "OK" and "VANISHED" not in m.untagged_responses
    m.logout()


def test_two_sessions_and_idle(server: Server) -> None:
    a = login(server)
    b = login(server)
    a.create("Shared")
    a.select("Shared")
    b.select("Shared")
    b.append("Shared", None, None, MSG)
    _typ, _data = a.noop()
    assert a.untagged_responses.get("EXISTS")[-1] == b"1"
    # IDLE sees a flag change, an expunge and a delivery from another process within a second
    sock = socket.create_connection(("127.0.0.1", server.port("imap")))
    f = sock.makefile("rb")
    f.readline()
    sock.sendall(f'a LOGIN {USER} "{PASSWORD}"\r\nb SELECT Shared\r\nc IDLE\r\n'.encode())
    while not f.readline().startswith(b"+"):
        pass
    b.store("1", "+FLAGS", "(\\Flagged)")
    sock.settimeout(2)
    line = f.readline()
    assert b"FETCH" in line and b"\\Flagged" in line
    box = server.maildir(USER, "Shared")
    write_message(box, [b"Subject: other process\n\nhi\n"])
    t0 = time.monotonic()
    lines = [f.readline(), f.readline()]
    assert b"* 2 EXISTS" in lines[0] and time.monotonic() - t0 < 1.5
    b.store("1", "+FLAGS", "(\\Deleted)")
    b.expunge()
    line = f.readline()
    while b"FETCH" in line:
        line = f.readline()
    assert line.startswith(b"* 1 EXPUNGE")
    sock.sendall(b"DONE\r\n")
    assert f.readline().startswith(b"c OK")
    sock.close()
    a.logout()
    b.logout()


def test_idle_sees_smtp_delivery(server: Server) -> None:
    import smtplib

    m = imaplib.IMAP4("127.0.0.1", server.port("imap"))
    m.login("sam@example.test", PASSWORD)
    m.select("INBOX")
    before = int(m.select("INBOX")[1][0])
    tag = m._new_tag()
    m.send(tag + b" IDLE\r\n")
    assert m.readline().startswith(b"+")
    try:
        with smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=10) as s:
            s.sendmail("x@example.org", ["sam@example.test"], b"Subject: by smtp\r\n\r\nhi\r\n")
    except (smtplib.SMTPException, OSError) as exc:
        pytest.skip(f"SMTP delivery not available: {exc}")
    m.sock.settimeout(1.5)
    line = m.readline()
    assert line.strip() == b"* %d EXISTS" % (before + 1)
    m.send(b"DONE\r\n")
    m.sock.settimeout(5)
    while not m.readline().startswith(tag):
        pass
    m.logout()


def test_literal_limits_and_literal_plus(server: Server) -> None:
    sock = socket.create_connection(("127.0.0.1", server.port("imap")))
    f = sock.makefile("rb")
    f.readline()
    sock.sendall(f'a LOGIN {{{len(USER)}+}}\r\n{USER} "{PASSWORD}"\r\n'.encode())
    assert f.readline().startswith(b"a OK")
    sock.sendall(b"b APPEND INBOX {999999999}\r\n")
    line = f.readline()
    assert line.startswith(b"b NO [TOOBIG]") or line.startswith(b"b BAD")
    sock.sendall(b"c NOOP\r\n")
    assert f.readline().startswith(b"c OK")
    sock.close()


def test_uid_persistence_across_restart(tmp_path: Path) -> None:
    s = Server(tmp_path, services=("imap",), extra_toml="[auth]\nallow_plaintext = true\n")
    s.start()
    try:
        s.add_user(USER)
        m = login(s)
        for _ in range(3):
            m.append("INBOX", None, None, MSG)
        m.select("INBOX")
        m.store("2", "+FLAGS", "(\\Seen $Label1)")
        before = m.fetch("1:*", "(UID FLAGS)")[1]
        uidv = m.untagged_responses["UIDVALIDITY"]
        m.logout()
        s.kill9()
        s.start()
        m = login(s)
        m.select("INBOX")
        assert m.untagged_responses["UIDVALIDITY"] == uidv
        strip = [x.replace(b" \\Recent", b"").replace(b"\\Recent", b"") for x in before]
        assert m.fetch("1:*", "(UID FLAGS)")[1] == strip
        m.logout()
        # the index is lost: rebuilt with a new UIDVALIDITY, keywords kept from the file names
        s.stop()
        for p in s.maildir(USER).glob("mailsuite-index.sqlite*"):
            p.unlink()
        s.start()
        m = login(s)
        m.select("INBOX")
        assert m.untagged_responses["UIDVALIDITY"] != uidv
        assert b"$Label1" in m.fetch("2", "(FLAGS)")[1][0]
        m.logout()
    finally:
        s.stop()


def _run_mbsync(rc: Path) -> tuple[int, str, float]:
    """Run mbsync with its protocol trace; return (exit code, output, seconds from the moment
    it sent its last LOGOUT to its exit).  RFC 3501 6.1.3: the server closes the connection
    after answering LOGOUT, and mbsync waits for that close: a server that leaves it open
    makes mbsync hang until its Timeout and exit 1 (issue 9)."""
    proc = subprocess.Popen(
        ["mbsync", "-Dn", "-c", str(rc), "-a"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    lines: list[tuple[float, bytes]] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.monotonic(), line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise
    ended = time.monotonic()
    reader.join(10)
    out = b"".join(line for _, line in lines).decode("utf-8", "replace")
    sent = [t for t, line in lines if re.match(rb">>> \d+ LOGOUT", line.lstrip(b"( 0123456789)"))]
    assert sent, "mbsync's trace shows no LOGOUT:\n" + out[-3000:]
    return code, out, ended - sent[-1]


@pytest.mark.parametrize("mode", ["plain", "imaps", "starttls"])
def test_mbsync_two_way_sync(
    servers: ServerFactory, ca: CertAuthority, tmp_path: Path, mode: str
) -> None:
    import shutil

    if shutil.which("mbsync") is None:
        pytest.skip("mbsync (Debian isync) is not installed")
    s = servers(
        ("imap", "imaps"), tls=True, users=(USER,), extra_toml="[auth]\nallow_plaintext = true\n"
    )
    box = s.maildir(USER)
    for i in range(200):
        write_message(box, [b"From: x@example.org\nSubject: m%d\n\nbody %d\n" % (i, i)])
    local = tmp_path / "local"
    local.mkdir()
    port = s.port("imaps" if mode == "imaps" else "imap")
    ssl_type = {"plain": "None", "imaps": "IMAPS", "starttls": "STARTTLS"}[mode]
    rc = tmp_path / "mbsyncrc"
    rc.write_text(
        f'IMAPAccount a\nHost localhost\nPort {port}\nUser {USER}\nPass "{PASSWORD}"\n'
        f"SSLType {ssl_type}\nCertificateFile {ca.ca_file}\nAuthMechs LOGIN\nTimeout 20\n\n"
        "IMAPStore remote\nAccount a\n\n"
        f"MaildirStore local\nPath {local}/\nInbox {local}/INBOX\nSubFolders Verbatim\n\n"
        "Channel c\nFar :remote:\nNear :local:\nPatterns *\nCreate Both\nExpunge Both\nSyncState *\n"
    )

    def run() -> subprocess.CompletedProcess[str]:
        code, out, after_logout = _run_mbsync(rc)
        assert code == 0, out[-3000:]
        # it must not wait for a close that never comes (a few seconds is generous)
        assert after_logout < 3.0, f"mbsync took {after_logout:.1f} s to exit after LOGOUT"
        return subprocess.CompletedProcess([], code, out, "")

    r = run()
    assert r.returncode == 0, r.stderr + r.stdout
    got = list((local / "INBOX" / "cur").iterdir()) + list((local / "INBOX" / "new").iterdir())
    assert len(got) == 200
    # local change: mark one seen and add one; remote change: flag one
    first = (
        sorted((local / "INBOX" / "new").iterdir())[0]
        if list((local / "INBOX" / "new").iterdir())
        else None
    )
    if first is not None:
        first.rename(local / "INBOX" / "cur" / (first.name + ":2,S"))
    write_message(local / "INBOX", [b"Subject: from local\n\nx\n"])
    m = login(s)
    m.select("INBOX")
    m.store("5", "+FLAGS", "(\\Flagged)")
    m.logout()
    r = run()
    assert r.returncode == 0, r.stderr + r.stdout
    m = login(s)
    m.select("INBOX")
    assert m.search(None, "SUBJECT", '"from local"')[1][0] != b""
    assert int(m.select("INBOX")[1][0]) == 201
    if first is not None:
        assert m.search(None, "SEEN")[1][0] != b""
    m.logout()
    flagged = [
        p
        for p in (local / "INBOX" / "cur").iterdir()
        if ":2," in p.name and "F" in p.name.split(":2,")[1]
    ]
    assert flagged


def test_curl_reads_a_folder(server: Server) -> None:
    import shutil

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    m = login(server)
    m.create("Curl")
    m.append("Curl", None, None, MSG)
    m.logout()
    url = f"imap://127.0.0.1:{server.port('imap')}/Curl;UID=1"
    r = subprocess.run(
        ["curl", "-s", "--user", f"{USER}:{PASSWORD}", url], capture_output=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    assert b"Subject: hello" in r.stdout


def test_esearch_return_options(server: Server) -> None:
    m = login(server)
    m.create("ES")
    for i in range(6):
        m.append("ES", "(\\Seen)" if i in (0, 3) else None, None, MSG)
    assert b"ESEARCH" in m.capability()[1][0]
    m.logout()
    r = IMAPClient(server.port("imap"), USER)
    r.ok("SELECT ES")
    got = r.ok("SEARCH RETURN (MIN MAX COUNT ALL) UNSEEN")
    assert got == [f'* ESEARCH (TAG "r{r.n}") MIN 2 MAX 6 COUNT 4 ALL 2:3,5:6'.encode()]
    got = r.ok("UID SEARCH RETURN (COUNT) SEEN")
    assert got == [f'* ESEARCH (TAG "r{r.n}") UID COUNT 2'.encode()]
    got = r.ok("UID SEARCH RETURN (MIN MAX) ALL")
    assert got == [f'* ESEARCH (TAG "r{r.n}") UID MIN 1 MAX 6'.encode()]
    # RETURN () means ALL (RFC 4731 3.1)
    got = r.ok("SEARCH RETURN () 4:*")
    assert got == [f'* ESEARCH (TAG "r{r.n}") ALL 4:6'.encode()]
    # no match: MIN/MAX/ALL left out, COUNT 0 present
    got = r.ok("SEARCH RETURN (MIN MAX ALL COUNT) FLAGGED")
    assert got == [f'* ESEARCH (TAG "r{r.n}") COUNT 0'.encode()]
    got = r.ok("SEARCH RETURN (MIN) CHARSET UTF-8 SUBJECT hello")
    assert got == [f'* ESEARCH (TAG "r{r.n}") MIN 1'.encode()]
    # with CONDSTORE a MODSEQ search key adds the highest mod-sequence
    got = r.ok("SEARCH RETURN (COUNT) MODSEQ 1")
    # the first CONDSTORE enabling command reports HIGHESTMODSEQ first (RFC 7162 3.1)
    assert got[0].startswith(b"* OK [HIGHESTMODSEQ ")
    assert got[1].startswith(f'* ESEARCH (TAG "r{r.n}") COUNT 6 MODSEQ '.encode())
    assert r.cmd("SEARCH RETURN (BOGUS) ALL")[-1].split()[1] == b"BAD"
    assert r.cmd("SEARCH RETURN ALL")[-1].split()[1] == b"BAD"
    # plain SEARCH is unchanged
    assert r.ok("SEARCH UNSEEN") == [b"* SEARCH 2 3 5 6"]
    r.close()


def _lists(lines: list[bytes]) -> list[bytes]:
    return [ln for ln in lines if ln.startswith(b"* LIST ")]


def test_list_extended_rfc5258_example9(server: Server) -> None:
    # RFC 5258 section 5, example 9, with our separator "." and our \HasChildren attributes
    user = "lx9@example.test"
    server.add_user(user)
    r = IMAPClient(server.port("imap"), user)
    for name in ("foo2", "foo2.bar1", "foo2.bar2", "baz2", "baz2.bar2", "baz2.bar22"):
        r.ok(f"CREATE {name}")
    for name in ("baz2.bar222", "eps2", "eps2.mamba"):
        r.ok(f"CREATE {name}")
    # qux2 exists only as the parent of qux2.bar2: CREATE qux2.bar2 would make qux2 too
    # (RFC 3501 6.3.3), so the child is made on disk, as another Maildir++ tool would
    ensure_folder(server.maildir(user, "qux2.bar2"))
    for name in ("foo2.bar1", "foo2.bar2", "baz2.bar2", "baz2.bar22", "baz2.bar222"):
        r.ok(f"SUBSCRIBE {name}")
    for name in ("eps2", "eps2.mamba", "qux2.bar2"):
        r.ok(f"SUBSCRIBE {name}")
    got = _lists(r.ok('LIST (SUBSCRIBED RECURSIVEMATCH) "" "*2"'))
    assert got == [
        b'* LIST (\\HasNoChildren \\Subscribed) "." "baz2.bar2"',
        b'* LIST (\\HasNoChildren \\Subscribed) "." "baz2.bar22"',
        b'* LIST (\\HasNoChildren \\Subscribed) "." "baz2.bar222"',
        b'* LIST (\\HasChildren \\Subscribed) "." "eps2" ("CHILDINFO" ("SUBSCRIBED"))',
        b'* LIST (\\HasChildren) "." "foo2" ("CHILDINFO" ("SUBSCRIBED"))',
        b'* LIST (\\HasNoChildren \\Subscribed) "." "foo2.bar2"',
        b'* LIST (\\HasNoChildren \\Subscribed) "." "qux2.bar2"',
    ]
    # with "%" every parent's subscribed children are outside the pattern, so baz2 and the
    # implied parent qux2 appear with CHILDINFO too
    got = _lists(r.ok('LIST (SUBSCRIBED RECURSIVEMATCH) "" "%"'))
    assert got == [
        b'* LIST (\\HasChildren) "." "baz2" ("CHILDINFO" ("SUBSCRIBED"))',
        b'* LIST (\\HasChildren \\Subscribed) "." "eps2" ("CHILDINFO" ("SUBSCRIBED"))',
        b'* LIST (\\HasChildren) "." "foo2" ("CHILDINFO" ("SUBSCRIBED"))',
        b'* LIST (\\Noselect \\HasChildren) "." "qux2" ("CHILDINFO" ("SUBSCRIBED"))',
    ]
    # without RECURSIVEMATCH only subscribed names that match come back
    got = _lists(r.ok('LIST (SUBSCRIBED) "" "%"'))
    assert got == [b'* LIST (\\HasChildren \\Subscribed) "." "eps2"']
    r.close()


def test_list_extended_options(server: Server) -> None:
    user = "lx@example.test"
    server.add_user(user)
    r = IMAPClient(server.port("imap"), user)
    assert b"LIST-EXTENDED" in r.ok("CAPABILITY")[0] and b"LIST-STATUS" in r.ok("CAPABILITY")[0]
    r.ok("CREATE Work")
    r.ok("CREATE Work.Plans")
    r.ok("SUBSCRIBE Work")
    r.ok("SUBSCRIBE Gone")  # subscribed but never created
    r.ok("SUBSCRIBE Gone.Child")
    r.ok("APPEND Work {4+}\r\nhi\r\n")
    # \NonExistent for subscribed names that do not exist (RFC 5258 3)
    got = _lists(r.ok('LIST (SUBSCRIBED) "" "*"'))
    assert got == [
        b'* LIST (\\NonExistent \\Subscribed) "." "Gone"',
        b'* LIST (\\NonExistent \\Subscribed) "." "Gone.Child"',
        b'* LIST (\\HasChildren \\Subscribed) "." "Work"',
    ]
    # REMOTE is accepted and changes nothing here (no remote mailboxes)
    assert _lists(r.ok('LIST (SUBSCRIBED REMOTE) "" "*"')) == got
    assert _lists(r.ok('LIST (REMOTE) "" "Work*"')) == _lists(r.ok('LIST "" "Work*"'))
    # return options: SUBSCRIBED and CHILDREN on a plain listing; several patterns
    got = _lists(r.ok('LIST "" ("Work" "INBOX" "Nope*") RETURN (SUBSCRIBED CHILDREN)'))
    assert got == [
        b'* LIST (\\HasNoChildren) "." "INBOX"',
        b'* LIST (\\HasChildren \\Subscribed) "." "Work"',
    ]
    assert _lists(r.ok('LIST () "" "Work.%"')) == [b'* LIST (\\HasNoChildren) "." "Work.Plans"']
    # RFC 5819: STATUS after each selectable mailbox's LIST line, none for \NonExistent
    got = r.ok('LIST (SUBSCRIBED) "" ("Work" "Gone") RETURN (STATUS (MESSAGES UIDNEXT UNSEEN))')
    assert got == [
        b'* LIST (\\NonExistent \\Subscribed) "." "Gone"',
        b'* LIST (\\HasChildren \\Subscribed) "." "Work"',
        b'* STATUS "Work" (MESSAGES 1 UIDNEXT 2 UNSEEN 1)',
    ]
    got = r.ok('LIST "" "Work*" RETURN (CHILDREN STATUS (MESSAGES))')
    assert got == [
        b'* LIST (\\HasChildren) "." "Work"',
        b'* STATUS "Work" (MESSAGES 1)',
        b'* LIST (\\HasNoChildren) "." "Work.Plans"',
        b'* STATUS "Work.Plans" (MESSAGES 0)',
    ]
    # SPECIAL-USE selection (RFC 6154)
    got = _lists(r.ok('LIST (SPECIAL-USE) "" "*"'))
    assert [g.rsplit(b" ", 1)[1] for g in got] == [
        b'"Archive"',
        b'"Drafts"',
        b'"Junk"',
        b'"Sent"',
        b'"Trash"',
    ]
    # errors
    for bad in (
        'LIST (RECURSIVEMATCH) "" "*"',
        'LIST (RECURSIVEMATCH REMOTE) "" "*"',
        'LIST (BOGUS) "" "*"',
        'LIST "" "*" RETURN (BOGUS)',
        'LIST "" "*" RETURN (STATUS (BOGUS))',
        'LIST "" "*" RETURN (STATUS)',
        'LIST "" ()',
    ):
        assert r.cmd(bad)[-1].split()[1] == b"BAD", bad
    # the delimiter query is unchanged
    assert r.ok('LIST "" ""') == [b'* LIST (\\Noselect) "." ""']
    r.close()


def _tmux_screen(session: str, want: list[bytes], timeout: float = 30.0) -> bytes:
    """mutt's screen once it shows every one of ``want``."""
    screen = [b""]

    def shows_all() -> bool:
        screen[0] = subprocess.run(
            ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, timeout=10
        ).stdout
        return all(w in screen[0] for w in want)

    try:
        wait_until(shows_all, timeout, f"{want!r} on mutt's screen", interval=0.3)
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}; the screen:\n{screen[0].decode('utf-8', 'replace')}"
        ) from None
    return screen[0]


def _tmux_alive(session: str) -> bool:
    return (
        subprocess.run(
            ["tmux", "has-session", "-t", session], capture_output=True, timeout=10
        ).returncode
        == 0
    )


@pytest.mark.parametrize("mode", ["imaps", "starttls"])
def test_mutt_reads_a_folder(server: Server, ca: CertAuthority, tmp_path: Path, mode: str) -> None:
    import shutil

    if shutil.which("mutt") is None or shutil.which("tmux") is None:
        pytest.skip("mutt or tmux is not installed (Debian packages mutt, tmux)")
    m = login(server)
    box = f"Mutt{mode}"
    m.create(box)
    subjects = [f"mutt check {mode} {i}" for i in range(3)]
    for i, subject in enumerate(subjects):
        msg = (
            f"From: Ann <ann@example.org>\r\nTo: {USER}\r\nSubject: {subject}\r\n"
            f"Date: Mon, 1 Jan 2024 10:0{i}:00 +0000\r\nMessage-ID: <m{i}.{mode}@example.org>\r\n"
            f"\r\nbody {i}\r\n"
        ).encode()
        m.append(box, "(\\Seen)" if i == 0 else None, None, msg)
    m.logout()
    user = USER.replace("@", "%40")
    if mode == "imaps":
        root = f"imaps://{user}@localhost:{server.port('imaps')}/"
        extra = ""
    else:  # plain imap:// with STARTTLS required
        root = f"imap://{user}@localhost:{server.port('imap')}/"
        extra = "set ssl_starttls=yes\nset ssl_force_tls=yes\n"
    url = root + box
    rc = tmp_path / "muttrc"
    rc.write_text(
        f'set folder="{root}"\nset spoolfile="{url}"\nset imap_pass="{PASSWORD}"\n'
        f"set ssl_ca_certificates_file={ca.ca_file}\n"
        f"set certificate_file={tmp_path / 'certs'}\n"
        f"{extra}"
        "set ssl_verify_host=yes\nset imap_passive=yes\nset mail_check=60\nset timeout=60\n"
        'set header_cache=""\nset sort=date\nset index_format="%4C %Z %-20.20n %s"\n'
        "set confirmappend=no\nset quit=yes\nset move=no\n"
    )
    port = server.port("imaps" if mode == "imaps" else "imap")
    # connections already there (the setup session above may still be closing on the same
    # port in STARTTLS mode): mutt's is any other one
    before = set(server_connection_peers(port))
    session = f"mutt-{os.getpid()}-{mode}"
    cmd = f"mutt -n -F {rc} -f '{url}'"
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "40", cmd],
        check=True,
        env={**os.environ, "TERM": "xterm", "HOME": str(tmp_path)},
        timeout=10,
    )
    try:
        screen = _tmux_screen(session, [s.encode() for s in subjects] + [b"Msgs:3"])
        text = screen.decode("utf-8", "replace")
        for s in subjects:
            assert s in text, text
        assert "Msgs:3" in text, text  # mutt's status line: three messages in the folder
        # the second and third are unread, the first \Seen (mutt's N flag)
        lines = {s: ln for ln in text.splitlines() for s in subjects if s in ln}
        assert " N " in lines[subjects[1]] and " N " not in lines[subjects[0]], text
        # open the third message: mutt FETCHes the body
        subprocess.run(["tmux", "send-keys", "-t", session, "3", "Enter", "Enter"], timeout=10)
        screen = _tmux_screen(session, [b"body 2"])
        assert b"body 2" in screen, screen.decode("utf-8", "replace")
        subprocess.run(["tmux", "send-keys", "-t", session, "q", "q"], timeout=10)
        # quitting logs out: mutt exits (its tmux session ends with it) and the server has
        # closed its end of the TLS connection (issue 9: LOGOUT over TLS left it open)
        wait_until(lambda: not _tmux_alive(session), 10, "mutt to exit after q")
        wait_until(
            lambda: set(server_connection_peers(port)) <= before,
            10,
            "the server to close mutt's connection",
        )
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, timeout=10)


def test_status_items_on_a_folder_nobody_has_open(server: Server) -> None:
    m = login(server)
    m.create("St")
    m.append("St", "(\\Seen)", None, MSG)
    m.append("St", None, None, MSG)
    typ, data = m.status("St", "(MESSAGES RECENT UIDNEXT UNSEEN SIZE HIGHESTMODSEQ UIDVALIDITY)")
    assert typ == "OK"
    got = dict(re.findall(rb"([A-Z]+) (\d+)", data[0].split(b"(", 1)[1]))
    size = len(MSG.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    assert got[b"MESSAGES"] == b"2" and got[b"RECENT"] == b"2" and got[b"UNSEEN"] == b"1"
    assert got[b"UIDNEXT"] == b"3" and int(got[b"SIZE"]) == 2 * size
    assert int(got[b"HIGHESTMODSEQ"]) > 0 and int(got[b"UIDVALIDITY"]) > 0
    m.select("St")  # this session claims \Recent
    m.close()
    typ, data = m.status("St", "(RECENT)")
    assert data[0].endswith(b"(RECENT 0)")
    m.logout()
