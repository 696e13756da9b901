"""ManageSieve (RFC 5804) against the real server: a raw client for every command and error,
Debian's sieve-connect for the usual client flow, and ``mailsuite sieve`` for administrators.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clients import ManageSieveClient as Client
from tests.harness import ALICE, BOB, PASSWORD, Server, ServerFactory
from tests.tls_helpers import CertAuthority

SCRIPT = b'require "fileinto";\r\nif header :contains "subject" "[list]" { fileinto "Lists"; }\r\n'


@pytest.fixture(scope="module")
def server(module_servers: ServerFactory) -> Iterator[Server]:
    s = module_servers(
        ("managesieve",),
        tls=True,
        users=(ALICE, BOB),
        extra_toml="[sieve]\nmax_script_size = 2048\nmax_scripts = 5\n"
        "[auth]\nmax_failures_per_ip = 50\n",
    )
    yield s
    s.stop()
    assert "Traceback" not in s.output()


def connect(server: Server, ca: CertAuthority) -> Client:
    return Client(server.port("managesieve"), starttls_context=ca.client_context())


@pytest.fixture
def client(server: Server, ca: CertAuthority) -> Iterator[Client]:
    c = connect(server, ca)
    yield c
    c.close()


def literal(data: bytes) -> bytes:
    return b"{%d+}\r\n" % len(data) + data


def test_greeting_and_starttls_capabilities(client: Client) -> None:
    g = client.greeting.decode()
    assert '"IMPLEMENTATION" "mailsuite"' in g and '"STARTTLS"' in g and '"SASL" ""' in g
    assert '"SIEVE" "fileinto envelope' in g and '"VERSION" "1.0"' in g
    after = client.starttls().decode()
    assert '"SASL" "PLAIN"' in after and "STARTTLS" not in after
    assert after.endswith('OK "TLS negotiation successful"\r\n')
    assert client.cmd(b"STARTTLS") == b'NO "TLS is already active"\r\n'


def test_authentication_rules(client: Client) -> None:
    cred = base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode())
    assert client.cmd(b'AUTHENTICATE "PLAIN" "' + cred + b'"').startswith(b"NO (ENCRYPT-NEEDED)")
    assert client.cmd(b"LISTSCRIPTS") == b'NO "Authenticate first"\r\n'
    client.starttls()
    wrong = base64.b64encode(f"\0{ALICE}\0wrong password".encode())
    assert client.cmd(b'AUTHENTICATE "PLAIN" "' + wrong + b'"') == (
        b'NO "Authentication failed"\r\n'
    )
    assert client.cmd(b'AUTHENTICATE "DIGEST-MD5"').startswith(b"NO")
    # the continuation form, the response sent as a literal
    client.send(b'AUTHENTICATE "PLAIN"\r\n')
    assert client.file.readline() == b'""\r\n'  # RFC 5804 2.1: an empty challenge
    client.send(literal(cred) + b"\r\n")
    assert client.response() == b'OK "Logged in"\r\n'
    assert client.cmd(b'AUTHENTICATE "PLAIN" "' + cred + b'"') == (
        b'NO "Command not valid in this state"\r\n'
    )
    assert client.cmd(b"UNAUTHENTICATE") == b'OK "Unauthenticate completed"\r\n'
    assert client.cmd(b"LISTSCRIPTS") == b'NO "Authenticate first"\r\n'


def test_every_script_command(client: Client, server: Server) -> None:
    client.login(ALICE)
    assert client.cmd(b'HAVESPACE "main" 100') == b'OK "Putscript would succeed"\r\n'
    assert client.cmd(b'HAVESPACE "main" 999999').startswith(b"NO (QUOTA/MAXSIZE)")
    assert client.cmd(b'PUTSCRIPT "main" ' + literal(SCRIPT)) == b'OK "Putscript completed"\r\n'
    bad = b'require "fileinto";\r\nif header :contains "subject" "x" {\r\n  fileinto;\r\n}\r\n'
    assert client.cmd(b'PUTSCRIPT "bad" ' + literal(bad)) == (
        b'NO "line 3: fileinto takes a string"\r\n'
    )
    assert client.cmd(b"CHECKSCRIPT " + literal(b"discard;")) == b'OK "Script is valid"\r\n'
    assert client.cmd(b"CHECKSCRIPT " + literal(b'vacation "x";')) == (
        b'NO "line 1: command \'vacation\' needs require \\"vacation\\""\r\n'
    )
    assert client.cmd(b'SETACTIVE "main"') == b'OK "main is active now"\r\n'
    assert client.cmd(b'SETACTIVE "nope"').startswith(b"NO (NONEXISTENT)")
    assert client.cmd(b"LISTSCRIPTS") == b'"main" ACTIVE\r\nOK "Listscripts completed"\r\n'
    got = client.cmd(b'GETSCRIPT "main"')
    assert got == b"{%d}\r\n" % len(SCRIPT) + SCRIPT + b'\r\nOK "Getscript completed"\r\n'
    assert client.cmd(b'DELETESCRIPT "main"').startswith(b"NO (ACTIVE)")
    assert client.cmd(b'RENAMESCRIPT "main" "renamed"') == b'OK "Renamescript completed"\r\n'
    assert client.cmd(b'RENAMESCRIPT "gone" "x"').startswith(b"NO (NONEXISTENT)")
    assert client.cmd(b'PUTSCRIPT "other" ' + literal(b"keep;")).startswith(b"OK")
    assert client.cmd(b'RENAMESCRIPT "other" "renamed"').startswith(b"NO (ALREADYEXISTS)")
    root = server.maildir(ALICE)
    assert (root / ".dovecot.sieve").readlink() == Path("sieve/renamed.sieve")
    assert (root / "sieve" / "renamed.sieve").read_bytes() == SCRIPT
    assert client.cmd(b'SETACTIVE ""') == b'OK "No script is active now"\r\n'
    assert client.cmd(b'DELETESCRIPT "renamed"') == b'OK "Deletescript completed"\r\n'
    assert client.cmd(b'DELETESCRIPT "renamed"').startswith(b"NO (NONEXISTENT)")
    assert client.cmd(b'GETSCRIPT "../../directory"').startswith(b"NO")
    assert client.cmd(b'NOOP "abc"') == b'OK (TAG "abc") "Done"\r\n'
    assert b'"OWNER" "alice@example.test"' in client.cmd(b"CAPABILITY")
    assert client.cmd(b"LOGOUT") == b'OK "Logout complete"\r\n'
    assert client.file.readline() == b""  # the server closed the connection


def test_logout_over_tls_does_not_wait_for_the_clients_close_notify(client: Client) -> None:
    """After LOGOUT's OK over TLS the server closes the TCP connection once its close_notify
    is out (RFC 8446 6.1), as after a timeout: it held the connection until the client went
    away (Twisted's TLS waits for the peer's close_notify, and reading was paused for the
    command), and the old ``close()`` of the test client passed through that 10 s hang."""
    client.login(ALICE)
    assert client.cmd(b"LOGOUT") == b'OK "Logout complete"\r\n'
    assert client.file.readline() == b""  # our close_notify
    client.sock.settimeout(5)
    client.close()  # raises when the server keeps its end open


def test_literals_limits_and_errors(client: Client) -> None:
    client.login(ALICE)
    # {N} (synchronising form) is accepted like {N+}
    assert client.cmd(b'PUTSCRIPT "sync" {5}\r\nkeep;').startswith(b"OK")
    # a literal over the script size limit is refused and skipped; the session goes on
    big = b"#" * 3000
    assert client.cmd(b'PUTSCRIPT "big" ' + literal(big)).startswith(b"NO (QUOTA/MAXSIZE)")
    assert client.cmd(b"NOOP") == b'OK "Done"\r\n'
    for i in range(4):
        client.cmd(b'PUTSCRIPT "s%d" ' % i + literal(b"keep;"))
    assert client.cmd(b'PUTSCRIPT "s9" ' + literal(b"keep;")).startswith(b"NO (QUOTA/MAXSCRIPTS)")
    assert client.cmd(b"FROBNICATE") == b'NO "Unknown command"\r\n'
    assert client.cmd(b'GETSCRIPT "a" "b"') == b'NO "Syntax error in GETSCRIPT arguments"\r\n'
    assert client.cmd(b'NOOP "unterminated').startswith(b'NO "Syntax error')
    assert client.cmd(b'PUTSCRIPT "x\\y" "keep;"').startswith(b'NO "Syntax error')
    client.send(b"FROB\r\n" * 10)
    out = b""
    while b"BYE" not in out:
        out += client.response()
    assert b'BYE "Too many errors' in out


def test_sieve_connect(server: Server, ca: CertAuthority, tmp_path: Path) -> None:
    if shutil.which("sieve-connect") is None:
        pytest.fail(
            "sieve-connect is not installed (apt-get install sieve-connect; "
            ".ci/apt-sieve.txt lists it)"
        )
    local = tmp_path / "rules.sieve"
    local.write_bytes(SCRIPT)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        r, w = os.pipe()
        os.write(w, PASSWORD.encode() + b"\n")
        os.close(w)
        try:
            return subprocess.run(
                [
                    "sieve-connect",
                    "-s",
                    "localhost",
                    "-p",
                    str(server.port("managesieve")),
                    "-u",
                    "bob@example.test",
                    "--passwordfd",
                    str(r),
                    "--tlscafile",
                    str(ca.ca_file),
                    *args,
                ],
                capture_output=True,
                text=True,
                timeout=60,
                pass_fds=(r,),
                check=True,
            )
        finally:
            os.close(r)

    run("--upload", "--localsieve", str(local), "--remotesieve", "rules")
    run("--activate", "--remotesieve", "rules")
    assert run("--list").stdout.split() == ['"rules"', "ACTIVE"]
    run("--download", "--remotesieve", "rules", "--localsieve", str(tmp_path / "back"))
    assert (tmp_path / "back").read_bytes() == SCRIPT
    run("--checkscript", "--localsieve", str(local))
    bad = tmp_path / "bad.sieve"
    bad.write_text('fileinto "x";\n')
    with pytest.raises(subprocess.CalledProcessError) as info:
        run("--checkscript", "--localsieve", str(bad))
    assert "needs require" in info.value.stdout + info.value.stderr
    run("--deactivate")
    run("--delete", "--remotesieve", "rules")
    assert run("--list").stdout.strip() == ""


def test_cli(server: Server, tmp_path: Path) -> None:
    script = tmp_path / "s.sieve"
    script.write_bytes(SCRIPT)
    user = "bob@example.test"
    assert "stored cli" in server.cli("sieve", "put", user, "cli", str(script), "--activate").stdout
    assert server.cli("sieve", "list", user).stdout == "cli\t(active)\n"
    # (text mode reads CRLF as LF)
    assert server.cli("sieve", "get", user, "cli").stdout == SCRIPT.decode().replace("\r\n", "\n")
    assert (server.maildir(user) / "sieve" / "cli.sieve").read_bytes() == SCRIPT
    assert server.cli("sieve", "check", user, "cli").stdout == "ok\n"
    bad = tmp_path / "bad.sieve"
    bad.write_text("keep;\nif true {\n")
    result = server.cli("sieve", "put", user, "bad", str(bad), check=False)
    assert result.returncode == 1 and "line 3: missing '}'" in result.stderr
    result = server.cli("sieve", "check", user, "x", str(bad), check=False)
    assert result.returncode == 1 and "line 3" in result.stderr
    assert server.cli("sieve", "put", user, "stdin", "-", stdin="discard;\n").returncode == 0
    assert server.cli("sieve", "activate", user, "stdin").stdout == "stdin is active\n"
    server.cli("sieve", "deactivate", user)
    assert server.cli("sieve", "list", user).stdout == "cli\nstdin\n"
    assert server.cli("sieve", "log", user).stdout == ""
    result = server.cli("sieve", "list", "nobody@example.test", check=False)
    assert result.returncode == 2 and "not a user" in result.stderr
    result = server.cli("sieve", "get", user, "../../../etc/passwd", check=False)
    assert result.returncode == 1 and "not a valid script name" in result.stderr


def test_connection_limit_per_ip(servers: ServerFactory, ca: CertAuthority) -> None:
    s = servers(
        ("managesieve",),
        tls=True,
        users=(ALICE,),
        extra_toml="[sieve]\nmax_connections_per_ip = 2\n",
    )
    first, second = connect(s, ca), connect(s, ca)
    with socket.create_connection(("127.0.0.1", s.port("managesieve")), timeout=10) as third:
        assert third.makefile("rb").readline() == (
            b'BYE (TRYLATER) "Too many connections, try again later"\r\n'
        )
    first.login(ALICE)  # a logged-in connection leaves the pre-login count
    fourth = connect(s, ca)
    assert fourth.cmd(b"NOOP") == b'OK "Done"\r\n'
    for c in (first, second, fourth):
        c.close()
