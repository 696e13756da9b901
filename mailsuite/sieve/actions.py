"""What a Sieve run asks delivery to do, and the rules that combine its actions.

The interpreter records actions in a :class:`ActionList` as the script runs; the list
enforces the rules of RFC 5228 and its extensions as actions arrive and produces the final,
de-duplicated list with the implicit keep made explicit:

* implicit keep (RFC 5228 2.10.2) is cancelled by ``keep``, ``fileinto``, ``redirect``,
  ``discard``, ``reject``/``ereject`` -- but not by ``fileinto :copy``/``redirect :copy``
  (RFC 3894 3) nor by ``vacation`` (RFC 5230 4.7) or the flag commands;
* ``keep`` and ``fileinto "INBOX"`` are one delivery, as are two ``fileinto`` of one folder
  (RFC 5228 4.1: never deliver to one folder twice); their flags are merged; two
  ``redirect`` to one address are one (RFC 5228 4.2);
* ``reject``/``ereject`` do not combine with ``keep``, ``fileinto``, ``redirect``,
  ``vacation`` or another reject (RFC 5429 2.1, 2.2): a run-time error;
* at most one ``vacation`` per run (one response per message, RFC 5230 4.7; Pigeonhole
  refuses a second one the same way);
* at most ``max_actions`` actions and ``max_redirects`` redirects (RFC 5228 10).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mailsuite.sieve.match import SieveRuntimeError


@dataclass(frozen=True)
class Keep:
    """Store in INBOX with ``flags`` (RFC 5232)."""

    flags: frozenset[str] = frozenset()


@dataclass(frozen=True)
class FileInto:
    """Store in ``mailbox`` (UTF-8 name, ``.`` or ``/`` hierarchy); ``create`` it when
    missing (RFC 5490 3); ``copy`` kept for logging only."""

    mailbox: str
    flags: frozenset[str] = frozenset()
    create: bool = False
    copy: bool = False


@dataclass(frozen=True)
class Redirect:
    address: str
    copy: bool = False


@dataclass(frozen=True)
class Discard:
    """Nothing stores, forwards or refuses the message: it is dropped on purpose."""


@dataclass(frozen=True)
class Reject:
    """Refuse the message (RFC 5429): ``extended`` is ``ereject`` (protocol-level refusal
    preferred)."""

    reason: str
    extended: bool = False


@dataclass(frozen=True)
class VacationRequest:
    """What a ``vacation`` command asked for (RFC 5230 4); :mod:`.vacation` decides."""

    reason: str
    seconds: int
    subject: str | None = None
    from_addr: str | None = None
    addresses: tuple[str, ...] = ()
    mime: bool = False
    handle: str = ""


Action = Keep | FileInto | Redirect | Discard | Reject | VacationRequest


def _folder_key(mailbox: str) -> str:
    return "INBOX" if mailbox.upper() == "INBOX" else mailbox.replace("/", ".")


def _address_key(address: str) -> str:
    local, at, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}" if at else address


@dataclass
class ActionList:
    max_actions: int
    max_redirects: int
    implicit_keep: bool = True
    discarded: bool = False
    stores: dict[str, FileInto] = field(default_factory=dict)  # folder key -> delivery
    redirects: dict[str, Redirect] = field(default_factory=dict)
    reject: Reject | None = None
    vacation: VacationRequest | None = None
    count: int = 0

    def _count(self, what: str) -> None:
        self.count += 1
        if self.count > self.max_actions:
            raise SieveRuntimeError(f"more than {self.max_actions} actions ({what})")

    def _no_reject(self, what: str) -> None:
        if self.reject is not None:
            kind = "ereject" if self.reject.extended else "reject"
            raise SieveRuntimeError(f"{what} cannot be combined with {kind}")

    def keep(self, flags: frozenset[str]) -> None:
        self._count("keep")
        self._no_reject("keep")
        self._store("INBOX", flags, False, False)
        self.implicit_keep = False

    def fileinto(self, mailbox: str, flags: frozenset[str], create: bool, copy: bool) -> None:
        self._count("fileinto")
        self._no_reject("fileinto")
        self._store(mailbox, flags, create, copy)
        if not copy:
            self.implicit_keep = False

    def _store(self, mailbox: str, flags: frozenset[str], create: bool, copy: bool) -> None:
        key = _folder_key(mailbox)
        old = self.stores.get(key)
        if old is None:
            self.stores[key] = FileInto(key if key == "INBOX" else mailbox, flags, create, copy)
        else:
            self.stores[key] = FileInto(
                old.mailbox, old.flags | flags, old.create or create, old.copy and copy
            )

    def redirect(self, address: str, copy: bool) -> None:
        self._count("redirect")
        self._no_reject("redirect")
        key = _address_key(address)
        if key not in self.redirects:
            if len(self.redirects) >= self.max_redirects:
                raise SieveRuntimeError(f"more than {self.max_redirects} redirects")
            self.redirects[key] = Redirect(address, copy)
        elif not copy:
            self.redirects[key] = Redirect(self.redirects[key].address, False)
        if not copy:
            self.implicit_keep = False

    def discard(self) -> None:
        self._count("discard")
        self.discarded = True
        self.implicit_keep = False

    def add_reject(self, reason: str, extended: bool) -> None:
        self._count("ereject" if extended else "reject")
        what = "ereject" if extended else "reject"
        if self.reject is not None:
            raise SieveRuntimeError(f"{what} executed twice")
        if self.stores or self.redirects:
            raise SieveRuntimeError(f"{what} cannot be combined with keep, fileinto or redirect")
        if self.vacation is not None:
            raise SieveRuntimeError(f"{what} cannot be combined with vacation")
        self.reject = Reject(reason, extended)
        self.implicit_keep = False

    def add_vacation(self, request: VacationRequest) -> None:
        self._count("vacation")
        self._no_reject("vacation")
        if self.vacation is not None:
            raise SieveRuntimeError("vacation executed twice")
        self.vacation = request

    def final(self, implicit_flags: frozenset[str]) -> list[Action]:
        """The actions delivery applies, in a fixed order: stores (INBOX first), redirects,
        reject, vacation; ``Discard()`` when nothing keeps, forwards or refuses."""
        stores = dict(self.stores)
        if self.implicit_keep:
            old = stores.get("INBOX")
            stores["INBOX"] = FileInto(
                "INBOX", implicit_flags | (old.flags if old else frozenset())
            )
        out: list[Action] = []
        inbox = stores.pop("INBOX", None)
        if inbox is not None:
            out.append(Keep(inbox.flags))
        out.extend(stores.values())
        out.extend(self.redirects.values())
        if self.reject is not None:
            out.append(self.reject)
        if not out:
            out.append(Discard())
        if self.vacation is not None:
            out.append(self.vacation)
        return out
