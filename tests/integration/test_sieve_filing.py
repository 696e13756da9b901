"""Sieve filing over the real server: messages arrive by SMTP, delivery runs the script that
was uploaded over ManageSieve, and the result is read over IMAP -- filing by header, envelope,
subaddress and body into existing and ``:create``d folders, flags set by the script, the
fall-back to INBOX (with the user's log) when a folder is missing or the script fails.
"""

from __future__ import annotations

import imaplib
import re
import smtplib
from collections.abc import Iterator

import pytest

from tests.clients import ManageSieveClient
from tests.harness import ALICE, PASSWORD, Server, ServerFactory

SCRIPT = b"""require ["fileinto", "envelope", "subaddress", "body", "mailbox", "imap4flags",
                      "variables"];
if header :contains "subject" "[acme]" { fileinto "Lists"; stop; }
if envelope :detail "to" "shop" { addflag "$Shopping"; fileinto :create "Shopping"; stop; }
if address :domain "from" "boss.example" { fileinto :flags "\\\\Flagged" "INBOX"; stop; }
if body :text :contains "unsubscribe" { setflag "\\\\Seen"; fileinto :create "Bulk/News"; stop; }
if header :matches "subject" "Re: *" { fileinto "Missing"; stop; }
"""


@pytest.fixture(scope="module")
def server(module_servers: ServerFactory) -> Iterator[Server]:
    s = module_servers(
        ("smtp", "imap", "managesieve"),
        users=(ALICE,),
        extra_toml="[auth]\nallow_plaintext = true\n",
    )
    upload(s, SCRIPT)
    yield s
    s.stop()
    assert "Traceback" not in s.output()


def upload(server: Server, script: bytes) -> None:
    """PUTSCRIPT + SETACTIVE over a raw ManageSieve connection."""
    client = ManageSieveClient(server.port("managesieve"))
    client.login(ALICE)
    for cmd in (
        b'PUTSCRIPT "rules" {%d+}\r\n' % len(script) + script,
        b'SETACTIVE "rules"',
        b"LOGOUT",
    ):
        assert client.cmd(cmd).startswith(b"OK"), cmd
    client.close()


def deliver(server: Server, rcpt: str, body: bytes, sender: str = "someone@example.org") -> None:
    """One message to ``rcpt`` through the server's SMTP listener (delivery runs the script)."""
    with smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=20) as s:
        assert s.sendmail(sender, [rcpt], body) == {}


def sieve_log(server: Server) -> str:
    path = server.maildir(ALICE) / "sieve" / "sieve.log"
    return path.read_text() if path.exists() else ""


def imap(server: Server) -> imaplib.IMAP4:
    m = imaplib.IMAP4("127.0.0.1", server.port("imap"))
    m.login(ALICE, PASSWORD)
    return m


def flags_in(m: imaplib.IMAP4, folder: str) -> list[set[str]]:
    typ, _ = m.select(folder, readonly=True)
    assert typ == "OK", folder
    typ, data = m.fetch("1:*", "(FLAGS)")
    out = []
    for item in data:
        if isinstance(item, bytes) and b"FLAGS" in item:
            found = re.search(rb"FLAGS \(([^)]*)\)", item)
            assert found
            out.append({f.decode() for f in found.group(1).split()} - {"\\Recent"})
    return out


def message(subject: str, frm: str = "Someone <someone@example.org>", body: str = "hi") -> bytes:
    return (
        f"From: {frm}\r\nTo: {ALICE}\r\nSubject: {subject}\r\nMessage-ID: "
        f"<{abs(hash(subject))}@example.org>\r\n\r\n{body}\r\n"
    ).encode()


def test_scripts_file_and_flag_what_imap_then_sees(server: Server) -> None:
    m = imap(server)
    assert m.create("Lists")[0] == "OK"
    deliver(server, ALICE, message("[acme] release"))
    deliver(server, "alice+shop@example.test", message("your order"))
    deliver(server, ALICE, message("now", "Boss <b@boss.example>"))
    deliver(server, ALICE, message("news", body="click to unsubscribe"))
    deliver(server, ALICE, message("plain"))
    assert sieve_log(server) == ""  # nothing fell back
    _typ, listed = m.list()
    names = b" ".join(listed)
    assert b"Shopping" in names and b"Bulk.News" in names
    assert flags_in(m, "Lists") == [set()]
    assert flags_in(m, "Shopping") == [{"$Shopping"}]
    assert flags_in(m, "Bulk.News") == [{"\\Seen"}]
    assert sorted(map(sorted, flags_in(m, "INBOX"))) == [[], ["\\Flagged"]]
    _typ, subs = m.lsub()
    assert b"Shopping" in b" ".join(subs)  # :create subscribes, so clients show it
    m.logout()


def test_missing_folder_and_failing_script_fall_back_to_inbox(server: Server) -> None:
    m = imap(server)
    before = len(flags_in(m, "INBOX"))
    deliver(server, ALICE, message("Re: lunch"))
    assert "no such folder" in sieve_log(server)
    upload(server, "".join(f'redirect "{c}@example.org";\n' for c in "abcde").encode())
    deliver(server, ALICE, message("[acme] again"))  # more redirects than allowed: kept
    assert len(flags_in(m, "INBOX")) == before + 2
    log = sieve_log(server)
    assert "no such folder" in log and "failed, message kept in INBOX" in log
    assert "redirects" in server.cli("sieve", "log", ALICE).stdout
    upload(server, SCRIPT)
    m.logout()
