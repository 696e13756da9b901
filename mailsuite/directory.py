"""Domains, users and aliases: who is local, where their mail goes, who may send as whom.

The directory is one JSON file, ``<data_dir>/directory.json``, written atomically by the
``mailsuite`` command under a lock and re-read by the running server whenever the file
changes (one ``stat`` per lookup), so changes apply without a restart.  JSON rather than a
database because a person can read it, back it up and diff it; thousands of users fit easily.

Routing rules, in order (RFC 5321 section 4.5.1 for postmaster, RFC 5233 for subaddresses):
an exact user; an exact alias; the same two with a ``+tag`` removed from the local part; the
domain's catch-all alias (``@domain``); ``postmaster@`` of any local domain, which always
exists (its own Maildir if nobody was set up for it).
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailsuite.ownership import like_data_dir
from mailsuite.store.maildir import ensure_folder, fsync_dir

MAX_ALIAS_DEPTH = 10
#: Special-use folders made for each new user (RFC 6154); name -> attribute.
SPECIAL_FOLDERS = {
    "Sent": "\\Sent",
    "Drafts": "\\Drafts",
    "Trash": "\\Trash",
    "Junk": "\\Junk",
    "Archive": "\\Archive",
}


class DirectoryError(Exception):
    """A refused change (unknown user, bad address ...) worded for the person at the CLI."""


#: mailbox roots remembered at most (a directory of more users just computes again)
MAX_CACHED_ROOTS = 10_000


def split_address(address: str) -> tuple[str, str]:
    """``local@domain`` -> (local, domain lower-cased); ValueError if it is not one."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"{address!r} is not an address of the form local@domain")
    return local, domain.lower().rstrip(".")


def normalize(address: str) -> str:
    """Canonical form used as the directory key: the whole address in lower case."""
    local, domain = split_address(address.strip())
    return f"{local.lower()}@{domain}"


def valid_mailbox_address(address: str) -> bool:
    """Whether ``address`` can name a mailbox: its local part becomes a directory name, so
    no path characters, no controls or spaces, no leading/trailing/double dots."""
    try:
        local, domain = split_address(address)
    except ValueError:
        return False
    bad = set('/\\"<>()[],;:~')
    for part in (local, domain):
        if set(part) & bad or any(c.isspace() or ord(c) < 0x21 or ord(c) == 0x7F for c in part):
            return False
    if local.startswith(".") or local.endswith(".") or ".." in local:
        return False
    return "." in domain or domain == "localhost"


@dataclass(frozen=True)
class LocalBox:
    """A local mailbox a recipient resolves to."""

    user: str  # canonical address of the mailbox owner
    root: Path  # Maildir root (INBOX)
    #: the recipient address that led here, as the sender wrote it (``bob+news@...``, an
    #: alias): what Sieve's ``envelope "to"`` sees.  Not part of the box's identity.
    rcpt: str = field(default="", compare=False)


@dataclass
class Resolution:
    """Where mail for one RCPT address goes; ``unknown`` when it has no home here."""

    local: list[LocalBox] = field(default_factory=list)
    remote: list[str] = field(default_factory=list)
    unknown: bool = False


@dataclass
class _Data:
    domains: list[str] = field(default_factory=list)
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    aliases: dict[str, list[str]] = field(default_factory=dict)
    #: domain -> default storage limit in bytes of its users (see Directory.quota_limit)
    domain_quotas: dict[str, int] = field(default_factory=dict)
    #: domain -> default message-count limit of its users (see Directory.message_limit)
    domain_message_quotas: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> _Data:
        return cls(
            domains=list(raw.get("domains", [])),
            users=dict(raw.get("users", {})),
            aliases={k: list(v) for k, v in raw.get("aliases", {}).items()},
            domain_quotas={k: int(v) for k, v in raw.get("domain_quotas", {}).items()},
            domain_message_quotas={
                k: int(v) for k, v in raw.get("domain_message_quotas", {}).items()
            },
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "domains": sorted(self.domains),
            "users": {k: self.users[k] for k in sorted(self.users)},
            "aliases": {k: self.aliases[k] for k in sorted(self.aliases)},
        }
        for key in ("domain_quotas", "domain_message_quotas"):
            table: dict[str, int] = getattr(self, key)
            if table:
                out[key] = {k: table[k] for k in sorted(table)}
        return out


class Directory:
    """Read side (server) and write side (CLI) of ``directory.json``."""

    def __init__(self, path: Path, mail_dir: Path, config_domains: tuple[str, ...] = ()) -> None:
        self.path = path
        self._path_str = os.fspath(path)
        self.mail_dir = mail_dir
        self.config_domains = tuple(d.lower() for d in config_domains)
        self._stamp: tuple[int, int, int] | None = None
        self._data = _Data()
        #: user -> mailbox root, for the mail_dir in ``_roots_of`` (see mailbox_root)
        self._roots: dict[str, Path] = {}
        self._roots_of = mail_dir

    # -- reading ---------------------------------------------------------------------------

    def _fresh(self) -> _Data:
        """Reload the file when it changed since the last look (cheap: one stat)."""
        try:
            st = os.stat(self._path_str)  # noqa: PTH116 (asked several times per RCPT)
        except FileNotFoundError:
            self._stamp, self._data = None, _Data()
            return self._data
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            with self.path.open(encoding="utf-8") as f:
                self._data = _Data.from_json(json.load(f))
            self._stamp = stamp
        return self._data

    def domains(self) -> list[str]:
        return sorted(set(self.config_domains) | set(self._fresh().domains))

    def is_local_domain(self, domain: str) -> bool:
        domain = domain.lower().rstrip(".")
        return domain in self.config_domains or domain in self._fresh().domains

    def users(self) -> list[str]:
        return sorted(self._fresh().users)

    def aliases(self) -> dict[str, list[str]]:
        return dict(self._fresh().aliases)

    def password_hash(self, user: str) -> str | None:
        try:
            entry = self._fresh().users.get(normalize(user))
        except ValueError:
            return None
        return entry.get("password") if entry else None

    def quota_limit(self, user: str) -> int:
        """The user's storage limit in bytes, 0 for none (RFC 9208 STORAGE): the user's own
        setting (``quota``, where 0 means "no limit" even under a domain default), else the
        domain's default (``domain_quotas``), else none."""
        return self._limit(user, "quota", "domain_quotas")

    def message_limit(self, user: str) -> int:
        """The user's message-count limit, 0 for none (RFC 9208 MESSAGE): ``quota_messages``,
        else the domain's ``domain_message_quotas``, as :meth:`quota_limit`."""
        return self._limit(user, "quota_messages", "domain_message_quotas")

    def _limit(self, user: str, key: str, domain_key: str) -> int:
        try:
            addr = normalize(user)
        except ValueError:
            return 0
        data = self._fresh()
        entry = data.users.get(addr)
        if entry is not None and key in entry:
            return int(entry[key])
        table: dict[str, int] = getattr(data, domain_key)
        return table.get(split_address(addr)[1], 0)

    def user_quota(self, user: str, key: str = "quota") -> int | None:
        """The user's own setting (``"quota"`` or ``"quota_messages"``; None: the domain
        default applies)."""
        entry = self._fresh().users.get(normalize(user))
        if entry is None:
            raise DirectoryError(f"{user} is not a user here")
        return int(entry[key]) if key in entry else None

    def domain_quota(self, domain: str, messages: bool = False) -> int:
        data = self._fresh()
        table = data.domain_message_quotas if messages else data.domain_quotas
        return table.get(domain.lower().rstrip("."), 0)

    def mailbox_root(self, user: str) -> Path:
        """``<mail_dir>/<domain>/<localpart>``: validated so it cannot leave ``mail_dir``.

        Remembered per address (a pure function of it and ``mail_dir``): every RCPT asks, and
        the validation and path building cost more than the rest of the lookup (~30 us)."""
        if self._roots_of is not self.mail_dir:
            self._roots, self._roots_of = {}, self.mail_dir
        root = self._roots.get(user)
        if root is not None:
            return root
        local, domain = split_address(normalize(user))
        if not valid_mailbox_address(f"{local}@{domain}"):
            raise ValueError(f"{user!r} cannot be a mailbox name")
        root = self.mail_dir / domain / local
        if len(self._roots) >= MAX_CACHED_ROOTS:
            self._roots.clear()
        self._roots[user] = root
        return root

    def send_as(self, user: str) -> set[str]:
        """Addresses ``user`` may use as MAIL FROM / From: its own, its ``send_as`` list and
        every alias that expands to it."""
        user = normalize(user)
        data = self._fresh()
        allowed = {user}
        entry = data.users.get(user, {})
        allowed.update(normalize(a) for a in entry.get("send_as", []))
        for alias, targets in data.aliases.items():
            if not alias.startswith("@") and user in (normalize(t) for t in targets):
                allowed.add(alias)
        return allowed

    def may_send_as(self, user: str, address: str) -> bool:
        if not address:
            return True  # null sender: bounces/notifications are allowed
        try:
            addr = normalize(address)
        except ValueError:
            return False
        allowed = self.send_as(user)
        if addr in allowed:
            return True
        local, domain = split_address(addr)
        if "+" in local:  # subaddress of an allowed address (RFC 5233)
            return f"{local.split('+', 1)[0]}@{domain}" in allowed
        return False

    def resolve(self, address: str) -> Resolution:
        """Route one recipient address: local mailboxes, remote addresses, or unknown."""
        result = Resolution()
        try:
            self._expand(normalize(address), result, set(), 0)
        except ValueError:
            result.unknown = True
        # remove duplicate targets while keeping order
        seen_users: set[str] = set()
        unique: list[LocalBox] = []
        for box in result.local:
            if box.user not in seen_users:
                seen_users.add(box.user)
                # (a plain constructor: dataclasses.replace inspects the fields per call)
                unique.append(LocalBox(box.user, box.root, address))
        result.local = unique
        result.remote = list(dict.fromkeys(result.remote))
        if not result.local and not result.remote:
            result.unknown = True
        return result

    def _expand(self, addr: str, out: Resolution, seen: set[str], depth: int) -> None:
        if addr in seen or depth > MAX_ALIAS_DEPTH:
            return
        seen.add(addr)
        local, domain = split_address(addr)
        if not self.is_local_domain(domain):
            out.remote.append(addr)
            return
        data = self._fresh()
        candidates = [addr]
        if "+" in local:
            candidates.append(f"{local.split('+', 1)[0]}@{domain}")
        for cand in candidates:
            if cand in data.users:
                out.local.append(LocalBox(cand, self.mailbox_root(cand)))
                if cand in data.aliases:  # a user can also forward copies elsewhere
                    for target in data.aliases[cand]:
                        if normalize(target) != cand:
                            self._expand(normalize(target), out, seen, depth + 1)
                return
            if cand in data.aliases:
                for target in data.aliases[cand]:
                    self._expand(normalize(target), out, seen, depth + 1)
                return
        catch_all = data.aliases.get("@" + domain)
        if catch_all:
            for target in catch_all:
                self._expand(normalize(target), out, seen, depth + 1)
            return
        if candidates[-1].split("@", 1)[0] == "postmaster":
            # RFC 5321 4.5.1: postmaster must always be accepted.
            pm = f"postmaster@{domain}"
            out.local.append(LocalBox(pm, self.mailbox_root(pm)))

    # -- writing (CLI) ----------------------------------------------------------------------

    @contextmanager
    def _editing(self) -> Iterator[_Data]:
        """Lock, load, let the caller change, then write atomically and durably."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_suffix(".lock")
        with lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._stamp = None
            data = self._fresh()
            yield data
            fd, tmp = tempfile.mkstemp(prefix=".directory.", dir=self.path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data.to_json(), f, indent=2, sort_keys=False)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            Path(tmp).chmod(0o600)
            Path(tmp).replace(self.path)
            fsync_dir(self.path.parent)
            like_data_dir(self.path.parent, [self.path, lock_path])
            self._stamp = None

    def add_domain(self, domain: str) -> None:
        domain = domain.strip().lower().rstrip(".")
        try:
            domain.encode("idna")
        except UnicodeError:
            raise DirectoryError(f"{domain!r} is not a valid domain name") from None
        if not domain or ("." not in domain and domain != "localhost") or "/" in domain:
            raise DirectoryError(f"{domain!r} is not a valid domain name")
        with self._editing() as data:
            if domain not in data.domains:
                data.domains.append(domain)

    def del_domain(self, domain: str) -> None:
        domain = domain.lower().rstrip(".")
        with self._editing() as data:
            if domain not in data.domains:
                if domain in self.config_domains:
                    raise DirectoryError(f"{domain} is set in the config file; remove it there")
                raise DirectoryError(f"{domain} is not a domain of this server")
            data.domains.remove(domain)

    def add_user(
        self, user: str, password_hash: str, on_created: Callable[[Path], None] | None = None
    ) -> Path:
        user = self._checked_local(user)
        with self._editing() as data:
            if user in data.users:
                raise DirectoryError(f"{user} exists already (use 'user passwd' to change it)")
            data.users[user] = {"password": password_hash, "send_as": []}
        root = self.mailbox_root(user)
        domain_dir_existed = root.parent.exists()
        ensure_folder(root)
        for name in SPECIAL_FOLDERS:
            ensure_folder(root / f".{name}")
        data_dir = self.path.parent
        like_data_dir(
            data_dir, [self.mail_dir, root.parent] if not domain_dir_existed else [self.mail_dir]
        )
        like_data_dir(data_dir, [root], tree=True)
        if on_created:
            on_created(root)
        return root

    def set_password(self, user: str, password_hash: str) -> None:
        user = normalize(user)
        with self._editing() as data:
            if user not in data.users:
                raise DirectoryError(f"{user} is not a user here")
            data.users[user]["password"] = password_hash

    def set_send_as(self, user: str, addresses: list[str]) -> None:
        user = normalize(user)
        with self._editing() as data:
            if user not in data.users:
                raise DirectoryError(f"{user} is not a user here")
            data.users[user]["send_as"] = sorted({normalize(a) for a in addresses})

    def set_user_quota(self, user: str, limit: int | None, *, messages: bool = False) -> None:
        """Set the user's storage limit in bytes, or with ``messages`` their message-count
        limit (0: none); None: follow the domain default."""
        user = normalize(user)
        key = "quota_messages" if messages else "quota"
        with self._editing() as data:
            if user not in data.users:
                raise DirectoryError(f"{user} is not a user here")
            if limit is None:
                data.users[user].pop(key, None)
            else:
                data.users[user][key] = limit

    def set_domain_quota(self, domain: str, limit: int, *, messages: bool = False) -> list[str]:
        """Set the default storage limit (bytes), or with ``messages`` the message-count limit
        (0: none), of the domain's users; returns the domain's users."""
        domain = domain.lower().rstrip(".")
        if not self.is_local_domain(domain):
            raise DirectoryError(f"{domain} is not a domain of this server")
        with self._editing() as data:
            table = data.domain_message_quotas if messages else data.domain_quotas
            if limit:
                table[domain] = limit
            else:
                table.pop(domain, None)
            return [u for u in data.users if split_address(u)[1] == domain]

    def del_user(self, user: str) -> None:
        """Remove the account; its Maildir is kept (say so to the person)."""
        user = normalize(user)
        with self._editing() as data:
            if user not in data.users:
                raise DirectoryError(f"{user} is not a user here")
            del data.users[user]

    def add_alias(self, alias: str, targets: list[str]) -> None:
        if alias.startswith("@"):
            domain = alias[1:].lower()
            if not self.is_local_domain(domain):
                raise DirectoryError(f"{domain} is not a domain of this server")
            key = "@" + domain
        else:
            key = self._checked_local(alias)
        if not targets:
            raise DirectoryError("an alias needs at least one target address")
        clean = []
        for t in targets:
            try:
                clean.append(normalize(t))
            except ValueError as e:
                raise DirectoryError(str(e)) from None
        with self._editing() as data:
            existing = data.aliases.setdefault(key, [])
            for t in clean:
                if t not in existing:
                    existing.append(t)

    def del_alias(self, alias: str, targets: list[str] | None = None) -> None:
        key = alias.lower() if alias.startswith("@") else normalize(alias)
        with self._editing() as data:
            if key not in data.aliases:
                raise DirectoryError(f"{alias} is not an alias here")
            if targets:
                drop = {normalize(t) for t in targets}
                data.aliases[key] = [t for t in data.aliases[key] if t not in drop]
            if not targets or not data.aliases[key]:
                del data.aliases[key]

    def _checked_local(self, address: str) -> str:
        try:
            addr = normalize(address)
        except ValueError as e:
            raise DirectoryError(str(e)) from None
        if not valid_mailbox_address(addr):
            raise DirectoryError(f"{address!r} is not a usable mailbox address")
        _, domain = split_address(addr)
        if not self.is_local_domain(domain):
            raise DirectoryError(
                f"{domain} is not a domain of this server (add it: mailsuite domain add {domain})"
            )
        return addr
