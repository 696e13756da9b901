"""Submission (RFC 6409) on 587 with STARTTLS and 465 with implicit TLS, SMTP AUTH (RFC 4954),
against the real ``twistd -n mailsuite`` on loopback, with real clients (smtplib, swaks)."""

from __future__ import annotations

import base64
import contextlib
import shutil
import smtplib
import socket
import ssl
import subprocess
import time
from email.message import EmailMessage

import pytest

from tests.clients import SMTPClient
from tests.harness import ALICE, BOB, PASSWORD, Server, ServerFactory
from tests.tls_helpers import HOSTNAME, CertAuthority, b64, plain, smtp_ssl, smtp_starttls

SERVICES = ("smtp", "submission", "submissions")


def make_server(servers: ServerFactory, extra_toml: str = "") -> Server:
    return servers(SERVICES, tls=True, users=(ALICE, BOB), extra_toml=extra_toml)


@pytest.fixture
def srv(servers: ServerFactory) -> Server:
    """A server of the test's own, for tests that look at mailboxes, the whole log or
    failed logins (which slow the next logins from the address down)."""
    return make_server(servers)


@pytest.fixture(scope="module")
def shared(module_servers: ServerFactory) -> Server:
    """One server for the module's tests that deliver nothing, fail no login and look at
    nothing but their own replies (a server start each cost ~1.5 s of CPU)."""
    return make_server(module_servers)


def message(sender: str = ALICE, to: str = BOB, subject: str = "hello") -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{time.time_ns()}@client.example>"
    msg.set_content("Hi Bob,\n\nsubmitted.\n")
    return bytes(msg)


def tls_session(port: int, ca: CertAuthority, source: str = "127.0.0.1") -> SMTPClient:
    raw = SMTPClient(port, source=source, timeout=30)
    raw.cmd("EHLO client.example")
    raw.start_tls(ca.client_context())
    raw.cmd("EHLO client.example")
    return raw


# --------------------------------------------------------------------------- 587


def test_587_before_tls_offers_starttls_but_no_auth_and_refuses_auth_and_mail(srv, ca):
    raw = SMTPClient(srv.port("submission"))
    ehlo = raw.cmd("EHLO client.example")
    assert any("STARTTLS" in line for line in ehlo.lines)
    assert not any("AUTH" in line for line in ehlo.lines)
    assert raw.cmd("AUTH PLAIN " + plain(ALICE, PASSWORD)).text.startswith("530 5.7.0")
    assert raw.cmd("MAIL FROM:<alice@example.test>").text.startswith("530 5.7.0")
    raw.close()
    assert "logged in" not in srv.output()


def test_587_starttls_login_plain_delivers_locally_with_esmtpsa(srv, ca):
    client = smtp_starttls(srv.port("submission"), ca)
    assert "auth" in client.esmtp_features
    assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
    assert "starttls" not in client.esmtp_features
    client.login(ALICE, PASSWORD)  # smtplib picks PLAIN with an initial response
    refused = client.sendmail(ALICE, [BOB], message())
    assert refused == {}
    client.quit()
    [stored] = srv.messages(BOB)
    received = stored.split(b"\n\n")[0]
    assert b"with ESMTPSA" in received
    assert PASSWORD.encode() not in stored
    assert plain(ALICE, PASSWORD).encode() not in stored
    assert b64(PASSWORD).encode() not in stored
    log = srv.wait_log("alice@example.test logged in from 127.0.0.1")
    assert PASSWORD not in log and plain(ALICE, PASSWORD) not in log


def test_587_auth_login_mechanism(srv, ca):
    client = smtp_starttls(srv.port("submission"), ca)
    client.user, client.password = ALICE, PASSWORD
    code, _ = client.auth("LOGIN", client.auth_login, initial_response_ok=False)
    assert code == 235
    client.sendmail(ALICE, [BOB], message(subject="login"))
    client.quit()
    assert b"Subject: login" in srv.messages(BOB)[0]


def test_587_mail_without_auth_after_tls_is_refused(srv, ca):
    raw = tls_session(srv.port("submission"), ca)
    assert raw.cmd("MAIL FROM:<alice@example.test>").text.startswith("530 5.7.0")
    assert raw.cmd("RCPT TO:<bob@example.test>").text.startswith("503")
    raw.close()
    assert srv.messages(BOB) == []


def test_587_auth_dialogue_details(shared, ca):
    raw = tls_session(shared.port("submission"), ca)
    # PLAIN without initial response: an empty 334 challenge, then the response line.
    assert raw.cmd("AUTH PLAIN").lines == ["334 "]
    assert raw.cmd("*").text.startswith("501 5.0.0")
    # LOGIN prompts, then cancel at the password prompt.
    assert raw.cmd("AUTH LOGIN").lines == ["334 VXNlcm5hbWU6"]
    assert raw.cmd(b64(ALICE)).lines == ["334 UGFzc3dvcmQ6"]
    assert raw.cmd("*").text.startswith("501 5.0.0")
    # Garbage instead of base64 is a syntax error, not a command.
    assert raw.cmd("AUTH PLAIN").lines == ["334 "]
    assert raw.cmd("QUIT").text.startswith("501 5.5.2")
    assert raw.cmd("AUTH CRAM-MD5").text.startswith("504 5.5.4")
    # "=" is an empty initial response (RFC 4954 4): an empty PLAIN message is malformed.
    assert raw.cmd("AUTH PLAIN =").text.startswith("501 5.5.2")
    # LOGIN with the user name as initial response, as Outlook and Thunderbird send it.
    assert raw.cmd("AUTH LOGIN " + b64(ALICE)).lines == ["334 UGFzc3dvcmQ6"]
    assert raw.cmd(b64(PASSWORD)).text.startswith("235 2.7.0")
    # Only once per session.
    assert raw.cmd("AUTH PLAIN " + plain(ALICE, PASSWORD)).text.startswith("503 5.5.1")
    ehlo = raw.cmd("EHLO client.example")
    assert not any("AUTH" in line for line in ehlo.lines)
    assert raw.cmd("MAIL FROM:<alice@example.test>").text.startswith("250")
    assert raw.cmd("QUIT").text.startswith("221")
    raw.close()


def test_auth_not_allowed_inside_a_transaction(shared, ca):
    raw = tls_session(shared.port("submission"), ca)
    assert raw.cmd("AUTH PLAIN " + plain(ALICE, PASSWORD)).text.startswith("235")
    raw.close()
    # A fresh session: MAIL is refused without AUTH, so test 503 by AUTH after AUTH+MAIL in
    # a session authorized with allow_plaintext is not needed; instead check AUTH during MAIL
    # once authenticated is 503 (already authenticated) and that RSET does not reset AUTH.
    raw = tls_session(shared.port("submission"), ca)
    assert raw.cmd("AUTH PLAIN " + plain(ALICE, PASSWORD)).text.startswith("235")
    assert raw.cmd("MAIL FROM:<alice@example.test>").text.startswith("250")
    assert raw.cmd("AUTH PLAIN " + plain(BOB, PASSWORD)).text.startswith("503")
    assert raw.cmd("RSET").text.startswith("250")
    assert raw.cmd("MAIL FROM:<alice@example.test>").text.startswith("250")
    raw.close()


def test_pipelined_auth_and_transaction_are_answered_in_order(srv, ca):
    raw = tls_session(srv.port("submission"), ca)
    body = "From: alice@example.test\r\nTo: bob@example.test\r\nSubject: pipe\r\n\r\nhi\r\n.\r\n"
    raw.sock.sendall(
        (
            "AUTH PLAIN " + plain(ALICE, PASSWORD) + "\r\n"
            "MAIL FROM:<alice@example.test>\r\n"
            "RCPT TO:<bob@example.test>\r\n"
            "DATA\r\n"
        ).encode()
    )
    assert raw.reply().text.startswith("235 2.7.0")
    assert raw.reply().text.startswith("250")
    assert raw.reply().text.startswith("250")
    assert raw.reply().text.startswith("354")
    raw.sock.sendall(body.encode() + b"QUIT\r\n")
    assert raw.reply().text.startswith("250")
    assert raw.reply().text.startswith("221")
    raw.close()
    assert b"Subject: pipe" in srv.messages(BOB)[0]


def test_authzid_other_than_the_user_is_refused(srv, ca):
    raw = tls_session(srv.port("submission"), ca)
    forged = base64.b64encode(f"{BOB}\0{ALICE}\0{PASSWORD}".encode()).decode()
    assert raw.cmd("AUTH PLAIN " + forged).text.startswith("535 5.7.8")
    raw.close()
    raw = tls_session(srv.port("submission"), ca)
    same = base64.b64encode(f"{ALICE}\0{ALICE}\0{PASSWORD}".encode()).decode()
    assert raw.cmd("AUTH PLAIN " + same).text.startswith("235")
    raw.close()


def test_remote_recipient_is_handed_to_the_queue_or_refused_451(srv, ca):
    """Until the outbound queue exists remote recipients get 451 4.4.0 (never a pretend 250);
    once it exists, authenticated mail to other domains is accepted into it."""
    client = smtp_starttls(srv.port("submission"), ca)
    client.login(ALICE, PASSWORD)
    client.mail(ALICE)
    code, text = client.rcpt("someone@elsewhere.example")
    if code == 451:
        assert text.startswith(b"4.4.0")
    else:
        assert code == 250, (code, text)
        code, text = client.data(message(to="someone@elsewhere.example"))
        assert code == 250, (code, text)
    client.quit()
    assert srv.messages(BOB) == []


# --------------------------------------------------------------------------- 465


def test_465_implicit_tls_login_and_send(srv, ca):
    client = smtp_ssl(srv.port("submissions"), ca)
    assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
    assert "starttls" not in client.esmtp_features
    client.login(ALICE, PASSWORD)
    client.sendmail(ALICE, [BOB], message(subject="implicit"))
    client.quit()
    [stored] = srv.messages(BOB)
    assert b"Subject: implicit" in stored and b"with ESMTPSA" in stored


def test_465_speaks_tls_from_the_first_byte(shared: Server) -> None:
    """Clear text on the implicit-TLS port is a broken handshake: the server answers with
    at most a TLS alert and closes the connection, it never reads it as SMTP."""
    sock = socket.create_connection(("127.0.0.1", shared.port("submissions")), timeout=10)
    sock.sendall(b"EHLO plain\r\n")
    data = b""
    try:
        while chunk := sock.recv(4096):  # until the server closes (a timeout fails the test)
            data += chunk
    except ConnectionResetError:
        pass
    sock.close()
    assert data == b"" or data[:1] == b"\x15", data  # nothing, or a TLS alert record


def test_465_mail_without_auth_is_refused(shared, ca):
    client = smtp_ssl(shared.port("submissions"), ca)
    code, text = client.mail(ALICE)
    assert code == 530 and text.startswith(b"5.7.0")
    client.close()


# --------------------------------------------------------------------------- port 25


def test_smtp_port_offers_starttls_and_never_auth(shared, ca):
    raw = SMTPClient(shared.port("smtp"))
    ehlo = raw.cmd("EHLO client.example")
    assert any("STARTTLS" in line for line in ehlo.lines)
    assert not any("AUTH" in line for line in ehlo.lines)
    raw.start_tls(ca.client_context())
    ehlo = raw.cmd("EHLO client.example")
    assert not any("AUTH" in line for line in ehlo.lines)
    assert raw.cmd("AUTH PLAIN " + plain(ALICE, PASSWORD)).text[:3] in ("500", "502")
    raw.close()


# --------------------------------------------------------------------------- sender binding


def test_sender_binding_mail_from(shared, ca):
    client = smtp_starttls(shared.port("submission"), ca)
    client.login(ALICE, PASSWORD)
    code, text = client.mail(BOB)
    assert (code, text[:5]) == (553, b"5.7.1")
    code, _ = client.mail("alice+lists@example.test")  # own subaddress
    assert code == 250
    client.rset()
    code, _ = client.mail("")  # null sender (notifications)
    assert code == 250
    client.quit()


def test_sender_binding_from_header(srv, ca):
    client = smtp_starttls(srv.port("submission"), ca)
    client.login(ALICE, PASSWORD)
    with pytest.raises(smtplib.SMTPDataError) as e:
        client.sendmail(ALICE, [BOB], message(sender=BOB))
    assert e.value.smtp_code == 553 and e.value.smtp_error.startswith(b"5.7.1")
    # Two addresses in From:, one not hers.
    with pytest.raises(smtplib.SMTPDataError):
        client.sendmail(ALICE, [BOB], message(sender=f"Alice <{ALICE}>, Bob <{BOB}>"))
    # A second From: field (folded, lower case) hidden further down.
    sneaky = (
        b"From: alice@example.test\r\nTo: bob@example.test\r\n"
        b"from :\r\n\tBob <bob@example.test>\r\nSubject: x\r\n\r\nbody\r\n"
    )
    with pytest.raises(smtplib.SMTPDataError):
        client.sendmail(ALICE, [BOB], sneaky)
    # Display names and encoded words are fine when the address is hers.
    client.sendmail(ALICE, [BOB], message(sender="=?utf-8?q?Al=C3=AFce?= <ALICE@Example.Test>"))
    # No From: at all is accepted (the envelope sender is bound; see submission.py).
    client.sendmail(ALICE, [BOB], b"To: bob@example.test\r\nSubject: nofrom\r\n\r\nbody\r\n")
    client.quit()
    stored = srv.messages(BOB)
    assert len(stored) == 2
    assert not any(b"Bob <bob@example.test>" in m for m in stored)


def test_send_as_configured_per_user(srv, ca):
    shared = "team@example.test"
    srv.cli("alias", "add", shared, BOB)
    srv.cli("alias", "add", "info@example.test", ALICE)  # an alias of hers: allowed
    client = smtp_starttls(srv.port("submission"), ca)
    client.login(ALICE, PASSWORD)
    assert client.mail(shared)[0] == 553
    client.rset()
    assert client.mail("info@example.test")[0] == 250
    client.rset()
    out = srv.cli("user", "send-as", ALICE, shared)
    assert shared in out.stdout
    client.sendmail(shared, [BOB], message(sender=f"Team <{shared}>", subject="as team"))
    client.quit()
    assert any(b"Subject: as team" in m for m in srv.messages(BOB))


# --------------------------------------------------------------------------- passwords


def test_wrong_password_535_after_a_growing_delay(srv, ca):
    raw = tls_session(srv.port("submission"), ca)
    delays = []
    for _ in range(3):
        start = time.monotonic()
        assert raw.cmd("AUTH PLAIN " + plain(ALICE, "wrong password")).text.startswith("535 5.7.8")
        delays.append(time.monotonic() - start)
    assert delays[0] >= 0.4
    assert delays[2] > delays[0] + 0.5  # 0.5 s, 1 s, 2 s
    # Unknown users fail the same way.
    assert raw.cmd("AUTH PLAIN " + plain("nobody@example.test", "x" * 8)).text.startswith(
        "535 5.7.8"
    )
    raw.close()
    log = srv.wait_log("failed login for 'nobody@example.test' from 127.0.0.1")
    assert "failed login for 'alice@example.test' from 127.0.0.1" in log
    assert "wrong password" not in log


def test_throttling_per_ip_and_per_account_spares_the_legitimate_user(
    servers: ServerFactory, ca: CertAuthority
) -> None:
    srv = make_server(servers, "[auth]\nmax_failures_per_ip = 3\nmax_failures_per_user = 4\n")
    port = srv.port("submission")
    # One IP guessing: 535 three times, then refused outright (temporary), even with the
    # right password, while the owner elsewhere still gets in.
    raw = tls_session(port, ca, source="127.0.0.2")
    for _ in range(3):
        assert raw.cmd("AUTH PLAIN " + plain(ALICE, "guess1234")).text.startswith("535")
    assert raw.cmd("AUTH PLAIN " + plain(ALICE, PASSWORD)).text.startswith("454 4.7.0")
    raw.close()
    srv.wait_log("login for 'alice@example.test' from 127.0.0.2 refused")
    owner = tls_session(port, ca, source="127.0.0.1")
    assert owner.cmd("AUTH PLAIN " + plain(ALICE, PASSWORD)).text.startswith("235")
    owner.close()
    # A guesser spread over IPs: past 4 failures for the account, IPs that failed are
    # refused, a clean IP (the owner at home) is not.
    raw = tls_session(port, ca, source="127.0.0.3")
    assert raw.cmd("AUTH PLAIN " + plain(ALICE, "guess5678")).text.startswith("535")
    assert raw.cmd("AUTH PLAIN " + plain(ALICE, PASSWORD)).text.startswith("454 4.7.0")
    raw.close()
    home = tls_session(port, ca, source="127.0.0.4")
    assert home.cmd("AUTH PLAIN " + plain(ALICE, PASSWORD)).text.startswith("235")
    home.close()
    # Other accounts from a clean IP are unaffected.
    bob = tls_session(port, ca, source="127.0.0.5")
    assert bob.cmd("AUTH PLAIN " + plain(BOB, PASSWORD)).text.startswith("235")
    bob.close()


def test_cli_never_echoes_and_stores_only_argon2id(shared):
    out = shared.cli("user", "add", "carol@example.test", "--password-stdin", stdin="sekrit-pass\n")
    assert "sekrit-pass" not in out.stdout + out.stderr
    directory = (shared.data / "directory.json").read_text()
    assert "sekrit-pass" not in directory
    assert "$argon2id$" in directory


# --------------------------------------------------------------------------- swaks


def swaks(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--timeout", "30", *args],
        capture_output=True,
        text=True,
        timeout=90,
    )


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed (.ci/apt-*.txt)")
@pytest.mark.parametrize("service", ["submission", "submissions"])
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks(srv, ca, service, mechanism):
    tls = ["--tls"] if service == "submission" else ["--tls-on-connect"]
    result = swaks(
        "--port",
        str(srv.port(service)),
        *tls,
        "--tls-verify",
        "--tls-ca-path",
        str(ca.ca_file),
        "--tls-sni",
        HOSTNAME,
        "--ehlo",
        "client.example",
        "--auth",
        mechanism,
        "--auth-user",
        ALICE,
        "--auth-password",
        PASSWORD,
        "--from",
        ALICE,
        "--to",
        BOB,
        "--header",
        f"Subject: swaks {service} {mechanism}",
        "--header",
        f"From: {ALICE}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "235 2.7.0" in result.stdout
    [stored] = srv.messages(BOB)
    assert f"Subject: swaks {service} {mechanism}".encode() in stored
    assert b"with ESMTPSA" in stored


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed (.ci/apt-*.txt)")
def test_swaks_auth_without_tls_is_refused(srv, ca):
    result = swaks(
        "--port",
        str(srv.port("submission")),
        "--auth",
        "PLAIN",
        "--auth-user",
        ALICE,
        "--auth-password",
        PASSWORD,
        "--from",
        ALICE,
        "--to",
        BOB,
    )
    assert result.returncode != 0
    assert srv.messages(BOB) == []


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls_below_1_2_is_refused(shared, ca):
    ctx = ca.client_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with contextlib.suppress(ssl.SSLError):
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    sock = socket.create_connection(("127.0.0.1", shared.port("submissions")), timeout=10)
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        ctx.wrap_socket(sock, server_hostname=HOSTNAME)
    sock.close()


def test_parallel_guesses_cannot_outrun_the_per_ip_limit(
    servers: ServerFactory, ca: CertAuthority
) -> None:
    srv = make_server(servers, "[auth]\nmax_failures_per_ip = 3\n")
    port = srv.port("submission")
    sessions = [tls_session(port, ca, source="127.0.0.6") for _ in range(10)]
    assert sessions[0].cmd("AUTH PLAIN " + plain(ALICE, "guess0000")).text.startswith("535")
    for i, raw in enumerate(sessions):  # all at once, before any answer
        raw.send_line("AUTH PLAIN " + plain(ALICE, f"guess{i:04d}x"))
    codes = [raw.reply().text[:3] for raw in sessions]
    for raw in sessions:
        raw.close()
    assert codes.count("535") + 1 <= 3, codes
    assert set(codes) <= {"535", "454"}
