"""Real POP3 clients against the real server: fetchmail (STLS on 110-style port and implicit
TLS) and getmail6 (implicit TLS; getmail6 has no STLS support) each retrieve and delete all
messages of a 500-message box.  Skipped only when the client binary is missing (CI installs
them from .ci/apt-pop3.txt)."""

from __future__ import annotations

import os
import shutil
import socketserver
import subprocess
import threading
from pathlib import Path

import pytest

from mailsuite.store.write import write_message
from tests.harness import ALICE, PASSWORD, Server, ServerFactory
from tests.tls_helpers import HOSTNAME, CertAuthority

COUNT = 500


def fill(server: Server) -> set[bytes]:
    box = server.maildir(ALICE)
    subjects = set()
    for i in range(COUNT):
        subject = b"Subject: message %d" % i
        body = subject + b"\nFrom: x@example.org\n\nbody %d\n.\n..dots\n" % i
        write_message(box, [body])
        subjects.add(subject)
    return subjects


class LMTPSink:
    """A minimal LMTP server (RFC 2033) on loopback writing each message to a file in ``out``:
    getmail's one destination that does not fork a child per message."""

    def __init__(self, out: Path) -> None:
        counter = iter(range(1_000_000))

        class Session(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                self.wfile.write(b"220 sink LMTP\r\n")
                rcpts = 0
                while line := self.rfile.readline(65536):
                    verb = line[:4].upper()
                    if verb == b"LHLO":
                        self.wfile.write(b"250-sink\r\n250 PIPELINING\r\n")
                    elif verb in (b"MAIL", b"RSET", b"NOOP"):
                        rcpts = 0
                        self.wfile.write(b"250 OK\r\n")
                    elif verb == b"RCPT":
                        rcpts += 1
                        self.wfile.write(b"250 OK\r\n")
                    elif verb == b"DATA":
                        self.wfile.write(b"354 go\r\n")
                        body = []
                        while (data := self.rfile.readline(1 << 20)) not in (b".\r\n", b""):
                            body.append(data[1:] if data.startswith(b"..") else data)
                        (out / f"msg.{next(counter)}").write_bytes(b"".join(body))
                        self.wfile.write(b"250 OK\r\n" * rcpts)  # RFC 2033 4.2: one per RCPT
                    elif verb == b"QUIT":
                        self.wfile.write(b"221 bye\r\n")
                        return
                    else:
                        self.wfile.write(b"500 what\r\n")

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Session)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def received_subjects(out: Path) -> list[bytes]:
    found = []
    for f in out.rglob("*"):
        if f.is_file():
            for line in f.read_bytes().splitlines():
                if line.startswith(b"Subject: message "):
                    found.append(line.rstrip(b"\r"))
    return found


def check(server: Server, out: Path, subjects: set[bytes]) -> None:
    got = received_subjects(out)
    assert len(got) == COUNT and set(got) == subjects
    sample = next(f for f in out.rglob("*") if f.is_file()).read_bytes().replace(b"\r\n", b"\n")
    assert b"\n.\n..dots\n" in sample  # unstuffed correctly
    assert server.messages(ALICE) == []  # all deleted at QUIT


@pytest.mark.parametrize("mode", ["stls", "pop3s"])
def test_fetchmail_retrieves_500(
    servers: ServerFactory, ca: CertAuthority, tmp_path: Path, mode: str
) -> None:
    exe = shutil.which("fetchmail")
    if exe is None:
        pytest.skip("fetchmail is not installed (apt-get install fetchmail)")
    server = servers(("pop3", "pop3s"), tls=True, users=(ALICE,))
    subjects = fill(server)
    out = tmp_path / "out"
    out.mkdir()
    port = server.port("pop3" if mode == "stls" else "pop3s")
    tls = "ssl" if mode == "pop3s" else "sslproto 'TLS1.2+'"
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        f"set no bouncemail\n"
        f"poll 127.0.0.1 with proto POP3 service {port} uidl\n"
        f"  user '{ALICE}' there with password '{PASSWORD}' is root here\n"
        f"  options {tls} sslcertck sslcertfile '{ca.ca_file}' sslcommonname {HOSTNAME}\n"
        f"  fetchall nokeep\n"
        f"  mda \"/bin/sh -c 'cat > {out}/msg.$$'\"\n"
    )
    rc.chmod(0o600)
    env = dict(os.environ, FETCHMAILHOME=str(tmp_path), HOME=str(tmp_path))
    result = subprocess.run(
        [exe, "-f", str(rc), "-N", "-v", "--pidfile", str(tmp_path / "fm.pid")],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    if mode == "stls":
        assert "STLS" in result.stdout + result.stderr
    check(server, out, subjects)


def test_getmail6_retrieves_500_over_pop3s(
    servers: ServerFactory, ca: CertAuthority, tmp_path: Path
) -> None:
    exe = shutil.which("getmail")
    if exe is None:
        pytest.skip("getmail6 is not installed (apt-get install getmail6)")
    server = servers(("pop3", "pop3s"), tls=True, users=(ALICE,))
    out = tmp_path / "out"
    out.mkdir()
    sink = LMTPSink(out)
    try:
        subjects = fill(server)
        gdir = tmp_path / "getmail"
        gdir.mkdir()
        (gdir / "getmailrc").write_text(
            "[retriever]\ntype = SimplePOP3SSLRetriever\nserver = 127.0.0.1\n"
            f"port = {server.port('pop3s')}\nusername = {ALICE}\npassword = {PASSWORD}\n"
            f"ca_certs = {ca.ca_file}\nssl_cert_hostname = localhost\n\n"
            # MDA_lmtp: getmail's forking destinations (Maildir, MDA_external) lose SIGCHLD
            # wake-ups now and then ("waiting child pid N timed out" after 60 s, a race in
            # getmail's _wait_for_child), which made this test fail for getmail's reasons
            "[destination]\ntype = MDA_lmtp\nhost = 127.0.0.1\n"
            f"port = {sink.port}\noverride = sink@example.org\n\n"
            "[options]\ndelete = true\nread_all = true\nverbose = 1\n"
        )
        result = subprocess.run(
            [exe, "--getmaildir", str(gdir), "--rcfile", "getmailrc"],
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        check(server, out, subjects)
    finally:
        sink.close()
