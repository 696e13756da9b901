"""The SMTP client session state machine, driven by hand with StringTransport and task.Clock."""

from __future__ import annotations

import base64

import pytest
from twisted.internet import error as ierror
from twisted.python.failure import Failure

from mailsuite.outbound.result import Outcome, Timeouts
from mailsuite.smtp.replies import Reply
from tests.outbound_helpers import BODY, Harness


def test_pipelined_transaction_with_per_recipient_results(tmp_path):
    h = Harness(tmp_path)
    h.greet_ehlo("PIPELINING", "SIZE 10000", "ENHANCEDSTATUSCODES")
    assert len(h.t.writes) == 1  # RFC 2920: MAIL and all RCPTs in one write
    assert h.sent() == [
        f"MAIL FROM:<alice@client.test> SIZE={len(BODY)}",
        "RCPT TO:<bob@mx.test>",
        "RCPT TO:<carol@mx.test>",
    ]
    h.server("250 2.1.0 ok", "250 2.1.5 ok", "550-5.1.1 no such user", "550 5.1.1 really")
    assert h.sent() == ["DATA"]
    h.server("354 go on")
    assert h.pump_body() == b"Subject: test\r\n\r\nline one\r\n..leading dot\r\n.\r\n"
    h.server("250 2.0.0 queued as X")
    assert h.sent() == ["QUIT"]
    h.server("221 2.0.0 bye")
    r = h.close()
    assert r.outcome is Outcome.DELIVERED
    assert r.recipients["bob@mx.test"] == Reply(250, "2.0.0", "queued as X")
    assert r.recipients["carol@mx.test"] == Reply(550, "5.1.1", "no such user\nreally")
    assert r.delivered == ["bob@mx.test"] and r.permanent_failures == ["carol@mx.test"]
    assert not r.try_next_mx


def test_without_pipelining_commands_wait_for_replies(tmp_path):
    h = Harness(tmp_path)
    h.greet_ehlo("8BITMIME")
    assert h.sent() == ["MAIL FROM:<alice@client.test>"]  # no SIZE= when SIZE not offered
    h.server("250 ok")
    assert h.sent() == ["RCPT TO:<bob@mx.test>"]
    h.server("451 4.3.0 later")
    assert h.sent() == ["RCPT TO:<carol@mx.test>"]
    h.server("250 ok")
    assert h.sent() == ["DATA"]
    h.server("354 go")
    h.pump_body()
    h.server("250 ok")
    h.server("221 bye")
    r = h.close()
    assert r.outcome is Outcome.DELIVERED
    assert r.transient_failures == ["bob@mx.test"] and r.delivered == ["carol@mx.test"]


def test_ehlo_refused_falls_back_to_helo(tmp_path):
    h = Harness(tmp_path)
    h.server("220 old.mx.test SMTP")
    assert h.sent() == ["EHLO client.test"]
    h.server("502 5.5.1 what?")
    assert h.sent() == ["HELO client.test"]
    h.server("250 old.mx.test")
    assert h.sent() == ["MAIL FROM:<alice@client.test>"]
    assert h.session.extensions == {}


def test_helo_refused_too(tmp_path):
    h = Harness(tmp_path)
    h.server("220 x", "500 no", "550 go away")
    assert h.sent()[-1] == "QUIT"
    h.server("221 bye")
    r = h.close()
    assert r.outcome is Outcome.HELO_REFUSED and r.try_next_mx
    assert all(x.code == 550 for x in r.recipients.values())


def test_greeting_421_closes(tmp_path):
    h = Harness(tmp_path)
    h.server("421 4.3.2 too busy")
    r = h.close()
    assert r.outcome is Outcome.GREETING_REFUSED and r.stage == "greeting"
    assert r.try_next_mx and r.transient_failures == ["bob@mx.test", "carol@mx.test"]


@pytest.mark.parametrize(
    "stage,seconds",
    [("greeting", 300), ("mail", 300), ("rcpt", 300), ("data", 120), ("data-end", 600)],
)
def test_default_timeouts(tmp_path, stage, seconds):
    h = Harness(tmp_path, rcpts=("bob@mx.test",))
    if stage != "greeting":
        h.greet_ehlo("SIZE 0")
        if stage != "mail":
            h.server("250 ok")
            if stage != "rcpt":
                h.server("250 ok")
                if stage != "data":
                    h.server("354 go")
                    h.pump_body()
    h.clock.advance(seconds - 1)
    assert not h.t.disconnecting
    h.clock.advance(1)
    r = h.close()
    assert r.outcome is Outcome.TIMEOUT and r.stage == stage
    assert r.recipients["bob@mx.test"].transient
    assert r.try_next_mx is (stage in ("greeting", "mail", "rcpt"))


def test_configurable_timeouts(tmp_path):
    h = Harness(tmp_path, timeouts=Timeouts(greeting=2, command=1))
    h.clock.advance(1.5)
    h.server("220 hi")
    h.clock.advance(1.5)
    r = h.close()
    assert r.outcome is Outcome.TIMEOUT and r.stage == "ehlo"


def test_data_block_timeout_restarts_on_progress(tmp_path):
    h = Harness(tmp_path, body=b"x\n" * 100, chunk_size=10, timeouts=Timeouts(data_block=5))
    h.greet_ehlo("PIPELINING")
    h.server("250 ok", "250 ok", "250 ok", "354 go")
    for _ in range(3):
        h.clock.advance(4)
        h.t.producer.resumeProducing()
    assert not h.t.disconnecting
    h.clock.advance(5)  # the transport stopped asking for data
    r = h.close()
    assert r.outcome is Outcome.TIMEOUT and r.stage == "data"


def test_quit_unanswered_is_aborted(tmp_path):
    h = Harness(tmp_path, timeouts=Timeouts(quit=3))
    h.server("554 5.7.1 no service")
    assert h.sent() == ["QUIT"]
    h.clock.advance(3)
    r = h.close()
    assert r.outcome is Outcome.GREETING_REFUSED and r.reply.code == 554


def test_mail_refused_in_pipeline(tmp_path):
    h = Harness(tmp_path)
    h.greet_ehlo("PIPELINING")
    h.sent()
    h.server("451 4.7.1 greylisted", "503 5.5.1 no MAIL", "503 5.5.1 no MAIL")
    assert h.sent() == ["QUIT"]
    h.server("221 bye")
    r = h.close()
    assert r.outcome is Outcome.MAIL_REFUSED and r.try_next_mx
    assert set(r.recipients.values()) == {Reply(451, "4.7.1", "greylisted")}


def test_all_recipients_refused_sends_no_data(tmp_path):
    h = Harness(tmp_path)
    h.greet_ehlo("PIPELINING")
    h.sent()
    h.server("250 ok", "550 5.1.1 no", "450 4.2.1 later")
    assert h.sent() == ["QUIT"]
    h.server("221 bye")
    r = h.close()
    assert r.outcome is Outcome.ALL_RECIPIENTS_REFUSED
    assert r.permanent_failures == ["bob@mx.test"] and r.transient_failures == ["carol@mx.test"]


def test_refused_after_final_dot(tmp_path):
    h = Harness(tmp_path)
    h.greet_ehlo("PIPELINING")
    h.server("250 ok", "250 ok", "550 5.1.1 no", "354 go")
    h.pump_body()
    h.server("452 4.3.1 disk full")
    h.server("221 bye")
    r = h.close()
    assert r.outcome is Outcome.DATA_REFUSED and r.stage == "data-end"
    assert r.recipients == {
        "bob@mx.test": Reply(452, "4.3.1", "disk full"),
        "carol@mx.test": Reply(550, "5.1.1", "no"),
    }


def test_connection_lost_mid_transaction(tmp_path):
    h = Harness(tmp_path)
    h.greet_ehlo("PIPELINING")
    h.server("250 ok", "250 ok")
    h.session.connectionLost(Failure(ierror.ConnectionLost()))
    r = h.results[0]
    assert r.outcome is Outcome.CONNECTION_LOST and r.stage == "rcpt" and r.try_next_mx
    assert r.transient_failures == ["bob@mx.test", "carol@mx.test"]


def test_garbage_reply_is_protocol_error(tmp_path):
    h = Harness(tmp_path)
    h.server("HTTP/1.1 400 Bad Request")
    r = h.close()
    assert r.outcome is Outcome.PROTOCOL_ERROR


def test_size_over_server_limit_is_not_sent(tmp_path):
    h = Harness(tmp_path, size=5000)
    h.greet_ehlo("PIPELINING", "SIZE 4999")
    assert h.sent() == ["QUIT"]
    h.server("221 bye")
    r = h.close()
    assert r.outcome is Outcome.MESSAGE_UNSENDABLE
    assert r.reply.status == "5.3.4" and r.permanent_failures == ["bob@mx.test", "carol@mx.test"]
    assert not r.reply.remote and not r.try_next_mx


def test_8bit_without_8bitmime_fails_permanently(tmp_path):
    h = Harness(tmp_path, body_8bit=True)
    h.greet_ehlo("PIPELINING")
    assert h.sent() == ["QUIT"]
    h.server("221 bye")
    r = h.close()
    assert r.outcome is Outcome.MESSAGE_UNSENDABLE and r.reply.status == "5.6.3"


def test_8bit_with_8bitmime_and_smtputf8(tmp_path):
    h = Harness(tmp_path, body_8bit=True, rcpts=("jörg@mx.test",))
    h.greet_ehlo("PIPELINING", "8BITMIME", "SMTPUTF8", "SIZE")
    assert h.sent() == [
        f"MAIL FROM:<alice@client.test> SIZE={len(BODY)} BODY=8BITMIME SMTPUTF8",
        "RCPT TO:<jörg@mx.test>",
    ]


def test_utf8_address_without_smtputf8_fails(tmp_path):
    h = Harness(tmp_path, mail_from="jörg@client.test")
    h.greet_ehlo("8BITMIME")
    assert h.sent() == ["QUIT"]
    h.server("221 bye")
    assert h.close().reply.status == "5.6.7"


# --------------------------------------------------------------- STARTTLS and AUTH


def test_starttls_then_ehlo_again(tmp_path):
    h = Harness(tmp_path, tls="opportunistic")
    h.greet_ehlo("STARTTLS", "PIPELINING")
    assert h.sent() == ["STARTTLS"]
    h.server("220 2.0.0 ready", "250 injected before TLS")  # RFC 3207: discarded
    assert h.t.tls_context is not None and h.session.tls_active
    assert h.sent() == ["EHLO client.test"]
    h.server("250-mx.test", "250 PIPELINING")
    assert h.sent()[0] == "MAIL FROM:<alice@client.test>"


def test_starttls_refused_opportunistic_goes_on(tmp_path):
    h = Harness(tmp_path, tls="opportunistic")
    h.greet_ehlo("STARTTLS")
    h.sent()
    h.server("454 4.7.0 TLS not available")
    assert h.sent() == ["MAIL FROM:<alice@client.test>"]


def test_tls_required_but_not_offered(tmp_path):
    h = Harness(tmp_path, tls="required")
    h.greet_ehlo("PIPELINING")
    assert h.sent() == ["QUIT"]
    h.server("221 bye")
    r = h.close()
    assert r.outcome is Outcome.TLS_FAILED and r.reply.transient and r.try_next_mx


def test_tls_handshake_failure(tmp_path):
    h = Harness(tmp_path, tls="required")
    h.greet_ehlo("STARTTLS")
    h.sent()
    h.server("220 go")
    h.session.connectionLost(Failure(ierror.ConnectionLost("handshake failure")))
    r = h.results[0]
    assert r.outcome is Outcome.TLS_FAILED and r.stage == "tls"


def tls_up(h: Harness, auth_mechs: str) -> None:
    h.greet_ehlo("STARTTLS")
    h.sent()
    h.server("220 go")
    h.sent()
    h.server("250-mx.test", f"250 AUTH {auth_mechs}")


def test_auth_plain_over_tls(tmp_path, twisted_logs):
    h = Harness(tmp_path, tls="opportunistic", auth=("alice", "s3cr3t-pw"))
    tls_up(h, "LOGIN PLAIN")
    token = base64.b64encode(b"\0alice\0s3cr3t-pw").decode()
    assert h.sent() == [f"AUTH PLAIN {token}"]
    h.server("235 2.7.0 ok")
    assert h.sent() == ["MAIL FROM:<alice@client.test>"]
    joined = "\n".join(twisted_logs.text)
    assert "s3cr3t-pw" not in joined and token not in joined


def test_auth_login_over_tls(tmp_path, twisted_logs):
    h = Harness(tmp_path, tls="required", auth=("alice", "s3cr3t-pw"))
    tls_up(h, "LOGIN")
    assert h.sent() == ["AUTH LOGIN"]
    h.server("334 VXNlcm5hbWU6")
    assert h.sent() == [base64.b64encode(b"alice").decode()]
    h.server("334 UGFzc3dvcmQ6")
    assert h.sent() == [base64.b64encode(b"s3cr3t-pw").decode()]
    h.server("235 ok")
    assert h.sent() == ["MAIL FROM:<alice@client.test>"]
    assert not any(base64.b64encode(b"s3cr3t-pw").decode() in x for x in twisted_logs.text)


def test_auth_refused(tmp_path):
    h = Harness(tmp_path, tls="required", auth=("alice", "wrong"))
    tls_up(h, "PLAIN")
    h.sent()
    h.server("535 5.7.8 bad credentials")
    assert h.sent() == ["QUIT"]
    h.server("221 bye")
    r = h.close()
    assert r.outcome is Outcome.AUTH_FAILED and r.reply.status == "5.7.8"


def test_auth_never_in_cleartext(tmp_path):
    h = Harness(tmp_path, tls="opportunistic", auth=("alice", "s3cr3t-pw"))
    h.greet_ehlo("AUTH PLAIN LOGIN")  # no STARTTLS offered
    assert h.sent() == ["QUIT"]
    h.server("221 bye")
    r = h.close()
    assert r.outcome is Outcome.AUTH_FAILED and not r.reply.remote


def test_reply_diagnostic_for_dsn():
    assert Reply(550, "5.1.1", "no such\nuser").diagnostic() == "smtp; 550 5.1.1 no such user"
    assert Reply(554, None, "no").diagnostic() == "smtp; 554 no"
    assert Reply(554, None, "no").status == "5.0.0"
    local = Reply(451, "4.4.1", "no connection", remote=False)
    assert local.diagnostic() == "x-mailsuite; no connection"
