"""DKIM verification (RFC 6376, RFC 8463 ed25519) with dkimpy, bounded per message.

Every DKIM-Signature is a cost the sender chooses (a DNS query and an RSA operation), so at
most ``max_signatures`` are verified (RFC 6376 6.1 allows a limit); signatures whose d= could
align with the From domain go first, so padding a message with foreign signatures cannot push
the one DMARC needs out of the window.  rsa-sha1 signatures and RSA keys under 1024 bits are
reported as fail (RFC 8301 3.1, 3.2).

dkimpy reports a missing key, a DNS timeout and a bad signature all as "False", so the DNS
function given to it notes what happened and the result is classified from that: temperror
(DNS did not answer), permerror (no key, a broken key record or signature), fail.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dkim
from dkim.crypto import HASH_ALGORITHMS
from dkim.util import InvalidTagValueList, parse_tag_value

from mailsuite.mailauth.canon import body_hash
from mailsuite.mailauth.dns import DNSTempError
from mailsuite.mailauth.headers import fields, header_section

__all__ = ["DKIMResult", "TxtRecord", "quiet_logger", "verifier_for", "verify_dkim"]

MIN_RSA_BITS = 1024

#: ``txt(name) -> first TXT record (strings joined) or None``; raises DNSTempError.
TxtRecord = Callable[[str], bytes | None]


#: dkimpy logs every failed signature at ERROR; those are results, not server errors.
_QUIET = logging.getLogger("mailsuite.mailauth.dkimpy")
_QUIET.propagate = False
_QUIET.addHandler(logging.NullHandler())


def quiet_logger() -> logging.Logger:
    return _QUIET


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
    """dkimpy's ``dnsfunc`` that remembers whether the key lookup failed, or found nothing."""

    def __init__(self, txt: TxtRecord) -> None:
        self.txt = txt
        self.temporary = False
        self.record: bytes | None = None

    def __call__(self, name: bytes, timeout: float = 5) -> bytes | None:
        self.temporary, self.record = False, None
        try:
            self.record = self.txt(name.decode("ascii", "replace"))
        except DNSTempError as e:
            self.temporary = True
            raise dkim.DnsTimeoutError(str(e)) from None
        return self.record


def verifier_for(cls: type[Any], message: bytes) -> Any:
    """A dkimpy ``DKIM`` or ``ARC`` verifier that checks body hashes with
    :mod:`~mailsuite.mailauth.canon` (in slices, see there) instead of its own whole-body
    regular expressions.

    dkimpy is given the header section only; its ``verify_sig`` is wrapped on this instance so
    that a signature's ``bh=`` is compared with our hash of the real body first (a mismatch
    raises dkimpy's own "body hash mismatch"), and dkimpy then checks the header hash and the
    signature as usual.  Each (canonicalization, algorithm, l=) hash is computed once.
    """
    section = header_section(message)
    body = message[len(section):]
    verifier = cls(section, logger=_QUIET, minkey=MIN_RSA_BITS)
    original = verifier.verify_sig
    hashes: dict[tuple[bool, bytes, int | None], bytes] = {}

    def verify_sig(sig: dict[bytes, bytes], include_headers: Any, sig_header: Any,
                   dnsfunc: Any) -> Any:
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
            key = (relaxed, algorithm, limit)
            if key not in hashes:
                hashes[key] = body_hash(body, relaxed, HASH_ALGORITHMS[algorithm], limit)
            try:
                expected = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]))
            except ValueError:
                raise dkim.ValidationError("bh= is not base64") from None
            if hashes[key] != expected:
                raise dkim.ValidationError("body hash mismatch")
            sig = {k: v for k, v in sig.items() if k != b"bh"}
        return original(sig, include_headers, sig_header, dnsfunc)

    verifier.verify_sig = verify_sig
    return verifier


def _tags(raw_value: bytes) -> dict[bytes, bytes] | None:
    try:
        tags: dict[bytes, bytes] = parse_tag_value(raw_value)
        return tags
    except (InvalidTagValueList, ValueError, IndexError):
        return None


def _text(value: bytes | None) -> str:
    return (value or b"").decode("ascii", "replace").strip()


def verify_dkim(
    message: bytes,
    txt: TxtRecord,
    max_signatures: int = 5,
    prefer: Callable[[str], bool] | None = None,
) -> tuple[list[DKIMResult], int]:
    """Verify up to ``max_signatures`` DKIM signatures of ``message`` (CRLF or LF lines).

    ``prefer(d)`` marks domains to verify first (those aligned with the From domain).  Returns
    the results, in the order verified, and how many signatures were left unverified.  Blocks
    on DNS and does RSA: call it in a worker thread.
    """
    section = header_section(message)
    sig_fields = [f for f in fields(section) if f.lname == "dkim-signature"]
    if not sig_fields:
        return [], 0
    parsed = [_tags(f.raw.partition(b":")[2]) for f in sig_fields]
    order = list(range(len(sig_fields)))
    if prefer is not None:
        order.sort(key=lambda i: not (parsed[i] is not None and prefer(
            _text(parsed[i].get(b"d")).lower())))  # type: ignore[union-attr]
    chosen, skipped = order[:max_signatures], max(0, len(order) - max_signatures)
    try:
        verifier = verifier_for(dkim.DKIM, message)
    except dkim.DKIMException as e:
        return [_result("permerror", parsed[i], f"message not parseable: {e}") for i in chosen], \
            skipped
    return [_verify_one(verifier, i, parsed[i], txt) for i in chosen], skipped


def _result(result: str, tags: dict[bytes, bytes] | None, reason: str) -> DKIMResult:
    tags = tags or {}
    return DKIMResult(result, _text(tags.get(b"d")).lower(), _text(tags.get(b"s")),
                      _text(tags.get(b"a")).lower(), reason)


def _verify_one(verifier: dkim.DKIM, index: int, tags: dict[bytes, bytes] | None,
                txt: TxtRecord) -> DKIMResult:
    if tags is None:
        return _result("permerror", None, "signature is not a tag list")
    if _text(tags.get(b"a")).lower() == "rsa-sha1":
        return _result("fail", tags, "rsa-sha1 is not accepted (RFC 8301)")
    lookup = _KeyLookup(txt)
    try:
        ok = verifier.verify(idx=index, dnsfunc=lookup)
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
