"""The shared state every protocol service is given: config, directory, logins, TLS, store
events and the outbound queue.  One object, built once by :mod:`mailsuite.service`, passed
to each protocol factory so nothing reaches for globals (and tests can build their own)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mailsuite.auth import Authenticator
from mailsuite.config import Config
from mailsuite.connection_limits import ConnectionLimits
from mailsuite.directory import Directory
from mailsuite.disk_jobs import DiskJobs
from mailsuite.flow import HeapTrim
from mailsuite.shared.folder_watch import folder_watcher
from mailsuite.store.events import ChangeHub
from mailsuite.store.mailbox import FolderRegistry
from mailsuite.store.space import FreeSpace


@dataclass
class Runtime:
    config: Config
    reactor: Any
    directory: Directory
    auth: Authenticator
    changes: ChangeHub
    #: :class:`mailsuite.tls.ServerTLS` when a certificate is configured or generated.
    tls: Any | None = None
    #: The outbound queue (see mailsuite.queue); None means remote delivery is unavailable
    #: and remote recipients are answered 451 4.4.0.
    queue: Any | None = None
    #: The server's one twisted.names resolver (``[dns] nameservers`` or the system's), shared
    #: by outbound MX lookups and mail authentication.
    resolver: Any | None = None
    #: :class:`mailsuite.mailauth.service.MailAuth`: DKIM signing and SPF/DKIM/DMARC/ARC checks.
    mail_auth: Any | None = None
    #: Folders open in IMAP and POP3 sessions (:class:`mailsuite.store.mailbox.FolderRegistry`),
    #: shared by every listener of both; made on first use by :meth:`folder_registry`.
    folders: FolderRegistry | None = None
    #: Free space on the data folder's file system: SMTP refuses MAIL while it is too low
    #: (``[smtp] min_free_space``).  None: never checked.
    space: FreeSpace | None = None
    #: Connection counters per service ("smtp", "submission", "imap", "pop3"), shared by the
    #: listeners of each (see mailsuite.connection_limits.shared_limits).
    connection_limits: dict[str, ConnectionLimits] = field(default_factory=dict)
    #: Sieve at local delivery (:class:`mailsuite.sieve.engine.SieveFilter`): delivery calls
    #: ``runtime.sieve.evaluate(path, envelope)`` in its thread (see mailsuite.sieve.apply).
    sieve: Any | None = None
    #: :class:`mailsuite.metrics.Metrics`: what /metrics exports.
    metrics: Any = None
    #: :class:`mailsuite.web.site.WebRoot` of ``[listen] web`` (None when it is off): mount
    #: resources with ``runtime.web.mount(path, resource)``.
    web: Any | None = None
    #: :class:`mailsuite.sandbox.service.Sandbox` in sandbox mode (``[server] mode``), else
    #: None: the capture catalog, its events and waiters.
    sandbox: Any | None = None
    #: Returns freed memory after stalled connections close (made by :meth:`heap_trim`).
    heap: HeapTrim | None = None
    #: The threads of local delivery's file work (made by :meth:`disk_jobs`).
    disk: DiskJobs | None = None

    def folder_registry(self) -> FolderRegistry:
        """The process's one registry of open folders (the folder model IMAP and POP3 share,
        DESIGN.md): a change one session makes is announced to the others."""
        if self.folders is None:
            reactor = self.reactor
            self.folders = FolderRegistry(
                self.changes,
                lambda f: reactor.callLater(0, f),
                watcher=folder_watcher(reactor),
                call_later=reactor.callLater,
            )
        return self.folders

    def heap_trim(self) -> HeapTrim:
        """The process's one :class:`~mailsuite.flow.HeapTrim`, told by each protocol
        when a connection whose output stalled closes."""
        if self.heap is None:
            self.heap = HeapTrim(self.reactor)
        return self.heap

    def disk_jobs(self) -> DiskJobs:
        """The process's one :class:`~mailsuite.disk_jobs.DiskJobs`: the threads that create,
        write, fsync and rename the messages SMTP receives."""
        if self.disk is None:
            self.disk = DiskJobs(self.reactor)
        return self.disk
