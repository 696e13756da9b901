"""Vacation (RFC 5230, RFC 3834): when not to answer, the persistent record, the reply."""

from __future__ import annotations

import email
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailsuite.sieve.actions import VacationRequest
from mailsuite.sieve.interpreter import SieveEnvelope
from mailsuite.sieve.message import MessageView
from mailsuite.sieve.vacation import Decision, VacationStore, build_reply, decide

ENV = SieveEnvelope("friend@example.org", "alice@example.test", "alice@example.test")
REQ = VacationRequest(reason="I am away until Monday.", seconds=86400, handle="h")
MSG = (
    b"From: Friend <friend@example.org>\nTo: Alice <alice@example.test>\n"
    b"Subject: Lunch?\nMessage-ID: <m1@example.org>\nReferences: <m0@example.org>\n\nHi\n"
)


def view(extra: bytes = b"", base: bytes = MSG) -> MessageView:
    head, body = base.split(b"\n\n", 1)
    return MessageView.from_bytes(head + b"\n" + extra + b"\n" + body if extra else base)


def test_a_personal_message_gets_a_reply_from_the_address_it_was_sent_to() -> None:
    d = decide(REQ, view(), ENV)
    assert d == Decision(True, "", "alice@example.test")


@pytest.mark.parametrize(
    "extra, why",
    [
        (b"Auto-Submitted: auto-replied", "Auto-Submitted"),
        (b"Auto-Submitted: auto-generated; type=x", "Auto-Submitted"),
        (b"Precedence: bulk", "Precedence"),
        (b"Precedence: list", "Precedence"),
        (b"Precedence: junk", "Precedence"),
        (b"List-Id: <x.lists.example.org>", "list-id"),
        (b"List-Unsubscribe: <mailto:x@example.org>", "list-unsubscribe"),
        (b"List-Post: <mailto:x@example.org>", "list-post"),
    ],
)
def test_lists_bulk_and_automatic_mail_get_none(extra: bytes, why: str) -> None:
    d = decide(REQ, view(extra), ENV)
    assert not d.reply and why in d.why


def test_auto_submitted_no_is_a_person() -> None:
    assert decide(REQ, view(b"Auto-Submitted: no"), ENV).reply


@pytest.mark.parametrize(
    "sender",
    [
        "",
        "MAILER-DAEMON@example.org",
        "owner-list@example.org",
        "list-request@example.org",
        "list-bounces@example.org",
        "alice@example.test",
        "ALICE@example.test",
    ],
)
def test_null_robot_and_own_senders_get_none(sender: str) -> None:
    env = SieveEnvelope(sender, "alice@example.test", "alice@example.test")
    assert not decide(REQ, view(), env).reply


def test_own_addresses_include_send_as_and_addresses_argument() -> None:
    env = SieveEnvelope("boss@example.test", "alice@example.test", "alice@example.test")
    assert not decide(REQ, view(), env, own_addresses=["boss@example.test"]).reply
    to_alias = MSG.replace(b"To: Alice <alice@example.test>", b"To: sales@example.test")
    assert not decide(REQ, view(base=to_alias), ENV).reply  # not addressed to the user
    req = VacationRequest(reason="x", seconds=1, addresses=("sales@example.test",))
    d = decide(req, view(base=to_alias), ENV)
    assert d.reply and d.from_addr == "sales@example.test"


def test_store_answers_once_per_period_and_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "sieve" / "vacation.json"
    store = VacationStore(path)
    assert store.claim("friend@example.org", "h", 100, now=1000.0)
    assert not store.claim("Friend@Example.org", "h", 100, now=1050.0)
    assert store.claim("friend@example.org", "other-handle", 100, now=1050.0)
    assert VacationStore(path).replied("friend@example.org", "h", now=1099.0)  # a new process
    assert VacationStore(path).claim("friend@example.org", "h", 100, now=1101.0)
    assert not list(path.parent.glob("*.tmp"))  # nothing half-written left behind
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_store_is_bounded_and_drops_expired_entries(tmp_path: Path) -> None:
    store = VacationStore(tmp_path / "v.json", max_entries=5)
    for i in range(20):
        assert store.claim(f"s{i}@example.org", "h", 1000 + i, now=0.0)
    data = json.loads((tmp_path / "v.json").read_text())
    assert len(data) == 5
    assert store.replied("s19@example.org", "h", now=1.0)  # the newest are kept
    assert store.claim("late@example.org", "h", 10, now=5000.0)
    assert len(json.loads((tmp_path / "v.json").read_text())) == 1  # expired ones pruned


def test_damaged_store_costs_at_most_a_reply(tmp_path: Path) -> None:
    path = tmp_path / "v.json"
    path.write_text("{not json")
    assert VacationStore(path).claim("a@example.org", "h", 10, now=0.0)


def test_reply_headers_rfc5230_5_rfc3834() -> None:
    now = datetime(2024, 10, 1, 12, 0, tzinfo=UTC)
    data = build_reply(
        REQ, view(), ENV, Decision(True, "", "alice@example.test"), "mx.example.test", now
    )
    msg = email.message_from_bytes(data)
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["To"] == "<friend@example.org>"
    assert msg["From"] == "alice@example.test"
    assert msg["Subject"] == "Auto: Lunch?"
    assert msg["In-Reply-To"] == "<m1@example.org>"
    assert msg["References"] == "<m0@example.org> <m1@example.org>"
    assert msg["Message-ID"].endswith("@mx.example.test>")
    assert msg.get_payload() == "I am away until Monday.\n"
    assert b"\r" not in data


def test_reply_subject_from_and_non_ascii() -> None:
    req = VacationRequest(
        reason="Je suis absente.\nÀ lundi.",
        seconds=1,
        subject="Absente — été",
        from_addr="Alice <alice@example.test>",
    )
    data = build_reply(
        req, view(), ENV, Decision(True, "", "x@example.test"), "h", datetime.now(UTC)
    )
    msg = email.message_from_bytes(data)
    assert str(email.header.make_header(email.header.decode_header(msg["Subject"]))) == (
        "Absente — été"
    )
    assert msg["From"] == "Alice <alice@example.test>"
    assert msg.get_payload(decode=True).decode("utf-8") == "Je suis absente.\nÀ lundi.\n"


def test_reply_header_injection_is_impossible() -> None:
    req = VacationRequest(reason="x", seconds=1, subject="hi\nBcc: victim@example.org")
    data = build_reply(
        req, view(), ENV, Decision(True, "", "a@example.test"), "h", datetime.now(UTC)
    )
    assert b"\nBcc:" not in data


def test_mime_reason_is_the_body_entity() -> None:
    req = VacationRequest(reason="Content-Type: text/html\n\n<p>away</p>\n", seconds=1, mime=True)
    data = build_reply(
        req, view(), ENV, Decision(True, "", "a@example.test"), "h", datetime.now(UTC)
    )
    msg = email.message_from_bytes(data)
    assert msg.get_content_type() == "text/html" and "<p>away</p>" in msg.get_payload()
