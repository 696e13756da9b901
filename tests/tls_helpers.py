"""A test CA (trustme) and helpers for TLS clients in integration tests."""

from __future__ import annotations

import base64
import datetime
import smtplib
import socket
import ssl
from pathlib import Path

import trustme

HOSTNAME = "mx.example.test"


class CertAuthority:
    """A throw-away CA; issues server certificates written as PEM files under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.ca_file = root / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def issue(
        self,
        *names: str,
        stem: str = "server",
        not_after: datetime.datetime | None = None,
        directory: Path | None = None,
    ) -> tuple[Path, Path]:
        """Write ``<stem>.pem`` (leaf + chain) and ``<stem>.key`` under ``directory`` (the CA's
        folder by default); returns their paths.  Each file is replaced atomically, as certbot
        does, so a server reloading it never reads half a file.  The first name is the
        subject's common name too (clients such as fetchmail check that, not the
        subjectAltName)."""
        names = names or (HOSTNAME, "localhost", "127.0.0.1")
        leaf = self.ca.issue_cert(*names, common_name=names[0], not_after=not_after)
        folder = directory or self.root
        cert_path = folder / f"{stem}.pem"
        key_path = folder / f"{stem}.key"
        for path, data in (
            (key_path, leaf.private_key_pem.bytes()),
            (cert_path, b"".join(blob.bytes() for blob in leaf.cert_chain_pems)),
        ):
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return cert_path, key_path

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        return ctx


def smtp_starttls(port: int, ca: CertAuthority, server_hostname: str = HOSTNAME) -> smtplib.SMTP:
    """smtplib on the submission port, after EHLO + STARTTLS (verifying against ``ca``)."""
    client = smtplib.SMTP("127.0.0.1", port, timeout=20)
    client._host = server_hostname  # type: ignore[attr-defined]  # SNI / name check
    client.ehlo("client.example")
    client.starttls(context=ca.client_context())
    client.ehlo("client.example")
    return client


def smtp_ssl(port: int, ca: CertAuthority, server_hostname: str = HOSTNAME) -> smtplib.SMTP_SSL:
    """smtplib with implicit TLS (port 465 role)."""

    class _SMTP_SSL(smtplib.SMTP_SSL):  # noqa: N801
        def _get_socket(self, host, port, timeout):  # type: ignore[no-untyped-def]
            sock = socket.create_connection(("127.0.0.1", port), timeout)
            return self.context.wrap_socket(sock, server_hostname=server_hostname)

    client = _SMTP_SSL("127.0.0.1", port, timeout=20, context=ca.client_context())
    client.ehlo("client.example")
    return client


def peer_certificate(
    host: str, port: int, ca: CertAuthority, server_name: str, starttls: bool
) -> dict:
    """The verified certificate a client sees for ``server_name`` (SNI), via STARTTLS or not."""
    sock = socket.create_connection((host, port), timeout=10)
    try:
        if starttls:
            f = sock.makefile("rb")
            f.readline()
            sock.sendall(b"EHLO c\r\n")
            while True:
                line = f.readline()
                if line[3:4] == b" ":
                    break
            sock.sendall(b"STARTTLS\r\n")
            assert f.readline().startswith(b"220")
        tls = ca.client_context().wrap_socket(sock, server_hostname=server_name)
        cert = tls.getpeercert()
        tls.close()
        return cert
    finally:
        sock.close()


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")
