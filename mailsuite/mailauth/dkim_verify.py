"""DKIM verification (RFC 6376, RFC 8463 ed25519), bounded per message.

Every DKIM-Signature is a cost the sender chooses (a DNS query and an RSA operation), so at
most ``max_signatures`` are verified (RFC 6376 6.1 allows a limit); signatures whose d= could
align with the From domain go first, so padding a message with foreign signatures cannot push
the one DMARC needs out of the window.  rsa-sha1 signatures and RSA keys under 1024 bits are
reported as fail (RFC 8301 3.1, 3.2).

Each signature goes first to :mod:`~mailsuite.mailauth.dkim_fast`, which answers the common
case (rsa-sha256 / ed25519-sha256, simple or relaxed, plain tags and keys) without dkimpy's
per-field Python, and to dkimpy for everything else, with the same results (a property test
compares them).  The key lookups of a message are shared by both paths.

dkimpy reports a missing key, a DNS timeout and a bad signature all as "False", so the DNS
function given to it notes what happened and the result is classified from that: temperror
(DNS did not answer), permerror (no key, a broken key record or signature), fail.

dkimpy checks RSA signatures in pure Python (``pow`` on 2048-bit integers and a byte loop to
convert the result: about 0.8 ms a signature, holding the GIL the reactor needs); its
verification function is replaced, once, by :func:`~mailsuite.mailauth.dkim_fast.rsa_verify`,
the same check done by OpenSSL through ``cryptography`` (tens of microseconds).
"""

from __future__ import annotations

import base64
import functools
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dkim
from dkim.crypto import HASH_ALGORITHMS
from dkim.util import InvalidTagValueList

from mailsuite.mailauth.dkim_fast import (
    BodyHashes,
    index_fields,
    parse_fields,
    parse_tags,
    verify_common,
)
from mailsuite.mailauth.dkim_fast import rsa_verify as rsa_verify
from mailsuite.mailauth.dns import DNSTempError
from mailsuite.mailauth.headers import Field, fields, header_section

__all__ = [
    "DKIMResult",
    "TxtRecord",
    "key_names",
    "quiet_logger",
    "rsa_verify",
    "verifier_for",
    "verify_dkim",
]

MIN_RSA_BITS = 1024

#: ``txt(name) -> first TXT record (strings joined) or None``; raises DNSTempError.
TxtRecord = Callable[[str], bytes | None]


#: dkimpy logs every failed signature at ERROR; those are results, not server errors.
_QUIET = logging.getLogger("mailsuite.mailauth.dkimpy")
_QUIET.propagate = False
_QUIET.addHandler(logging.NullHandler())


def quiet_logger() -> logging.Logger:
    return _QUIET


dkim.RSASSA_PKCS1_v1_5_verify = rsa_verify  # what dkimpy's DKIM and ARC verifiers call

#: dkimpy parses the key record (base64, ASN.1) at every verification; the same few keys sign
#: most mail, so parsed keys are kept by (name, record).  Failures are not kept (they raise).
dkim.evaluate_pk = functools.lru_cache(maxsize=1024)(dkim.evaluate_pk)


@dataclass(frozen=True)
class DKIMResult:
    """One signature's outcome: ``result`` per RFC 8601 2.7.1 (pass, fail, neutral, temperror,
    permerror); domain, selector and algorithm from its d=, s= and a= tags."""

    result: str
    domain: str
    selector: str
    algorithm: str
    reason: str = ""


class _KeyLookup:
    """dkimpy's ``dnsfunc`` that remembers whether the key lookup failed, or found nothing.

    Answers (and temporary failures) are kept per name for the message: the fast path and
    dkimpy, or two signatures with one selector, never ask twice, and a name server that
    does not answer costs one deadline, not one per attempt."""

    def __init__(self, txt: TxtRecord) -> None:
        self.txt = txt
        self.temporary = False
        self.record: bytes | None = None
        self._seen: dict[bytes, bytes | DNSTempError | None] = {}

    def __call__(self, name: bytes, timeout: float = 5) -> bytes | None:
        if name not in self._seen:
            try:
                self._seen[name] = self.txt(name.decode("ascii", "replace"))
            except DNSTempError as e:
                self._seen[name] = e
        found = self._seen[name]
        self.temporary = isinstance(found, DNSTempError)
        self.record = None if isinstance(found, DNSTempError) else found
        if isinstance(found, DNSTempError):
            raise dkim.DnsTimeoutError(str(found)) from None
        return found

    def parsed(self, name: bytes) -> tuple[Any, int, bytes] | None:
        """dkimpy's parse of the key at ``name`` (``evaluate_pk``, cached): ``(key, bits,
        k=)``, or None unless it is a plain e-mail key (the fast path then leaves the
        signature to dkimpy, which reports whatever is wrong)."""
        try:
            record = self(name)
            pk, bits, ktag, tlsrpt = dkim.evaluate_pk(name, record)
        except Exception:  # dkimpy raises several kinds for broken records
            return None
        if tlsrpt or ktag not in (b"rsa", b"ed25519"):
            return None
        return pk, bits, ktag


def verifier_for(cls: type[Any], message: bytes, hashes: BodyHashes | None = None) -> Any:
    """A dkimpy ``DKIM`` or ``ARC`` verifier that checks body hashes with
    :mod:`~mailsuite.mailauth.canon` (in slices, see there) instead of its own whole-body
    regular expressions.

    dkimpy is given the header section only; its ``verify_sig`` is wrapped on this instance so
    that a signature's ``bh=`` is compared with our hash of the real body first (a mismatch
    raises dkimpy's own "body hash mismatch"), and dkimpy then checks the header hash and the
    signature as usual.  Each (canonicalization, algorithm, l=) hash is computed once
    (``hashes``: shared with the fast path).
    """
    section = header_section(message)
    body = hashes if hashes is not None else BodyHashes(message[len(section) :])
    verifier = cls(section, logger=_QUIET, minkey=MIN_RSA_BITS)
    original = verifier.verify_sig

    def verify_sig(
        sig: dict[bytes, bytes], include_headers: Any, sig_header: Any, dnsfunc: Any
    ) -> Any:
        if b"bh" in sig:
            c = sig.get(b"c", b"simple/simple").split(b"/", 1)
            relaxed = (c[1] if len(c) > 1 else b"simple").strip().lower() == b"relaxed"
            algorithm = sig.get(b"a", b"")
            if algorithm not in HASH_ALGORITHMS:
                raise dkim.ValidationError(f"unknown signature algorithm: {algorithm!r}")
            try:
                limit = int(sig[b"l"]) if b"l" in sig else None
            except ValueError:
                raise dkim.ValidationError("l= is not a number") from None
            # rsa-sha256 and ed25519-sha256 share a hash
            computed = body.get(relaxed, HASH_ALGORITHMS[algorithm], limit)
            try:
                expected = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]))
            except ValueError:
                raise dkim.ValidationError("bh= is not base64") from None
            if computed != expected:
                raise dkim.ValidationError("body hash mismatch")
            sig = {k: v for k, v in sig.items() if k != b"bh"}
        return original(sig, include_headers, sig_header, dnsfunc)

    verifier.verify_sig = verify_sig
    return verifier


@functools.lru_cache(maxsize=64)
def _tags(raw_value: bytes) -> dict[bytes, bytes] | None:
    """A DKIM-Signature's tags (None when it is not a tag list).  Kept for the few signatures
    last seen: :func:`key_names` and :func:`verify_dkim` parse the same fields of a message
    one after the other.  Read-only for callers (the dict is shared)."""
    try:
        return parse_tags(raw_value)
    except (InvalidTagValueList, ValueError, IndexError):
        return None


def _value(raw: bytes) -> bytes:
    """A DKIM-Signature field's value as dkimpy and the fast path read it (CRLF line ends,
    as :func:`~mailsuite.mailauth.dkim_fast.parse_fields` gives it), so that one parse of
    its tags serves :func:`key_names`, :func:`verify_dkim` and the fast path."""
    value = raw.partition(b":")[2]
    if b"\r" not in value:  # the stored form
        return value.replace(b"\n", b"\r\n")
    return re.sub(rb"\r?\n", b"\r\n", value)


def _text(value: bytes | None) -> str:
    return (value or b"").decode("ascii", "replace").strip()


def key_names(
    section: bytes, max_signatures: int, split: Sequence[Field] | None = None
) -> list[str]:
    """The key record names (``s._domainkey.d``) of the first ``max_signatures`` DKIM
    signatures of a header section: what :func:`verify_dkim` will look up, to ask early.
    ``split``: the section's fields when the caller has split it already."""
    names: list[str] = []
    for f in fields(section) if split is None else split:
        if f.lname == "dkim-signature" and len(names) < max_signatures:
            tags = _tags(_value(f.raw)) or {}
            d, sel = _text(tags.get(b"d")), _text(tags.get(b"s"))
            if d and sel:
                names.append(f"{sel}._domainkey.{d}")
    return names


class _Message:
    """One message under verification: its fields as dkimpy reads them (None when only
    dkimpy can read them), its body hashes, and dkimpy's verifier, made only if needed."""

    def __init__(self, message: bytes, section: bytes) -> None:
        self.message = message
        self.hashes = BodyHashes(message[len(section) :])
        self.headers = parse_fields(section)
        self.signatures = (
            [h for h in self.headers if h[0].lower() == b"dkim-signature"]
            if self.headers is not None
            else None
        )
        self.where = index_fields(self.headers) if self.headers is not None else {}
        self._dkimpy: Any = None

    def dkimpy(self) -> Any:
        """dkimpy's verifier (raises dkimpy's error for a message it cannot parse)."""
        if self._dkimpy is None:
            self._dkimpy = verifier_for(dkim.DKIM, self.message, self.hashes)
        return self._dkimpy


def verify_dkim(
    message: bytes,
    txt: TxtRecord,
    max_signatures: int = 5,
    prefer: Callable[[str], bool] | None = None,
    split: Sequence[Field] | None = None,
) -> tuple[list[DKIMResult], int]:
    """Verify up to ``max_signatures`` DKIM signatures of ``message`` (CRLF or LF lines).

    ``prefer(d)`` marks domains to verify first (those aligned with the From domain).  Returns
    the results, in the order verified, and how many signatures were left unverified.  Blocks
    on DNS and does RSA: call it in a worker thread.

    Each signature goes to :func:`~mailsuite.mailauth.dkim_fast.verify_common` first, and to
    dkimpy when that does not give an answer (see there: the results are dkimpy's).
    ``split``: the message's header fields when the caller has split them already.
    """
    if split is None:
        split = fields(header_section(message))
    sig_fields = [f for f in split if f.lname == "dkim-signature"]
    if not sig_fields:
        return [], 0
    section = header_section(message)
    parsed = [_tags(_value(f.raw)) for f in sig_fields]
    order = list(range(len(sig_fields)))
    if prefer is not None:

        def preferred(i: int) -> bool:
            tags = parsed[i]
            return tags is not None and prefer(_text(tags.get(b"d")).lower())

        order.sort(key=lambda i: not preferred(i))
    chosen, skipped = order[:max_signatures], max(0, len(order) - max_signatures)
    msg = _Message(message, section)
    if msg.signatures is None or len(msg.signatures) != len(sig_fields):
        try:
            msg.dkimpy()
        except dkim.DKIMException as e:
            return [
                _result("permerror", parsed[i], f"message not parseable: {e}") for i in chosen
            ], skipped
    lookup = _KeyLookup(txt)
    return [_verify_one(msg, i, parsed[i], lookup) for i in chosen], skipped


def _result(result: str, tags: dict[bytes, bytes] | None, reason: str) -> DKIMResult:
    tags = tags or {}
    return DKIMResult(
        result,
        _text(tags.get(b"d")).lower(),
        _text(tags.get(b"s")),
        _text(tags.get(b"a")).lower(),
        reason,
    )


@functools.lru_cache(maxsize=256)
def _signs_from(h: bytes) -> bool:
    """Whether an h= list names the From field: RFC 6376 6.1.1 makes a signature that does
    not cover From a PERMFAIL ("From field not signed").  Split as dkimpy splits h=."""
    return any(n.lower() == b"from" for n in re.split(rb"\s*:\s*", h.strip()))


def _verify_one(
    msg: _Message, index: int, tags: dict[bytes, bytes] | None, lookup: _KeyLookup
) -> DKIMResult:
    if tags is None:
        return _result("permerror", None, "signature is not a tag list")
    if _text(tags.get(b"a")).lower() == "rsa-sha1":
        return _result("fail", tags, "rsa-sha1 is not accepted (RFC 8301)")
    if b"h" in tags and not _signs_from(tags[b"h"]):  # (dkimpy's verify does not check it)
        return _result("permerror", tags, "From field not signed")
    lookup.temporary, lookup.record = False, None  # what this signature's lookup finds
    if msg.headers is not None and msg.signatures is not None:
        sig = msg.signatures[index]
        fast = verify_common(
            msg.headers, msg.where, sig, _tags(sig[1]), msg.hashes, lookup.parsed, MIN_RSA_BITS
        )
        if fast is not None:
            return _result(fast[0], tags, fast[1])
    try:
        ok = msg.dkimpy().verify(idx=index, dnsfunc=lookup)
    except dkim.KeyFormatError as e:
        if "too small" in str(e):
            return _result("fail", tags, f"key shorter than {MIN_RSA_BITS} bits")
        return _result("permerror", tags, f"bad key: {e}")
    except dkim.ValidationError as e:
        if "body hash mismatch" in str(e):
            return _result("fail", tags, "body hash did not verify")
        return _result("permerror", tags, str(e))
    except dkim.DKIMException as e:
        return _result("permerror", tags, str(e))
    except Exception as e:  # a malformed signature must not lose the message
        return _result("permerror", tags, f"unverifiable: {type(e).__name__}")
    if ok:
        return _result("pass", tags, "")
    if lookup.temporary:
        return _result("temperror", tags, "key lookup did not get an answer")
    if lookup.record is None:
        return _result("permerror", tags, "no key for signature")
    name = f"{_text(tags.get(b's'))}._domainkey.{_text(tags.get(b'd'))}"
    try:
        dkim.evaluate_pk(name.encode(), lookup.record)
    except Exception as e:  # dkimpy raises several kinds for broken records
        return _result("permerror", tags, f"bad key record: {e}")
    return _result("fail", tags, "signature did not verify")
