"""TLS for every listener and for outbound relay (RFC 3207, RFC 8314, RFC 7525 advice).

Built on Twisted's TLS plumbing (``twisted.protocols.tls``, ``optionsForClientTLS``) and
pyOpenSSL contexts we configure ourselves; nothing from twisted.mail is used.

Server side: `ServerTLS` holds one OpenSSL context per configured (cert, key) pair, picks one
by SNI, and is both an ``IOpenSSLServerConnectionCreator`` (for ``transport.startTLS`` and
``TLSMemoryBIOFactory``) and an old-style context factory (``getContext``).  Certificates are
re-read by `ServerTLS.reload` (SIGHUP), by a cheap mtime check on new connections, and by
`TLSReloadService`; a failed reload keeps the previous certificates.

Client side: `client_tls_options` for outbound relay, verifying or opportunistic.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import os
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
)
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

__all__ = [
    "SERVER_CIPHERS",
    "ServerTLS",
    "TLSConfigError",
    "TLSReloadService",
    "client_tls_options",
    "ensure_self_signed",
    "lose_connection",
    "peer_tls_info",
]

log = Logger(namespace="mailsuite.tls")

# TLS 1.2 suites: forward secret AEAD only (RFC 7525 s.4.2, Mozilla "intermediate" minus DHE,
# which would need DH parameters).  TLS 1.3 suites are OpenSSL's defaults (all AEAD).
SERVER_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS:!RC4:!3DES:!EXPORT:!PSK"

_SERVER_OPTIONS = (
    SSL.OP_NO_COMPRESSION  # CRIME
    | SSL.OP_CIPHER_SERVER_PREFERENCE
    | SSL.OP_NO_RENEGOTIATION  # TLS <= 1.2 renegotiation: DoS and injection risk
    | SSL.OP_SINGLE_ECDH_USE
    | SSL.OP_SINGLE_DH_USE
)

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)


class TLSConfigError(Exception):
    """A certificate or key file cannot be used.

    ``str(error)`` is ``"PATH: problem"``; ``path`` and ``problem`` are also available
    separately, and ``which`` is ``"cert"`` or ``"key"`` (the config key at fault), or
    ``None`` when no single file is to blame.
    """

    def __init__(self, path: Path | str | None, problem: str, which: str | None = None):
        self.path = Path(path) if path is not None else None
        self.problem = problem
        self.which = which
        super().__init__(f"{path}: {problem}" if path is not None else problem)


# --------------------------------------------------------------------------- loading


def _read_file(path: Path, which: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TLSConfigError(path, "file not found", which) from None
    except IsADirectoryError:
        raise TLSConfigError(path, "is a directory, expected a PEM file", which) from None
    except PermissionError:
        raise TLSConfigError(
            path, f"permission denied (reading as uid {os.geteuid()})", which
        ) from None
    except OSError as e:
        raise TLSConfigError(path, f"cannot read: {e.strerror or e}", which) from None


def _pem_blocks(data: bytes) -> list[tuple[str, bytes]]:
    return [(m.group(1).decode("ascii"), m.group(0)) for m in _PEM_BLOCK.finditer(data)]


def _not_pem(data: bytes, expected: str) -> str:
    if not data.strip():
        return "file is empty"
    if data[:1] == b"\x30":
        return f"not PEM (looks like binary DER); expected a '-----BEGIN {expected}-----' block"
    return f"not PEM: no '-----BEGIN {expected}-----' block found"


def _load_certificates(path: Path) -> list[x509.Certificate]:
    data = _read_file(path, "cert")
    blocks = _pem_blocks(data)
    pems = [pem for label, pem in blocks if label == "CERTIFICATE"]
    if not pems:
        if any(label.endswith("PRIVATE KEY") for label, _ in blocks):
            raise TLSConfigError(
                path, "contains a private key but no certificate (cert and key swapped?)", "cert"
            )
        raise TLSConfigError(path, _not_pem(data, "CERTIFICATE"), "cert")
    certs = []
    for n, pem in enumerate(pems, 1):
        try:
            certs.append(x509.load_pem_x509_certificate(pem))
        except ValueError as e:
            raise TLSConfigError(
                path, f"certificate #{n} in the file is corrupt: {e}", "cert"
            ) from None
    return certs


def _load_private_key(path: Path) -> Any:
    data = _read_file(path, "key")
    blocks = _pem_blocks(data)
    keys = [(label, pem) for label, pem in blocks if label.endswith("PRIVATE KEY")]
    if not keys:
        if any(label == "CERTIFICATE" for label, _ in blocks):
            raise TLSConfigError(
                path, "contains a certificate but no private key (cert and key swapped?)", "key"
            )
        raise TLSConfigError(path, _not_pem(data, "PRIVATE KEY"), "key")
    label, pem = keys[0]
    if label == "ENCRYPTED PRIVATE KEY" or b"Proc-Type: 4,ENCRYPTED" in pem:
        raise TLSConfigError(
            path,
            "private key is protected by a passphrase; an unencrypted key is needed "
            "(openssl pkey -in KEY -out NEWKEY)",
            "key",
        )
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise TLSConfigError(path, f"private key is corrupt or unsupported: {e}", "key") from None


def _spki(public_key: Any) -> bytes:
    """The DER SubjectPublicKeyInfo of a certificate's or a private key's public key."""
    der: bytes = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _cert_names(cert: x509.Certificate) -> tuple[str, ...]:
    """DNS names the certificate serves: SAN dNSNames, else the subject CN (RFC 6125 s.6.4.4)."""
    names: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = list(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        pass
    if not names:
        for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
            if isinstance(attr.value, str):
                names.append(attr.value)
    return tuple(_normalize_name(n) for n in names)


def _normalize_name(name: str) -> str:
    name = name.strip().rstrip(".").lower()
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return name


@dataclass(frozen=True)
class _Identity:
    """One loaded (cert, key) pair and the OpenSSL context serving it."""

    cert_path: Path
    key_path: Path
    chain: tuple[x509.Certificate, ...]
    names: tuple[str, ...]
    context: SSL.Context

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]


def _file_signature(paths: Sequence[Path]) -> tuple[Any, ...]:
    """Cheap change detector: stat() of each file (symlinks followed, as certbot uses them)."""
    sig: list[Any] = []
    for p in paths:
        try:
            st = p.stat()
        except OSError as e:
            sig.append((str(p), "error", e.errno))
        else:
            sig.append((str(p), st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev))
    return tuple(sig)


@dataclass
class _Generation:
    """A consistent set of identities loaded together; replaced as a whole on reload."""

    identities: tuple[_Identity, ...]
    signature: tuple[Any, ...]
    exact: dict[str, _Identity] = field(default_factory=dict)
    wildcard: dict[str, _Identity] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for ident in self.identities:  # earlier pairs win on equal names
            for name in ident.names:
                if name.startswith("*."):
                    self.wildcard.setdefault(name[2:], ident)
                elif "*" not in name:
                    self.exact.setdefault(name, ident)

    @property
    def default(self) -> _Identity:
        return self.identities[0]

    def select(self, server_name: str | None) -> _Identity:
        """Exact name first, then a wildcard covering exactly one left label, else the first."""
        if not server_name:
            return self.default
        name = _normalize_name(server_name)
        if name in self.exact:
            return self.exact[name]
        _, dot, parent = name.partition(".")
        if dot and parent in self.wildcard:
            return self.wildcard[parent]
        return self.default


def _new_server_context() -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)  # RFC 8996, RFC 8314 s.4.1
    ctx.set_options(_SERVER_OPTIONS)
    ctx.set_cipher_list(SERVER_CIPHERS)
    ctx.set_session_id(b"mailsuite")  # session cache / tickets across connections
    return ctx


def _load_identity(cert_path: Path, key_path: Path) -> _Identity:
    chain = _load_certificates(cert_path)
    key = _load_private_key(key_path)
    if _spki(chain[0].public_key()) != _spki(key.public_key()):
        hint = ""
        if any(_spki(c.public_key()) == _spki(key.public_key()) for c in chain[1:]):
            hint = " (the certificate file must start with the server certificate, "
            hint += "followed by intermediates)"
        raise TLSConfigError(
            key_path, f"private key does not match the certificate in {cert_path}{hint}", "key"
        )
    ctx = _new_server_context()
    try:
        ctx.use_certificate(chain[0])
        for extra in chain[1:]:
            ctx.add_extra_chain_cert(extra)
        ctx.use_privatekey(key)
        ctx.check_privatekey()
    except (SSL.Error, TypeError, ValueError) as e:
        raise TLSConfigError(
            cert_path, f"OpenSSL refused the certificate or key: {e}", "cert"
        ) from None
    leaf = chain[0]
    now = datetime.datetime.now(datetime.UTC)
    if leaf.not_valid_after_utc < now:
        log.warn(
            "TLS certificate {path} expired on {when}; serving it anyway",
            path=str(cert_path),
            when=leaf.not_valid_after_utc.isoformat(),
        )
    return _Identity(cert_path, key_path, tuple(chain), _cert_names(leaf), ctx)


# --------------------------------------------------------------------------- server


#: OpenSSL's state descriptions before a ClientHello has been read.
_NO_HELLO_YET = (b"before SSL initialization", b"before/accept initialization", b"error")


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class ServerTLS:
    """Server TLS for all listeners: TLS >= 1.2, SNI over several certificates, live reload.

    ``pairs`` are (cert_path, key_path) PEM files; the cert file may hold the chain after the
    server certificate, and may be the same file as the key.  The first pair is the default
    for clients that send no SNI or an unknown name.  Raises `TLSConfigError` if any pair
    cannot be loaded.

    ``check_interval``: on a new connection, if at least this many seconds have passed since the
    last check, stat() the files and reload if they changed (``None`` disables).  ``clock``
    provides ``seconds()`` (the reactor, or ``task.Clock`` in tests); default: time.monotonic.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str | os.PathLike[str], str | os.PathLike[str]]],
        *,
        check_interval: float | None = 60.0,
        clock: IReactorTime | None = None,
    ) -> None:
        self._pairs = tuple((Path(c), Path(k)) for c, k in pairs)
        if not self._pairs:
            raise TLSConfigError(None, "no TLS certificate configured", "cert")
        self._paths = tuple(p for pair in self._pairs for p in pair)
        self._check_interval = check_interval
        self._now: Callable[[], float] = clock.seconds if clock is not None else time.monotonic
        self._handshake_observer: Callable[[bool], None] | None = None
        self._generation = self._load()
        self._last_check = self._now()
        self._failed_signature: tuple[Any, ...] | None = None
        #: Why the last reload failed, or None if it succeeded.
        self.last_error: str | None = None
        log.info("TLS: serving {summary}", summary=self.describe())

    # ---- loading / reloading

    def _load(self) -> _Generation:
        signature = _file_signature(self._paths)
        identities = []
        for cert_path, key_path in self._pairs:
            identities.append(_load_identity(cert_path, key_path))
        generation = _Generation(tuple(identities), signature)
        callback = self._servername_callback(generation)
        for ident in generation.identities:
            ident.context.set_tlsext_servername_callback(callback)
        self._watch_handshakes(generation)
        return generation

    # ---- handshake outcomes (for metrics)

    def observe_handshakes(self, observer: Callable[[bool], None]) -> None:
        """Call ``observer(True)`` when a server handshake completes and ``observer(False)``
        when one that started (a ClientHello arrived) ends with a fatal alert, sent or
        received.  Connections that never send a ClientHello (port probes, plaintext on a TLS
        port) and clients that hang up mid-handshake without an alert are not counted as
        failures.  Uses OpenSSL's info callback on every certificate's context (reloads keep
        it); off unless asked for, as it costs a Python call per handshake state."""
        self._handshake_observer = observer
        self._watch_handshakes(self._generation)

    def _watch_handshakes(self, generation: _Generation) -> None:
        if self._handshake_observer is None:
            return
        for ident in generation.identities:
            ident.context.set_info_callback(self._on_tls_info)

    def _on_tls_info(self, conn: SSL.Connection, where: int, ret: int) -> None:
        # Each connection is counted once: TLS 1.3 reports HANDSHAKE_DONE again for
        # post-handshake messages (session tickets).
        try:
            state = getattr(conn, "_mailsuite_tls", None)
            if state == "counted":
                return
            if where & SSL.SSL_CB_HANDSHAKE_DONE:
                ok = True
            elif where & SSL.SSL_CB_LOOP:
                if state is None and conn.get_state_string() not in _NO_HELLO_YET:
                    conn._mailsuite_tls = "hello"  # type: ignore[attr-defined]
                return
            elif where & SSL.SSL_CB_ALERT and ret >> 8 == 2 and state == "hello":
                ok = False  # level 2: fatal (RFC 8446 6)
            else:
                return
            conn._mailsuite_tls = "counted"  # type: ignore[attr-defined]
            observer = self._handshake_observer
            if observer is not None:
                observer(ok)
        except Exception:  # never let counting break a handshake
            log.failure("TLS: counting a handshake failed")

    @staticmethod
    def _servername_callback(generation: _Generation) -> Callable[[SSL.Connection], None]:
        def on_servername(conn: SSL.Connection) -> None:
            try:
                raw = conn.get_servername()
                name = raw.decode("ascii", "replace") if raw else None
                chosen = generation.select(name)
                if chosen is not generation.default:
                    conn.set_context(chosen.context)
            except Exception:
                log.failure("TLS: choosing a certificate by SNI failed; using the default")

        return on_servername

    def reload(self) -> bool:
        """Re-read all files now (call on SIGHUP).

        On success the new certificates serve new connections (existing ones are untouched)
        and True is returned.  On failure the previous certificates stay in service, the
        reason is logged and kept in `last_error`, and False is returned.
        """
        self._last_check = self._now()
        try:
            generation = self._load()
        except TLSConfigError as e:
            self.last_error = str(e)
            self._failed_signature = _file_signature(self._paths)
            log.error(
                "TLS reload failed, still serving the previous certificate: {reason}",
                reason=self.last_error,
            )
            return False
        self._generation = generation
        self._failed_signature = None
        self.last_error = None
        log.info("TLS: reloaded; serving {summary}", summary=self.describe())
        return True

    def reload_if_changed(self) -> bool:
        """Reload if any file's stat() changed since the last load or failed attempt.

        Returns True only if new certificates were loaded.
        """
        self._last_check = self._now()
        signature = _file_signature(self._paths)
        if signature == self._generation.signature or signature == self._failed_signature:
            return False
        return self.reload()

    def _maybe_check(self) -> None:
        if self._check_interval is None:
            return
        if self._now() - self._last_check >= self._check_interval:
            try:
                self.reload_if_changed()
            except Exception:  # never break a connection over a reload check
                log.failure("TLS: checking certificate files for changes failed")

    # ---- Twisted interfaces

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:  # noqa: N802
        """IOpenSSLServerConnectionCreator: a connection starting on the default certificate."""
        self._maybe_check()
        return SSL.Connection(self._generation.default.context, None)

    def getContext(self) -> SSL.Context:  # noqa: N802
        """IOpenSSLContextFactory (old style): the default certificate's context, with SNI."""
        self._maybe_check()
        return self._generation.default.context

    def wrap_factory(self, factory: IProtocolFactory) -> IProtocolFactory:
        """Wrap a listening factory in implicit TLS (ports 465, 993, 995; RFC 8314 s.3)."""
        return TLSMemoryBIOFactory(self, False, factory)

    # ---- inspection

    @property
    def certificates(self) -> list[x509.Certificate]:
        """Leaf certificates currently served, in configuration order."""
        return [ident.leaf for ident in self._generation.identities]

    def certificate_for(self, server_name: str | None) -> x509.Certificate:
        """The leaf certificate a client sending this SNI name (or none) would get."""
        return self._generation.select(server_name).leaf

    def describe(self) -> str:
        """One line for logs: each cert file, its names and expiry."""
        parts = []
        for ident in self._generation.identities:
            names = ",".join(ident.names) or "(no names)"
            until = ident.leaf.not_valid_after_utc.date().isoformat()
            parts.append(f"{ident.cert_path} [{names}] until {until}")
        return "; ".join(parts)


class TLSReloadService(Service):
    """Every ``interval`` seconds, reload ``server_tls`` if its files changed on disk."""

    def __init__(
        self, server_tls: ServerTLS, interval: float = 300.0, clock: IReactorTime | None = None
    ) -> None:
        self.server_tls = server_tls
        self.interval = interval
        self._clock = clock
        self._loop: LoopingCall | None = None

    def _check(self) -> None:
        try:
            self.server_tls.reload_if_changed()
        except Exception:
            log.failure("TLS: periodic certificate check failed")

    def startService(self) -> None:
        Service.startService(self)  # by name: Twisted's is unannotated (setup.cfg)
        self._loop = LoopingCall(self._check)
        if self._clock is not None:
            self._loop.clock = self._clock
        self._loop.start(self.interval, now=False)

    def stopService(self) -> Any:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return Service.stopService(self)


# --------------------------------------------------------------------------- self-signed


def _self_signed_usable(cert_path: Path, key_path: Path, hostname: str) -> bool:
    try:
        chain = _load_certificates(cert_path)
        key = _load_private_key(key_path)
    except TLSConfigError:
        return False
    leaf = chain[0]
    if _spki(leaf.public_key()) != _spki(key.public_key()):
        return False
    if leaf.not_valid_after_utc <= datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1):
        return False
    if _is_ip(hostname):
        try:
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return False
        return ipaddress.ip_address(hostname) in san.get_values_for_type(x509.IPAddress)
    return _normalize_name(hostname) in _cert_names(leaf)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    tmp.replace(path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _make_self_signed(hostname: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    if _is_ip(hostname):
        primary: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(hostname))
        cn = hostname
    else:
        cn = _normalize_name(hostname)
        primary = x509.DNSName(cn)
    san: list[x509.GeneralName] = [primary]
    if cn != "localhost":
        san.append(x509.DNSName("localhost"))
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn[:64]),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mailsuite self-signed"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def ensure_self_signed(data_dir: Path, hostname: str) -> tuple[Path, Path]:
    """Return (cert, key) paths of ``<data_dir>/tls/selfsigned.{pem,key}``, creating them if needed.

    Regenerates when a file is missing, unreadable, mismatched, expired (or within a day of
    it), or does not name ``hostname``.  EC P-256, SAN = hostname + localhost, one year.
    The key is mode 0600; both files are written atomically (temp file, fsync, rename).
    """
    tls_dir = Path(data_dir) / "tls"
    tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path = tls_dir / "selfsigned.pem"
    key_path = tls_dir / "selfsigned.key"
    with (tls_dir / ".selfsigned.lock").open("a") as lock:  # two processes starting at once
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if _self_signed_usable(cert_path, key_path, hostname):
            return cert_path, key_path
        cert_pem, key_pem = _make_self_signed(hostname)
        _write_atomic(key_path, key_pem, 0o600)  # key first: a cert on disk has its key
        _write_atomic(cert_path, cert_pem, 0o644)
    log.info(
        "TLS: created self-signed certificate {path} for {hostname}",
        path=str(cert_path),
        hostname=hostname,
    )
    return cert_path, key_path


# --------------------------------------------------------------------------- client


def _trust_root(trust_root: Any) -> Any:
    if trust_root is None:
        return platformTrust()
    if isinstance(trust_root, str | os.PathLike):
        path = Path(trust_root)
        data = _read_file(path, "ca")
        pems = [pem for label, pem in _pem_blocks(data) if label == "CERTIFICATE"]
        if not pems:
            raise TLSConfigError(path, _not_pem(data, "CERTIFICATE"), "ca")
        return trustRootFromCertificates([Certificate.loadPEM(p) for p in pems])
    if isinstance(trust_root, bytes):
        pems = [pem for label, pem in _pem_blocks(trust_root) if label == "CERTIFICATE"]
        return trustRootFromCertificates([Certificate.loadPEM(p) for p in pems])
    return trust_root  # a twisted Certificate or an IOpenSSLTrustRoot


def _sni_bytes(hostname: str) -> bytes | None:
    name = hostname.strip().rstrip(".").lower()
    if not name or _is_ip(name):
        return None  # RFC 6066 s.3: no literal addresses in SNI
    try:
        return name.encode("idna")
    except UnicodeError:
        return name.encode("ascii", "replace")


@implementer(IOpenSSLClientConnectionCreator)
class _OpportunisticClientTLS:
    """Encrypt without authenticating (RFC 7435 opportunistic security), TLS >= 1.2, SNI sent."""

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname
        self._sni = _sni_bytes(hostname)
        self._options = CertificateOptions(verify=False, raiseMinimumTo=TLSVersion.TLSv1_2)

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:  # noqa: N802
        conn = SSL.Connection(self._options.getContext(), None)
        if self._sni is not None:
            conn.set_tlsext_host_name(self._sni)
        return conn


def client_tls_options(
    hostname: str, verify: bool, trust_root: Any = None
) -> IOpenSSLClientConnectionCreator:
    """A client connection creator for ``transport.startTLS`` on outbound SMTP.

    ``verify=True``: the chain must lead to ``trust_root`` (None = the platform store; or a
    PEM file path, PEM bytes, a ``twisted.internet.ssl.Certificate``, or an IOpenSSLTrustRoot)
    and the certificate must name ``hostname`` (service-identity).  ``verify=False``:
    opportunistic, any certificate accepted.  Both require TLS >= 1.2 and send SNI.
    """
    if not verify:
        return _OpportunisticClientTLS(hostname)
    return optionsForClientTLS(
        hostname,
        trustRoot=_trust_root(trust_root),
        extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2},
    )


# --------------------------------------------------------------------------- inspection


def peer_tls_info(transport: object) -> str | None:
    """``"version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384"`` for a TLS transport, else None.

    None also while the handshake has not finished.  Works after STARTTLS and on
    implicit-TLS listeners (the handle of both is the pyOpenSSL connection).
    """
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return None
    try:
        handle = get_handle()
    except Exception:
        return None
    if not isinstance(handle, SSL.Connection):
        return None
    cipher = handle.get_cipher_name()
    version = handle.get_protocol_version_name()
    if not cipher or not version or version == "Unknown":
        return None
    return f"version={version} cipher={cipher}"


# --------------------------------------------------------------------------- closing


def lose_connection(transport: Any) -> None:
    """``transport.loseConnection()``, and over TLS close the TCP connection as soon as our
    close_notify has gone out instead of waiting for the peer's.

    Twisted's TLS layer, once it has sent close_notify, keeps the TCP connection open until the
    peer answers with its own; many clients (Python's ssl, most IMAP and POP3 clients) read
    our close_notify as the end of the stream and never answer, so the server would hold the
    connection until the client closes it, however long that takes.  RFC 8446 6.1 lets the
    side that closes not wait for the reply.  Works on implicit-TLS listeners (the transport
    is the TLS protocol) and after STARTTLS (the TLS protocol is the transport's
    ``protocol``); plain TCP is only ``loseConnection``.
    """
    transport.loseConnection()
    tls = transport if isinstance(transport, TLSMemoryBIOProtocol) else None
    if tls is None and getattr(transport, "TLS", False):
        tls = getattr(transport, "protocol", None)
    if not isinstance(tls, TLSMemoryBIOProtocol) or tls.transport is None:
        return
    # Only once close_notify is really out: not while application data waits for the
    # handshake or a producer is still registered (then loseConnection sent nothing yet).
    if getattr(tls, "_appSendBuffer", True) or getattr(tls, "_producer", True) is not None:
        return
    tls.transport.loseConnection()  # the byte transport: flushes close_notify, then FIN
