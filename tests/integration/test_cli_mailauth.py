"""`mailsuite dkim ...` and `mailsuite dns ...` run as a person runs them (a subprocess), the
DNS check against a twisted.names server on 127.0.0.1.  Signatures made with keygen's keys are
verified by dkimpy against nothing but the record text keygen printed."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import dkim
import pytest

from mailsuite.config import parse_config
from mailsuite.mailauth.dkim_keys import KeyStore, txt_strings
from mailsuite.mailauth.dkim_sign import Signer
from mailsuite.mailauth.dns import server_resolver
from mailsuite.mailauth.service import MailAuth
from mailsuite.testing.dns import spawn_dns_server
from tests.reactor_thread import in_reactor

CONFIG = """\
[server]
hostname = "mail.example.test"
data_dir = "data"

[listen]
smtp = ["tcp:25"]
submissions = ["tcp:465"]
imaps = ["tcp:993"]

[domains]
local = ["example.test"]
"""


def setup(tmp_path: Path, extra: str = "") -> Path:
    config = tmp_path / "mailsuite.toml"
    config.write_text(CONFIG + extra)
    return config


def cli(config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "mailsuite.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"mailsuite {' '.join(args)}: {result.returncode} {result.stderr}")
    return result


LINE = re.compile(r'^(\S+)\. IN TXT ((?:"[^"]*" ?)+)$', re.MULTILINE)


def published(output: str) -> tuple[str, str]:
    """(owner, record text) from keygen's zone-file line: the strings joined, as DNS does."""
    m = LINE.search(output)
    assert m, output
    strings = re.findall(r'"([^"]*)"', m.group(2))
    assert all(len(s.encode()) <= 255 for s in strings)
    return m.group(1), "".join(strings)


@pytest.mark.parametrize("algorithm,k", [("rsa", "rsa"), ("ed25519", "ed25519")])
def test_keygen_record_verifies_signatures_made_with_its_key(tmp_path, algorithm, k):
    config = setup(tmp_path)
    out = cli(
        config, "dkim", "keygen", "example.test", "--selector", "s1", "--algorithm", algorithm
    ).stdout
    owner, record = published(out)
    assert owner == "s1._domainkey.example.test"
    assert record.startswith(f"v=DKIM1; k={k}; p=")
    if algorithm == "rsa":
        assert out.splitlines()[0].count('" "') == 1  # 392 base64 characters: two strings
    key_file = tmp_path / "data" / "dkim" / "example.test" / "s1.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    msg = (
        b"From: Alice <alice@example.test>\nTo: bob@example.org\nSubject: report\n"
        b"Date: Mon, 01 Jun 2026 10:00:00 +0000\nMessage-ID: <1@example.test>\n\nHello.\n"
    )
    signature = Signer(KeyStore(tmp_path / "data" / "dkim")).signature_headers(msg)
    assert f"a={k}-sha256".encode() in signature
    wire = (signature + msg).replace(b"\n", b"\r\n")  # as it leaves over SMTP

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        return record.encode() if name.rstrip(b".") == owner.encode() else None

    assert dkim.verify(wire, dnsfunc=dnsfunc)
    assert not dkim.verify(wire.replace(b"Hello.", b"Hullo."), dnsfunc=dnsfunc)


def test_list_use_and_refusals(tmp_path):
    config = setup(tmp_path)
    assert "no DKIM keys" in cli(config, "dkim", "list").stdout
    cli(config, "dkim", "keygen", "example.test", "-s", "r1")
    second = cli(config, "dkim", "keygen", "example.test", "-s", "r2").stdout
    assert "not signing yet" in second and "mailsuite dkim use example.test r2" in second
    cli(config, "dkim", "keygen", "example.test", "-s", "e1", "-a", "ed25519")
    rows = [line.split() for line in cli(config, "dkim", "list").stdout.splitlines()[1:]]
    assert [(r[1], r[2], r[-1]) for r in rows] == [
        ("e1", "ed25519-sha256", "signing"),
        ("r1", "rsa-sha256", "signing"),
        ("r2", "rsa-sha256", "-"),
    ]
    assert "selector r2 from now on" in cli(config, "dkim", "use", "example.test", "r2").stdout
    rows = [line.split() for line in cli(config, "dkim", "list").stdout.splitlines()[1:]]
    assert [r[-1] for r in rows] == ["signing", "-", "signing"]

    for args, needle in [
        (("dkim", "keygen", "other.test", "-s", "x"), "not a local domain"),
        (("dkim", "keygen", "example.test", "-s", "r1"), "already has a selector"),
        (("dkim", "keygen", "example.test", "-s", "../../etc"), "not a valid selector"),
        (("dkim", "use", "example.test", "zz"), "no key with selector 'zz'"),
        (("dns", "records", "example.test", "--ip", "nonsense"), "not an IP address"),
    ]:
        result = cli(config, *args, check=False)
        assert result.returncode == 2 and needle in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_running_server_signs_with_a_new_key_without_restart(tmp_path, reactor):
    config_path = setup(tmp_path)
    config = parse_config(tomllib.loads(config_path.read_text()), None, tmp_path)
    auth = MailAuth(config, reactor, server_resolver(("127.0.0.1:9",), reactor))
    auth.startService()
    try:
        msg = b"From: a@example.test\nTo: b@example.org\nSubject: x\n\nbody\n"
        assert in_reactor(reactor, auth.sign, msg) == b""
        cli(config_path, "dkim", "keygen", "example.test", "-s", "e1", "-a", "ed25519")
        assert b"s=e1" in in_reactor(reactor, auth.sign, msg)
        cli(config_path, "dkim", "keygen", "example.test", "-s", "e2", "-a", "ed25519")
        cli(config_path, "dkim", "use", "example.test", "e2")
        assert b"s=e2" in in_reactor(reactor, auth.sign, msg)
    finally:
        in_reactor(reactor, auth.stopService)


def test_records_lists_what_the_domain_needs(tmp_path):
    config = setup(tmp_path)
    cli(config, "dkim", "keygen", "example.test", "-s", "r1")
    out = cli(config, "dns", "records", "example.test", "--ip", "192.0.2.1").stdout
    lines = [line for line in out.splitlines() if not line.startswith(";")]
    assert "example.test. IN MX 10 mail.example.test." in lines
    assert "mail.example.test. IN A 192.0.2.1" in lines
    assert 'example.test. IN TXT "v=spf1 mx -all"' in lines
    assert any(
        line.startswith('r1._domainkey.example.test. IN TXT "v=DKIM1; k=rsa; p=') for line in lines
    )
    assert (
        '_dmarc.example.test. IN TXT "v=DMARC1; p=quarantine; rua=mailto:postmaster@example.test"'
    ) in lines
    assert "_submissions._tcp.example.test. IN SRV 0 1 465 mail.example.test." in lines
    assert "_imaps._tcp.example.test. IN SRV 0 1 993 mail.example.test." in lines
    assert "_submission._tcp.example.test. IN SRV 0 0 0 ." in lines  # not offered
    assert "_pop3s._tcp.example.test. IN SRV 0 0 0 ." in lines
    assert "1.2.0.192.in-addr.arpa. IN PTR mail.example.test." in lines


def dns_zone(tmp_path: Path, names: dict) -> tuple[subprocess.Popen[str], int]:
    zone = tmp_path / "zone.json"
    zone.write_text(json.dumps({"origin": "test", "also": ["in-addr.arpa"], "names": names}))
    return spawn_dns_server(str(zone))


def good_zone(key_record: str) -> dict:
    return {
        "example.test": {"MX": [[10, "mail.example.test"]], "TXT": [["v=spf1 mx -all"]]},
        "mail.example.test": {"A": ["127.0.0.1"]},
        "r1._domainkey.example.test": {"TXT": [txt_strings(key_record)]},
        "_dmarc.example.test": {"TXT": [["v=DMARC1; p=quarantine; rua=mailto:pm@example.test"]]},
        "_submissions._tcp.example.test": {"SRV": [[0, 1, 465, "mail.example.test"]]},
        "_imaps._tcp.example.test": {"SRV": [[0, 1, 993, "mail.example.test"]]},
        "_submission._tcp.example.test": {"SRV": [[0, 0, 0, "."]]},
        "1.0.0.127.in-addr.arpa": {"PTR": ["mail.example.test"]},
    }


def test_check_all_good_exits_zero(tmp_path):
    _, record = published(cli(setup(tmp_path), "dkim", "keygen", "example.test", "-s", "r1").stdout)
    proc, port = dns_zone(tmp_path, good_zone(record))
    try:
        config = setup(tmp_path, f'\n[dns]\nnameservers = ["127.0.0.1:{port}"]\ntimeout = 2\n')
        result = cli(config, "dns", "check", "example.test", check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        statuses = {
            (line.split()[1], line.split()[2]): line.split()[0]
            for line in result.stdout.splitlines()
            if line[:1] != " " and len(line.split()) > 2 and line.split()[1].isupper()
        }
        for kind, owner in [
            ("MX", "example.test."),
            ("SPF", "example.test."),
            ("DKIM", "r1._domainkey.example.test."),
            ("DMARC", "_dmarc.example.test."),
            ("A", "mail.example.test."),
            ("PTR", "1.0.0.127.in-addr.arpa."),
            ("SRV", "_imaps._tcp.example.test."),
        ]:
            assert statuses[(kind, owner)] == "ok", (kind, result.stdout)
        assert "all needed records are in place" in result.stdout
    finally:
        proc.kill()
        proc.wait(5)


def test_check_reports_missing_and_different_with_the_fix(tmp_path):
    cli(setup(tmp_path), "dkim", "keygen", "example.test", "-s", "r1")
    other_key = KeyStore(tmp_path / "elsewhere").generate("example.test", "r1", "ed25519")[0]
    names = {
        "example.test": {
            "MX": [[10, "mx.provider.test"]],
            "TXT": [["v=spf1 ip4:192.0.2.1 -all"], ["v=spf1 -all"]],
        },
        "mail.example.test": {"A": ["127.0.0.1"]},
        "r1._domainkey.example.test": {"TXT": [[other_key.record()]]},
        "_dmarc.example.test": {"TXT": [["v=DMARC1; p=none"]]},
        "1.0.0.127.in-addr.arpa": {"PTR": ["host-127-0-0-1.provider.test"]},
        "_imaps._tcp.example.test": "servfail",
    }
    proc, port = dns_zone(tmp_path, names)
    try:
        config = setup(tmp_path, f'\n[dns]\nnameservers = ["127.0.0.1:{port}"]\ntimeout = 2\n')
        result = cli(config, "dns", "check", "example.test", check=False)
        out = result.stdout
        assert result.returncode == 1, out
        assert "Traceback" not in result.stderr
        lines = out.splitlines()

        def status(kind: str, owner: str) -> tuple[str, str]:
            for i, line in enumerate(lines):
                parts = line.split()
                if len(parts) > 2 and parts[1] == kind and parts[2] == owner:
                    return parts[0], lines[i + 1] if i + 1 < len(lines) else ""
            raise AssertionError(f"{kind} {owner} not reported:\n{out}")

        st, advice = status("MX", "example.test.")
        assert st == "different" and "example.test. IN MX 10 mail.example.test." in advice
        st, advice = status("SPF", "example.test.")
        assert st == "different" and "more than one SPF record" in advice
        st, advice = status("DKIM", "r1._domainkey.example.test.")
        assert st == "different" and "not this selector's key" in advice
        st, advice = status("DMARC", "_dmarc.example.test.")
        assert st == "different" and "p=quarantine" in advice
        st, advice = status("PTR", "1.0.0.127.in-addr.arpa.")
        assert st == "different" and "mail.example.test" in advice
        assert status("SRV", "_submissions._tcp.example.test.")[0] == "missing"
        assert status("SRV", "_imaps._tcp.example.test.")[0] == "error"
        assert "to fix" in lines[-1]
    finally:
        proc.kill()
        proc.wait(5)


def test_check_with_ip_tests_spf_against_that_address(tmp_path):
    cli(setup(tmp_path), "dkim", "keygen", "example.test", "-s", "r1", "-a", "ed25519")
    names = {
        "example.test": {"MX": [[10, "mail.example.test"]], "TXT": [["v=spf1 ip4:192.0.2.1 -all"]]},
        "mail.example.test": {"A": ["192.0.2.1"]},
    }
    proc, port = dns_zone(tmp_path, names)
    try:
        config = setup(tmp_path, f'\n[dns]\nnameservers = ["127.0.0.1:{port}"]\n')
        out = cli(
            config,
            "dns",
            "check",
            "example.test",
            "--ip",
            "192.0.2.1",
            "--ip",
            "198.51.100.7",
            check=False,
        ).stdout
        spf = next(line for line in out.splitlines() if line.split()[1:2] == ["SPF"])
        assert spf.startswith("different")
        assert "198.51.100.7 (fail)" in out and "192.0.2.1 (" not in out
        a_lines = [line.split()[0] for line in out.splitlines() if line.split()[1:2] == ["A"]]
        assert a_lines == ["ok", "different"]  # the name has an address, not this one
    finally:
        proc.kill()
        proc.wait(5)
