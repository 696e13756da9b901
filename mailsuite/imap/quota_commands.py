"""The IMAP QUOTA extension (RFC 9208): GETQUOTAROOT, GETQUOTA and SETQUOTA.

Each user has one quota root, named ``""`` (the root RFC 2087's examples use), covering every
folder; its resources are STORAGE (RFC 9208 5.1: the size of the messages in units of 1024
octets) and MESSAGE (5.2: their number), each reported when it is limited, set by the
administrator with ``mailsuite user quota`` or a domain default.  SETQUOTA
is refused: limits are the administrator's, not the user's (RFC 9208 4.1.3 lets a server
refuse it).  A user without a limit has no quota root.

The usage comes from the user's quota file (:mod:`mailsuite.store.quota`), read in a thread:
when the file is missing or names another limit than the directory's (a limit set by hand in
``directory.json``), it is recounted first.  Refusals over the limit (``NO [OVERQUOTA]`` on
APPEND, COPY and MOVE) come from the store's write helpers
(:func:`mailsuite.store.folder_copy.append_blocking`,
:func:`~mailsuite.store.folder_copy.copy_blocking`).
"""

from __future__ import annotations

from mailsuite.imap.parser import Command, astring
from mailsuite.imap.session_base import SessionBase, _bad, _no, quote
from mailsuite.store import quota

#: The capabilities this module adds once logged in (RFC 9208 3.1, 5.1).
CAPABILITIES = ("QUOTA", "QUOTA=RES-STORAGE", "QUOTA=RES-MESSAGE")
#: The name of every user's one quota root.
ROOT = ""


def _kib_used(n: int) -> int:
    """Bytes to RFC 9208's units of 1024 octets, rounded up (a byte used is a unit used)."""
    return (n + 1023) // 1024


class QuotaCommands(SessionBase):
    """GETQUOTAROOT, GETQUOTA, SETQUOTA for :class:`mailsuite.imap.session.Session`."""

    async def _usage_now(self) -> quota.Usage | None:
        assert self.user is not None
        limit, messages = self.shared.quota_limits(self.user)
        if not limit and not messages:
            return None
        root = self.shared.mailbox_root(self.user)
        return await self.shared.run_blocking(quota.ensure, root, limit, messages)

    def _quota_line(self, usage: quota.Usage) -> bytes:
        items = []
        if usage.limit:
            items.append(f"STORAGE {_kib_used(usage.bytes)} {usage.limit // 1024}")
        if usage.max_messages:
            items.append(f"MESSAGE {usage.messages} {usage.max_messages}")
        return b"* QUOTA " + quote(ROOT) + b" (" + " ".join(items).encode() + b")\r\n"

    async def do_GETQUOTAROOT(self, cmd: Command) -> None:
        if len(cmd.args) != 1:
            raise _bad("GETQUOTAROOT expects a mailbox name")
        name = self._mailbox_arg(cmd.args[0])
        if not self._acct().exists(name):
            raise _no("No such mailbox", "NONEXISTENT")
        usage = await self._usage_now()
        roots = b" " + quote(ROOT) if usage is not None else b""
        out = b"* QUOTAROOT " + quote(name) + roots + b"\r\n"
        if usage is not None:
            out += self._quota_line(usage)
        self.send(out)
        self.ok(cmd, "GETQUOTAROOT completed")

    async def do_GETQUOTA(self, cmd: Command) -> None:
        if len(cmd.args) != 1:
            raise _bad("GETQUOTA expects a quota root")
        root = astring(cmd.args[0]).decode("utf-8", "replace")
        usage = await self._usage_now()
        if root != ROOT or usage is None:
            raise _no("No such quota root", "NONEXISTENT")
        self.send(self._quota_line(usage))
        self.ok(cmd, "GETQUOTA completed")

    def do_SETQUOTA(self, cmd: Command) -> None:
        raise _no("Quotas are set by the administrator (mailsuite user quota)", "NOPERM")
