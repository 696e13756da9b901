"""ARC (RFC 8617) chain validation with dkimpy; the result is recorded, never acted on.

ARC tells a receiver what earlier hops (a mailing list, a forwarder) saw before they changed
the message.  We only report it in Authentication-Results (``arc=pass/fail/none``): trusting a
sealer enough to override DMARC would need a list of trusted sealers, which we do not have.

Work is bounded like DKIM's: a chain longer than ``max_sets`` is failed without verifying
anything (RFC 8617 4.2.1 allows instances 1-50; real chains have a handful).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import dkim

from mailsuite.mailauth.dkim_verify import TxtRecord, verifier_for
from mailsuite.mailauth.dns import DNSTempError
from mailsuite.mailauth.headers import Field, fields, header_section

__all__ = ["ARCResult", "verify_arc"]

MAX_SETS = 10
_INSTANCE = re.compile(rb"(?:^|[\s;])i\s*=\s*(\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class ARCResult:
    """``result``: none (no ARC headers), pass, fail or temperror; ``sets`` the ARC sets seen."""

    result: str
    sets: int = 0
    reason: str = ""


#: The result for a message without ARC fields (nearly all mail), made once.
NO_ARC = ARCResult("none")
ARC_FIELDS = frozenset(("arc-seal", "arc-message-signature", "arc-authentication-results"))


def verify_arc(
    message: bytes,
    txt: TxtRecord,
    max_sets: int = MAX_SETS,
    split: Sequence[Field] | None = None,
) -> ARCResult:
    """Validate the ARC chain of ``message``.  Blocks on DNS: call it in a worker thread.
    ``split``: the message's header fields when the caller has split them already."""
    instances: set[int] = set()
    for f in fields(header_section(message)) if split is None else split:
        if f.lname in ARC_FIELDS:
            m = _INSTANCE.search(f.raw.partition(b":")[2])
            if m is None or len(m.group(1)) > 3:
                return ARCResult("fail", len(instances), "ARC header without a valid i= tag")
            instances.add(int(m.group(1)))
    if not instances:
        return NO_ARC
    if len(instances) > max_sets or max(instances) > 50:
        return ARCResult("fail", len(instances), f"more than {max_sets} ARC sets")
    temporary = False

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        nonlocal temporary
        try:
            return txt(name.decode("ascii", "replace"))
        except DNSTempError as e:
            temporary = True
            raise dkim.DnsTimeoutError(str(e)) from None

    try:
        cv, _results, reason = verifier_for(dkim.ARC, message).verify(dnsfunc=dnsfunc)
    except Exception as e:  # a malformed chain is a fail, never a lost message
        return ARCResult("fail", len(instances), f"unverifiable: {type(e).__name__} {e}")
    if cv == dkim.CV_Pass:
        return ARCResult("pass", len(instances))
    if cv == dkim.CV_None:
        return ARCResult("none", len(instances), str(reason))
    if temporary:
        return ARCResult("temperror", len(instances), "key lookup did not get an answer")
    return ARCResult("fail", len(instances), str(reason))
