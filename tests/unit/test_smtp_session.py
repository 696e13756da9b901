"""The SMTP session state machine with plain objects (no sockets, no reactor): greeting, EHLO
per profile, transaction sequencing, AUTH, STARTTLS, limits and the end-of-data hook."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mailsuite.smtp import replies as R
from mailsuite.smtp.headers import HeaderEdit, header_edit, header_field, split_fields
from mailsuite.smtp.policy import ACCEPT, Check, Facts, ReceivedMessage, Verdict, refuse
from mailsuite.smtp.sasl import encode_plain
from mailsuite.smtp.session import (
    AbortMessage,
    CheckMessage,
    Close,
    Deliver,
    Login,
    LoginAnswer,
    ReceiveData,
    StartTLS,
    State,
)
from tests.smtp_session_helpers import (
    HOST,
    Directory,
    check_wire,
    cmd,
    code,
    reader_of,
    run,
    send_data,
    session,
    status,
    transaction,
)

BODY = b"From: alice@example.test\r\nSubject: hi\r\n\r\nhello\r\n"


def ehlo_keywords(s) -> list[str]:  # type: ignore[no-untyped-def]
    step = cmd(s, "EHLO client.example")
    assert code(step) == 250
    check_wire(step.replies[0])
    return step.replies[0].text.split("\n")[1:]


# -- greeting and EHLO --------------------------------------------------------------------------


def test_greeting_names_the_host_without_enhanced_code() -> None:
    step = session().greeting()
    assert step.out == f"220 {HOST} ESMTP mailsuite ready\r\n".encode()
    assert step.action is None


def test_a_connect_check_can_refuse_instead_of_the_greeting() -> None:
    class Blocklist(Check):
        def connect(self, facts: Facts) -> Verdict:
            return refuse(R.Reply(554, "5.7.1", "Blocked"), f"{facts.client_ip} is listed")

    s = session(extra=[Blocklist()])
    step = s.greeting()
    assert status(step) == "554 5.7.1" and isinstance(step.action, Close)
    assert step.log == ("192.0.2.7 is listed",)
    assert s.state is State.CLOSED
    assert cmd(s, "EHLO x").replies == ()  # nothing is answered once closed


def test_ehlo_extensions_of_the_mx_profile() -> None:
    s = session("mx", max_message_size=1234)
    assert ehlo_keywords(s) == [
        "PIPELINING",
        "SIZE 1234",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
        "STARTTLS",
    ]
    s.tls_started()
    assert "STARTTLS" not in ehlo_keywords(s)
    assert not any(k.startswith("AUTH") for k in ehlo_keywords(s))  # never on port 25
    assert "STARTTLS" not in ehlo_keywords(session("mx", tls_available=False))


def test_ehlo_extensions_of_the_submission_profile() -> None:
    plain = session("submission")
    assert "STARTTLS" in ehlo_keywords(plain)
    assert not any(k.startswith("AUTH") for k in ehlo_keywords(plain))  # not before TLS
    tls = session("submission", tls=True)
    keywords = ehlo_keywords(tls)
    assert "AUTH PLAIN LOGIN" in keywords and "STARTTLS" not in keywords
    allowed = session("submission", allow_plaintext=True)
    assert "AUTH PLAIN LOGIN" in ehlo_keywords(allowed)


def test_ehlo_reply_is_multiline_and_helo_is_not() -> None:
    s = session()
    step = cmd(s, "EHLO client.example")
    lines = step.out.split(b"\r\n")[:-1]
    assert lines[0] == f"250-{HOST} greets client.example".encode()
    assert all(line.startswith(b"250-") for line in lines[:-1])
    assert lines[-1].startswith(b"250 ")
    assert s.esmtp and s.state is State.READY
    step = cmd(s, "HELO client.example")
    assert step.out == f"250 {HOST} greets client.example\r\n".encode()
    assert not s.esmtp


def test_helo_name_is_neutralised_for_the_received_field() -> None:
    s = session()
    cmd(s, "EHLO evil(comment)\tX-Injected:yes more")
    assert s.helo == "evil_comment__X-Injected:yes"


@pytest.mark.parametrize("verb", ["EHLO", "HELO"])
def test_hello_needs_an_argument(verb: str) -> None:
    assert status(cmd(session(), verb)) == "501 5.5.4"


# -- sequencing -------------------------------------------------------------------------------


def test_commands_out_of_sequence_get_503() -> None:
    s = session()
    assert cmd(s, "MAIL FROM:<a@remote.test>").replies == (R.NEED_EHLO,)
    assert cmd(s, "RCPT TO:<alice@example.test>").replies == (R.NEED_MAIL,)
    assert cmd(s, "DATA").replies == (R.NEED_MAIL,)
    cmd(s, "EHLO c")
    assert code(cmd(s, "MAIL FROM:<a@remote.test>")) == 250
    assert s.state is State.MAIL
    assert cmd(s, "MAIL FROM:<b@remote.test>").replies == (R.NESTED_MAIL,)
    assert cmd(s, "DATA").replies == (R.NEED_RCPT,)
    assert code(cmd(s, "RCPT TO:<nobody@example.test>")) == 550
    assert cmd(s, "DATA").replies == (R.NEED_RCPT,)  # a refused RCPT is not recorded
    assert code(cmd(s, "RCPT TO:<alice@example.test>")) == 250
    assert s.state is State.RCPT
    assert cmd(s, "RSET").replies == (R.RESET,)
    assert s.transaction is None and s.state is State.READY
    assert cmd(s, "RCPT TO:<alice@example.test>").replies == (R.NEED_MAIL,)


def test_ehlo_resets_the_transaction() -> None:
    s = session()
    transaction(s, "alice@example.test")
    cmd(s, "EHLO again")
    assert s.transaction is None and s.state is State.READY


def test_unknown_and_malformed_commands() -> None:
    s = session()
    assert cmd(s, "BOGUS").replies == (R.UNKNOWN_COMMAND,)
    assert cmd(s, "").replies == (R.UNKNOWN_COMMAND,)
    assert cmd(s, "NO0P").replies == (R.UNKNOWN_COMMAND,)
    assert status(cmd(s, b"NOOP \xff")) == "501 5.5.4"  # not UTF-8
    assert status(cmd(s, b"NOOP a\rb")) == "501 5.5.4"  # bare CR
    assert cmd(s, "noop").replies == (R.OK,)  # verbs are case-insensitive
    assert code(cmd(s, "VRFY alice")) == 252
    assert code(cmd(s, "EXPN team")) == 502
    assert code(cmd(s, "HELP")) == 214


def test_too_many_errors_closes_with_421() -> None:
    s = session(max_errors=3)
    assert code(cmd(s, "BOGUS")) == 500
    assert code(cmd(s, "MAIL FROM:<a@b.test>")) == 503
    step = cmd(s, "ALSOBOGUS")
    assert step.replies == (R.TOO_MANY_ERRORS,) and isinstance(step.action, Close)
    assert s.state is State.CLOSED
    assert cmd(s, "NOOP").replies == ()


def test_quit_closes() -> None:
    s = session()
    step = cmd(s, "QUIT")
    assert step.replies == (R.BYE,) and isinstance(step.action, Close)
    assert cmd(s, "NOOP").replies == ()


def test_no_command_is_read_while_an_action_is_pending() -> None:
    """The adapter holds input while the session waits; a line that reaches the session
    anyway is a bug on our side, answered 451 rather than acted on (ordered pipelining)."""
    s = session("submission", tls=True)
    cmd(s, "EHLO c")
    assert isinstance(
        cmd(s, "AUTH PLAIN " + encode_plain("alice@example.test", "pw")).action, Login
    )
    assert s.state is State.LOGIN
    assert cmd(s, "MAIL FROM:<alice@example.test>").replies == (R.INTERNAL_ERROR,)
    assert s.transaction is None


# -- MAIL and RCPT -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("MAIL FROM:<a@remote.test> SIZE=2000", "552 5.3.4"),
        ("MAIL FROM:<a@remote.test> SIZE=big", "501 5.5.4"),
        ("MAIL FROM:<a@remote.test> BODY=9BIT", "555 5.5.4"),
        ("MAIL FROM:<a@remote.test> FOO=bar", "555 5.5.4"),
        ("MAIL FROM:<ünï@remote.test>", "553 5.6.7"),
        ("MAIL FROM:<a@remote.test> SIZE=1000 BODY=8BITMIME", "250 2.1.0"),
        ("MAIL FROM:<ünï@remote.test> SMTPUTF8", "250 2.1.0"),
        ("MAIL FROM:<>", "250 2.1.0"),
        ("MAIL FROM:a@remote.test", "501 5.5.4"),
    ],
)
def test_mail_parameters(line: str, expected: str) -> None:
    s = session(max_message_size=1500)
    cmd(s, "EHLO c")
    assert status(cmd(s, line)) == expected


def test_mail_parameters_need_ehlo() -> None:
    s = session()
    cmd(s, "HELO c")
    assert status(cmd(s, "MAIL FROM:<a@remote.test> BODY=8BITMIME")) == "555 5.5.4"


def test_mail_records_the_envelope_options() -> None:
    s = session()
    cmd(s, "EHLO c")
    assert code(cmd(s, "MAIL FROM:<ü@remote.test> SMTPUTF8 BODY=8BITMIME")) == 250
    assert code(cmd(s, "RCPT TO:<jörg@example.test>")) == 550  # unknown, but UTF-8 is fine
    txn = s.transaction
    assert (
        txn is not None and txn.smtputf8 and txn.body_8bit and txn.sender.address == "ü@remote.test"
    )


def test_rcpt_rules_of_the_mx_profile() -> None:
    s = session()
    transaction(s)
    assert status(cmd(s, "RCPT TO:<nobody@example.test>")) == "550 5.1.1"
    step = cmd(s, "RCPT TO:<victim@gmail.example>")
    assert status(step) == "554 5.7.1"
    assert step.log == ("relay denied for <victim@gmail.example>",)
    assert status(cmd(s, "RCPT TO:<alice+tag@example.test>")) == "250 2.1.5"
    assert status(cmd(s, "RCPT TO:<Postmaster>")) == "250 2.1.5"  # RFC 5321 4.1.1.3
    assert status(cmd(s, "RCPT TO:<bob@example.test> NOTIFY=NEVER")) == "555 5.5.4"
    assert status(cmd(s, "RCPT TO:<jörg@example.test>")) == "553 5.6.7"  # no SMTPUTF8
    assert s.transaction is not None
    assert s.transaction.recipients == ["alice+tag@example.test", "postmaster@example.test"]
    assert [box.user for box in s.transaction.local] == [
        "alice@example.test",
        "postmaster@example.test",
    ]


def test_trusted_networks_may_relay_on_the_mx_profile_only() -> None:
    s = session("mx", trusted=True)
    transaction(s, "someone@elsewhere.test")
    assert s.transaction is not None and s.transaction.remote == ["someone@elsewhere.test"]
    s = session("submission", tls=True, trusted=True)
    cmd(s, "EHLO c")
    assert status(cmd(s, "MAIL FROM:<a@example.test>")) == "530 5.7.0"  # AUTH first, always


def test_remote_recipients_without_a_queue_get_451_and_are_not_errors() -> None:
    directory = Directory(aliases={"ext@example.test": ["someone@remote.test"]})
    s = session(directory=directory, has_queue=False, max_errors=2)
    transaction(s)
    for _ in range(3):
        assert status(cmd(s, "RCPT TO:<ext@example.test>")) == "451 4.4.0"
    assert s.state is State.MAIL and s.errors == 0


def test_recipient_limit_452_is_not_an_error_and_costs_no_lookup() -> None:
    directory = Directory()
    s = session(directory=directory, max_recipients=100, max_errors=2)
    transaction(s, *(f"alice+{i}@example.test" for i in range(100)))
    lookups = directory.lookups
    for _ in range(3):
        assert status(cmd(s, "RCPT TO:<bob+2@example.test>")) == "452 4.5.3"
    assert directory.lookups == lookups and s.errors == 0


def test_recipients_resolving_to_one_mailbox_are_delivered_once() -> None:
    directory = Directory(aliases={"team@example.test": ["alice@example.test", "x@remote.test"]})
    s = session(directory=directory)
    transaction(s, "alice@example.test", "team@example.test", "alice+a@example.test")
    assert s.transaction is not None
    assert [box.user for box in s.transaction.local] == ["alice@example.test"]
    assert s.transaction.remote == ["x@remote.test"]


# -- DATA -------------------------------------------------------------------------------------


def test_data_is_accepted_after_delivery_only() -> None:
    s = session()
    transaction(s, "alice@example.test")
    step = cmd(s, "DATA")
    assert s.state is State.OPENING and not step.replies
    step = s.message_opened(True)
    assert step.replies == (R.START_DATA,) and isinstance(step.action, ReceiveData)
    chunk = s.data(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert chunk.store == b"Subject: x\n\nbody\n" and chunk.newlines == 3
    assert chunk.rest == b"QUIT\r\n" and not chunk.drop
    step = s.end_of_data(reader_of(b""))
    assert isinstance(step.action, Deliver) and not step.replies
    assert step.action == Deliver(body_8bit=False)
    txid = s.transaction.txid if s.transaction else ""
    step = s.delivery_finished(True)
    assert step.out == f"250 2.0.0 Message accepted for delivery as {txid}\r\n".encode()
    assert step.log[0].startswith(f"{txid} from=<a@remote.test> to=alice@example.test")
    assert s.transaction is None and s.state is State.READY


def test_a_refusal_by_delivery_is_the_final_reply() -> None:
    """The only recipient's Sieve script rejected the message (RFC 5429 2.1): the delivery's
    550 5.7.1 goes out instead of 250, the transaction ends, and the log says why."""
    s = session()
    transaction(s, "alice@example.test")
    cmd(s, "DATA")
    s.message_opened(True)
    s.data(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert isinstance(s.end_of_data(reader_of(b"Subject: x\n\nbody\n")).action, Deliver)
    refusal = R.Reply(550, "5.7.1", "No offers, thanks.")
    step = s.delivery_finished(True, refusal)
    assert step.replies == (refusal,) and step.out == b"550 5.7.1 No offers, thanks.\r\n"
    assert "refused by delivery: 550 5.7.1 No offers, thanks." in step.log[0]
    assert s.transaction is None and s.state is State.READY


def test_delivery_failure_is_451_and_ends_the_transaction() -> None:
    s = session()
    transaction(s, "alice@example.test")
    assert send_data(s, BODY, delivered=False).replies == (R.TEMP_FAILURE,)
    assert s.transaction is None


def test_store_unavailable_at_data_keeps_the_transaction() -> None:
    s = session()
    transaction(s, "alice@example.test")
    cmd(s, "DATA")
    assert s.message_opened(False).replies == (R.TEMP_FAILURE,)
    assert s.state is State.RCPT and s.errors == 0


def test_eight_bit_data_sets_the_envelope_flag() -> None:
    s = session()
    transaction(s, "alice@example.test")
    cmd(s, "DATA")
    s.message_opened(True)
    s.data("Subject: ö\r\n\r\nÄpfel\r\n.\r\n".encode())
    step = s.end_of_data(reader_of(b""))
    assert step.action == Deliver(body_8bit=True)


def test_size_limit_counts_the_data_as_sent_and_drops_it_once() -> None:
    s = session(max_message_size=1024)
    transaction(s, "alice@example.test")
    cmd(s, "DATA")
    s.message_opened(True)
    first = s.data((b"x" * 98 + b"\r\n") * 10)  # 1000 octets as sent, 990 stored
    assert first.store and not first.drop
    over = s.data(b"y" * 20 + b"\r\n" + b"z\r\n")  # now 1025 > 1024
    assert over.drop and over.store == b""
    more = s.data(b"w" * 500 + b"\r\n.\r\n")
    assert not more.drop and more.store == b"" and more.rest == b""
    step = s.end_of_data(reader_of(b""))
    assert step.replies == (R.TOO_BIG,) and isinstance(step.action, AbortMessage)
    assert s.state is State.READY and s.errors == 0


def test_long_line_is_refused_at_the_end() -> None:
    s = session()
    transaction(s, "alice@example.test")
    step = send_data(s, b"Subject: x\r\n\r\n" + b"y" * 1000 + b"\r\n")
    assert status(step) == "550 5.6.0" and isinstance(step.action, AbortMessage)


def test_write_failure_is_451_at_the_end() -> None:
    s = session()
    transaction(s, "alice@example.test")
    cmd(s, "DATA")
    s.message_opened(True)
    s.data(b"Subject: x\r\n")
    s.write_failed()
    assert s.data(b"more\r\n.\r\n").store == b""
    step = s.end_of_data(reader_of(b""))
    assert step.replies == (R.TEMP_FAILURE,) and isinstance(step.action, AbortMessage)


def test_hop_count() -> None:
    s = session(max_hops=10)  # ours counts: 9 Received fields pass, 10 are a loop
    transaction(s, "alice@example.test")
    nine = b"Received: from a\r\nreceived: from b\r\n\tby c\r\n" + b"RECEIVED: x\r\n" * 7
    assert code(send_data(s, nine + b"Subject: ok\r\n\r\nx\r\n")) == 250
    transaction(s, "alice@example.test")
    ten = nine + b"Received: from d\r\n"
    assert status(send_data(s, ten + b"\r\nx\r\n")) == "554 5.4.6"


def test_received_field() -> None:
    s = session("submission", tls=True)
    cmd(s, "EHLO client.example")
    cmd(s, "AUTH PLAIN " + encode_plain("alice@example.test", "pw"))
    s.login_finished(LoginAnswer.OK, "alice@example.test")
    transaction(s, "bob@example.test", sender="alice@example.test")
    cmd(s, "DATA")
    field = s.received_field("version=TLSv1.3 cipher=X", "Mon, 1 Jan 2024 00:00:00 +0000")
    txid = s.transaction.txid if s.transaction else ""
    assert (
        field
        == (
            "Received: from client.example ([192.0.2.7])\n"
            "\tby mx.example.test (mailsuite) with ESMTPSA (version=TLSv1.3 cipher=X)\n"
            f"\tid {txid}\n\tfor <bob@example.test>;\n"
            "\tMon, 1 Jan 2024 00:00:00 +0000\n"
        ).encode()
    )


# -- AUTH -------------------------------------------------------------------------------------


def test_auth_is_unknown_on_the_mx_profile() -> None:
    s = session("mx", tls=True)
    cmd(s, "EHLO c")
    assert cmd(s, "AUTH PLAIN " + encode_plain("alice@example.test", "pw")).replies == (
        R.UNKNOWN_COMMAND,
    )


def test_submission_needs_tls_then_auth_for_mail() -> None:
    s = session("submission")
    cmd(s, "EHLO c")
    assert cmd(s, "AUTH PLAIN " + encode_plain("a@example.test", "pw")).replies == (R.TLS_REQUIRED,)
    assert cmd(s, "MAIL FROM:<alice@example.test>").replies == (R.TLS_REQUIRED,)
    # even a malformed MAIL gets the 530 first: nothing is parsed before AUTH
    assert cmd(s, "MAIL FROM:garbage").replies == (R.TLS_REQUIRED,)
    s.tls_started()
    cmd(s, "EHLO c")
    assert cmd(s, "MAIL FROM:<alice@example.test>").replies == (R.AUTH_REQUIRED,)


def test_auth_plain_with_initial_response() -> None:
    s = session("submission", tls=True)
    assert cmd(s, "AUTH PLAIN x").replies == (R.AUTH_NEEDS_EHLO,)
    cmd(s, "EHLO c")
    step = cmd(s, "AUTH PLAIN " + encode_plain("alice@example.test", "secret pw"))
    assert not step.replies and step.action == Login("alice@example.test", "secret pw")
    assert "secret" not in repr(step.action)  # never in a log or a traceback
    assert s.state is State.LOGIN
    assert s.login_finished(LoginAnswer.OK, "alice@example.test").replies == (R.AUTH_OK,)
    assert s.user == "alice@example.test" and s.state is State.READY
    assert cmd(s, "AUTH PLAIN x").replies == (R.AUTH_TWICE,)
    assert status(cmd(s, "MAIL FROM:<alice@example.test>")) == "250 2.1.0"
    assert s.user == "alice@example.test"  # RSET and transactions keep the login
    cmd(s, "RSET")
    assert s.user == "alice@example.test"


def test_auth_login_dialogue_and_cancel() -> None:
    s = session("submission", tls=True, max_errors=2)
    cmd(s, "EHLO c")
    assert cmd(s, "AUTH LOGIN").out == b"334 VXNlcm5hbWU6\r\n"
    assert s.state is State.SASL
    assert cmd(s, "*").replies == (R.AUTH_CANCELLED,)  # not counted as an error
    assert cmd(s, "AUTH PLAIN").out == b"334 \r\n"
    assert cmd(s, "QUIT").replies[0].code == 501  # a SASL line, not a command
    assert s.state is State.READY and s.errors == 1
    assert cmd(s, "AUTH LOGIN YWxpY2VAZXhhbXBsZS50ZXN0").out == b"334 UGFzc3dvcmQ6\r\n"
    step = cmd(s, "cHc=")
    assert step.action == Login("alice@example.test", "pw")


@pytest.mark.parametrize(
    ("answer", "expected", "errors"),
    [
        (LoginAnswer.BAD_CREDENTIALS, R.AUTH_BAD, 1),
        (LoginAnswer.THROTTLED, R.AUTH_THROTTLED, 0),
        (LoginAnswer.ERROR, R.AUTH_TEMP, 0),
    ],
)
def test_failed_logins(answer: LoginAnswer, expected: R.Reply, errors: int) -> None:
    s = session("submission", tls=True)
    cmd(s, "EHLO c")
    cmd(s, "AUTH PLAIN " + encode_plain("alice@example.test", "pw"))
    assert s.login_finished(answer).replies == (expected,)
    assert s.user is None and s.errors == errors and s.state is State.READY


def test_authzid_of_another_user_fails_like_a_wrong_password() -> None:
    s = session("submission", tls=True)
    cmd(s, "EHLO c")
    step = cmd(s, "AUTH PLAIN " + encode_plain("alice@example.test", "pw", "bob@example.test"))
    assert step.action == Login("", "pw")
    s.login_finished(LoginAnswer.BAD_CREDENTIALS)
    s = session("submission", tls=True)
    cmd(s, "EHLO c")
    step = cmd(s, "AUTH PLAIN " + encode_plain("alice@example.test", "pw", "Alice@Example.Test"))
    assert step.action == Login("alice@example.test", "pw")


def test_auth_not_inside_a_transaction() -> None:
    s = session("submission", tls=True)
    cmd(s, "EHLO c")
    cmd(s, "AUTH PLAIN " + encode_plain("alice@example.test", "pw"))
    s.login_finished(LoginAnswer.OK, "alice@example.test")
    transaction(s, sender="alice@example.test")
    s.user = None  # (as if it had not happened: RFC 4954 4 still refuses inside MAIL)
    assert cmd(s, "AUTH PLAIN x").replies == (R.AUTH_IN_TRANSACTION,)


def test_sender_binding() -> None:
    directory = Directory(send_as={"alice@example.test": {"team@example.test"}})
    s = session("submission", tls=True, directory=directory)
    cmd(s, "EHLO c")
    cmd(s, "AUTH PLAIN " + encode_plain("alice@example.test", "pw"))
    s.login_finished(LoginAnswer.OK, "alice@example.test")
    step = cmd(s, "MAIL FROM:<bob@example.test>")
    assert step.replies == (R.SENDER_NOT_OWNED,) and s.errors == 1
    assert step.log == ("alice@example.test may not send as <bob@example.test>",)
    assert code(cmd(s, "MAIL FROM:<team@example.test>")) == 250
    cmd(s, "RSET")
    assert code(cmd(s, "MAIL FROM:<>")) == 250
    cmd(s, "RCPT TO:<someone@elsewhere.test>")  # authenticated: relayed
    assert s.transaction is not None and s.transaction.remote == ["someone@elsewhere.test"]
    step = send_data(s, b"From: Bob <bob@example.test>\r\n\r\nx\r\n")
    assert step.replies == (R.FROM_NOT_OWNED,) and isinstance(step.action, AbortMessage)
    transaction(s, "bob@example.test", sender="alice@example.test")
    assert code(send_data(s, b"Subject: no From\r\n\r\nx\r\n")) == 250
    transaction(s, "bob@example.test", sender="alice@example.test")
    assert send_data(s, b"From: undisclosed\r\n\r\nx\r\n").replies == (R.FROM_UNUSABLE,)


# -- STARTTLS ---------------------------------------------------------------------------------


def test_starttls_rules() -> None:
    assert cmd(session(tls_available=False), "STARTTLS").replies == (R.TLS_UNAVAILABLE,)
    s = session()
    assert status(cmd(s, "STARTTLS now")) == "501 5.5.4"
    step = cmd(s, "STARTTLS")
    assert step.replies == (R.READY_TLS,) and isinstance(step.action, StartTLS)
    s.tls_started()
    assert s.tls and s.state is State.CONNECTED
    assert cmd(s, "STARTTLS").replies == (R.BAD_SEQUENCE,)


def test_starttls_forgets_everything_even_a_plaintext_login() -> None:
    s = session("submission", allow_plaintext=True)
    cmd(s, "EHLO c")
    cmd(s, "AUTH PLAIN " + encode_plain("alice@example.test", "pw"))
    s.login_finished(LoginAnswer.OK, "alice@example.test")
    transaction(s, sender="alice@example.test")
    cmd(s, "STARTTLS")
    s.tls_started()
    assert (s.helo, s.user, s.transaction) == (None, None, None)
    assert cmd(s, "MAIL FROM:<alice@example.test>").replies == (R.NEED_EHLO,)
    assert "AUTH PLAIN LOGIN" in ehlo_keywords(s)


# -- the end-of-data hook (mail authentication plugs in here) ----------------------------------


class Recorder(Check):
    """An end-of-data check that answers with ``verdict`` and remembers what it saw."""

    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict
        self.seen: list[tuple[str | None, str, ReceivedMessage, bytes]] = []

    async def end_of_data(self, facts: Facts, message: ReceivedMessage) -> Verdict:
        data = await message.read()
        self.seen.append((facts.helo, facts.client_ip, message, data))
        return self.verdict


def test_end_of_data_checks_see_the_message_and_can_reject() -> None:
    reject = refuse(R.AUTH_POLICY_REJECT, "dmarc=fail")
    check = Recorder(reject)
    s = session(extra=[check])
    transaction(s, "alice@example.test", "bob@example.test")
    step = send_data(s, BODY)
    assert status(step) == "550 5.7.26" and isinstance(step.action, AbortMessage)
    assert step.log == ("dmarc=fail",)
    [(helo, ip, message, data)] = check.seen
    assert (helo, ip) == ("client.example", "192.0.2.7")
    assert message.sender == "a@remote.test"
    assert message.recipients == ("alice@example.test", "bob@example.test")
    assert message.headers == b"From: alice@example.test\nSubject: hi"
    assert data == BODY.replace(b"\r\n", b"\n") and message.size == len(data)


def test_end_of_data_verdicts_combine_into_one_delivery() -> None:
    forged = b"Authentication-Results: mx.example.test;\n\tdkim=pass"
    first = Recorder(
        Verdict(prepend=("Authentication-Results: mx.example.test; spf=fail",), remove=(forged,))
    )
    second = Recorder(Verdict(junk=True, prepend=("X-Spam: yes",)))
    s = session(extra=[first, second])
    transaction(s, "alice@example.test")
    cmd(s, "DATA")
    s.message_opened(True)
    s.data(forged.replace(b"\n", b"\r\n") + b"\r\n" + BODY + b".\r\n")
    step = s.end_of_data(reader_of(b""))
    assert isinstance(step.action, CheckMessage) and s.state is State.CHECKING
    verdict = run(s.profile.policy.end_of_data(s, step.action.message))
    step = s.checks_done(verdict)
    assert isinstance(step.action, Deliver) and step.action.junk
    assert step.action.header == HeaderEdit(
        len(forged) + len(b"\nFrom: alice@example.test\nSubject: hi"),
        b"Authentication-Results: mx.example.test; spf=fail\nX-Spam: yes\n"
        b"From: alice@example.test\nSubject: hi",
    )


class Settled(Recorder):
    """A check whose verdict is known at the end of the data without reading the message."""

    def settle(self, facts: Facts, message: ReceivedMessage) -> Verdict | None:
        return self.verdict


def test_a_verdict_known_at_once_delivers_without_a_check_step() -> None:
    forged = b"Authentication-Results: mx.example.test; spf=pass"
    s = session(extra=[Settled(Verdict(remove=(forged,)))])
    transaction(s, "alice@example.test")
    cmd(s, "DATA")
    s.message_opened(True)
    s.data(forged + b"\r\n" + BODY + b".\r\n")
    step = s.end_of_data(reader_of(b""))
    assert isinstance(step.action, Deliver) and s.state is State.DELIVERING
    assert step.action.header == HeaderEdit(
        len(forged) + len(b"\nFrom: alice@example.test\nSubject: hi"),
        b"From: alice@example.test\nSubject: hi",
    )
    # a refusal known at once answers as the check step's would
    s = session(extra=[Settled(refuse(R.AUTH_POLICY_REJECT, "dmarc=fail"))])
    transaction(s, "alice@example.test")
    step = send_data(s, BODY)
    assert status(step) == "550 5.7.26" and isinstance(step.action, AbortMessage)
    assert step.log == ("dmarc=fail",) and s.state is State.READY


def test_an_invalid_field_from_a_check_is_a_temporary_failure() -> None:
    s = session(extra=[Recorder(Verdict(prepend=("X-Bad: a\nX-Injected: b",)))])
    transaction(s, "alice@example.test")
    step = send_data(s, BODY)
    assert step.replies == (R.INTERNAL_ERROR,) and isinstance(step.action, AbortMessage)


def test_without_end_of_data_checks_no_check_step() -> None:
    s = session()
    assert not s.profile.policy.checks_messages
    assert session(extra=[Recorder(ACCEPT)]).profile.policy.checks_messages


def test_header_edit() -> None:
    headers = b"A: 1\nB: 2\n\tfolded\nC: 3"
    assert split_fields(headers) == [b"A: 1", b"B: 2\n\tfolded", b"C: 3"]
    assert b"\n".join(split_fields(headers)) == headers
    assert header_edit(headers, True, (), ()) is None
    assert header_edit(headers, True, ("X: y",), ()) == HeaderEdit(0, b"X: y\n")
    assert header_edit(headers, True, (), (b"B: 2\n\tfolded",)) == HeaderEdit(
        len(headers), b"A: 1\nC: 3"
    )
    assert header_edit(headers, True, (), (b"Z: none",)) is None
    # every field removed: the last field's line end goes too
    assert header_edit(b"A: 1", True, ("X: y",), (b"A: 1",)) == HeaderEdit(5, b"X: y\n")
    with pytest.raises(ValueError):
        header_edit(headers, True, ("no colon",), ())
    with pytest.raises(ValueError):
        header_edit(headers, True, ("X: a\r\nY: b",), ())


def _old_field_ok(text: str) -> bool:
    """The per-character definition header_field must keep (RFC 5322 2.2)."""
    lines = text.split("\n")
    name, colon, _ = lines[0].partition(":")
    return bool(
        colon
        and name
        and all(33 <= ord(c) <= 126 for c in name)
        and all(line[:1] in (" ", "\t") and line.strip() for line in lines[1:])
        and "\r" not in text
        and "\x00" not in text
    )


def test_header_field_accepts_what_the_rfc_5322_definition_does() -> None:
    texts = ["X: y", "X:", ": y", "X y: z", "X\ty: z", "Xé: y", "X: a\n\tb", "X: a\n b\n\tc"]
    texts += ["X: a\nb", "X: a\n \n", "X: a\n", "X: a\r", "X: \x00", "X\x7f: y", "~!: y"]
    texts += [f"A{chr(c)}B: v" for c in range(0, 256)]
    for text in texts:
        if _old_field_ok(text):
            assert header_field(text) == text.encode() + b"\n", text
        else:
            with pytest.raises(ValueError):
                header_field(text)


# -- the core stays free of Twisted -------------------------------------------------------------


def test_session_and_policy_import_nothing_from_twisted() -> None:
    code_ = (
        "import sys, mailsuite.smtp.session, mailsuite.smtp.policy\n"
        "bad = sorted(m for m in sys.modules if m == 'twisted' or m.startswith('twisted.'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code_], check=True, timeout=60)


def test_a_message_past_its_end_is_delivered_and_logged_after_the_client_left() -> None:
    s = session()
    transaction(s, "alice@example.test")
    cmd(s, "DATA")
    s.message_opened(True)
    s.data(BODY + b".\r\n")
    assert isinstance(s.end_of_data(reader_of(b"")).action, Deliver)
    s.connection_lost()
    step = s.delivery_finished(True)
    assert step.log and step.log[0].endswith("ip=192.0.2.7")
    s = session()
    transaction(s, "alice@example.test")
    s.connection_lost()
    assert s.state is State.CLOSED and cmd(s, "DATA").replies == ()
