"""The Authentication-Results header (RFC 8601): writing ours, removing forged ones.

One header at the top of the message, authserv-id = ``[server] hostname``, one clause per
method (spf, dkim per signature with header.d/header.s/header.a, dmarc with header.from, arc),
formatted by ``authres``.  Values that come from the sender (d=, s=, reasons) are reduced to
safe characters first: authres leaves a value containing "@" unquoted, so a signature with
``d=x@y; dkim=pass`` would otherwise write a clause of the attacker's choosing into our header.

RFC 8601 5: a header carrying our authserv-id that arrives with the message is a forgery (or
a loop) and is removed before ours is added; headers of other authserv-ids stay.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import authres
import authres.arc
import authres.dmarc

from mailsuite.mailauth.arc import ARCResult
from mailsuite.mailauth.dkim_verify import DKIMResult
from mailsuite.mailauth.dmarc import DMARCResult
from mailsuite.mailauth.headers import fields, strip_comments, unfold
from mailsuite.mailauth.spf import SPFResult

__all__ = ["authserv_id_of", "results_header", "strip_forged_results"]

NAME = "Authentication-Results"
#: (whole values: fullmatch, since "$" also matches before a final LF, which would end the
#: header line inside our field)
_DOMAINISH = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,252})")
_ADDRESS = re.compile(r"[!#-'*+\-/-9=?A-Z^-~.]{1,64}@[A-Za-z0-9.-]{1,253}")
_FEATURES = authres.FeatureContext(authres.dmarc, authres.arc)


def _token(value: str | None) -> str:
    """A domain or selector as it may appear in a property; anything else becomes 'invalid'."""
    if value and _DOMAINISH.fullmatch(value):
        return value
    return "invalid"


def _reason(text: str) -> str | None:
    """Printable ASCII, one line, no '@' (see the module docstring), at most 120 chars."""
    if not text:
        return None
    clean = re.sub(r"[^\x20-\x7e]", "?", " ".join(text.split())).replace("@", " at ")
    return clean[:120]


def _spf_clause(spf: SPFResult) -> authres.AuthenticationResult:
    reason = _reason(spf.reason) if spf.result not in ("pass", "none") else None
    if spf.identity == "helo":
        return authres.SPFAuthenticationResult(
            result=spf.result, reason=reason, smtp_helo=_token(spf.domain)
        )
    mailfrom = spf.address if _ADDRESS.fullmatch(spf.address) else _token(spf.domain)
    return authres.SPFAuthenticationResult(result=spf.result, reason=reason, smtp_mailfrom=mailfrom)


def _dkim_clause(r: DKIMResult) -> authres.AuthenticationResult:
    algorithm = r.algorithm if r.algorithm in ("rsa-sha256", "ed25519-sha256", "rsa-sha1") else None
    return authres.DKIMAuthenticationResult(
        result=r.result,
        reason=_reason(r.reason),
        header_d=_token(r.domain) if r.domain else None,
        header_s=_token(r.selector) if r.selector else None,
        header_a=algorithm,
    )


def _dmarc_clause(r: DMARCResult) -> authres.AuthenticationResult:
    comment = None
    if r.result in ("pass", "fail"):
        comment = f"p={r.policy} dis={r.disposition}"
    return authres.dmarc.DMARCAuthenticationResult(
        result=r.result,
        result_comment=comment,
        reason=_reason(r.reason),
        header_from=_token(r.author) if r.author else None,
    )


def _arc_clause(r: ARCResult) -> authres.AuthenticationResult:
    comment = f"sets={r.sets}" if r.sets else None
    return authres.arc.ARCAuthenticationResult(
        result=r.result, result_comment=comment, reason=_reason(r.reason)
    )


@functools.lru_cache(maxsize=1024)
def _clause(result: SPFResult | DKIMResult | DMARCResult | ARCResult) -> str:
    """One method's clause as text.  ``authres`` builds and formats objects with properties
    for every value (about 0.1 ms a clause, on the reactor thread); the results are frozen
    dataclasses and the same ones come back all the time (a sender's SPF pass, a domain's
    DKIM pass), so each distinct result is formatted once."""
    if isinstance(result, SPFResult):
        return str(_spf_clause(result))
    if isinstance(result, DKIMResult):
        return str(_dkim_clause(result))
    if isinstance(result, DMARCResult):
        return str(_dmarc_clause(result))
    return str(_arc_clause(result))


#: dkim=none (a message without signatures: most mail), formatted once.
_DKIM_NONE = str(authres.DKIMAuthenticationResult(result="none"))


def results_header(
    authserv_id: str,
    spf: SPFResult | None = None,
    dkim: Sequence[DKIMResult] | None = None,
    dmarc: DMARCResult | None = None,
    arc: ARCResult | None = None,
    dkim_unchecked: int = 0,
    linesep: bytes = b"\n",
) -> bytes:
    """The whole header field, one clause per continuation line, ending in ``linesep``.

    ``None`` leaves a method out (its check is turned off); ``dkim=[]`` reports dkim=none.
    """
    clauses: list[str] = []
    if spf is not None:
        clauses.append(_clause(spf))
    if dkim is not None:
        if not dkim:
            clauses.append(_DKIM_NONE)
        clauses.extend(_clause(r) for r in dkim)
        if dkim_unchecked:
            clauses.append(
                str(
                    authres.DKIMAuthenticationResult(
                        result="neutral",
                        reason=f"{dkim_unchecked} more signatures not verified (limit reached)",
                    )
                )
            )
    if dmarc is not None:
        clauses.append(_clause(dmarc))
    if arc is not None:
        clauses.append(_clause(arc))
    sep = linesep.decode("ascii")
    if not clauses:
        text = f"{NAME}: {authserv_id}; none"
    else:
        text = f"{NAME}: {authserv_id};" + ";".join(f"{sep}\t{c}" for c in clauses)
    return (text + sep).encode("ascii")


def authserv_id_of(value: str) -> str | None:
    """The authserv-id of an Authentication-Results value (RFC 8601 2.2): the first word
    after comments, before ';' or a version number; None when there is none."""
    text = strip_comments(value).strip()
    word = re.split(r"[\s;]", text, maxsplit=1)[0] if text else ""
    if len(word) >= 2 and word.startswith('"') and word.endswith('"'):
        word = word[1:-1]
    return word.lower().rstrip(".") or None


def strip_forged_results(section: bytes, authserv_id: str) -> tuple[bytes, int]:
    """``section`` without the Authentication-Results fields that carry ``authserv_id``
    (case-insensitive); returns the new section and how many fields were removed.  Everything
    else, the blank line that ends the section included, is kept byte for byte."""
    ours = authserv_id.lower().rstrip(".")
    kept: list[bytes] = []
    removed = 0
    consumed = 0
    for f in fields(section):
        consumed += len(f.raw)
        if f.lname == NAME.lower() and authserv_id_of(unfold(f.raw.partition(b":")[2])) == ours:
            removed += 1
            continue
        kept.append(f.raw)
    return b"".join(kept) + section[consumed:], removed


def parse_results(value: str) -> object:
    """Parse one of our headers back (for tests and tooling) with the same feature set."""
    return _FEATURES.parse(f"{NAME}: {value}")
