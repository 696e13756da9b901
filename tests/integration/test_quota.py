"""Storage quotas over the real server (RFC 9208, issue 13): the CLI sets and shows limits, SMTP
refuses at RCPT (already over) and at the end of the data (this message would exceed), a
recipient over quota among others waits in the queue (4.2.2) and is delivered once there is
room, IMAP APPEND / COPY / MOVE answer ``NO [OVERQUOTA]``, a move into Trash and every way of
deleting still work, Sieve's fileinto is held to the limit, GETQUOTAROOT / GETQUOTA report the
usage in KiB, and the usage is counted as mail comes and goes (and recounted by reindex).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clients import IMAPClient, SMTPClient
from tests.harness import ALICE, BOB, Server, ServerFactory, wait_until

CAROL = "carol@example.test"
DAVE = "dave@example.test"  # only the +tag test writes to dave
KIB = 1024


def usage_file(server: Server, user: str) -> Path:
    return server.maildir(user) / "maildirsize"


def counted(server: Server, user: str) -> tuple[int, int, int]:
    """(limit, bytes, messages) from the user's quota file, summed as Maildir++ does."""
    lines = usage_file(server, user).read_text().splitlines()
    limit = int(lines[0].rstrip("S"))
    pairs = [tuple(map(int, line.split())) for line in lines[1:] if line.strip()]
    return limit, sum(p[0] for p in pairs), sum(p[1] for p in pairs)


def on_disk(server: Server, user: str) -> tuple[int, int]:
    """(bytes, messages) of every message file the user has, walked for the check."""
    total = count = 0
    root = server.maildir(user)
    for folder in [root, *(p for p in root.iterdir() if p.name.startswith(".") and p.is_dir())]:
        for sub in ("cur", "new"):
            for f in (folder / sub).iterdir():
                total += f.stat().st_size
                count += 1
    return total, count


def message(size: int, subject: str = "hello") -> str:
    body = ("x" * 70 + "\r\n") * (size // 72 + 1)
    return f"From: someone@example.org\r\nSubject: {subject}\r\n\r\n{body}"


def send(server: Server, rcpts: list[str], data: str) -> tuple[list[int], int]:
    """One transaction: the RCPT codes and the final reply's code (0 when DATA was not
    reached because every recipient was refused)."""
    c = SMTPClient(server.port("smtp"))
    try:
        assert c.cmd("EHLO client.example.org").code == 250
        assert c.cmd("MAIL FROM:<someone@example.org>").code == 250
        codes = [c.cmd(f"RCPT TO:<{r}>").code for r in rcpts]
        if not any(code == 250 for code in codes):
            return codes, 0
        assert c.cmd("DATA").code == 354
        c.send(data.encode() + b"\r\n.\r\n")
        final = c.reply()
        last[0] = final.text
        return codes, final.code
    finally:
        c.close()


last = [""]  # the text of the last final reply (for messages in assertions)


@pytest.fixture(scope="module")
def server(module_servers: ServerFactory) -> Iterator[Server]:
    s = module_servers(
        ("smtp", "imap"),
        users=(ALICE, BOB, CAROL, DAVE),
        extra_toml="[auth]\nallow_plaintext = true\n",
    )
    yield s


def set_quota(server: Server, user: str, size: str) -> str:
    return server.cli("user", "quota", user, size).stdout


def test_cli_sets_and_shows_a_limit_and_counts_what_is_there(server: Server) -> None:
    assert send(server, [CAROL], message(3000))[1] == 250
    out = set_quota(server, CAROL, "1M")
    assert out.startswith(f"{CAROL}: ") and "of 1M used" in out and "own size limit" in out
    limit, used, messages = counted(server, CAROL)
    assert (limit, (used, messages)) == (1024 * KIB, on_disk(server, CAROL))
    assert messages == 1
    # shown without a size; refused sizes name the fix
    assert "of 1M used" in server.cli("user", "quota", CAROL).stdout
    bad = server.cli("user", "quota", CAROL, "lots", check=False)
    assert bad.returncode == 2 and "500M, 2G, 20K or 0" in bad.stderr
    # a domain default applies to users without their own setting; 0 = none, "default" =
    # back to the domain's
    out = server.cli("domain", "quota", "example.test", "2M").stdout
    assert "default limits 2M, 0 messages" in out
    assert "of 1M used" in server.cli("user", "quota", CAROL).stdout
    out = server.cli("user", "quota", CAROL, "default").stdout
    assert "of 2M used" in out and "size: default of example.test (2M)" in out
    assert counted(server, CAROL)[0] == 2 * 1024 * KIB
    assert "no limit" in server.cli("user", "quota", CAROL, "0").stdout
    assert not usage_file(server, CAROL).exists()
    server.cli("domain", "quota", "example.test", "0")
    directory = json.loads((server.data / "directory.json").read_text())
    assert directory["users"][CAROL]["quota"] == 0
    assert "domain_quotas" not in directory


def test_smtp_refuses_at_rcpt_when_over_and_at_the_end_of_data_when_it_would_exceed(
    server: Server,
) -> None:
    set_quota(server, ALICE, "20K")
    start = on_disk(server, ALICE)
    assert send(server, [ALICE], message(6000))[1] == 250
    # this one would take alice over 20 KiB: refused after the data, nothing stored
    codes, final = send(server, [ALICE], message(16000))
    assert codes == [250] and final == 552 and "5.2.2" in last[0], last[0]
    assert on_disk(server, ALICE)[1] == start[1] + 1
    # a smaller one still fits
    assert send(server, [ALICE], message(12000))[1] == 250
    limit, used, _ = counted(server, ALICE)
    assert used < limit
    # now over: tighten the limit below the usage, and RCPT is refused at once
    set_quota(server, ALICE, "10K")
    c = SMTPClient(server.port("smtp"))
    try:
        c.cmd("EHLO client.example.org")
        c.cmd("MAIL FROM:<someone@example.org>")
        reply = c.cmd(f"RCPT TO:<{ALICE}>")
        assert reply.code == 552 and "5.2.2" in reply.text, reply
        assert c.cmd(f"RCPT TO:<{BOB}>").code == 250  # the others still get mail
    finally:
        c.close()
    # the usage counted incrementally equals what is on disk
    assert counted(server, ALICE)[1:] == on_disk(server, ALICE)
    set_quota(server, ALICE, "0")


def test_a_recipient_over_quota_among_others_waits_in_the_queue(server: Server) -> None:
    set_quota(server, BOB, "4K")
    bob_before = on_disk(server, BOB)[1]
    carol_before = on_disk(server, CAROL)[1]
    codes, final = send(server, [BOB, CAROL], message(8000, "for two"))
    assert codes == [250, 250] and final == 250, last[0]
    assert on_disk(server, CAROL)[1] == carol_before + 1
    assert on_disk(server, BOB)[1] == bob_before
    listing = wait_until(
        lambda: (out := server.polled_cli("queue", "list")) and "4.2.2" in out and out,
        20,
        "the queued local delivery for bob deferred with 4.2.2",
    )
    assert BOB in listing
    # room again: the queue delivers it
    set_quota(server, BOB, "1M")
    server.cli("queue", "flush", "--timeout", "30")
    wait_until(lambda: on_disk(server, BOB)[1] == bob_before + 1, 20, "bob's copy delivered")
    assert any(b"Subject: for two" in m for m in server.messages(BOB))
    set_quota(server, BOB, "0")


def test_a_queued_over_quota_delivery_keeps_the_plus_tag(server: Server, tmp_path: Path) -> None:
    """The retry of an over-quota recipient is queued under the address the sender wrote
    (``dave+news``), so the Sieve script still sees the detail when the mailbox has room
    again; queued as plain ``dave`` the message used to land in INBOX instead of News."""
    script = tmp_path / "tags.sieve"
    script.write_text(
        'require ["fileinto", "mailbox", "envelope", "subaddress"];\n'
        'if envelope :detail "to" "news" { fileinto :create "News"; }\n'
    )
    server.cli("sieve", "put", DAVE, "tags", str(script), "--activate")
    set_quota(server, DAVE, "4K")
    tagged = DAVE.replace("@", "+news@")
    codes, final = send(server, [tagged, CAROL], message(8000, "tagged for two"))
    assert codes == [250, 250] and final == 250, last[0]
    listing = wait_until(
        lambda: (out := server.polled_cli("queue", "list")) and "4.2.2" in out and out,
        20,
        "the queued local delivery for dave+news deferred with 4.2.2",
    )
    assert tagged in listing, listing
    set_quota(server, DAVE, "1M")
    server.cli("queue", "flush", "--timeout", "30")
    wait_until(
        lambda: (
            server.maildir(DAVE, "News").is_dir()
            and any(b"Subject: tagged for two" in m for m in server.messages(DAVE, "News"))
        ),
        20,
        "dave's copy filed into News by the +news detail",
    )
    assert not any(b"Subject: tagged for two" in m for m in server.messages(DAVE))
    server.cli("sieve", "deactivate", DAVE)
    set_quota(server, DAVE, "0")


def imap(server: Server, user: str) -> IMAPClient:
    return IMAPClient(server.port("imap"), user)


def append(client: IMAPClient, folder: str, size: int) -> list[bytes]:
    data = message(size).encode()
    return client.cmd(f"APPEND {folder} {{{len(data)}+}}\r\n".encode() + data)


def test_imap_quota_commands_and_refusals(server: Server) -> None:
    set_quota(server, BOB, "40K")
    c = imap(server, BOB)
    try:
        caps = b" ".join(c.ok("CAPABILITY"))
        assert b" QUOTA " in caps + b" " and b"QUOTA=RES-STORAGE" in caps
        c.ok("CREATE Work")
        _, used, _ = counted(server, BOB)
        lines = c.ok("GETQUOTAROOT INBOX")
        assert lines[0] == b'* QUOTAROOT "INBOX" ""', lines
        assert lines[1] == b'* QUOTA "" (STORAGE %d 40)' % ((used + 1023) // 1024), lines
        assert c.ok('GETQUOTA ""') == [lines[1]]
        assert c.cmd("GETQUOTA other")[-1].split()[1:3] == [b"NO", b"[NONEXISTENT]"]
        assert b"NO [NOPERM]" in c.cmd('SETQUOTA "" (STORAGE 100000)')[-1]
        # APPEND fits, then one that would not
        assert append(c, "Work", 15000)[-1].split()[1] == b"OK"
        refused = append(c, "Work", 30000)[-1]
        assert refused.split()[1:3] == [b"NO", b"[OVERQUOTA]"], refused
        assert append(c, "INBOX", 15000)[-1].split()[1] == b"OK"
        # COPY and MOVE of 15 KB more would exceed 40 KiB
        c.ok("SELECT Work")
        refused = c.cmd("COPY 1 INBOX")[-1]
        assert refused.split()[1:3] == [b"NO", b"[OVERQUOTA]"], refused
        refused = c.cmd("MOVE 1 INBOX")[-1]
        assert refused.split()[1:3] == [b"NO", b"[OVERQUOTA]"], refused
        assert b"EXISTS" not in b"".join(c.ok("NOOP"))  # nothing was moved or copied
        # deleting always works: a move into Trash, STORE \Deleted + EXPUNGE
        before = counted(server, BOB)
        c.ok("MOVE 1 Trash")
        assert counted(server, BOB)[1:] == before[1:]  # moved, not added
        c.ok("SELECT Trash")
        c.ok("STORE 1:* +FLAGS (\\Deleted)")
        c.ok("EXPUNGE")
        assert counted(server, BOB)[1] < before[1]
        # DELETE of a folder frees what it held
        append(c, "Work", 1000)
        before = counted(server, BOB)[1]
        c.ok("DELETE Work")
        assert counted(server, BOB)[1] < before
        assert counted(server, BOB)[1:] == on_disk(server, BOB)
    finally:
        c.close()
    set_quota(server, BOB, "0")


def test_a_message_count_limit(server: Server) -> None:
    out = server.cli("user", "quota", BOB, "--messages", "0").stdout  # none yet
    set_quota(server, BOB, "0")
    start = on_disk(server, BOB)[1]
    out = server.cli("user", "quota", BOB, "--messages", str(start + 2)).stdout
    assert f"{start} of {start + 2} messages" in out and "no size limit" in out
    c = imap(server, BOB)
    try:
        caps = b" ".join(c.ok("CAPABILITY"))
        assert b"QUOTA=RES-MESSAGE" in caps
        assert append(c, "INBOX", 100)[-1].split()[1] == b"OK"
        lines = c.ok("GETQUOTAROOT INBOX")
        assert lines[1] == b'* QUOTA "" (MESSAGE %d %d)' % (start + 1, start + 2), lines
        assert append(c, "INBOX", 100)[-1].split()[1] == b"OK"
        refused = append(c, "INBOX", 100)[-1]
        assert refused.split()[1:3] == [b"NO", b"[OVERQUOTA]"], refused
    finally:
        c.close()
    codes, _ = send(server, [BOB], message(100))
    assert codes == [552]  # at the count: refused at RCPT
    server.cli("user", "quota", BOB, "1M", "--messages", str(start + 10))
    c = imap(server, BOB)
    try:
        lines = c.ok('GETQUOTA ""')
        assert re.fullmatch(
            rb'\* QUOTA "" \(STORAGE \d+ 1024 MESSAGE %d %d\)' % (start + 2, start + 10), lines[0]
        ), lines
    finally:
        c.close()
    server.cli("user", "quota", BOB, "0", "--messages", "0")
    assert not usage_file(server, BOB).exists()


def test_sieve_fileinto_is_held_to_the_limit(server: Server, tmp_path: Path) -> None:
    script = tmp_path / "rules.sieve"
    script.write_text('require ["fileinto", "mailbox"];\nfileinto :create "Lists";\n')
    server.cli("sieve", "put", CAROL, "rules", str(script), "--activate")
    set_quota(server, CAROL, "1M")
    assert send(server, [CAROL], message(4000, "filed"))[1] == 250
    assert len(server.messages(CAROL, "Lists")) == 1
    _, used, _ = counted(server, CAROL)
    set_quota(server, CAROL, f"{used // 1024 + 4}K")  # room for 4 KiB more, not 8
    codes, final = send(server, [CAROL], message(8000, "too big"))
    assert final == 552 and "5.2.2" in last[0], (codes, last[0])
    assert len(server.messages(CAROL, "Lists")) == 1
    server.cli("sieve", "deactivate", CAROL)
    set_quota(server, CAROL, "0")


def test_reindex_recounts_a_drift(server: Server) -> None:
    set_quota(server, ALICE, "1M")
    assert send(server, [ALICE], message(2000))[1] == 250
    # a change made behind the server's back (a file removed by hand) is a drift that
    # reindex recounts away
    victim = next((server.maildir(ALICE) / "new").iterdir(), None) or next(
        (server.maildir(ALICE) / "cur").iterdir()
    )
    victim.unlink()
    assert counted(server, ALICE)[1:] != on_disk(server, ALICE)
    out = server.cli("reindex", ALICE)
    assert out.returncode == 0
    assert counted(server, ALICE)[1:] == on_disk(server, ALICE)
    assert re.search(r"1048576S", usage_file(server, ALICE).read_text())
    set_quota(server, ALICE, "0")
