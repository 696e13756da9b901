"""Mail authentication as one object of the server: built once, started and stopped with it.

:class:`MailAuth` owns the worker pool, the DNS client over the server's resolver, the DKIM key
store and signer and the inbound checker, and is what the SMTP layer is given (as
``runtime.mail_auth``).  Its calls are the whole interface:

- :meth:`MailAuth.applies_to` - whether a session's mail is checked at all (not for
  authenticated submission, not for ``[relay] trusted_networks``);
- :meth:`MailAuth.check_message` - the :class:`~mailsuite.mailauth.inbound.Verdict` for a
  message received on the MX listener, at the end of DATA (:meth:`MailAuth.check_now`: the
  same at once, when it can be had without waiting);
- :meth:`MailAuth.sign` - the DKIM-Signature fields for a submitted or relayed message, to be
  written at its top before its queue entry or local delivery is made durable.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.defer import Deferred

from mailsuite.config import Config
from mailsuite.mailauth.dkim_keys import KeyStore
from mailsuite.mailauth.dkim_sign import Signer
from mailsuite.mailauth.dmarc import organizational_domain
from mailsuite.mailauth.dns import BlockingDNS, DNSClient
from mailsuite.mailauth.inbound import InboundChecker, Verdict
from mailsuite.mailauth.workers import WorkerPool
from mailsuite.reactor_lag import freeze_startup_objects

__all__ = ["MailAuth"]


class MailAuth(service.Service):
    """See the module docstring.  ``resolver`` is the server's one twisted.names resolver."""

    def __init__(
        self, config: Config, reactor: Any, resolver: Any, rng: random.Random | None = None
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.workers = WorkerPool(reactor, config.mail_auth.threads)
        self.dns = DNSClient(resolver, reactor, timeout=config.dns.timeout)
        self.blocking_dns = BlockingDNS(self.dns, reactor, lane=self.workers.lane)
        self.keys = KeyStore(config.dkim_dir)
        self.signer = Signer(self.keys)
        self.inbound = InboundChecker(
            config.mail_auth, config.hostname, self.workers, self.blocking_dns, rng
        )

    def startService(self) -> None:
        service.Service.startService(self)  # by name: Twisted's is unannotated (setup.cfg)
        self.workers.startService()
        # Parse the Public Suffix List (~150 ms) now, in a worker, not on the first message;
        # then keep its objects out of the garbage collector's full collections.
        warm = self.workers.run(organizational_domain, "example.com")
        warm.addCallback(lambda _: freeze_startup_objects())
        warm.addErrback(lambda _f: None)

    def stopService(self) -> Deferred[None]:
        service.Service.stopService(self)
        return self.workers.stopService()

    def applies_to(self, client_ip: str, authenticated: bool) -> bool:
        """Whether mail from this session is checked: only unauthenticated mail from outside
        ``[relay] trusted_networks``, and only when some check is on."""
        if authenticated or not self.config.mail_auth.verifies:
            return False
        return not self.config.relay.is_trusted(client_ip)  # (parses the address: last)

    def check_message(
        self,
        message: bytes | Path,
        mail_from: str,
        helo: str,
        client_ip: str,
        inline: bool = True,
    ) -> Deferred[Verdict]:
        """See :meth:`InboundChecker.check_message`."""
        return self.inbound.check_message(message, mail_from, helo, client_ip, inline)

    def check_now(
        self, message: bytes, mail_from: str, helo: str, client_ip: str
    ) -> Verdict | None:
        """See :meth:`InboundChecker.check_now`."""
        return self.inbound.check_now(message, mail_from, helo, client_ip)

    def sign(self, message: bytes | Path, from_domain: str | None = None) -> Deferred[bytes]:
        """DKIM-Signature fields (LF line ends) for ``message``, computed in the worker pool;
        b"" when signing is off or the domain has no key.  ``from_domain`` defaults to the
        domain of the message's (first) From address."""
        if not self.config.mail_auth.sign:
            return defer.succeed(b"")

        def sign_blocking() -> bytes:
            data = message if isinstance(message, bytes) else message.read_bytes()
            return self.signer.signature_headers(data, from_domain)

        return self.workers.run(sign_blocking)
