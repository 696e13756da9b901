"""Inboxes of sandbox mode: names, folders, and logins with any password.

An inbox is named by the SMTP AUTH user that sent into it (``default`` without AUTH) and is one
Maildir folder, ``<data_dir>/mail/<name>``, so the IMAP and POP3 servers read it as that
user's INBOX.  Names are case-insensitive (kept in lower case) and may be anything a client
sends as a user name, up to :data:`MAX_NAME` characters; characters that cannot be part of a
directory name are percent-encoded on disk (``a/b`` is the folder ``a%2Fb``).

:class:`SandboxDirectory` and :class:`AnyPassword` stand in for the directory and the
authenticator (``runtime.directory``, ``runtime.auth``) in sandbox mode, so the IMAP and POP3
servers need no change: a login with any password opens the inbox of that name.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote, unquote

from twisted.internet import defer
from twisted.logger import Logger

from mailsuite.auth import Authenticator, LoginResult, Outcome
from mailsuite.config import Config
from mailsuite.directory import Directory, LocalBox, Resolution

log = Logger(namespace="mailsuite.sandbox")

DEFAULT_INBOX = "default"
MAX_NAME = 128
_SAFE = "@+-_.="


def inbox_name(user: str | None) -> str | None:
    """The inbox for an AUTH or login user name (None: no AUTH -> ``default``); None when the
    name cannot be one (empty, too long, control characters)."""
    if user is None:
        return DEFAULT_INBOX
    name = user.strip().lower()
    if not name or len(name) > MAX_NAME or any(ord(c) < 0x20 or c == "\x7f" for c in name):
        return None
    return name


def folder_name(name: str) -> str:
    """The directory name of inbox ``name`` (already :func:`inbox_name`-checked)."""
    encoded = quote(name, safe=_SAFE)
    if encoded.startswith("."):  # never a hidden or Maildir++ sub-folder name
        encoded = "%2E" + encoded[1:]
    return encoded


def name_of_folder(folder: str) -> str:
    return unquote(folder)


class SandboxDirectory(Directory):
    """The directory in sandbox mode: no domain is local, every address is fine as a sender,
    and each inbox name is a user whose mailbox is its folder."""

    def __init__(self, config: Config) -> None:
        super().__init__(config.directory_file, config.mail_dir, ())

    def box(self, name: str) -> LocalBox:
        return LocalBox(name, self.mailbox_root(name))

    def mailbox_root(self, user: str) -> Path:
        name = inbox_name(user)
        if name is None:
            raise ValueError(f"{user!r} cannot be an inbox name")
        return self.mail_dir / folder_name(name)

    def inboxes(self) -> list[str]:
        """The names of the inboxes that exist (a folder with ``cur/``), sorted."""
        names = []
        try:
            with os.scandir(self.mail_dir) as it:
                for entry in it:
                    if entry.is_dir() and (Path(entry.path) / "cur").is_dir():
                        names.append(name_of_folder(entry.name))
        except FileNotFoundError:
            pass
        return sorted(names)

    def users(self) -> list[str]:
        return self.inboxes()

    def domains(self) -> list[str]:
        return []

    def is_local_domain(self, domain: str) -> bool:
        return False

    def resolve(self, address: str) -> Resolution:
        return Resolution(remote=[address])

    def password_hash(self, user: str) -> str | None:
        return None

    def send_as(self, user: str) -> set[str]:
        return {user}

    def may_send_as(self, user: str, address: str) -> bool:
        return True


class AnyPassword(Authenticator):
    """Logins of sandbox mode: any password opens the inbox named by the user name, with no
    throttling (there is no secret to guess)."""

    def __init__(self, directory: SandboxDirectory, config: Config, reactor: object) -> None:
        super().__init__(directory, config.auth, reactor)

    def login(
        self, username: str, password: str, ip: str, protocol: str
    ) -> defer.Deferred[LoginResult]:
        name = inbox_name(username)
        if name is None:
            log.info(
                "{protocol}: sandbox login refused for {user!r} from {ip}: not an inbox name",
                protocol=protocol,
                user=username[:80],
                ip=ip,
            )
            return defer.succeed(LoginResult(Outcome.BAD_CREDENTIALS))
        return defer.succeed(LoginResult(Outcome.OK, name))
