"""Unit tests for mailsuite.tls: loading errors, SNI selection, reload logic, self-signed certs.

No sockets here; the handshakes are in tests/integration/test_tls_loopback.py.
"""

from __future__ import annotations

import datetime
import stat
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailsuite import tls
from mailsuite.tls import (
    ServerTLS,
    TLSConfigError,
    TLSReloadService,
    client_tls_options,
    ensure_self_signed,
    peer_tls_info,
)
from tests.tls_helpers import CertAuthority


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def cn_only_pair(directory: Path, cn: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cn.pem", directory / "cn.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


# ----------------------------------------------------------------- loading errors


def test_missing_cert_file_names_file_and_problem(tmp_path: Path) -> None:
    with pytest.raises(TLSConfigError) as info:
        ServerTLS([(tmp_path / "nope.pem", tmp_path / "nope.key")])
    err = info.value
    assert err.path == tmp_path / "nope.pem"
    assert err.which == "cert"
    assert str(err) == f"{tmp_path / 'nope.pem'}: file not found"


def test_missing_key_file(ca: CertAuthority, tmp_path: Path) -> None:
    cert, _ = ca.issue("mail.example.test", stem="a", directory=tmp_path)
    with pytest.raises(TLSConfigError) as info:
        ServerTLS([(cert, tmp_path / "missing.key")])
    assert info.value.which == "key"
    assert "missing.key: file not found" in str(info.value)


def test_cert_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(TLSConfigError, match="is a directory"):
        ServerTLS([(tmp_path, tmp_path)])


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"hello, I am not a certificate\n", "not PEM"),
        (b"", "file is empty"),
        (b"\x30\x82\x01\x0a\x02\x82", "binary DER"),
        (
            b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
            "corrupt",
        ),
    ],
)
def test_garbage_cert(ca: CertAuthority, tmp_path: Path, content: bytes, expected: str) -> None:
    _, key = ca.issue("mail.example.test", stem="a", directory=tmp_path)
    bad = tmp_path / "bad.pem"
    bad.write_bytes(content)
    with pytest.raises(TLSConfigError) as info:
        ServerTLS([(bad, key)])
    assert str(info.value).startswith(f"{bad}: ")
    assert expected in str(info.value)
    assert info.value.which == "cert"


def test_garbage_key(ca: CertAuthority, tmp_path: Path) -> None:
    cert, _ = ca.issue("mail.example.test", stem="a", directory=tmp_path)
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"-----BEGIN PRIVATE KEY-----\nZ2FyYmFnZQ==\n-----END PRIVATE KEY-----\n")
    with pytest.raises(TLSConfigError, match="private key is corrupt") as info:
        ServerTLS([(cert, bad)])
    assert info.value.path == bad and info.value.which == "key"


def test_swapped_cert_and_key(ca: CertAuthority, tmp_path: Path) -> None:
    cert, key = ca.issue("mail.example.test", stem="a", directory=tmp_path)
    with pytest.raises(TLSConfigError, match="swapped") as info:
        ServerTLS([(key, cert)])
    assert info.value.path == key


def test_mismatched_key(ca: CertAuthority, tmp_path: Path) -> None:
    cert, _ = ca.issue("mail.example.test", stem="a", directory=tmp_path)
    _, other_key = ca.issue("mail.example.test", stem="b", directory=tmp_path)
    with pytest.raises(TLSConfigError) as info:
        ServerTLS([(cert, other_key)])
    err = info.value
    assert err.path == other_key and err.which == "key"
    assert f"private key does not match the certificate in {cert}" in str(err)


def test_chain_in_wrong_order_gets_a_hint(tmp_path: Path) -> None:
    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf = intermediate.issue_cert("mail.example.test")
    pems = [blob.bytes() for blob in leaf.cert_chain_pems]
    assert len(pems) >= 2
    cert, key = tmp_path / "c.pem", tmp_path / "c.key"
    cert.write_bytes(b"".join(reversed(pems)))
    key.write_bytes(leaf.private_key_pem.bytes())
    with pytest.raises(TLSConfigError, match="must start with the server certificate"):
        ServerTLS([(cert, key)])
    cert.write_bytes(b"".join(pems))  # right order loads, with the chain
    assert ServerTLS([(cert, key)]).certificates[0].subject == leaf_subject(pems[0])


def leaf_subject(pem: bytes) -> x509.Name:
    return x509.load_pem_x509_certificate(pem).subject


def test_encrypted_key_is_refused(ca: CertAuthority, tmp_path: Path) -> None:
    cert, key_path = ca.issue("mail.example.test", stem="a", directory=tmp_path)
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TLSConfigError, match="passphrase"):
        ServerTLS([(cert, key_path)])


def test_cert_and_key_in_one_file(ca: CertAuthority, tmp_path: Path) -> None:
    cert, key = ca.issue("mail.example.test", stem="a", directory=tmp_path)
    both = tmp_path / "both.pem"
    both.write_bytes(key.read_bytes() + cert.read_bytes())
    server = ServerTLS([(both, both)])
    assert der(server.certificates[0]) == der(x509.load_pem_x509_certificate(cert.read_bytes()))


def test_no_pairs() -> None:
    with pytest.raises(TLSConfigError, match="no TLS certificate"):
        ServerTLS([])


# ----------------------------------------------------------------- context settings


def test_interfaces_and_context_settings(ca: CertAuthority, tmp_path: Path) -> None:
    server = ServerTLS([ca.issue("mail.example.test", stem="a", directory=tmp_path)])
    assert IOpenSSLServerConnectionCreator.providedBy(server)
    assert IOpenSSLContextFactory.providedBy(server)
    ctx = server.getContext()
    options = ctx.set_options(0)  # returns the current option bits
    for bit in (SSL.OP_NO_COMPRESSION, SSL.OP_CIPHER_SERVER_PREFERENCE, SSL.OP_NO_RENEGOTIATION):
        assert options & bit
    ciphers = SSL.Connection(ctx, None).get_cipher_list()
    assert ciphers
    for name in ciphers:
        assert name.startswith(("TLS_", "ECDHE-")), name
        for weak in ("RC4", "DES", "NULL", "EXP", "ADH", "AECDH", "MD5", "CBC", "-SHA"):
            assert weak not in name.removesuffix("-SHA256").removesuffix("-SHA384"), name
    assert isinstance(server.wrap_factory(object()), TLSMemoryBIOFactory)  # type: ignore[arg-type]


# ----------------------------------------------------------------- SNI selection


def test_sni_selection(ca: CertAuthority, tmp_path: Path) -> None:
    a = ca.issue("mail.example.test", "smtp.example.test", stem="a", directory=tmp_path)
    b = ca.issue("*.other.test", "other.test", stem="b", directory=tmp_path)
    c = ca.issue("exact.other.test", stem="c", directory=tmp_path)
    server = ServerTLS([a, b, c])
    first, second, third = server.certificates
    assert server.certificate_for(None) is first
    assert server.certificate_for("") is first
    assert server.certificate_for("mail.example.test") is first
    assert server.certificate_for("SMTP.Example.Test.") is first
    assert server.certificate_for("imap.other.test") is second
    assert server.certificate_for("other.test") is second
    assert server.certificate_for("exact.other.test") is third  # exact beats wildcard
    assert server.certificate_for("a.b.other.test") is first  # wildcard covers one label
    assert server.certificate_for("unknown.test") is first


def test_sni_falls_back_to_cn(ca: CertAuthority, tmp_path: Path) -> None:
    a = ca.issue("mail.example.test", stem="a", directory=tmp_path)
    server = ServerTLS([a, cn_only_pair(tmp_path, "Legacy.Example.Test")])
    assert server.certificate_for("legacy.example.test") is server.certificates[1]


# ----------------------------------------------------------------- reload


def reissue(ca: CertAuthority, pair: tuple[Path, Path], *names: str) -> bytes:
    """Overwrite a pair atomically with a new cert; return its leaf DER."""
    cert, _ = ca.issue(*names, stem=pair[0].stem, directory=pair[0].parent)
    return der(x509.load_pem_x509_certificate(cert.read_bytes()))


def test_reload_success_and_failure(ca: CertAuthority, tmp_path: Path) -> None:
    pair = ca.issue("mail.example.test", stem="a", directory=tmp_path)
    server = ServerTLS([pair], check_interval=None)
    old = der(server.certificates[0])

    new = reissue(ca, pair, "mail.example.test")
    assert server.reload() is True
    assert der(server.certificates[0]) == new != old
    assert server.last_error is None

    pair[0].write_bytes(b"garbage")
    assert server.reload() is False
    assert der(server.certificates[0]) == new
    assert server.last_error is not None and "not PEM" in server.last_error

    # a new cert with the old key: mismatched, still the previous cert
    other = ca.ca.issue_cert("mail.example.test")
    pair[0].write_bytes(other.cert_chain_pems[0].bytes())
    assert server.reload() is False
    assert "does not match" in (server.last_error or "")
    assert der(server.certificates[0]) == new


def test_reload_if_changed(ca: CertAuthority, tmp_path: Path) -> None:
    pair = ca.issue("mail.example.test", stem="a", directory=tmp_path)
    server = ServerTLS([pair], check_interval=None)
    assert server.reload_if_changed() is False  # nothing changed
    new = reissue(ca, pair, "mail.example.test")
    assert server.reload_if_changed() is True
    assert der(server.certificates[0]) == new
    assert server.reload_if_changed() is False

    pair[1].unlink()  # renewal half done: key missing
    assert server.reload_if_changed() is False
    assert "file not found" in (server.last_error or "")
    error = server.last_error
    server.last_error = "sentinel"
    assert server.reload_if_changed() is False  # same broken state: not retried, not re-logged
    assert server.last_error == "sentinel"
    newer = reissue(ca, pair, "mail.example.test")
    assert error and server.reload_if_changed() is True
    assert der(server.certificates[0]) == newer


def test_new_connection_triggers_check_at_most_every_interval(
    ca: CertAuthority, tmp_path: Path
) -> None:
    clock = Clock()
    pair = ca.issue("mail.example.test", stem="a", directory=tmp_path)
    server = ServerTLS([pair], check_interval=30, clock=clock)
    old = der(server.certificates[0])
    new = reissue(ca, pair, "mail.example.test")
    clock.advance(10)
    conn = server.serverConnectionForTLS(None)
    assert der(server.certificates[0]) == old  # too soon to look
    assert conn.get_context() is not None
    clock.advance(25)
    server.serverConnectionForTLS(None)
    assert der(server.certificates[0]) == new


def test_reload_service(ca: CertAuthority, tmp_path: Path) -> None:
    clock = Clock()
    pair = ca.issue("mail.example.test", stem="a", directory=tmp_path)
    server = ServerTLS([pair], check_interval=None)
    service = TLSReloadService(server, 60, clock=clock)
    service.startService()
    try:
        new = reissue(ca, pair, "mail.example.test")
        clock.advance(59)
        assert der(server.certificates[0]) != new
        clock.advance(1)
        assert der(server.certificates[0]) == new
    finally:
        service.stopService()
    assert not clock.getDelayedCalls()


# ----------------------------------------------------------------- self-signed


def test_ensure_self_signed_creates_usable_pair(tmp_path: Path) -> None:
    cert_path, key_path = ensure_self_signed(tmp_path, "mx.example.test")
    assert cert_path == tmp_path / "tls" / "selfsigned.pem"
    assert key_path == tmp_path / "tls" / "selfsigned.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert not list((tmp_path / "tls").glob("*.tmp"))
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"mx.example.test", "localhost"}
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=364) < lifetime < datetime.timedelta(days=366)
    server = ServerTLS([(cert_path, key_path)])  # loads, key matches
    assert server.certificate_for("mx.example.test") is server.certificates[0]


def test_ensure_self_signed_reuses_existing(tmp_path: Path) -> None:
    first = ensure_self_signed(tmp_path, "mx.example.test")
    before = first[0].read_bytes(), first[1].read_bytes()
    second = ensure_self_signed(tmp_path, "mx.example.test")
    assert second == first
    assert (second[0].read_bytes(), second[1].read_bytes()) == before


def test_ensure_self_signed_regenerates_expired(tmp_path: Path) -> None:
    cert_path, key_path = ensure_self_signed(tmp_path, "mx.example.test")
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    old = x509.load_pem_x509_certificate(cert_path.read_bytes())
    now = datetime.datetime.now(datetime.UTC)
    expired = (
        x509.CertificateBuilder()
        .subject_name(old.subject)
        .issuer_name(old.issuer)
        .public_key(old.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=400))
        .not_valid_after(now - datetime.timedelta(days=35))
        .add_extension(
            old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value,
            critical=False,
        )
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_path.write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    ensure_self_signed(tmp_path, "mx.example.test")
    renewed = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert renewed.not_valid_after_utc > now + datetime.timedelta(days=300)


def test_ensure_self_signed_regenerates_for_new_hostname_or_corruption(tmp_path: Path) -> None:
    cert_path, key_path = ensure_self_signed(tmp_path, "old.example.test")
    ensure_self_signed(tmp_path, "new.example.test")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "new.example.test" in san.get_values_for_type(x509.DNSName)
    key_path.write_bytes(b"junk")
    ensure_self_signed(tmp_path, "new.example.test")
    ServerTLS([(cert_path, key_path)])  # consistent again


def test_ensure_self_signed_ip_hostname(tmp_path: Path) -> None:
    cert_path, _key_path = ensure_self_signed(tmp_path, "192.0.2.7")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["192.0.2.7"]
    before = cert_path.read_bytes()
    ensure_self_signed(tmp_path, "192.0.2.7")
    assert cert_path.read_bytes() == before


# ----------------------------------------------------------------- client and helpers


def test_client_options(ca: CertAuthority, tmp_path: Path) -> None:
    ca_file = ca.ca_file
    for creator in (
        client_tls_options("mx.example.test", verify=False),
        client_tls_options("mx.example.test", verify=True, trust_root=ca_file),
        client_tls_options("mx.example.test", verify=True, trust_root=ca.ca_file.read_bytes()),
        client_tls_options("mx.example.test", verify=True),
    ):
        assert IOpenSSLClientConnectionCreator.providedBy(creator)


def test_client_options_bad_trust_root(tmp_path: Path) -> None:
    with pytest.raises(TLSConfigError, match="file not found"):
        client_tls_options("mx.example.test", verify=True, trust_root=tmp_path / "none.pem")


def test_sni_not_sent_for_ip_literal() -> None:
    assert tls._sni_bytes("192.0.2.1") is None
    assert tls._sni_bytes("::1") is None
    assert tls._sni_bytes("MX.Example.Test.") == b"mx.example.test"


def test_peer_tls_info_without_tls() -> None:
    assert peer_tls_info(object()) is None

    class Plain:
        def getHandle(self) -> object:  # noqa: N802
            return object()

    assert peer_tls_info(Plain()) is None
