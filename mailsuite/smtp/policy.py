"""Which mail an SMTP listener takes: a list of checks with one hook per SMTP stage.

In maddy's style (DESIGN.md): a :class:`Check` may look at the connection, the HELO name, the
sender, each recipient, the header section and the whole message, and answers each with a
:class:`Verdict`: go on, or refuse with a reply.  The first refusal in list order wins.  A
:class:`Profile` is a list of checks plus the profile's AUTH rules: the MX profile (port 25)
and the submission profile (587/465, RFC 6409) differ only in their profile, not in code.

Stages and when the session runs them (:mod:`mailsuite.smtp.session`):

=================  ===========================================================  ==========
hook               when                                                         result
=================  ===========================================================  ==========
``connect``        before the greeting; a refusal replaces it and closes        Verdict
``helo``           on EHLO/HELO, after the syntax check                         Verdict
``mail``           on MAIL, after the path and its parameters were parsed       Verdict
``rcpt``           on RCPT, for a syntactically valid recipient                 Verdict
``data_headers``   when the data has ended, on the stored header section        Verdict
``end_of_data``    then, asynchronously, on the whole message (mail auth)       awaitable
=================  ===========================================================  ==========

``end_of_data`` is where the mail-authentication checks (SPF, DKIM, DMARC, ARC: issue 12)
plug in.  It is a coroutine (no Twisted here: the adapter turns it into a Deferred), it may
read the stored message (:attr:`ReceivedMessage.read`), and its verdict can refuse (e.g.
``550 5.7.26``, :data:`mailsuite.smtp.replies.AUTH_POLICY_REJECT`), ask for delivery into the
recipients' Junk folder (:attr:`Verdict.junk`), add header fields at the top of the message
(:attr:`Verdict.prepend`, e.g. ``Authentication-Results:`` or ``DKIM-Signature:``) and take
fields out (:attr:`Verdict.remove`, e.g. forged Authentication-Results).  An exception in a
check is a temporary failure (451 4.3.0), never a silent accept.

The SIZE limit (RFC 1870) is not a check: it is part of the protocol (advertised in EHLO,
checked on MAIL's SIZE parameter and while the data streams in), so it lives in the session.
Refusals at MAIL and RCPT with a 5xx code count towards the session's error limit.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from email.utils import getaddresses
from typing import Protocol

from mailsuite.config import Config
from mailsuite.directory import Resolution, split_address
from mailsuite.smtp import replies as R
from mailsuite.smtp.address import Path
from mailsuite.smtp.data import MAX_HEADER_CAPTURE
from mailsuite.smtp.replies import Reply
from mailsuite.store.quota import UsageCache

# --------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Verdict:
    """A check's answer.  ``reply`` None lets the command (or message) through; a reply
    refuses it with that reply.  ``reason`` is logged, never sent.

    Only end-of-data verdicts may carry the rest:

    * ``junk``: deliver the local copies into the recipients' Junk folder, not the INBOX;
    * ``prepend``: header fields to add at the top of the message (just below our Received
      field), in order; each one complete ``Name: value`` text, folded lines joined with
      ``"\\n\\t"`` or ``"\\n "``, without a line end (e.g. Authentication-Results);
    * ``remove``: fields to take out of the header section, each exactly as it appears in
      :attr:`ReceivedMessage.headers` (folded lines included, no line end), e.g. forged
      Authentication-Results that claim our authserv-id (RFC 8601 5);
    * ``disconnect``: drop the message and close the connection without any reply (the
      sandbox's ``drop@`` fault: what a client sees when a server dies after the data).

    A refusal with ``421`` closes the connection after the reply (RFC 5321 3.8).
    """

    reply: Reply | None = None
    reason: str | None = None
    junk: bool = False
    prepend: tuple[str, ...] = ()
    remove: tuple[bytes, ...] = ()
    disconnect: bool = False

    @property
    def refused(self) -> bool:
        return self.reply is not None


ACCEPT = Verdict()


def refuse(reply: Reply, reason: str | None = None) -> Verdict:
    return Verdict(reply=reply, reason=reason)


# --------------------------------------------------------------------------- what checks see


class Facts(Protocol):
    """What a check may know about the session (the session object provides it)."""

    @property
    def client_ip(self) -> str: ...

    @property
    def helo(self) -> str | None: ...

    @property
    def tls(self) -> bool: ...

    @property
    def user(self) -> str | None:
        """The authenticated user (canonical address), None before a successful AUTH."""

    @property
    def trusted(self) -> bool:
        """The client address is in ``[relay] trusted_networks``."""

    @property
    def recipients(self) -> Sequence[str]:
        """Recipient addresses accepted so far in the transaction."""


class Lookup(Protocol):
    """The directory as the session and the checks use it (:class:`mailsuite.directory
    .Directory` in the server, a plain object in tests).  Calls are synchronous: the
    directory is a small JSON file re-read only when it changes."""

    def is_local_domain(self, domain: str) -> bool: ...

    def resolve(self, address: str) -> Resolution: ...

    def domains(self) -> list[str]: ...

    def may_send_as(self, user: str, address: str) -> bool: ...


class Recipient:
    """One syntactically valid RCPT.  The directory is asked only when a check needs the
    answer (a refused 101st recipient costs no lookup)."""

    def __init__(self, path: Path, lookup: Lookup) -> None:
        self.path = path
        self.address = path.address
        self._lookup = lookup
        self._local_domain: bool | None = None
        self._resolution: Resolution | None = None

    @property
    def local_domain(self) -> bool:
        if self._local_domain is None:
            self._local_domain = self._lookup.is_local_domain(split_address(self.address)[1])
        return self._local_domain

    @property
    def resolution(self) -> Resolution:
        """Where the mail goes; every address outside our domains is simply remote."""
        if self._resolution is None:
            if self.local_domain:
                self._resolution = self._lookup.resolve(self.address)
            else:
                self._resolution = Resolution(remote=[self.address])
        return self._resolution


@dataclass(frozen=True)
class ReceivedMessage:
    """The message as the end-of-data checks see it.  ``headers`` is the stored header
    section (LF line ends, without the blank line; at most ``MAX_HEADER_CAPTURE`` bytes),
    ``size`` the stored size.  ``read()`` gives the whole message as received (without our
    trace fields), once it is on disk: the end-of-data hook is the only place to call it.
    ``data`` is the same bytes when they are in memory anyway (a small message, written to
    disk only with its delivery): :meth:`Check.settle` may judge from them at once."""

    sender: str
    recipients: tuple[str, ...]
    headers: bytes
    size: int
    read: Callable[[], Awaitable[bytes]]
    data: bytes | None = None


# --------------------------------------------------------------------------- checks


class Check:
    """A policy check.  Every hook accepts; a check overrides the stages it cares about
    (the :class:`Policy` calls only overridden hooks, so a check costs nothing elsewhere)."""

    def connect(self, facts: Facts) -> Verdict:
        return ACCEPT

    def helo(self, facts: Facts, name: str) -> Verdict:
        return ACCEPT

    def mail(self, facts: Facts, sender: Path) -> Verdict:
        return ACCEPT

    def rcpt(self, facts: Facts, rcpt: Recipient) -> Verdict:
        return ACCEPT

    def data_headers(self, facts: Facts, headers: bytes) -> Verdict:
        return ACCEPT

    async def end_of_data(self, facts: Facts, message: ReceivedMessage) -> Verdict:
        return ACCEPT

    def settle(self, facts: Facts, message: ReceivedMessage) -> Verdict | None:
        """The :meth:`end_of_data` verdict when it is known at once, without reading the
        message or waiting on anything (e.g. mail authentication for a session it does not
        check); None: run :meth:`end_of_data`.  Lets the session answer without a coroutine,
        a Deferred and a turn of the reactor per message.  It must give the same verdict
        :meth:`end_of_data` would."""
        return None


class DiskSpace(Check):
    """Postfix's queue_minfree: while the data folder's file system has less than
    ``[smtp] min_free_space`` free, or less than that plus the size the client declared
    (RFC 1870 SIZE), MAIL gets 452 4.3.1 (RFC 5321 4.3.2 lists 452 for MAIL): a full disk costs
    the client one reply and a later retry, not a whole message.  Temporary, so not a client
    error.  ``too_low(declared_size)`` is :meth:`mailsuite.store.space.FreeSpace.too_low`."""

    def __init__(self, too_low: Callable[[int], bool]) -> None:
        self.too_low = too_low

    def mail(self, facts: Facts, sender: Path) -> Verdict:
        size = sender.params.get("SIZE")
        declared = int(size) if size is not None and size.isdigit() else 0
        if self.too_low(declared):
            return refuse(R.NO_STORAGE, "MAIL refused: the disk is nearly full")
        return ACCEPT


class RecipientLimit(Check):
    """RFC 5321 4.5.3.1.8: at least 100 recipients must be taken; more get 452, which the
    client retries in a later transaction (not a client error)."""

    def __init__(self, max_recipients: int) -> None:
        self.max_recipients = max_recipients

    def rcpt(self, facts: Facts, rcpt: Recipient) -> Verdict:
        if len(facts.recipients) >= self.max_recipients:
            return refuse(R.TOO_MANY_RCPTS)
        return ACCEPT


class KnownRecipient(Check):
    """An address in one of our domains must resolve to a mailbox or an alias (550 5.1.1)."""

    def rcpt(self, facts: Facts, rcpt: Recipient) -> Verdict:
        if rcpt.local_domain and rcpt.resolution.unknown:
            return refuse(R.UNKNOWN_USER)
        return ACCEPT


class QuotaCheck(Check):
    """A recipient whose every mailbox is already at or past its storage limit: ``552 5.2.2``
    at RCPT (RFC 3463 X.2.2; the reply Dovecot's quota-status policy service gives Postfix),
    so the sender learns it before sending the data.  A message that would only take a user
    over is decided at the end of the data, by the delivery (:mod:`mailsuite.delivery_fanout`),
    which knows its size.  ``usage`` answers from the users' quota files (one ``stat`` each
    when nothing changed; users without a limit have none)."""

    def __init__(self, usage: UsageCache) -> None:
        self.usage = usage

    def rcpt(self, facts: Facts, rcpt: Recipient) -> Verdict:
        if not rcpt.local_domain:
            return ACCEPT
        res = rcpt.resolution
        if res.local and not res.remote and self.usage.over(box.root for box in res.local):
            return refuse(R.MAILBOX_FULL, f"<{rcpt.address}> is over quota")
        return ACCEPT


class RelayRule(Check):
    """No open relay: a recipient outside our domains needs an authenticated user, or, where
    ``trusted_networks_relay`` (the MX profile), a client in ``[relay] trusted_networks``.
    The submission profile relays for authenticated users only (RFC 6409 4.3)."""

    def __init__(self, trusted_networks_relay: bool) -> None:
        self.trusted_networks_relay = trusted_networks_relay

    def rcpt(self, facts: Facts, rcpt: Recipient) -> Verdict:
        if rcpt.local_domain:
            return ACCEPT
        if facts.user is not None or (self.trusted_networks_relay and facts.trusted):
            return ACCEPT
        return refuse(R.RELAY_DENIED, f"relay denied for <{rcpt.address}>")


class RemoteDelivery(Check):
    """Remote recipients (relayed, or an alias pointing outside) need the outbound queue;
    without it they get 451 4.4.0, never a pretend 250."""

    def __init__(self, available: Callable[[], bool]) -> None:
        self.available = available

    def rcpt(self, facts: Facts, rcpt: Recipient) -> Verdict:
        if rcpt.resolution.remote and not self.available():
            return refuse(R.NO_REMOTE)
        return ACCEPT


class SenderBinding(Check):
    """Submission (RFC 6409 8.1 leaves the policy to the MSA): MAIL FROM must be an address
    the authenticated user may send as (:meth:`mailsuite.directory.Directory.may_send_as`),
    else 553 5.7.1."""

    def __init__(self, lookup: Lookup) -> None:
        self.lookup = lookup

    def mail(self, facts: Facts, sender: Path) -> Verdict:
        user = facts.user
        if user is not None and self.lookup.may_send_as(user, sender.address):
            return ACCEPT
        return refuse(R.SENDER_NOT_OWNED, f"{user} may not send as <{sender.address}>")


class FromBinding(Check):
    """Submission: every address of every From: field must be one the user may send as
    (553 5.7.1).  A message without a From: field is accepted: the envelope sender is
    already bound, and RFC 6409 8.1 lets an MSA accept (or complete) such a message; a
    From: field with no usable address is refused, and so is a header section too large to
    have been seen whole (552 5.3.4: a From: field could hide beyond it)."""

    def __init__(self, lookup: Lookup) -> None:
        self.lookup = lookup

    def data_headers(self, facts: Facts, headers: bytes) -> Verdict:
        user = facts.user
        if user is None:
            return refuse(R.AUTH_REQUIRED)  # not reached: MAIL needs AUTH on this profile
        if len(headers) >= MAX_HEADER_CAPTURE:
            return refuse(R.HEADERS_TOO_BIG)
        fields = from_addresses(headers)
        if fields is None:
            return refuse(R.FROM_UNUSABLE)
        for addresses in fields:
            for address in addresses:
                if not self.lookup.may_send_as(user, address):
                    return refuse(R.FROM_NOT_OWNED, f"{user} may not use From: <{address}>")
        return ACCEPT


class HopCount(Check):
    """RFC 5321 6.3: a message that has passed more than ``max_hops`` relays (Received:
    fields, counting ours) is in a loop: 554 5.4.6."""

    def __init__(self, max_hops: int) -> None:
        self.max_hops = max_hops

    def data_headers(self, facts: Facts, headers: bytes) -> Verdict:
        if count_received(headers) + 1 > self.max_hops:
            return refuse(R.TOO_MANY_HOPS)
        return ACCEPT


def count_received(headers: bytes) -> int:
    """Received: fields in a header section (LF line ends)."""
    count = 0
    for line in headers.split(b"\n"):
        if line[:9].lower() == b"received:":
            count += 1
    return count


def from_addresses(headers: bytes) -> list[list[str]] | None:
    """The addresses of each From: field in a header section (one list per field).

    Fields are unfolded by hand rather than with ``email.parser``, whose mbox ``From `` line
    handling and lenient field names could hide a field another reader would display.  A name
    matches ``From`` case-insensitively, with white space before the colon tolerated (RFC 5322
    obsolete syntax, section 4.5).  Returns None if a From: field cannot be parsed.
    """
    text = headers.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")
    fields: list[list[str]] = []
    current: list[str] | None = None
    for line in text.split("\n"):
        if line[:1] in (" ", "\t"):
            if current is not None:
                current.append(line)
            continue
        name, colon, value = line.partition(":")
        if colon and name.strip(" \t").lower() == "from":
            current = [value]
            fields.append(current)
        else:
            current = None
    out: list[list[str]] = []
    for parts in fields:
        value = " ".join(p.strip() for p in parts)
        pairs = getaddresses([value])
        addresses = [addr for _, addr in pairs if addr]
        if not addresses or any("@" not in a for a in addresses):
            return None
        out.append(addresses)
    return out


# --------------------------------------------------------------------------- the policy


def _overrides(check: Check, hook: str) -> bool:
    return getattr(type(check), hook) is not getattr(Check, hook)


class Policy:
    """Checks in order; each stage runs the checks that override its hook."""

    def __init__(self, checks: Sequence[Check]) -> None:
        self.checks = tuple(checks)
        self._by_hook = {
            hook: tuple(c for c in self.checks if _overrides(c, hook))
            for hook in ("connect", "helo", "mail", "rcpt", "data_headers", "end_of_data")
        }

    def with_checks(self, *extra: Check) -> Policy:
        """This policy with ``extra`` checks run after its own (e.g. mail authentication)."""
        return Policy(self.checks + extra)

    @property
    def checks_messages(self) -> bool:
        """Whether any check has an end-of-data hook (else the session skips that stage)."""
        return bool(self._by_hook["end_of_data"])

    def connect(self, facts: Facts) -> Verdict:
        for check in self._by_hook["connect"]:
            verdict = check.connect(facts)
            if verdict.refused:
                return verdict
        return ACCEPT

    def helo(self, facts: Facts, name: str) -> Verdict:
        for check in self._by_hook["helo"]:
            verdict = check.helo(facts, name)
            if verdict.refused:
                return verdict
        return ACCEPT

    def mail(self, facts: Facts, sender: Path) -> Verdict:
        for check in self._by_hook["mail"]:
            verdict = check.mail(facts, sender)
            if verdict.refused:
                return verdict
        return ACCEPT

    def rcpt(self, facts: Facts, rcpt: Recipient) -> Verdict:
        for check in self._by_hook["rcpt"]:
            verdict = check.rcpt(facts, rcpt)
            if verdict.refused:
                return verdict
        return ACCEPT

    def data_headers(self, facts: Facts, headers: bytes) -> Verdict:
        for check in self._by_hook["data_headers"]:
            verdict = check.data_headers(facts, headers)
            if verdict.refused:
                return verdict
        return ACCEPT

    async def end_of_data(self, facts: Facts, message: ReceivedMessage) -> Verdict:
        """Every end-of-data check in order; the first refusal ends it.  Otherwise the
        verdicts combine: Junk if any check asks for it, every check's header edits."""
        verdicts: list[Verdict] = []
        for check in self._by_hook["end_of_data"]:
            verdict = await check.end_of_data(facts, message)
            if verdict.refused or verdict.disconnect:
                return verdict
            verdicts.append(verdict)
        return _combined(verdicts)

    def settle(self, facts: Facts, message: ReceivedMessage) -> Verdict | None:
        """:meth:`end_of_data`'s verdict when every check can give its own at once
        (:meth:`Check.settle`); None when one must run."""
        verdicts: list[Verdict] = []
        for check in self._by_hook["end_of_data"]:
            verdict = check.settle(facts, message)
            if verdict is None:
                return None
            if verdict.refused or verdict.disconnect:
                return verdict
            verdicts.append(verdict)
        return _combined(verdicts)


def _combined(verdicts: Sequence[Verdict]) -> Verdict:
    """Accepting end-of-data verdicts as one: Junk if any asks for it, every header edit."""
    if len(verdicts) == 1 and verdicts[0].reason is None:
        return verdicts[0]  # (a reason is the check's own, never the combined verdict's)
    junk = False
    prepend: list[str] = []
    remove: list[bytes] = []
    for verdict in verdicts:
        junk = junk or verdict.junk
        prepend.extend(verdict.prepend)
        remove.extend(verdict.remove)
    return Verdict(junk=junk, prepend=tuple(prepend), remove=tuple(remove))


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class Profile:
    """What kind of listener a session serves.

    ``name`` is ``"mx"``, ``"submission"`` or ``"sandbox"`` (log prefix, connection-count
    group).
    ``auth``: AUTH is offered and accepted, once TLS is on (or with ``[auth]
    allow_plaintext``: RFC 4954 4, never credentials in clear text by default).
    ``requires_auth``: MAIL needs a successful AUTH first (RFC 6409 4.3; 530 5.7.0), checked
    before MAIL's arguments are even parsed.
    """

    name: str
    auth: bool
    requires_auth: bool
    policy: Policy
    #: Where an accepted recipient's mail goes (default: :attr:`Recipient.resolution`, the
    #: directory's answer); the sandbox sends every recipient to the session's inbox.
    route: Callable[[Facts, Recipient], Resolution] | None = None
    #: ``[smtp] max_connections_per_ip`` applies (not in the sandbox: test suites open many
    #: connections from one address).
    limit_per_ip: bool = True


def mx_profile(
    config: Config,
    lookup: Lookup,
    has_queue: Callable[[], bool],
    space_low: Callable[[int], bool] | None = None,
) -> Profile:
    """Port 25: mail for our domains from anyone; relay only for trusted networks (and
    authenticated users, of whom there are none here: no AUTH is offered).  ``space_low``:
    the free-space rule (:class:`DiskSpace`), when the server has a data folder to watch."""
    limits = config.smtp
    checks: list[Check] = [
        *([DiskSpace(space_low)] if space_low is not None else []),
        RecipientLimit(limits.max_recipients),
        KnownRecipient(),
        QuotaCheck(UsageCache()),
        RelayRule(trusted_networks_relay=True),
        RemoteDelivery(has_queue),
        HopCount(limits.max_hops),
    ]
    return Profile("mx", auth=False, requires_auth=False, policy=Policy(checks))


def submission_profile(
    config: Config,
    lookup: Lookup,
    has_queue: Callable[[], bool],
    space_low: Callable[[int], bool] | None = None,
) -> Profile:
    """Ports 587/465 (RFC 6409): AUTH required, the user bound to MAIL FROM and From:,
    relay to any domain for the authenticated user."""
    limits = config.smtp
    checks: list[Check] = [
        *([DiskSpace(space_low)] if space_low is not None else []),
        SenderBinding(lookup),
        RecipientLimit(limits.max_recipients),
        KnownRecipient(),
        QuotaCheck(UsageCache()),
        RelayRule(trusted_networks_relay=False),
        RemoteDelivery(has_queue),
        HopCount(limits.max_hops),
        FromBinding(lookup),
    ]
    return Profile("submission", auth=True, requires_auth=True, policy=Policy(checks))
