"""The common case of DKIM verification (RFC 6376, RFC 8463), done without dkimpy's Python.

dkimpy spends about half a millisecond of pure Python on each signature before any
cryptography happens: it splits the whole message into lines, canonicalizes every header field
of the message (three regular expressions each), and walks the header list once per signed
name.  With two signatures on a message (rsa-sha256 and ed25519-sha256, what a big provider
sends) that was most of the cost of checking inbound mail, paid in a worker thread that
shares the GIL with the reactor.

Here the same verification is done for the common case only: rsa-sha256 or ed25519-sha256,
simple or relaxed canonicalization, the usual tags, a key record dkimpy parses as RSA or
Ed25519 for e-mail.  The header section is split into fields with one regular expression
over the whole buffer, only the fields that a signature's h= selects are canonicalized, the
body hash comes from :mod:`~mailsuite.mailauth.canon` (shared with the dkimpy path, once per
canonicalization), RSA is checked by OpenSSL (:func:`~mailsuite.mailauth.dkim_verify
.rsa_verify`) and Ed25519 by libsodium through PyNaCl, the library dkimpy itself uses, so
that no edge case of either algorithm is judged differently.

Every rule is dkimpy's own: its tag parser and tag validation are called as they are, the
header selection and canonicalization rules are its (``select_headers``, ``RE_BTAG``, the
``From`` counted once more, ``strip()`` of relaxed values), and anything outside the common
case (an unknown tag or algorithm, z=, an odd c= or l=, a header line dkimpy would parse
differently, a key record it does not accept, a DNS problem, any exception) returns None:
the caller then asks dkimpy, so a result can never differ from what dkimpy says.  Only pass,
and the two fails whose meaning is certain (body hash, signature), are answered here.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import operator
import re
import time
from collections.abc import Callable
from typing import Any

import dkim
import dkim.crypto
import nacl.exceptions
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.util import DuplicateTag, InvalidTagSpec

from mailsuite.mailauth.canon import body_hash

__all__ = [
    "BodyHashes",
    "FastResult",
    "dkimpy_rsa_verify",
    "index_fields",
    "parse_fields",
    "parse_tags",
    "rsa_verify",
    "verify_common",
]

#: ``(result, reason)``: "pass" or "fail" with the reason dkimpy's path would give.
FastResult = tuple[str, str]

#: dkimpy's rfc822_parse splits lines on CRLF or LF and gives every line a CRLF back.
_LINE_END = re.compile(rb"\r?\n")
#: One field as dkimpy's parser reads it: a name up to the first colon (``[\x21-\x7e]+?:``),
#: the rest of its line and the continuation lines (first byte SP or HTAB).
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+):([^\n]*\r\n(?:[ \t][^\n]*\r\n)*)")
_H_SPLIT = re.compile(rb"\s*:\s*")  # dkimpy's split of h= (verify_headerprep)
_WSP_RUN = re.compile(rb"[\t ]+")  # dkimpy's compress_whitespace
#: dkimpy's ``RE_BTAG`` (the b= value, to be emptied; RFC 6376 3.7), written so that Python's
#: engine does not enter three nested groups per base64 character (60 us on a 2048-bit
#: signature): its FWS, ``(?:(?:\s*\r?\n)?\s+)?``, matches exactly the runs of ``\s``, and
#: ``(?:FWS [b64])*`` exactly the runs of ``\s* [b64]+``; same matches (a test compares them).
BTAG = re.compile(rb"([;\s]b\s*=)(?:\s*[a-zA-Z0-9+/=]+)*(?:\r?\n\Z)?")

#: c= values handled here -> (relaxed header canonicalization, relaxed body canonicalization)
_TAG_NAME = operator.itemgetter(1)  # BTAG's replacement: its group 1 (no template to expand)

_CANON = {
    b"simple": (False, False),
    b"relaxed": (True, False),
    b"simple/simple": (False, False),
    b"simple/relaxed": (False, True),
    b"relaxed/simple": (True, False),
    b"relaxed/relaxed": (True, True),
}
#: a= -> the key type (k=) that verifies it
_ALGORITHMS = {b"rsa-sha256": b"rsa", b"ed25519-sha256": b"ed25519"}
#: RFC 6376 3.5 tags; anything else (z= included) goes to dkimpy
_TAGS = frozenset((b"v", b"a", b"b", b"bh", b"c", b"d", b"h", b"i", b"l", b"q", b"s", b"t", b"x"))


_PREHASHED = {"sha256": Prehashed(hashes.SHA256()), "sha1": Prehashed(hashes.SHA1())}
#: dkimpy's own (pure Python) check, kept before ``dkim_verify`` replaces it in dkimpy
dkimpy_rsa_verify = dkim.crypto.RSASSA_PKCS1_v1_5_verify


@functools.lru_cache(maxsize=256)
def _public_key(exponent: int, modulus: int) -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(exponent, modulus).public_key()


def rsa_verify(hash: Any, signature: bytes, public_key: dict[str, int]) -> bool:
    """dkimpy's ``RSASSA_PKCS1_v1_5_verify`` (RFC 8017 8.2.2: ``hash`` a hashlib object or
    dkimpy's wrapper of one, ``public_key`` dkimpy's parsed key) done by OpenSSL.  Anything
    OpenSSL will not take (an odd digest, a key it refuses to load) is left to dkimpy's own
    code, so the answers are dkimpy's in every case."""
    prehashed = _PREHASHED.get(str(getattr(hash, "name", "")).lower())
    try:
        modulus, exponent = public_key["modulus"], public_key["publicExponent"]
        size = (modulus.bit_length() + 7) // 8
        # 30: the most DigestInfo and padding add (RFC 8017 9.2); dkimpy raises for a key
        # too short to hold them, and keeps that answer
        if prehashed is None or len(signature) > size or size < len(hash.digest()) + 30:
            raise ValueError("not for OpenSSL")
        key = _public_key(exponent, modulus)
    except (KeyError, TypeError, ValueError, UnsupportedAlgorithm):
        return bool(dkimpy_rsa_verify(hash, signature, public_key))
    try:  # a signature shorter than the modulus is an integer without its leading zeros
        key.verify(signature.rjust(size, b"\0"), hash.digest(), padding.PKCS1v15(), prehashed)
    except InvalidSignature:
        return False
    return True


def parse_tags(tag_list: bytes) -> dict[bytes, bytes]:
    """dkimpy's ``parse_tag_value`` (RFC 6376 3.2), same answers and same exceptions, without
    a regular expression per tag (its key check, ``^[a-zA-Z](\\w)*``, only asks that the key
    start with an ASCII letter, which ``bytes.isalpha`` tells)."""
    tags: dict[bytes, bytes] = {}
    specs = tag_list.strip().split(b";")
    if not specs[-1]:  # a trailing semicolon is allowed
        specs.pop()
    for spec in specs:
        key, equals, value = spec.partition(b"=")
        key = key.strip()
        if not equals or not key[:1].isalpha():
            raise InvalidTagSpec(spec)
        if key in tags:
            raise DuplicateTag(key)
        tags[key] = value.strip()
    return tags


def parse_fields(section: bytes) -> list[tuple[bytes, bytes]] | None:
    """The header fields of ``section`` as dkimpy's ``rfc822_parse`` gives them, ``(name,
    value after the colon with CRLF line ends)``; None when dkimpy would read the section
    any other way (a line that is neither a field nor a continuation, an mbox "From " line,
    no empty line at the end): the caller then leaves the message to dkimpy."""
    if b"\r" not in section:  # the stored form (LF line ends)
        section = section.replace(b"\n", b"\r\n")
    elif section.count(b"\n") != section.count(b"\r\n"):
        section = _LINE_END.sub(b"\r\n", section)
    if not section.endswith(b"\r\n\r\n"):
        return None
    end = len(section) - 2
    out: list[tuple[bytes, bytes]] = []
    pos = 0
    match = _FIELD.match
    while pos < end:
        m = match(section, pos, end)
        if m is None:
            return None
        out.append((m[1], m[2]))
        pos = m.end()
    return out


class BodyHashes:
    """Body hashes of one message by (relaxed, hash function, l=), each computed once and
    shared by every signature and by the dkimpy path (see ``verifier_for``)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self._done: dict[tuple[bool, Any, int | None], bytes] = {}

    def get(self, relaxed: bool, hasher: Callable[[], Any], limit: int | None) -> bytes:
        key = (relaxed, hasher, limit)
        found = self._done.get(key)
        if found is None:
            found = self._done[key] = body_hash(self.body, relaxed, hasher, limit)
        return found


def index_fields(headers: list[tuple[bytes, bytes]]) -> dict[bytes, list[int]]:
    """Where each field name (lower case) occurs in ``headers``, top to bottom: made once
    per message for every signature's :func:`_select`."""
    where: dict[bytes, list[int]] = {}
    for i, (name, _value) in enumerate(headers):
        where.setdefault(name.lower(), []).append(i)
    return where


def _select(
    headers: list[tuple[bytes, bytes]], where: dict[bytes, list[int]], names: list[bytes]
) -> list[tuple[bytes, bytes]]:
    """dkimpy's ``select_headers``: each h= name takes the lowest field of that name not
    taken yet (RFC 6376 5.4.2), names with no field left take nothing."""
    taken: dict[bytes, int] = {}
    out = []
    for name in names:
        found = where.get(name)
        if found:
            k = taken.get(name, len(found)) - 1
            if k >= 0:
                out.append(headers[found[k]])
                taken[name] = k
    return out


_MANDATORY = (b"v", b"a", b"b", b"bh", b"d", b"h", b"s")
_BASE64 = re.compile(rb"[\s0-9A-Za-z+/]+[\s=]*$")  # dkimpy's test of b= (and ours of bh=)
_SPECIALS = re.compile(rb"[\(\)<>\[\]:;@\\,]")
_SLOP = 36000  # dkimpy's leeway for t= and x=: 10 hours


def _plain(tags: dict[bytes, bytes]) -> bool:
    """Whether dkimpy's ``validate_signature_fields`` certainly accepts these tags (RFC 6376
    3.5), checked a little more strictly than it does (False: leave the signature to dkimpy,
    which says what is wrong).  Its checks, without its regular expression per tag."""
    if not all(t in tags for t in _MANDATORY) or tags[b"v"] != b"1":
        return False
    for tag in (b"b", b"bh"):  # dkimpy checks b='s characters for both (and each length)
        value = tags[tag]
        if _BASE64.match(value) is None or len(_unspaced(value)) % 4:
            return False
    d = tags[b"d"]
    if not d.isascii() or _SPECIALS.search(d) is not None:
        return False
    i = tags.get(b"i")
    if i is not None and not (
        len(i) > len(d) and i.lower().endswith(d.lower()) and i[-len(d) - 1] in b"@."
    ):
        return False
    length = tags.get(b"l")
    if length is not None and not (length.isdigit() and len(length) <= 76):
        return False
    if tags.get(b"q", b"dns/txt") != b"dns/txt":
        return False
    t, x = tags.get(b"t"), tags.get(b"x")
    if (t is not None and not t.isdigit()) or (x is not None and not x.isdigit()):
        return False
    now = int(time.time())
    if t is not None and int(t) > now + _SLOP:
        return False
    return x is None or (int(x) >= now - _SLOP and (not t or int(x) >= int(t)))


@functools.lru_cache(maxsize=128)
def _relaxed(name: bytes, value: bytes) -> bytes:
    """RFC 6376 3.4.2 as dkimpy does it: lower-case name, unfold (``value`` has only CRLF
    line ends, see :func:`parse_fields`), runs of SP/HTAB to one SP, ``strip()`` of the
    value.  The substitution runs only when there is something to change.  Kept for the
    fields last seen: the signatures of one message mostly sign the same fields."""
    value = value.replace(b"\r\n", b"")
    if b"\t" in value or b"  " in value:
        value = _WSP_RUN.sub(b" ", value)
    return name.lower() + b":" + value.strip() + b"\r\n"


def _unspaced(value: bytes) -> bytes:
    """``re.sub(rb"\\s+", b"", value)``: ``bytes.split()`` splits on the same six bytes."""
    return b"".join(value.split())


def verify_common(
    headers: list[tuple[bytes, bytes]],
    where: dict[bytes, list[int]],
    sig: tuple[bytes, bytes],
    tags: dict[bytes, bytes] | None,
    body: BodyHashes,
    key: Callable[[bytes], tuple[Any, int, bytes] | None],
    min_bits: int,
) -> FastResult | None:
    """Verify the signature field ``sig`` (one of ``headers``, both from :func:`parse_fields`;
    ``where`` from :func:`index_fields`) whose tags are ``tags`` (dkimpy's parse of its
    value, None if that failed), or None to have dkimpy do it.  ``key(name)`` gives dkimpy's
    parsed key ``(pk, bits, k=)`` for a record name ("s._domainkey.d."), or None when the
    lookup or the record is not the plain case."""
    try:
        return _verify(headers, where, sig, tags, body, key, min_bits)
    except Exception:  # whatever it is, dkimpy's answer is the one to give
        return None


def _verify(
    headers: list[tuple[bytes, bytes]],
    where: dict[bytes, list[int]],
    sig: tuple[bytes, bytes],
    tags: dict[bytes, bytes] | None,
    body: BodyHashes,
    key: Callable[[bytes], tuple[Any, int, bytes] | None],
    min_bits: int,
) -> FastResult | None:
    if tags is None or not _TAGS.issuperset(tags):
        return None
    kind = _ALGORITHMS.get(tags.get(b"a", b""))
    canon = _CANON.get(tags.get(b"c", b"simple/simple"))
    if kind is None or canon is None:
        return None
    if not _plain(tags):
        return None
    limit = int(tags[b"l"]) if b"l" in tags else None
    relaxed_head, relaxed_body = canon
    # the body first, like the dkimpy path: a body that changed is a fail whatever the key
    expected = base64.b64decode(_unspaced(tags[b"bh"]))
    if body.get(relaxed_body, hashlib.sha256, limit) != expected:
        return "fail", "body hash did not verify"
    found = key(tags[b"s"] + b"._domainkey." + tags[b"d"] + b".")
    if found is None or found[2] != kind:
        return None
    pk, bits, _k = found

    names = [n.lower() for n in _H_SPLIT.split(tags[b"h"])]
    if b"from" in names:
        names.append(b"from")  # dkimpy's answer to a second From field (its bug#644046)
    sig_name, sig_value = sig
    unsigned = BTAG.sub(_TAG_NAME, sig_value)  # b= emptied (RFC 6376 3.7)
    selected = _select(headers, where, names)
    if relaxed_head:
        data = b"".join(_relaxed(n, v) for n, v in selected)
        data += _relaxed(sig_name, unsigned).rstrip()
    else:
        data = b"".join(n + b":" + v for n, v in selected) + sig_name + b":" + unsigned.rstrip()
    digest = hashlib.sha256(data)
    signature = base64.b64decode(_unspaced(tags[b"b"]))
    if kind == b"rsa":
        if not rsa_verify(digest, signature, pk):
            return "fail", "signature did not verify"
        if bits < min_bits:
            return "fail", f"key shorter than {min_bits} bits"
        return "pass", ""
    try:
        pk.verify(digest.digest(), signature)
    except nacl.exceptions.BadSignatureError:
        return "fail", "signature did not verify"
    return "pass", ""
