"""Mail authentication over the real server (issue 12): the MX listener checks SPF, DKIM and
DMARC against a twisted.names DNS on loopback and acts on the verdict (550 5.7.26, Junk, our
Authentication-Results on top, forged ones removed); submission and trusted-network relays
are DKIM-signed before the message is made durable, so the local copy and the relayed copy
carry the same signature, verified here by dkimpy against the record ``dkim keygen`` printed.
"""

from __future__ import annotations

import re
import smtplib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dkim
import pytest

from mailsuite.mailauth.dkim_keys import txt_strings
from mailsuite.mailauth.results import parse_results
from tests.harness import PASSWORD, Server, wait_until
from tests.loopback import Net
from tests.mailauth_helpers import dkim_sign, ed25519_key, message, rsa_key
from tests.tls_helpers import CertAuthority, smtp_starttls

HOST = "mx.example.test"  # the harness's [server] hostname: our authserv-id
GOOD_IP, SPOOF_IP, TRUSTED_IP = "127.0.0.1", "127.0.0.9", "127.0.0.5"
BOB = "bob@example.test"
SIGNERS = {"rsa": ("alice@example.test", "example.test"), "ed25519": ("ed@ed.test", "ed.test")}


def txt(*texts: str) -> dict[str, Any]:
    return {"TXT": [txt_strings(t) if len(t) > 255 else [t] for t in texts]}


def zone() -> dict[str, Any]:
    return {
        "good.test": txt("v=spf1 ip4:127.0.0.1 -all"),
        "_dmarc.good.test": txt("v=DMARC1; p=reject"),
        "r._domainkey.good.test": txt(rsa_key().record),
        "e._domainkey.good.test": txt(ed25519_key().record),
        "quar.test": txt("v=spf1 ip4:127.0.0.1 -all"),
        "_dmarc.quar.test": txt("v=DMARC1; p=quarantine"),
        "attacker.test": txt("v=spf1 ip4:127.0.0.9 -all"),
        "_dmarc.temp.test": "servfail",
        "remote.test": {"MX": [[10, "mx.remote.test"]]},
        "mx.remote.test": {"A": ["127.0.0.2"]},
        "seven.test": {"MX": [[10, "mx.seven.test"]]},
        "mx.seven.test": {"A": ["127.0.0.3"]},
    }


LINE = re.compile(r'^(\S+)\. IN TXT ((?:"[^"]*" ?)+)$', re.MULTILINE)


def published(output: str) -> tuple[str, str]:
    """(owner, record text) from keygen's zone-file line, the strings joined as DNS does."""
    m = LINE.search(output)
    assert m, output
    return m.group(1), "".join(re.findall(r'"([^"]*)"', m.group(2)))


class Setup:
    """The loopback DNS (``zone()``), a recording MX for remote.test on 127.0.0.2, and one
    server with an rsa key for example.test and an ed25519 key for ed.test."""

    def __init__(self, root: Path, net: Net, ca: CertAuthority, cert: tuple[Path, Path]) -> None:
        self.ca = ca
        self.mx = net.mx("127.0.0.2")
        # a server without 8BITMIME: 8-bit mail reaches it as a 7-bit copy (RFC 6152 3)
        self.seven = net.mx("127.0.0.3", {"extensions": ["PIPELINING", "ENHANCEDSTATUSCODES"]})
        extra = (
            f'[relay]\ntrusted_networks = ["{TRUSTED_IP}/32"]\nport = {net.port}\n'
            f'retry_initial = 1\n\n[dns]\nnameservers = ["127.0.0.1:{net.dns_port}"]\n'
            "timeout = 2\n"
        )
        self.server = Server(
            root / "srv",
            services=("smtp", "submission"),
            domains=("example.test", "ed.test"),
            tls=cert,
            extra_toml=extra,
        )
        self.records = {
            "rsa": published(
                self.server.cli(
                    "dkim", "keygen", "example.test", "--selector", "s1", "--algorithm", "rsa"
                ).stdout
            ),
            "ed25519": published(
                self.server.cli(
                    "dkim", "keygen", "ed.test", "--selector", "s2", "--algorithm", "ed25519"
                ).stdout
            ),
        }
        self.server.start()
        for user in (BOB, "alice@example.test", "ed@ed.test"):
            self.server.add_user(user)

    def relayed(self, marker: bytes, mx: Any = None) -> bytes:
        """The message holding ``marker`` that reached the recording MX (or ``mx``)."""

        def found() -> bytes | None:
            for t in (mx or self.mx).transactions():
                if marker in t["data"]:
                    return bytes(t["data"])
            return None

        return wait_until(found, timeout=20, what=f"{marker!r} relayed")


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory,
    loopback_net: Callable[..., Net],
    ca: CertAuthority,
    server_cert: tuple[Path, Path],
) -> Iterator[Setup]:
    # a TTL of 300 s, as real records have: a sender's second message finds its answers in
    # the server's cache and is judged at once at the end of DATA (no coroutine)
    net = loopback_net(zone(), ttl=300)
    s = Setup(tmp_path_factory.mktemp("mailauth-smtp"), net, ca, server_cert)
    yield s
    s.server.stop()


def mx_client(env: Setup, source: str) -> smtplib.SMTP:
    client = smtplib.SMTP(
        "127.0.0.1", env.server.port("smtp"), timeout=30, source_address=(source, 0)
    )
    client.ehlo("client.example")
    return client


def send_mx(
    env: Setup, source: str, mail_from: str, data: bytes, rcpts: tuple[str, ...] = (BOB,)
) -> tuple[int, bytes]:
    """The reply at the end of DATA."""
    client = mx_client(env, source)
    try:
        assert client.mail(mail_from)[0] == 250
        for r in rcpts:
            assert client.rcpt(r)[0] == 250
        return client.data(data)
    finally:
        client.quit()


def holding(env: Setup, address: str, marker: bytes, folder: str = "") -> list[bytes]:
    box = env.server.maildir(address, folder)
    if not box.exists():
        return []
    return [m for m in env.server.messages(address, folder) if marker in m]


def header_fields(msg: bytes) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) of each header field, in order."""
    head = msg.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode()
    out: list[tuple[str, str]] = []
    for line in head.split("\n"):
        if line[:1] in (" ", "\t") and out:
            out[-1] = (out[-1][0], out[-1][1] + " " + line.strip())
        else:
            name, _, value = line.partition(":")
            out.append((name.strip().lower(), value.strip()))
    return out


# ------------------------------------------------------------------------------ inbound


def test_dmarc_reject_spoof_gets_550_5_7_26_and_nothing_is_kept(env: Setup) -> None:
    marker = f"spoof-{time.time_ns()}"
    spoof = message("Your Bank <alerts@good.test>", subject=marker)
    code, text = send_mx(env, SPOOF_IP, "bounce@attacker.test", spoof)
    assert (code, text[:6]) == (550, b"5.7.26"), text
    assert b"good.test" in text
    assert holding(env, BOB, marker.encode()) == []
    assert holding(env, BOB, marker.encode(), "Junk") == []
    env.server.check_log()


def test_dmarc_quarantine_lands_in_junk(env: Setup) -> None:
    marker = f"quar-{time.time_ns()}".encode()
    code, _ = send_mx(
        env, SPOOF_IP, "bounce@attacker.test", message("x@quar.test", subject=marker.decode())
    )
    assert code == 250
    (junk,) = holding(env, BOB, marker, "Junk")
    assert holding(env, BOB, marker) == []
    dmarc = [v for n, v in header_fields(junk) if n == "authentication-results"]
    assert len(dmarc) == 1 and "dmarc=fail" in dmarc[0]


def test_dns_temporary_error_never_rejects(env: Setup) -> None:
    marker = f"temp-{time.time_ns()}".encode()
    code, _ = send_mx(
        env, SPOOF_IP, "bounce@attacker.test", message("x@temp.test", subject=marker.decode())
    )
    assert code == 250
    (stored,) = holding(env, BOB, marker)
    (results,) = [v for n, v in header_fields(stored) if n == "authentication-results"]
    assert "dmarc=temperror" in results


def test_signed_mail_gets_one_results_header_and_forged_ones_go(env: Setup) -> None:
    marker = f"good-{time.time_ns()}"
    forged = (
        f"Authentication-Results: {HOST};\r\n\tspf=pass smtp.mailfrom=x@good.test;\r\n"
        f"\tdmarc=pass header.from=good.test\r\n"
        "Authentication-Results: relay.other.test; spf=pass smtp.mailfrom=a@good.test\r\n"
    )
    msg = message("Alice <alice@good.test>", subject=marker, extra=forged)
    msg = dkim_sign(dkim_sign(msg, "good.test", "r", rsa_key()), "good.test", "e", ed25519_key())
    code, _ = send_mx(env, GOOD_IP, "alice@good.test", msg)
    assert code == 250
    (stored,) = holding(env, BOB, marker.encode())
    # delivery's Return-Path and Delivered-To come first, then our trace field, then ours
    fields = [f for f in header_fields(stored) if f[0] not in ("return-path", "delivered-to")]
    assert [n for n, _ in fields[:2]] == ["received", "authentication-results"]
    ours = [v for n, v in fields if n == "authentication-results" and v.startswith(HOST)]
    assert len(ours) == 1 and ours[0] == fields[1][1]
    parsed = parse_results(ours[0])
    by_method = {}
    for r in parsed.results:
        by_method.setdefault(r.method, []).append(r.result)
    assert by_method["spf"] == ["pass"]
    assert by_method["dkim"] == ["pass", "pass"]
    assert by_method["dmarc"] == ["pass"]
    others = [v for n, v in fields if n == "authentication-results" and v != ours[0]]
    assert others == ["relay.other.test; spf=pass smtp.mailfrom=a@good.test"]


def test_a_senders_next_message_judged_from_the_cache_is_treated_alike(env: Setup) -> None:
    """The first message of each sender waits for DNS (the worker pool checks it); the next
    ones find every answer cached and are judged at once in the session's end of DATA: the
    same 550, the same Junk, the same Authentication-Results."""
    results = []
    for n in range(3):
        marker = f"again-{n}-{time.time_ns()}"
        spoof = message("Your Bank <alerts@good.test>", subject=marker)
        code, text = send_mx(env, SPOOF_IP, "bounce@attacker.test", spoof)
        assert (code, text[:6]) == (550, b"5.7.26"), (n, text)
        assert holding(env, BOB, marker.encode()) == []
        quar = message("x@quar.test", subject=marker)
        assert send_mx(env, SPOOF_IP, "bounce@attacker.test", quar)[0] == 250
        assert len(holding(env, BOB, marker.encode(), "Junk")) == 1
        good = message("Alice <alice@good.test>", subject=marker)
        good = dkim_sign(
            dkim_sign(good, "good.test", "r", rsa_key()), "good.test", "e", ed25519_key()
        )
        assert send_mx(env, GOOD_IP, "alice@good.test", good)[0] == 250
        (stored,) = holding(env, BOB, marker.encode())
        (ours,) = [
            v for k, v in header_fields(stored) if k == "authentication-results" and HOST in v
        ]
        results.append(sorted((r.method, r.result) for r in parse_results(ours).results))
    assert results[0] == results[1] == results[2]
    assert ("dmarc", "pass") in results[0] and results[0].count(("dkim", "pass")) == 2
    env.server.check_log()


def test_trusted_network_is_not_checked_but_forged_results_still_go(env: Setup) -> None:
    marker = f"trusted-{time.time_ns()}"
    forged = f"Authentication-Results: {HOST}; dmarc=pass header.from=good.test\r\n"
    spoof = message("alerts@good.test", subject=marker, extra=forged)
    code, _ = send_mx(env, TRUSTED_IP, "bounce@attacker.test", spoof)
    assert code == 250  # trusted networks are not checked: no 550 for this DMARC failure
    (stored,) = holding(env, BOB, marker.encode())
    assert [n for n, _ in header_fields(stored)].count("authentication-results") == 0


# ------------------------------------------------------------------------------ signing


def verify(env: Setup, algorithm: str, msg: bytes) -> bool:
    owner, record = env.records[algorithm]

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        return record.encode() if name.rstrip(b".") == owner.encode() else None

    wire = msg.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return bool(dkim.verify(wire, dnsfunc=dnsfunc))


def signatures(msg: bytes) -> list[str]:
    return [v for n, v in header_fields(msg) if n == "dkim-signature"]


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_submitted_mail_is_signed_in_the_local_and_the_relayed_copy(
    env: Setup, algorithm: str
) -> None:
    sender, domain = SIGNERS[algorithm]
    marker = f"signed-{algorithm}-{time.time_ns()}"
    body = (
        f"From: {sender}\r\nTo: {BOB}, carol@remote.test\r\nSubject: {marker}\r\n"
        f"Date: Mon, 01 Jun 2026 10:00:00 +0000\r\nMessage-ID: <{marker}@{domain}>\r\n"
        "\r\nHello, signed.\r\n"
    ).encode()
    client = smtp_starttls(env.server.port("submission"), env.ca)
    try:
        client.login(sender, PASSWORD)
        client.sendmail(sender, [BOB, "carol@remote.test"], body)
    finally:
        client.quit()
    (local,) = holding(env, BOB, marker.encode())
    relayed = env.relayed(marker.encode())
    assert len(signatures(local)) == 1
    assert f"a={algorithm}-sha256" in signatures(local)[0].replace(" ", "")
    assert f"d={domain}" in signatures(local)[0].replace(" ", "")
    assert signatures(local) == signatures(relayed)  # signed once, before either copy
    assert verify(env, algorithm, local)
    assert verify(env, algorithm, relayed)
    assert not verify(env, algorithm, relayed.replace(b"Hello, signed.", b"Hello, forged."))


def test_signature_holds_on_the_7bit_copy_for_a_server_without_8bitmime(env: Setup) -> None:
    """The 7-bit conversion re-encodes the body after it was signed at submission: the
    relayed copy carries our signature made again over what is sent (it failed to verify
    before), and the local copy keeps the one made at submission."""
    sender, domain = SIGNERS["rsa"]
    marker = f"eightbit-{time.time_ns()}"
    body = (
        f"From: {sender}\r\nTo: {BOB}, olga@seven.test\r\nSubject: {marker}\r\n"
        f"Date: Mon, 01 Jun 2026 10:00:00 +0000\r\nMessage-ID: <{marker}@{domain}>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\nGrüße aus Köln, signed.\r\n"
    ).encode()
    client = smtp_starttls(env.server.port("submission"), env.ca)
    try:
        client.login(sender, PASSWORD)
        client.sendmail(sender, [BOB, "olga@seven.test"], body, mail_options=["BODY=8BITMIME"])
    finally:
        client.quit()
    (local,) = holding(env, BOB, marker.encode())
    relayed = env.relayed(marker.encode(), env.seven)
    assert relayed.isascii() and b"quoted-printable" in relayed  # the converted copy
    assert verify(env, "rsa", local)
    assert len(signatures(relayed)) == 1
    assert verify(env, "rsa", relayed)


def test_trusted_network_relay_is_signed_and_inbound_mail_is_not(env: Setup) -> None:
    marker = f"relay-{time.time_ns()}"
    msg = message("alice@example.test", subject=marker).replace(
        b"To: bob@example.test", b"To: carol@remote.test"
    )
    assert send_mx(env, TRUSTED_IP, "alice@example.test", msg, ("carol@remote.test",))[0] == 250
    relayed = env.relayed(marker.encode())
    assert len(signatures(relayed)) == 1 and verify(env, "rsa", relayed)
    # the same From on a message from outside is inbound mail: checked, never signed by us
    marker = f"outside-{time.time_ns()}"
    code, _ = send_mx(
        env, SPOOF_IP, "bounce@attacker.test", message("alice@example.test", subject=marker)
    )
    assert code == 250
    (stored,) = holding(env, BOB, marker.encode())
    assert signatures(stored) == []
