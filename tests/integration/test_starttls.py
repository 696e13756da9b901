"""TLS on the SMTP listeners: certificate reload on SIGHUP, SNI over several certificates, and
the self-signed bootstrap of the embedded default (``twistd -n mailsuite`` without --config)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mailsuite.testing.process import mailsuite_argv
from tests.harness import ALICE, PASSWORD, ServerFactory, assert_clean_log, wait_port, wait_until
from tests.tls_helpers import CertAuthority, peer_certificate, plain, smtp_starttls


def _serial(cert: dict) -> str:
    return cert["serialNumber"]


def _san(cert: dict) -> set[str]:
    return {value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"}


def test_sighup_reloads_a_renewed_certificate(servers: ServerFactory, ca: CertAuthority) -> None:
    cert, key = ca.issue("mx.example.test", stem="live")
    srv = servers(("smtp", "submission", "submissions"), tls=(cert, key), users=(ALICE,))
    before = {
        s: _serial(peer_certificate("127.0.0.1", srv.port(s), ca, "mx.example.test", st))
        for s, st in (("submission", True), ("submissions", False), ("smtp", True))
    }
    assert len(set(before.values())) == 1
    ca.issue("mx.example.test", "smtp.example.test", stem="live")  # renewed in place
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "TLS: reloaded" in srv.output(), what="the reload in the log")
    assert srv.proc.poll() is None  # SIGHUP did not kill the server
    for s, st in (("submission", True), ("submissions", False), ("smtp", True)):
        cert_now = peer_certificate("127.0.0.1", srv.port(s), ca, "mx.example.test", st)
        assert _serial(cert_now) != before[s]
        assert "smtp.example.test" in _san(cert_now)
    # A broken renewal keeps the previous certificate in service.
    Path(cert).write_text("garbage")
    srv.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "TLS reload failed" in srv.output(), what="the failed reload")
    client = smtp_starttls(srv.port("submission"), ca)
    client.login(ALICE, PASSWORD)
    client.quit()


def test_several_certificates_by_sni(servers: ServerFactory, ca: CertAuthority) -> None:
    c1, k1 = ca.issue("mx.example.test", stem="one")
    c2, k2 = ca.issue("mail.other.test", stem="two")
    c3, k3 = ca.issue("*.wild.test", stem="three")
    toml = (
        f'[tls]\ncert = "{c1}"\nkey = "{k1}"\n'
        f'extra = [{{ cert = "{c2}", key = "{k2}" }}, {{ cert = "{c3}", key = "{k3}" }}]\n'
    )
    srv = servers(("submission", "submissions"), extra_toml=toml)
    for service, starttls in (("submission", True), ("submissions", False)):
        port = srv.port(service)
        assert "mx.example.test" in _san(
            peer_certificate("127.0.0.1", port, ca, "mx.example.test", starttls)
        )
        assert "mail.other.test" in _san(
            peer_certificate("127.0.0.1", port, ca, "mail.other.test", starttls)
        )
        assert "*.wild.test" in _san(
            peer_certificate("127.0.0.1", port, ca, "smtp.wild.test", starttls)
        )


DEFAULT_PORTS = (2525, 2587, 2465, 2143, 2993, 2110, 2995, 24190, 2080)


def _busy(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def test_embedded_default_bootstraps_a_self_signed_certificate(tmp_path: Path):
    if any(_busy(p) for p in DEFAULT_PORTS):
        pytest.skip("a port of the embedded default (2525/2587/2465/...) is busy")
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    log = tmp_path / "twistd.log"
    proc = subprocess.Popen(
        mailsuite_argv(None, logfile=str(log)),  # no --config: the embedded default
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    cert = tmp_path / "mailsuite-data" / "tls" / "selfsigned.pem"
    key = tmp_path / "mailsuite-data" / "tls" / "selfsigned.key"
    try:
        try:
            wait_until(lambda: cert.exists(), 20, "the self-signed certificate")
            wait_until(
                lambda: log.exists() and "self-signed" in log.read_text(errors="replace"),
                20,
                "the self-signed certificate in the log",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{_output(proc, log)}") from None
        text = log.read_text(errors="replace")
        assert str(cert) in text or "selfsigned.pem" in text
        assert oct(key.stat().st_mode & 0o777) == "0o600"
        # The server runs on it: STARTTLS on 2587 and implicit TLS on 2465 serve that cert.
        wait_port("127.0.0.1", 2587, proc=proc)
        wait_port("127.0.0.1", 2465, proc=proc)
        import ssl

        from cryptography import x509

        served = x509.load_pem_x509_certificate(cert.read_bytes())
        for port, starttls in ((2587, True), (2465, False)):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            if starttls:
                f = sock.makefile("rb")
                f.readline()
                sock.sendall(b"EHLO c\r\n")
                while f.readline()[3:4] != b" ":
                    pass
                sock.sendall(b"STARTTLS\r\n")
                assert f.readline().startswith(b"220")
            ctx = ssl.create_default_context(cafile=str(cert))
            tls = ctx.wrap_socket(sock, server_hostname="localhost")
            der = tls.getpeercert(binary_form=True)
            assert der == served.public_bytes(_der())
            tls.close()
        # AUTH works against a user made with the CLI on the default config.
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mailsuite.cli",
                "user",
                "add",
                "me@example.test",
                "--password-stdin",
            ],
            input=PASSWORD + "\n",
            text=True,
            cwd=tmp_path,
            check=True,
            capture_output=True,
        )
        import smtplib

        client = smtplib.SMTP_SSL(
            "localhost", 2465, context=ssl.create_default_context(cafile=str(cert)), timeout=20
        )
        client.ehlo("c")
        code, _ = client.docmd("AUTH", "PLAIN " + plain("me@example.test", PASSWORD))
        assert code == 235
        client.quit()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    assert_clean_log(_output(proc, log), f"the log of the embedded default server, {log}")


def _der():  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER


def _output(proc: subprocess.Popen, log: Path) -> str:
    out = log.read_text(errors="replace") if log.exists() else ""
    if proc.poll() is not None and proc.stdout:
        out += proc.stdout.read().decode(errors="replace")
    return out
