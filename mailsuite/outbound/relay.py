"""The relay (MTA) role: take one message to the servers of one destination, per recipient.

Written here rather than using twisted.mail.relaymanager: that bounces every 4xx at once, never
falls back to the next MX and does not run on Python 3 (research/twisted-mail.md 4.1-4.3).

:meth:`Relay.send` is given a message, a sender and the recipients of one route (one domain
delivered by MX, or the recipients one configured route serves: ``[relay] routes`` and the
smarthost, its ``"*"`` route, see mailsuite.outbound.routes) and fires with one
:class:`RecipientResult` per recipient.  MX delivery and configured routes share this one code
path; they differ only in where the host list comes from and in the TLS/AUTH settings.

It never fails: DNS trouble, refused connections and odd servers all end up as
replies (made-up local ones say so with ``remote=False``) that the queue runner files as
delivered (2xx), retry (4xx) or bounce (5xx).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer, endpoints, threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailsuite.config import Config, RelayRoute
from mailsuite.outbound.client import SessionParameters, SMTPClientSession, deliver
from mailsuite.outbound.downgrade import downgrade_file
from mailsuite.outbound.mx import MXError, MXHost, MXResolver, apply_loop_rule, make_resolver
from mailsuite.outbound.result import Outcome, Timeouts, TransactionResult
from mailsuite.outbound.routes import RouteTable, next_hop_hosts
from mailsuite.outbound.wire import MessageInfo, scan_message
from mailsuite.smtp.replies import Reply
from mailsuite.tls import client_tls_options

__all__ = [
    "MAX_RCPTS_PER_TRANSACTION",
    "SMARTHOST_ROUTE",
    "RecipientResult",
    "Relay",
    "SelfCheck",
    "listening_addresses",
    "too_many_recipients",
]

log = Logger(namespace="mailsuite.relay")

#: RFC 5321 4.5.3.1.8: a server must accept at least 100 recipients per transaction.
MAX_RCPTS_PER_TRANSACTION = 100
#: The route key of the ``"*"`` route, which is what a smarthost is: every remote recipient
#: without a route of its own goes out under it.
SMARTHOST_ROUTE = RelayRoute("*", "", 0, False).key


@dataclass(frozen=True)
class RecipientResult:
    """The final word on one recipient after an attempt: ``reply`` positive = delivered,
    transient = try again later, permanent = bounce. ``host`` is the server that said it."""

    address: str
    reply: Reply
    host: str | None = None


_local = Reply.local


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


def _downgrade(
    message_path: Path, scratch_dir: Path, resign: Callable[[bytes], bytes] | None = None
) -> tuple[str, int]:
    """Blocking: a 7-bit copy of the message and its SIZE (RFC 1870) value.

    The conversion changes the body, so a DKIM signature we made at submission would fail
    at the receiver: ``resign`` makes ours again over the copy (it is a scratch file,
    remade on every attempt, so it is rewritten in place without fsync)."""
    path = downgrade_file(message_path, scratch_dir)
    try:
        if resign is not None:
            data = path.read_bytes()
            signed = resign(data)
            if signed is not data:
                path.write_bytes(signed)
        return str(path), scan_message(path).wire_size
    except BaseException:
        _unlink(path)
        raise


def _unlink(path: str | os.PathLike[str]) -> None:
    with contextlib.suppress(FileNotFoundError):
        Path(path).unlink()


def too_many_recipients(reply: Reply) -> bool:
    """A RCPT refused because of the per-transaction limit (RFC 5321 4.5.3.1.10: 452, and the
    older 552 that clients should treat alike), told apart from "mailbox full" (452 4.2.2) by
    the enhanced code 4.5.3/5.5.3 or, without one, by the reply text."""
    if reply.code not in (452, 552) or not reply.remote:
        return False
    if reply.enhanced is not None:
        return reply.enhanced in ("4.5.3", "5.5.3")
    return "too many recipients" in reply.text.lower()


def _endpoint_interface(desc: str) -> str | None:
    """The ``interface=`` of a tcp/tcp6/ssl server endpoint string ('' = every address);
    None for endpoints that are not IP listeners (unix, systemd)."""
    parts = re.split(r"(?<!\\):", desc)
    kind = parts[0]
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    for part in parts[1:]:
        key, _, value = part.partition("=")
        if key == "interface":
            return value.replace("\\:", ":")
    return "::" if kind == "tcp6" else ""


def listening_addresses(listen: dict[str, tuple[str, ...]]) -> tuple[set[str], bool]:
    """The addresses the configured listeners bind, and whether one binds every address."""
    out: set[str] = set()
    wildcard = False
    for descs in listen.values():
        for desc in descs:
            interface = _endpoint_interface(desc)
            if interface is None:
                continue
            if interface in ("", "0.0.0.0", "::"):
                wildcard = True
                continue
            try:
                out.add(str(ipaddress.ip_address(interface)))
            except ValueError:
                continue
    return out, wildcard


def _assigned_here(address: str) -> bool:
    """True when ``address`` belongs to this host: the kernel lets us bind it."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((str(ip), 0))
    except OSError:
        return False
    return True


class SelfCheck:
    """Recognises this server among a domain's MX hosts (RFC 5321 5.1, the loop rule): by name
    (``[server] hostname``) or by address (an address one of our listeners binds; with a
    wildcard listener, any address assigned to this host). Like Postfix's inet_interfaces,
    the port is not compared: ``[relay] port`` is where others listen, not us."""

    def __init__(self, hostname: str, listen: dict[str, tuple[str, ...]]) -> None:
        self.hostname = hostname.rstrip(".").lower()
        self.addresses, self.wildcard = listening_addresses(listen)
        self._assigned: dict[str, bool] = {}

    def __call__(self, host: MXHost) -> bool:
        if host.name.rstrip(".").lower() == self.hostname:
            return True
        return any(self.is_own_address(a) for a in host.addresses)

    def is_own_address(self, address: str) -> bool:
        try:
            address = str(ipaddress.ip_address(address))
        except ValueError:
            return False
        if address in self.addresses:
            return True
        if not self.wildcard:
            return False
        if address not in self._assigned:
            self._assigned[address] = _assigned_here(address)
        return self._assigned[address]


class Relay:
    """Routes and delivers; one per server. ``deliver_fn`` and ``resolver`` are replaceable
    for tests (``deliver_fn`` has :func:`mailsuite.outbound.client.deliver`'s signature).
    ``resign`` (blocking: message bytes in, message bytes out) makes our DKIM signatures
    again on the 7-bit copy made for a server without 8BITMIME (see `_downgrade`)."""

    def __init__(
        self,
        config: Config,
        reactor: Any,
        *,
        resolver: Any = None,
        deliver_fn: Callable[..., Deferred[TransactionResult]] = deliver,
        rng: random.Random | None = None,
        timeouts: Timeouts = Timeouts(),
        blocking: Callable[..., Deferred[Any]] | None = None,
        resign: Callable[[bytes], bytes] | None = None,
    ) -> None:
        self.config = config
        self.resign = resign
        self.relay = config.relay
        self.reactor = reactor
        if resolver is None:
            ns = list(config.nameservers) if config.nameservers else None
            resolver = make_resolver(ns, reactor)
        self.resolver = resolver
        self.mx = MXResolver(resolver, rng=rng, clock=reactor)
        self.is_self = SelfCheck(config.hostname, config.listen)
        self.deliver_fn = deliver_fn
        self.timeouts = timeouts
        if blocking is None:
            if reactor is not None and hasattr(reactor, "getThreadPool"):

                def blocking(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
                    return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)
            else:

                def blocking(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
                    return defer.maybeDeferred(f, *args)

        self._blocking = blocking
        self.routes = RouteTable(self.relay.routes)

    def route_key(self, address: str) -> str:
        """Recipients with the same key go out together: the key of the configured route
        that serves the recipient's domain, or the domain itself (delivery by MX)."""
        domain = domain_of(address)
        route = self.routes.match(domain)
        return route.key if route is not None else domain

    def send(
        self,
        route: str,
        sender: str,
        rcpts: Sequence[str],
        message_path: Path,
        info: MessageInfo,
        *,
        smtputf8: bool = False,
        body_8bit: bool = False,
        scratch_dir: Path | None = None,
    ) -> Deferred[dict[str, RecipientResult]]:
        """``scratch_dir`` is where a 7-bit copy of an 8-bit message is written if a server
        lacks 8BITMIME (the spool's tmp/, cleared at start; default: beside the message)."""
        return defer.ensureDeferred(
            self._send_and_clean(
                route,
                sender,
                list(rcpts),
                message_path,
                info,
                smtputf8,
                body_8bit,
                scratch_dir if scratch_dir is not None else message_path.parent,
            )
        )

    async def _send_and_clean(
        self,
        route: str,
        sender: str,
        rcpts: list[str],
        message_path: Path,
        info: MessageInfo,
        smtputf8: bool,
        body_8bit: bool,
        scratch_dir: Path,
    ) -> dict[str, RecipientResult]:
        # RFC 6152 3: one 7-bit copy per send, made the first time a server needs it,
        # reused for every further host and transaction, removed at the end.
        copies: list[tuple[str, int]] = []

        async def convert() -> tuple[str, int]:
            if not copies:
                copies.append(
                    await self._blocking(_downgrade, message_path, scratch_dir, self.resign)
                )
            return copies[0]

        downgrade = (lambda: defer.ensureDeferred(convert())) if body_8bit else None
        try:
            return await self._send(
                route, sender, rcpts, message_path, info, smtputf8, body_8bit, downgrade
            )
        finally:
            for path, _size in copies:
                await self._blocking(_unlink, path)

    async def _send(
        self,
        route: str,
        sender: str,
        rcpts: list[str],
        message_path: Path,
        info: MessageInfo,
        smtputf8: bool,
        body_8bit: bool,
        downgrade: Any = None,
    ) -> dict[str, RecipientResult]:
        hop = self.routes.get(route)
        try:
            if hop is not None:
                hosts = list(await next_hop_hosts(hop, self.mx, self.is_self))
                port = hop.port
            else:
                hosts = list(apply_loop_rule(await self.mx.resolve(route), self.is_self).hosts)
                port = self.relay.port
        except MXError as e:
            # RFC 7505 / NXDOMAIN: permanent; SERVFAIL / timeout: try again later.
            reply = (
                _local(550, e.status, e.reason) if e.permanent else _local(451, e.status, e.reason)
            )
            log.info("relay: {route}: {reply}", route=route, reply=str(reply))
            return {r: RecipientResult(r, reply) for r in rcpts}
        out: dict[str, RecipientResult] = {}
        batches = [
            rcpts[start : start + MAX_RCPTS_PER_TRANSACTION]
            for start in range(0, len(rcpts), MAX_RCPTS_PER_TRANSACTION)
        ]
        while batches:
            batch = batches.pop(0)
            results = await self._transaction(
                route,
                hosts,
                port,
                sender,
                batch,
                message_path,
                info,
                smtputf8,
                body_8bit,
                downgrade,
            )
            out.update(results)
            # RFC 5321 4.5.3.1.10: "452 too many recipients" means the server's limit per
            # transaction was reached, not that these recipients have a problem: send them at
            # once in a new transaction. Only after progress (someone was accepted), so a
            # server that takes nobody falls back to the ordinary retry schedule.
            over = [r for r in batch if too_many_recipients(results[r].reply)]
            if over and len(over) < len(batch) and any(results[r].reply.positive for r in batch):
                log.info(
                    "relay: {route}: server limit reached; {n} recipients in a new transaction",
                    route=route,
                    n=len(over),
                )
                batches.insert(0, over)
        for rcpt, result in out.items():
            if result.reply.permanent and too_many_recipients(result.reply):
                # 4.5.3.1.10: a 552 for the recipient limit is temporary all the same.
                out[rcpt] = RecipientResult(
                    rcpt,
                    _local(452, "4.5.3", f"{result.host or route}: {result.reply}"),
                    result.host,
                )
        return out

    async def _transaction(
        self,
        route: str,
        hosts: list[MXHost],
        port: int,
        sender: str,
        batch: list[str],
        message_path: Path,
        info: MessageInfo,
        smtputf8: bool,
        body_8bit: bool,
        downgrade: Any = None,
    ) -> dict[str, RecipientResult]:
        """Try the hosts in order (RFC 5321 5.1) until every recipient has a definite answer,
        or a host may have taken the message (then no further host is tried)."""
        out: dict[str, RecipientResult] = {}
        todo = list(batch)
        for host in hosts:
            result = await self._one_host(
                route, host, port, sender, todo, message_path, info, smtputf8, body_8bit, downgrade
            )
            log.info(
                "relay: {route} via {host} [{address}]: {outcome} {reply}",
                route=route,
                host=host.name,
                address=result.address or "-",
                outcome=result.outcome.value,
                reply=str(result.reply),
            )
            remote_host = host.name if result.address else None
            retry_elsewhere = []
            for rcpt in todo:
                reply = result.recipients.get(rcpt, result.reply)
                if result.outcome is Outcome.GREETING_REFUSED and reply.permanent:
                    # A 5xx greeting says "no service here", not "no such recipient": skip
                    # the host and, if it was the last, try later (as Postfix does).
                    reply = _local(451, "4.4.0", f"{host.name} refused to talk to us: {reply}")
                elif (
                    result.outcome in (Outcome.AUTH_FAILED, Outcome.TLS_FAILED) and reply.permanent
                ):
                    # Our credentials or the smarthost's TLS are wrong: a configuration problem
                    # for the postmaster to fix, not a reason to return the mail. Keep it.
                    reply = _local(451, "4.7.0", f"{host.name}: {reply}")
                out[rcpt] = RecipientResult(rcpt, reply, remote_host)
                if result.try_next_mx or (
                    reply.transient and reply.remote and result.outcome is not Outcome.DELIVERED
                ):
                    # The host did not take it (unreachable, or said 4xx): next MX. Not after
                    # a local timeout in DATA: the message may have arrived (RFC 5321 6.1).
                    retry_elsewhere.append(rcpt)
            todo = retry_elsewhere
            if not todo:
                break
        return out

    async def _one_host(
        self,
        route: str,
        host: MXHost,
        port: int,
        sender: str,
        rcpts: list[str],
        message_path: Path,
        info: MessageInfo,
        smtputf8: bool,
        body_8bit: bool,
        downgrade: Any = None,
    ) -> TransactionResult:
        helo = self.config.hostname
        hop = self.routes.get(route)
        if hop is None:  # a domain's MX host: opportunistic STARTTLS, no AUTH
            tls, tls_verify, auth = "opportunistic", self.relay.tls_verify, None
        else:
            tls, tls_verify = hop.tls, hop.tls_verify
            auth = (hop.user, hop.password or "") if hop.user else None
        context = client_tls_options(host.name, tls_verify, self.relay.tls_ca)
        if tls == "implicit":
            return await self._implicit_tls(
                host,
                port,
                helo,
                sender,
                rcpts,
                message_path,
                info,
                smtputf8,
                body_8bit,
                context,
                auth,
                downgrade,
            )
        return await self.deliver_fn(
            self.reactor,
            host.name,
            port,
            host.addresses,
            helo,
            sender,
            rcpts,
            message_path,
            size=info.wire_size,
            body_8bit=body_8bit,
            smtputf8=smtputf8,
            tls=tls,
            tls_verify=tls_verify,
            tls_client_context=context,
            auth=auth,
            timeouts=self.timeouts,
            downgrade=downgrade,
        )

    async def _implicit_tls(
        self,
        host: MXHost,
        port: int,
        helo: str,
        sender: str,
        rcpts: list[str],
        message_path: Path,
        info: MessageInfo,
        smtputf8: bool,
        body_8bit: bool,
        context: Any,
        auth: tuple[str, str] | None,
        downgrade: Any = None,
    ) -> TransactionResult:
        """RFC 8314 implicit TLS (port 465): TLS from the first byte, then the same session.

        ``deliver`` only speaks STARTTLS, so the session runs here over a TLS endpoint, marked
        as already secure (AUTH is then allowed, STARTTLS not attempted)."""
        params = SessionParameters(
            host=host.name,
            helo_name=helo,
            mail_from=sender,
            rcpts=tuple(rcpts),
            message_path=str(message_path),
            size=info.wire_size,
            body_8bit=body_8bit,
            smtputf8=smtputf8,
            tls="none",
            auth=auth,
            timeouts=self.timeouts,
            downgrade=downgrade,
        )
        errors = []
        for address in host.addresses:
            session = SMTPClientSession(params, self.reactor)
            session.tls_active = True
            cls = (
                endpoints.TCP6ClientEndpoint
                if ipaddress.ip_address(address).version == 6
                else endpoints.TCP4ClientEndpoint
            )
            endpoint = endpoints.wrapClientTLS(
                context, cls(self.reactor, address, port, timeout=self.timeouts.connect)
            )
            try:
                await endpoints.connectProtocol(endpoint, session)
            except Exception as e:  # any connect failure means: next address
                errors.append(f"{address}:{port}: {e}")
                continue
            return await session.done
        reply = _local(451, "4.4.1", "no connection: " + ("; ".join(errors) or "no addresses"))
        return TransactionResult(
            outcome=Outcome.CONNECT_FAILED,
            reply=reply,
            stage="connect",
            recipients={r: reply for r in rcpts},
            host=host.name,
            port=port,
        )
