"""Sieve outcomes applied to a running server's store, seen over IMAP.

Until local delivery calls ``evaluate`` (issue 11 restructures delivery.py first), this test
plays delivery's part in-process -- write the message file with its trace headers, call
``evaluate``, store with ``apply.store_all`` -- against the data folder of a real server
whose script was uploaded over ManageSieve, and reads the result over IMAP: filing by header,
envelope, subaddress and body into existing and ``:create``d folders, flags set by the script,
the fall-back to INBOX (with the user's log) when a folder is missing or the script fails.
"""

from __future__ import annotations

import imaplib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailsuite.sieve.apply import store_all
from mailsuite.sieve.engine import SieveSettings, evaluate
from mailsuite.sieve.interpreter import Limits, SieveEnvelope
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
    s = module_servers(("imap", "managesieve"), users=(ALICE,),
                       extra_toml="[auth]\nallow_plaintext = true\n")
    upload(s, SCRIPT)
    yield s
    s.stop()
    assert "Traceback" not in s.output()


def upload(server: Server, script: bytes) -> None:
    """PUTSCRIPT + SETACTIVE over a raw ManageSieve connection."""
    client = ManageSieveClient(server.port("managesieve"))
    client.login(ALICE)
    for cmd in (b'PUTSCRIPT "rules" {%d+}\r\n' % len(script) + script,
                b'SETACTIVE "rules"', b"LOGOUT"):
        assert client.cmd(cmd).startswith(b"OK"), cmd
    client.close()


def deliver(server: Server, tmp: Path, rcpt: str, body: bytes,
            sender: str = "someone@example.org", limits: Limits | None = None) -> list[str]:
    """What delivery will do for one recipient: trace headers, evaluate, store."""
    root = server.maildir(ALICE)
    head = f"Return-Path: <{sender}>\nDelivered-To: {ALICE}\n".encode()
    path = tmp / f"msg-{abs(hash(body))}"
    path.write_bytes(head + body)
    settings = SieveSettings(limits=limits or Limits(), hostname="mx.example.test")
    outcome = evaluate(root, path, SieveEnvelope(sender, rcpt, ALICE), settings)
    _, notes = store_all(outcome.actions, root, path, 0, b"")
    return notes + ([outcome.error] if outcome.error else [])


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
    return (f"From: {frm}\nTo: {ALICE}\nSubject: {subject}\nMessage-ID: <{abs(hash(subject))}"
            f"@example.org>\n\n{body}\n").encode()


def test_scripts_file_and_flag_what_imap_then_sees(server: Server, tmp_path: Path) -> None:
    m = imap(server)
    assert m.create("Lists")[0] == "OK"
    assert deliver(server, tmp_path, ALICE, message("[acme] release")) == []
    assert deliver(server, tmp_path, "alice+shop@example.test", message("your order")) == []
    assert deliver(server, tmp_path, ALICE, message("now", "Boss <b@boss.example>")) == []
    assert deliver(server, tmp_path, ALICE, message("news", body="click to unsubscribe")) == []
    assert deliver(server, tmp_path, ALICE, message("plain")) == []
    typ, listed = m.list()
    names = b" ".join(listed)
    assert b"Shopping" in names and b"Bulk.News" in names
    assert flags_in(m, "Lists") == [set()]
    assert flags_in(m, "Shopping") == [{"$Shopping"}]
    assert flags_in(m, "Bulk.News") == [{"\\Seen"}]
    assert sorted(map(sorted, flags_in(m, "INBOX"))) == [[], ["\\Flagged"]]
    typ, subs = m.lsub()
    assert b"Shopping" in b" ".join(subs)  # :create subscribes, so clients show it
    m.logout()


def test_missing_folder_and_failing_script_fall_back_to_inbox(server: Server,
                                                               tmp_path: Path) -> None:
    m = imap(server)
    before = len(flags_in(m, "INBOX"))
    notes = deliver(server, tmp_path, ALICE, message("Re: lunch"))
    assert notes and "no such folder" in notes[0]
    notes = deliver(server, tmp_path, ALICE, message("[acme] again"), limits=Limits(max_actions=0))
    assert notes and "more than 0 actions" in notes[0]
    assert len(flags_in(m, "INBOX")) == before + 2
    log = (server.maildir(ALICE) / "sieve" / "sieve.log").read_text()
    assert "no such folder" in log and "failed, message kept in INBOX" in log
    assert "more than 0 actions" in server.cli("sieve", "log", ALICE).stdout
    m.logout()
