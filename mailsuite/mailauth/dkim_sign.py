"""DKIM signing of outgoing mail (RFC 6376, RFC 8463) with dkimpy.

A message from a domain with keys gets one signature per key that signs for it: rsa-sha256
and ed25519-sha256 both when both exist (RFC 8463 recommends the pair while receivers learn
ed25519), relaxed/relaxed canonicalization (survives the header re-folding and trailing
whitespace changes of relays), the header set below signed as present and From signed once
more than it occurs, so that no From field can be added without breaking the signature
(RFC 6376 8.15).  The signing domain is the From domain or, failing a key there, its nearest
parent within the same organizational domain (still aligned for relaxed DMARC).

``Signer.signature_headers`` is pure and thread-safe: the keys come from the
:class:`~mailsuite.mailauth.dkim_keys.KeyStore`, re-read when they change.  dkimpy does RSA in
it runs in the mail-auth worker pool, never on the reactor (see
:mod:`mailsuite.mailauth.service`).  Two pieces are not dkimpy's, both so that a worker does not
hold the GIL for long: the body hash comes from :mod:`~mailsuite.mailauth.canon` (sliced) and
the RSA operation from OpenSSL (:class:`_OpenSSLRSA`); dkimpy builds and folds the header.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable
from typing import Any

import dkim
import nacl.encoding
import nacl.signing
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import CanonicalizationPolicy
from dkim.crypto import HASH_ALGORITHMS
from twisted.logger import Logger

from mailsuite.mailauth.canon import body_hash
from mailsuite.mailauth.dkim_keys import DKIMKey, KeyStore, KeyStoreError
from mailsuite.mailauth.dkim_verify import quiet_logger
from mailsuite.mailauth.dmarc import organizational_domain
from mailsuite.mailauth.headers import fields, from_domains, header_section

__all__ = ["SIGNED_HEADERS", "Signer"]

log = Logger(namespace="mailsuite.mailauth.dkim_sign")

#: Signed when present (plus every List-* field, RFC 2369/2919).
SIGNED_HEADERS = (
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "in-reply-to",
    "references",
    "mime-version",
    "content-type",
)


def signed_header_list(section: bytes) -> list[bytes]:
    """The h= list for a header section: each present field of the set once per occurrence,
    then ``from`` once more (over-signing)."""
    names = [
        f.lname for f in fields(section) if f.lname in SIGNED_HEADERS or f.lname.startswith("list-")
    ]
    if "from" not in names:
        return []
    return [n.encode("ascii") for n in names] + [b"from"]


class _OpenSSLRSA:
    """RSASSA-PKCS1-v1_5 over a SHA-256 digest (RFC 6376 3.3.1) by OpenSSL, in the shape of a
    PyNaCl signing key (``sign(digest).signature``).

    dkimpy's own RSA is pure Python: about 12 ms per 2048-bit signature, all of it one
    ``pow()`` that holds the GIL (the reactor thread waits meanwhile).  OpenSSL takes about
    1 ms.  The signature is the same bytes either way (PKCS#1 v1.5 is deterministic).
    """

    def __init__(self, pem: bytes) -> None:
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("not an RSA private key")
        self.key = key

    def sign(self, digest: bytes) -> Any:
        signature = self.key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        return _Signed(signature)


class _Signed:
    __slots__ = ("signature",)

    def __init__(self, signature: bytes) -> None:
        self.signature = signature


class Signer:
    """Signs with the keys in ``keys``; ``org_domain`` maps a name to its organizational
    domain (the Public Suffix List by default)."""

    def __init__(
        self, keys: KeyStore, org_domain: Callable[[str], str] = organizational_domain
    ) -> None:
        self.keys = keys
        self.org_domain = org_domain
        self._rsa: dict[bytes, _OpenSSLRSA] = {}
        self._lock = threading.Lock()

    def _rsa_key(self, pem: bytes) -> _OpenSSLRSA:
        """Loaded once: OpenSSL checks an RSA key as it loads it, which costs more than
        signing with it."""
        with self._lock:
            key = self._rsa.get(pem)
        if key is None:
            key = _OpenSSLRSA(pem)
            with self._lock:
                if len(self._rsa) >= 256:
                    self._rsa.clear()
                self._rsa[pem] = key
        return key

    def keys_for(self, from_domain: str) -> list[DKIMKey]:
        """The keys of ``from_domain``, or of its nearest parent that has some, not going
        above the organizational domain."""
        domain = from_domain.lower().rstrip(".")
        org = self.org_domain(domain)
        while True:
            found = self.keys.signing_keys(domain)
            if found or domain == org or "." not in domain:
                return found
            domain = domain.split(".", 1)[1]

    def signature_headers(
        self, message: bytes, from_domain: str | None = None, linesep: bytes = b"\n"
    ) -> bytes:
        """DKIM-Signature fields to put at the top of ``message`` (b"" when there is no key
        or no From field).  ``message`` may use CRLF or LF line ends; the returned fields end
        their lines with ``linesep`` (the stored form is LF).  A key that fails to sign is
        logged and skipped: mail is not held back for a broken key file."""
        section = header_section(message)
        include = signed_header_list(section)
        if not include:
            return b""
        if from_domain is None:
            authors = from_domains(section)
            if not authors:
                return b""
            from_domain = authors[0]
        keys = self.keys_for(from_domain)
        if not keys:
            return b""
        body = message[len(section) :]
        out = []
        for key in keys:
            try:
                out.append(self._sign(section, body, key, include, linesep))
            except Exception as e:  # see the docstring
                log.error(
                    "DKIM signing for {domain} with selector {selector} failed: {error}",
                    domain=key.domain,
                    selector=key.selector,
                    error=e,
                )
        return b"".join(out)

    def ours(self, signature: str) -> bool:
        """Whether a DKIM-Signature value was made with one of our keys (its d= and s= name
        a selector we hold for that domain)."""
        tags = {}
        for part in signature.split(";"):
            name, eq, value = part.partition("=")
            if eq:
                tags[name.strip().lower()] = "".join(value.split()).lower()
        domain, selector = tags.get("d", ""), tags.get("s", "")
        if not domain or not selector:
            return False
        try:
            return any(k.selector == selector for k in self.keys.keys(domain))
        except (KeyStoreError, OSError):
            return False

    def resign(self, message: bytes) -> bytes:
        """``message`` with our own DKIM signatures made again, for a copy whose body was
        changed after signing: the 7-bit conversion for a server without 8BITMIME
        (RFC 6152 3) re-encodes 8-bit parts, so the body hash made at submission no longer
        matches and receivers would see ``dkim=fail`` on mail we sent.  Signatures that are
        not ours are left as they are (they break, as RFC 6376 6.1 expects of a changed
        body); a message without any of ours comes back unchanged."""
        section = header_section(message)
        every = fields(section)
        kept = [f for f in every if f.lname != "dkim-signature" or not self.ours(f.value())]
        if len(kept) == len(every):
            return message
        end = section[sum(len(f.raw) for f in every) :]  # the empty line, if any
        stripped = b"".join(f.raw for f in kept) + end + message[len(section) :]
        linesep = b"\r\n" if section.endswith(b"\r\n") else b"\n"
        return self.signature_headers(stripped, linesep=linesep) + stripped

    def _sign(
        self, section: bytes, body: bytes, key: DKIMKey, include: list[bytes], linesep: bytes
    ) -> bytes:
        """What ``dkim.DKIM.sign`` does, with the body hash from :mod:`canon` (sliced, so the
        GIL is released on big bodies) and dkimpy's own ``gen_header`` for the rest."""
        algorithm = key.algorithm.encode("ascii")
        # gen_header signs the header hash with ``private.sign(digest).signature`` on its
        # ed25519 branch; an RSA key goes the same way through _OpenSSLRSA (see there).
        signer = dkim.DKIM(
            section, logger=quiet_logger(), signature_algorithm=b"ed25519-sha256", linesep=linesep
        )
        if key.kind == "rsa":
            private: object = self._rsa_key(key.private)
        else:
            private = nacl.signing.SigningKey(key.private, encoder=nacl.encoding.Base64Encoder)
        signer.hasher = HASH_ALGORITHMS[algorithm]
        bh = base64.b64encode(body_hash(body, True, signer.hasher))
        domain = key.domain.encode("ascii")
        fields = [
            (b"v", b"1"),
            (b"a", algorithm),
            (b"c", b"relaxed/relaxed"),
            (b"d", domain),
            (b"i", b"@" + domain),
            (b"q", b"dns/txt"),
            (b"s", key.selector.encode("ascii")),
            (b"t", str(int(time.time())).encode("ascii")),
            (b"h", b" : ".join(include)),
            (b"bh", bh),
            (b"b", b"0" * 60),  # dkimpy's placeholder: b= is folded onto lines of its own
        ]
        policy = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
        value = signer.gen_header(fields, include, policy, b"DKIM-Signature", private)
        return b"DKIM-Signature: " + value  # type: ignore[no-any-return]
