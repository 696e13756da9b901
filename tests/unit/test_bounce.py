"""DSN structure (RFC 3464), parsed back with the email package."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime, timedelta

import pytest

from mailsuite.queue.bounce import RecipientStatus, build_dsn, read_header_block

ARRIVAL = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture
def original(tmp_path):
    path = tmp_path / "msg"
    body = b"x" * 1000 + b"\n"
    path.write_bytes(
        b"From: Alice <alice@example.org>\nTo: bob@remote.test\nSubject: hello\n"
        b"Message-ID: <orig@example.org>\n\nSECRET BODY LINE\n" + body * 5000
    )
    return path


def parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.default)


def status_blocks(part) -> list[dict[str, str]]:
    """The message/delivery-status blocks as dicts (per-message first)."""
    raw = part.get_payload()
    if isinstance(raw, list):  # email parses it as a list of header blocks
        return [{k: str(v) for k, v in m.items()} for m in raw]
    raise AssertionError(raw)


def test_failed_dsn_structure(original):
    data = build_dsn(
        reporting_mta="mail.example.org",
        original_sender="alice@example.org",
        recipients=[
            RecipientStatus(
                "bob@remote.test",
                "failed",
                "5.1.1",
                diagnostic="smtp; 550 5.1.1 no such user",
                remote_mta="mx.remote.test",
            ),
            RecipientStatus(
                "carol@remote.test",
                "failed",
                "5.4.4",
                diagnostic="smtp; 550 5.1.10 domain does not accept mail",
            ),
        ],
        original_message_path=original,
        arrival_date=ARRIVAL,
        envelope_id="ENV123",
    )
    assert b"\r" not in data
    msg = parse(data)
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mail.example.org>"
    assert msg["To"].addresses[0].addr_spec == "alice@example.org"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Date"] and msg["Message-ID"].endswith("@mail.example.org>")
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert "bob@remote.test" in parts[0].get_content()

    blocks = status_blocks(parts[1])
    assert blocks[0]["Reporting-MTA"] == "dns; mail.example.org"
    assert blocks[0]["Original-Envelope-Id"] == "ENV123"
    assert blocks[0]["Arrival-Date"] == "Fri, 02 Jan 2026 03:04:05 +0000"
    assert blocks[1]["Final-Recipient"] == "rfc822; bob@remote.test"
    assert blocks[1]["Action"] == "failed"
    assert blocks[1]["Status"] == "5.1.1"
    assert blocks[1]["Remote-MTA"] == "dns; mx.remote.test"
    assert blocks[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert blocks[2]["Final-Recipient"] == "rfc822; carol@remote.test"
    assert "Remote-MTA" not in blocks[2]

    headers = parts[2].get_payload()
    assert "Subject: hello" in headers
    assert "SECRET BODY LINE" not in headers
    assert len(data) < 10_000  # the 5 MB body is not included


def test_delayed_warning(original):
    until = ARRIVAL + timedelta(days=5)
    data = build_dsn(
        reporting_mta="mail.example.org",
        original_sender="alice@example.org",
        recipients=[
            RecipientStatus(
                "bob@remote.test",
                "delayed",
                "4.4.1",
                diagnostic="smtp; 451 4.4.1 no answer",
                last_attempt=ARRIVAL,
                will_retry_until=until,
            )
        ],
        original_message_path=original,
        arrival_date=ARRIVAL,
    )
    msg = parse(data)
    assert msg["Subject"].startswith("Delivery delayed")
    block = status_blocks(msg.get_payload()[1])[1]
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.4.1"
    assert block["Will-Retry-Until"] == "Wed, 07 Jan 2026 03:04:05 +0000"
    assert block["Last-Attempt-Date"] == "Fri, 02 Jan 2026 03:04:05 +0000"


def test_never_bounce_a_bounce(original):
    with pytest.raises(ValueError):
        build_dsn(
            reporting_mta="m",
            original_sender="",
            recipients=[RecipientStatus("b@x", "failed", "5.0.0")],
            original_message_path=original,
            arrival_date=ARRIVAL,
        )


def test_header_injection_in_diagnostic_is_flattened(original):
    data = build_dsn(
        reporting_mta="mail.example.org",
        original_sender="alice@example.org",
        recipients=[
            RecipientStatus(
                "bob@remote.test", "failed", "5.0.0", diagnostic="smtp; 550 oops\r\nX-Injected: yes"
            )
        ],
        original_message_path=original,
        arrival_date=ARRIVAL,
    )
    assert b"\nX-Injected" not in data


def test_internationalized_uses_global_types(tmp_path):
    path = tmp_path / "m"
    path.write_bytes("From: jörg@exämple.org\nSubject: grüße\n\nbody\n".encode())
    data = build_dsn(
        reporting_mta="mail.example.org",
        original_sender="jörg@exämple.org",
        recipients=[RecipientStatus("bøb@remote.test", "failed", "5.1.1")],
        original_message_path=path,
        arrival_date=ARRIVAL,
    )
    msg = parse(data)
    types = [p.get_content_type() for p in msg.get_payload()]
    assert types == ["text/plain", "message/global-delivery-status", "message/global-headers"]
    assert "utf-8; bøb@remote.test".encode() in data


def test_read_header_block_limits(tmp_path):
    path = tmp_path / "m"
    path.write_bytes(b"A: 1\r\nB: 2\r\n\r\nbody\r\n")
    assert read_header_block(path) == b"A: 1\nB: 2\n"
    path.write_bytes(b"X: " + b"y" * 100 + b"\n" + b"Z: 1\n" * 1000)
    block = read_header_block(path, limit=200)
    assert len(block) <= 200 and block.endswith(b"\n")
