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
pure Python (about 12 ms per 2048-bit signature, holding the GIL), so it runs in the mail-auth
worker pool, never on the reactor (see :mod:`mailsuite.mailauth.service`).
"""

from __future__ import annotations

from collections.abc import Callable

import dkim
from twisted.logger import Logger

from mailsuite.mailauth.dkim_keys import DKIMKey, KeyStore
from mailsuite.mailauth.dkim_verify import quiet_logger
from mailsuite.mailauth.dmarc import organizational_domain
from mailsuite.mailauth.headers import fields, from_domains, header_section

__all__ = ["SIGNED_HEADERS", "Signer"]

log = Logger(namespace="mailsuite.mailauth.dkim_sign")

#: Signed when present (plus every List-* field, RFC 2369/2919).
SIGNED_HEADERS = ("from", "to", "cc", "subject", "date", "message-id", "reply-to",
                  "in-reply-to", "references", "mime-version", "content-type")


def signed_header_list(section: bytes) -> list[bytes]:
    """The h= list for a header section: each present field of the set once per occurrence,
    then ``from`` once more (over-signing)."""
    names = [f.lname for f in fields(section)
             if f.lname in SIGNED_HEADERS or f.lname.startswith("list-")]
    if "from" not in names:
        return []
    return [n.encode("ascii") for n in names] + [b"from"]


class Signer:
    """Signs with the keys in ``keys``; ``org_domain`` maps a name to its organizational
    domain (the Public Suffix List by default)."""

    def __init__(self, keys: KeyStore,
                 org_domain: Callable[[str], str] = organizational_domain) -> None:
        self.keys = keys
        self.org_domain = org_domain

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

    def signature_headers(self, message: bytes, from_domain: str | None = None,
                          linesep: bytes = b"\n") -> bytes:
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
        out = []
        try:
            signer = dkim.DKIM(message, logger=quiet_logger(), linesep=linesep)
        except dkim.DKIMException as e:
            log.error("DKIM signing for {domain} skipped: the message does not parse ({error})",
                      domain=from_domain, error=e)
            return b""
        for key in keys:
            try:
                out.append(signer.sign(
                    key.selector.encode("ascii"), key.domain.encode("ascii"), key.private,
                    signature_algorithm=key.algorithm.encode("ascii"),
                    canonicalize=(b"relaxed", b"relaxed"), include_headers=include))
            except Exception as e:  # noqa: BLE001 - see the docstring
                log.error("DKIM signing for {domain} with selector {selector} failed: {error}",
                          domain=key.domain, selector=key.selector, error=e)
        return b"".join(out)
