"""The end-of-data checks that connect mail authentication (issue 12) to the SMTP policy.

Two checks, built on :class:`mailsuite.mailauth.service.MailAuth` (``runtime.mail_auth``):

* :class:`MailAuthCheck` (MX listener): for sessions that :meth:`MailAuth.applies_to` (not
  authenticated, not from ``[relay] trusted_networks``) it runs SPF, DKIM, ARC and DMARC and
  maps the verdict: reject -> ``550 5.7.26`` (RFC 7372 3.2), nothing stored; quarantine -> the
  recipients' Junk folder; accept -> our Authentication-Results field on top (RFC 8601).  In
  every session, checked or not, Authentication-Results fields that claim our authserv-id are
  removed (RFC 8601 5: a field of ours can only come from us).  DNS temporary errors never
  reject: the inbound checker reports them as temperror and delivers.
* :class:`DKIMSigning` (submission, and trusted-network relays on the MX listener): the
  ``DKIM-Signature:`` fields from :meth:`MailAuth.sign` (RFC 6376, RFC 8463) for mail whose
  From domain is one of ours.  The end-of-data hook runs before the message is made durable
  (queue entry and local copies alike) and before the 250, so every copy carries the same
  signature.
"""

from __future__ import annotations

from typing import Any

from mailsuite.mailauth.headers import fields, from_domains, unfold
from mailsuite.mailauth.results import NAME as RESULTS_NAME
from mailsuite.mailauth.results import authserv_id_of
from mailsuite.smtp import replies as R
from mailsuite.smtp.policy import ACCEPT, Check, Facts, Lookup, ReceivedMessage, Verdict

__all__ = ["DKIMSigning", "MailAuthCheck", "forged_results", "header_texts"]


def forged_results(headers: bytes, authserv_id: str) -> tuple[bytes, ...]:
    """The Authentication-Results fields of ``headers`` (the stored section, LF line ends)
    that carry ``authserv_id``, in the form :attr:`Verdict.remove` wants (folded lines kept,
    no final line end).  Same matching as :func:`~mailsuite.mailauth.results
    .strip_forged_results`: authserv-id compared case-insensitively, trailing dot ignored."""
    name = RESULTS_NAME.lower()
    if name.encode("ascii") not in headers.lower():
        return ()  # nearly all mail: no field to look at (the split below costs ~60 us)
    ours = authserv_id.lower().rstrip(".")
    out: list[bytes] = []
    for f in fields(headers if headers.endswith(b"\n") else headers + b"\n"):
        if f.lname == name and authserv_id_of(unfold(f.raw.partition(b":")[2])) == ours:
            out.append(f.raw.rstrip(b"\n"))
    return tuple(out)


def header_texts(block: bytes) -> tuple[str, ...]:
    """Header fields (LF line ends, as :class:`MailAuth` returns them) as the complete
    ``Name: value`` texts :attr:`Verdict.prepend` wants, one per field."""
    if not block:
        return ()
    section = block if block.endswith(b"\n") else block + b"\n"
    return tuple(f.raw.decode("utf-8").rstrip("\n") for f in fields(section))


class DKIMSigning(Check):
    """Sign mail submitted by a user, or relayed by a trusted network (``trusted_only``: the
    MX profile, where unauthenticated mail from anyone else is inbound, never signed).  Only
    a From domain in our directory is signed, and only when it has a key (else
    :meth:`MailAuth.sign` gives nothing)."""

    def __init__(self, mail_auth: Any, lookup: Lookup, trusted_only: bool) -> None:
        self.mail_auth = mail_auth
        self.lookup = lookup
        self.trusted_only = trusted_only

    def applies(self, facts: Facts) -> bool:
        if facts.user is not None:
            return True
        return self.trusted_only and facts.trusted

    async def end_of_data(self, facts: Facts, message: ReceivedMessage) -> Verdict:
        if not self.applies(facts):
            return ACCEPT
        return await self.sign(message)

    def settle(self, facts: Facts, message: ReceivedMessage) -> Verdict | None:
        """Nothing to sign is known at once (not a session we sign for, or a From domain
        that is not ours); a signature needs the message (None)."""
        if not self.applies(facts) or self._domain(message) is None:
            return ACCEPT
        return None

    def _domain(self, message: ReceivedMessage) -> str | None:
        """The From domain to sign for: the first author's, when it is one of ours."""
        authors = from_domains(message.headers) or []
        if not authors or not self.lookup.is_local_domain(authors[0]):
            return None
        return authors[0]

    async def sign(self, message: ReceivedMessage) -> Verdict:
        domain = self._domain(message)
        if domain is None:
            return ACCEPT
        data = await message.read()
        signatures = await self.mail_auth.sign(data, domain)
        return Verdict(prepend=header_texts(signatures)) if signatures else ACCEPT


class MailAuthCheck(Check):
    """The MX listener's mail authentication (see the module docstring); ``signing`` signs
    what trusted networks relay through it."""

    def __init__(self, mail_auth: Any, signing: DKIMSigning | None = None) -> None:
        self.mail_auth = mail_auth
        self.authserv_id: str = mail_auth.inbound.authserv_id
        self.signing = signing
        self._settled: tuple[ReceivedMessage, Verdict] | None = None  # see settle()

    def settle(self, facts: Facts, message: ReceivedMessage) -> Verdict | None:
        """Known at once: a session the checks do not apply to (authenticated, a trusted
        network, every check off) with nothing to sign, where only our forged fields come
        out; or a message in memory that :meth:`MailAuth.check_now` judges from cached DNS
        answers (most inbound mail: its senders' records are in the cache)."""
        if self.mail_auth.applies_to(facts.client_ip, facts.user is not None):
            if message.data is None:
                return None
            try:
                checked = self.mail_auth.check_now(
                    message.data, message.sender, facts.helo or "", facts.client_ip
                )
            except Exception:  # end_of_data then runs it in the pool, and logs what fails
                return None
            if checked is None:
                return None
            verdict = self._judged(checked, forged_results(message.headers, self.authserv_id))
            # if a later check of the policy cannot settle, end_of_data runs for this
            # message: it takes this verdict instead of checking the message again
            self._settled = (message, verdict)
            return verdict
        if self.signing is not None and self.signing.settle(facts, message) is None:
            return None
        forged = forged_results(message.headers, self.authserv_id)
        return Verdict(remove=forged) if forged else ACCEPT

    async def end_of_data(self, facts: Facts, message: ReceivedMessage) -> Verdict:
        settled, self._settled = self._settled, None
        if settled is not None and settled[0] is message:
            return settled[1]
        forged = forged_results(message.headers, self.authserv_id)
        if not self.mail_auth.applies_to(facts.client_ip, facts.user is not None):
            if self.signing is not None and self.signing.applies(facts):
                signed = await self.signing.sign(message)
                return Verdict(prepend=signed.prepend, remove=forged)
            return Verdict(remove=forged) if forged else ACCEPT
        data = await message.read()
        verdict = await self.mail_auth.check_message(
            data,
            message.sender,
            facts.helo or "",
            facts.client_ip,
            inline=message.data is None,  # else settle() tried it at once already
        )
        return self._judged(verdict, forged)

    def _judged(self, verdict: Any, forged: tuple[bytes, ...]) -> Verdict:
        """The SMTP verdict for mail authentication's :class:`~mailsuite.mailauth.inbound
        .Verdict`; ``forged``: our authserv-id's fields the client sent, to remove."""
        if verdict.action == "reject":
            reply = verdict.reply or R.AUTH_POLICY_REJECT
            return Verdict(reply=reply, reason="DMARC fail, policy reject")
        header = verdict.header.decode("utf-8").rstrip("\n")
        return Verdict(
            junk=verdict.action == "quarantine",
            prepend=(header,),
            remove=forged,
            reason=f"mail auth: {verdict.action}",
        )
