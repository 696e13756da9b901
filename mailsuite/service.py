"""Build the whole server, a ``MultiService``, from a :class:`~mailsuite.config.Config`.

Each ``[listen]`` service name maps to a protocol factory builder, imported only when that
service is configured (so a partial config does not import, say, IMAP).  Implicit-TLS
services (``submissions``, ``imaps``, ``pop3s``) get their factory wrapped in TLS here, so
listeners take plain ``tcp:`` endpoint descriptions and share one reloadable certificate set.
Every listener's factory is wrapped once more to count its connections for ``/metrics``.
The web listener serves the resource tree built here (:func:`web_tree`), which other parts
of the server mount into.
"""

from __future__ import annotations

import importlib
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.internet import endpoints, threads
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from twisted.python.components import proxyForInterface

from mailsuite import tls
from mailsuite.auth import Authenticator
from mailsuite.config import Config, ConfigError
from mailsuite.directory import Directory
from mailsuite.leftovers import LeftoverSweeper
from mailsuite.mailauth.dns import server_resolver
from mailsuite.mailauth.service import MailAuth
from mailsuite.metrics import Metrics
from mailsuite.ownership import give_to, give_tree_to
from mailsuite.queue.runner import make_spool, queue_service
from mailsuite.reactor_dispatch import lean_dispatch
from mailsuite.reactor_lag import ReactorLag, freeze_startup_objects
from mailsuite.runtime import Runtime
from mailsuite.sieve.engine import SieveFilter, SieveSettings
from mailsuite.store.events import ChangeHub
from mailsuite.store.space import FreeSpace, ensure_reserve

log = Logger(namespace="mailsuite.service")

#: service name -> ("module:function", implicit TLS).  The function takes
#: ``(runtime, implicit_tls)`` and returns the protocol factory.
FACTORIES: dict[str, tuple[str, bool]] = {
    "smtp": ("mailsuite.smtp.protocol:mx_factory", False),
    "submission": ("mailsuite.smtp.protocol:submission_factory", False),
    "submissions": ("mailsuite.smtp.protocol:submission_factory", True),
    "imap": ("mailsuite.imap.server:imap_factory", False),
    "imaps": ("mailsuite.imap.server:imap_factory", True),
    "pop3": ("mailsuite.pop3.server:pop3_factory", False),
    "pop3s": ("mailsuite.pop3.server:pop3_factory", True),
    "managesieve": ("mailsuite.managesieve.server:managesieve_factory", False),
    "web": ("mailsuite.web.site:web_factory", False),
}


#: In sandbox mode every SMTP listener captures (see mailsuite.sandbox.smtp).
SANDBOX_FACTORIES = {
    name: "mailsuite.sandbox.smtp:sandbox_factory" for name in ("smtp", "submission", "submissions")
}


def _builder(spec: str) -> Callable[[Runtime, bool], IProtocolFactory]:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def _change_hub() -> ChangeHub:
    """The process's change hub, logging (as the folder registry does) to the server's log:
    the store imports no Twisted and is given its logger (mailsuite.corelog)."""
    return ChangeHub(Logger(namespace="mailsuite.store"))


def build_runtime(config: Config, reactor: Any) -> Runtime:
    """Create the data folder and the shared objects the services use, and give the reactor
    the lean event dispatch (:mod:`mailsuite.reactor_dispatch`; the worker processes build
    their runtime here too)."""
    lean_dispatch(reactor)
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    config.mail_dir.mkdir(exist_ok=True, mode=0o700)
    if config.mode == "sandbox":
        return _sandbox_runtime(config, reactor)
    directory = Directory(config.directory_file, config.mail_dir, config.local_domains)
    auth = Authenticator(directory, config.auth, reactor)
    runtime = Runtime(config, reactor, directory, auth, _change_hub())
    runtime.space = FreeSpace(
        config.data_dir, config.smtp.min_free_space, config.smtp.max_message_size
    )
    runtime.tls = _server_tls(config, runtime)
    runtime.queue = make_spool(config.data_dir, reactor)
    runtime.resolver = server_resolver(config.nameservers, reactor)
    runtime.mail_auth = MailAuth(config, reactor, runtime.resolver)
    runtime.sieve = SieveFilter(SieveSettings.from_config(config), directory)
    runtime.metrics = Metrics()
    runtime.metrics.watch_queue(runtime.queue.env_dir)
    auth.observe = runtime.metrics.login
    # through the authenticator: a worker swaps in the shared failure log after this
    runtime.metrics.watch_throttling(lambda: auth.failures.throttled_ips())
    return runtime


def _sandbox_runtime(config: Config, reactor: Any) -> Runtime:
    """Sandbox mode: inboxes instead of users, any password, no mail authentication or
    Sieve; the outbound queue is there for releases only."""
    from mailsuite.sandbox.inboxes import AnyPassword, SandboxDirectory
    from mailsuite.sandbox.service import Sandbox

    directory = SandboxDirectory(config)
    runtime = Runtime(
        config, reactor, directory, AnyPassword(directory, config, reactor), _change_hub()
    )
    runtime.tls = _server_tls(config, runtime)
    runtime.queue = make_spool(config.data_dir, reactor)
    runtime.resolver = server_resolver(config.nameservers, reactor)
    runtime.metrics = Metrics()
    runtime.metrics.watch_queue(runtime.queue.env_dir)
    runtime.sandbox = Sandbox(runtime, directory)
    return runtime


def _server_tls(config: Config, runtime: Runtime) -> Any | None:
    """The configured certificates, or a self-signed one made for the embedded default."""
    pairs = [(p.cert, p.key) for p in config.tls]
    if not pairs:
        needs_tls = config.mode == "sandbox" or any(
            config.listen.get(s) for s in ("submission", "submissions", "imaps", "pop3s")
        )
        starttls = ("imap", "pop3", "managesieve")
        if not needs_tls and not any(config.listen.get(s) for s in starttls):
            return None
        cert, key = tls.ensure_self_signed(config.data_dir, config.hostname)
        log.warn(
            "No [tls] certificate configured: using the self-signed {cert} (clients will warn; "
            "set [tls] cert and key for real use)",
            cert=str(cert),
        )
        pairs = [(cert, key)]
    try:
        return tls.ServerTLS(pairs)
    except tls.TLSConfigError as e:
        raise ConfigError(f"{config.where}: [tls] {e.which}: {e}") from None


def makeService(
    config: Config, reactor: Any = None, run_as: tuple[int, int] | None = None
) -> service.MultiService:
    """The server as a ``MultiService``: one child per listening endpoint plus helpers.

    ``run_as`` is the (uid, gid) twistd will switch to after binding the ports (``--uid`` /
    ``--gid``); what this start creates as root in the data folder is handed to it.

    With ``[server] workers`` > 1 this process binds the listeners, runs the queue and
    supervises the worker processes that serve them (:mod:`mailsuite.workers`).
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    from mailsuite.workers import count

    workers = count(config)
    if workers > 1:
        odd = [
            d
            for descs in config.listen.values()
            for d in descs
            if d.split(":", 1)[0] not in ADOPTABLE
        ]
        if odd:
            log.warn(
                "{where}: [server] workers = {n}: listener {desc!r} cannot be shared with "
                "worker processes (only tcp:, tcp6: and unix: can); running one process",
                where=config.where,
                n=workers,
                desc=odd[0],
            )
            workers = 1
    if workers > 1:
        from mailsuite.metrics import share_with_workers
        from mailsuite.workers import live_state_dir

        live_dir = live_state_dir(config, owner=None if run_as is None else run_as[0])
        share_with_workers(live_dir)  # before build_runtime makes the Metrics
    runtime = build_runtime(config, reactor)
    if workers > 1:
        # asked again now that the data folder exists: the folder is noted as its own, and
        # those of data folders that are gone are removed (see live_state_dir)
        live_state_dir(config, owner=None if run_as is None else run_as[0])
    top = service.MultiService()
    top.runtime = runtime  # type: ignore[attr-defined]
    if workers > 1:
        from mailsuite.workers import WorkerSupervisor

        # Build what the workers will build, to stop here on a value only building finds
        # (a bad [pop3] expire, say) instead of in workers started again and again.
        list(listener_factories(runtime, []))
        runner = queue_service(runtime)
        attach(runner, top)
        attach(LeftoverSweeper(runtime), top)
        lag = ReactorLag(reactor)  # this reactor runs the queue and relays the workers' logs
        runtime.metrics.watch_reactor(lag)
        attach(lag, top)
        if runtime.mail_auth is not None:  # the queue's DSNs are DKIM-signed here
            attach(runtime.mail_auth, top)
        supervisor = WorkerSupervisor(config, reactor, workers, runner.enqueued, live_dir)
        attach(supervisor, top, "workers")
        if run_as is not None:  # last: what building made as root (metrics files) included
            hand_data_to(config, *run_as)
            give_tree_to(live_dir, *run_as)  # in tmpfs, outside the data folder
        freeze_startup_objects()  # see there: no 60-150 ms GC pauses, none at the start
        return top
    for extra in _extra_services(runtime):
        extra.setServiceParent(top)
    listeners: list[Any] = []
    for name, desc, factory in listener_factories(runtime, listeners):
        endpoint = endpoints.serverFromString(reactor, desc)
        svc = _Listener(endpoint, factory, f"[listen] {name} {desc!r}", config.where)
        attach(svc, top, f"{name} {desc}")
        listeners.append(svc)
    if run_as is not None:  # last: what building made as root included
        hand_data_to(config, *run_as)
    freeze_startup_objects()  # see there: no 60-150 ms GC pauses, none at the start
    return top


#: Endpoint kinds whose listening socket a worker process can adopt (``[server] workers``).
ADOPTABLE = ("tcp", "tcp6", "unix")


def listener_factories(
    runtime: Runtime, listeners: list[Any]
) -> Iterator[tuple[str, str, IProtocolFactory]]:
    """(service name, endpoint description, factory) for every configured listener, the
    factories wrapped for implicit TLS and connection counting.  ``listeners`` is the list
    the caller fills with its listener services (``problem()`` each), for /healthz."""
    config = runtime.config
    metrics: Metrics = runtime.metrics
    if config.listen.get("web"):
        runtime.web = web_tree(runtime, lambda: [svc.problem() for svc in listeners])
        if runtime.tls is not None:
            runtime.tls.observe_handshakes(metrics.tls_handshake)
    for name, (spec, implicit_tls) in FACTORIES.items():
        descs = config.listen.get(name, ())
        if not descs:
            continue
        if config.mode == "sandbox":
            spec = SANDBOX_FACTORIES.get(name, spec)
        factory = _builder(spec)(runtime, implicit_tls)
        if implicit_tls:
            if runtime.tls is None:
                raise RuntimeError(f"[listen] {name} needs TLS but no certificate is available")
            factory = runtime.tls.wrap_factory(factory)
        factory = CountingFactory(factory, *metrics.listener(name))
        for desc in descs:
            yield name, desc, factory


def web_tree(runtime: Runtime, listener_problems: Callable[[], list[str | None]]) -> Any:
    """The resource tree of ``[listen] web``: health, metrics, client autoconfiguration.
    Other parts add theirs with ``runtime.web.mount(path, resource)``."""
    from mailsuite.web.autoconfig import OutlookAutodiscover, ThunderbirdConfig
    from mailsuite.web.health import HealthCheck, HealthResource
    from mailsuite.web.prometheus import MetricsResource
    from mailsuite.web.site import WebRoot

    config = runtime.config
    metrics: Metrics = runtime.metrics
    root = WebRoot()
    queue: Any = runtime.queue
    folders = [config.data_dir, config.mail_dir, queue.root]
    root.mount("healthz", HealthResource(HealthCheck(listener_problems, folders, runtime.reactor)))
    root.mount("metrics", MetricsResource(metrics.exported(), runtime.reactor))
    thunderbird = ThunderbirdConfig(runtime)
    root.mount("mail/config-v1.1.xml", thunderbird)  # at autoconfig.<domain>
    root.mount(".well-known/autoconfig/mail/config-v1.1.xml", thunderbird)  # at <domain>
    outlook = OutlookAutodiscover(runtime)
    root.mount("autodiscover/autodiscover.xml", outlook)
    root.mount("Autodiscover/Autodiscover.xml", outlook)  # the spelling Outlook uses
    if runtime.sandbox is not None:
        from mailsuite.sandbox.api import ApiV1
        from mailsuite.sandbox.page import MessageView, Page

        root.mount("api/v1", ApiV1(runtime.sandbox))
        root.mount("view", MessageView(runtime.sandbox))
        root.mount("/", Page())
    return root


def attach(child: service.Service, parent: service.MultiService, name: str | None = None) -> None:
    """Name ``child`` (if given a name) and add it to ``parent``.  Typed as Twisted's base
    class so the calls into its unannotated methods are checked as calls into Twisted
    (setup.cfg ``untyped_calls_exclude``), whatever subclass ``child`` is."""
    if name is not None:
        child.setName(name)
    child.setServiceParent(parent)


class CountingFactory(proxyForInterface(IProtocolFactory, "wrapped")):  # type: ignore[misc]
    """A listener's factory, counting the connections it accepts and those still open.

    The protocol is the wrapped factory's own (no wrapper between it and its transport, so
    STARTTLS and transport checks see what they always saw); only its ``connectionLost`` is
    chained to count the close."""

    def __init__(self, wrapped: IProtocolFactory, accepted: Any, open_now: Any) -> None:
        self.wrapped: Any = wrapped
        self.accepted = accepted
        self.open_now = open_now
        #: the protocols whose connection is open (a worker's shutdown waits for them)
        self.live: set[Any] = set()

    def buildProtocol(self, addr: Any) -> Any:
        protocol: Any = self.wrapped.buildProtocol(addr)
        if protocol is None:
            return None
        self.accepted.inc()
        self.open_now.inc()
        lost = protocol.connectionLost
        open_now = self.open_now
        live = self.live
        live.add(protocol)

        def connection_lost(reason: Any) -> Any:
            open_now.dec()
            live.discard(protocol)
            return lost(reason)

        protocol.connectionLost = connection_lost
        make_connection = protocol.makeConnection

        def made(transport: Any) -> Any:
            _release_on_close(protocol, transport)
            return make_connection(transport)

        protocol.makeConnection = made
        return protocol

    def logPrefix(self) -> str:  # noqa: N802
        """The wrapped factory's name in "... starting on PORT" log lines."""
        prefix = getattr(self.wrapped, "logPrefix", None)
        return str(prefix()) if prefix is not None else type(self.wrapped).__name__


def _release_on_close(protocol: Any, transport: Any) -> None:
    """Give back the connection's place in the connection limits when the server closes it
    (QUIT, LOGOUT, a refusal), before the close reaches the client rather than after.

    With worker processes the counts are shared, and a client that reconnects as soon as it
    sees the close may land on another worker: released only in ``connectionLost`` (after
    the socket is closed), the old connection could still count there.  The protocol's
    ``admission`` (every adapter names it so; under implicit TLS it is the wrapped
    protocol's) is released once; releasing again in ``connectionLost`` does nothing."""
    lose = transport.loseConnection

    def lose_connection(*args: Any) -> Any:
        inner = getattr(protocol, "wrappedProtocol", protocol)
        admission = getattr(inner, "admission", None)
        if admission is not None:
            admission.release()
        return lose(*args)

    transport.loseConnection = lose_connection


class _Listener(StreamServerEndpointService):
    """A listening endpoint whose failure to bind stops the start with one clear line."""

    def __init__(self, endpoint: Any, factory: IProtocolFactory, what: str, where: str) -> None:
        StreamServerEndpointService.__init__(self, _ObservedEndpoint(endpoint, self), factory)
        self._raiseSynchronously = True  # a port in use must stop the start, loudly
        self.what = what
        self.where = where
        self.port: Any = None  # the listening port, once bound
        self.failure: str | None = None  # why binding failed

    def problem(self) -> str | None:
        """What is wrong with this listener (for /healthz), or None when it listens."""
        if self.failure is not None:
            return f"{self.what}: cannot listen: {self.failure}"
        if self.port is None:
            return f"{self.what}: not listening yet"
        if not getattr(self.port, "connected", True):
            return f"{self.what}: not listening"
        return None

    def _bound(self, port: Any) -> Any:
        self.port = port
        return port

    def _failed(self, reason: Any) -> Any:
        self.failure = reason.getErrorMessage()
        return reason

    def privilegedStartService(self) -> None:
        try:
            StreamServerEndpointService.privilegedStartService(self)
        except CannotListenError as e:
            reason = getattr(e.socketError, "strerror", None) or str(e.socketError)
            raise SystemExit(
                f"mailsuite: {self.where}: {self.what}: cannot listen: {reason}"
                " (is another server using that port? ports below 1024 need root)"
            ) from None


class _ObservedEndpoint:
    """An endpoint that tells its :class:`_Listener` the port it bound or why it could not
    (before StreamServerEndpointService's own handlers, which swallow the failure)."""

    def __init__(self, endpoint: Any, listener: _Listener) -> None:
        self.endpoint = endpoint
        self.listener = listener

    def listen(self, factory: IProtocolFactory) -> Any:
        d = self.endpoint.listen(factory)
        d.addCallbacks(self.listener._bound, self.listener._failed)
        return d


def hand_data_to(config: Config, uid: int, gid: int) -> None:
    """Give the data folder to the account the server will run as (when started as root).

    Everything outside ``mail/`` is small (directory, certificates, queue) and always checked.
    The mail tree is walked only when the data folder itself still belongs to someone else,
    i.e. on the first start after setting up as root; afterwards the ``mailsuite`` command
    keeps new files in step (see :mod:`mailsuite.ownership`).
    """
    if os.geteuid() != 0:
        return
    data = config.data_dir
    first_time = data.stat().st_uid != uid
    give_to([data], uid, gid)
    for entry in data.iterdir():
        if entry == config.mail_dir and not first_time:
            give_to([entry], uid, gid)
            continue
        if entry.is_dir() and not entry.is_symlink():
            if entry == config.mail_dir:
                log.info(
                    "Handing {path} to uid {uid} (first start as root)", path=str(entry), uid=uid
                )
            give_tree_to(entry, uid, gid)
        else:
            give_to([entry], uid, gid)


class ReloadOnHangup(service.Service):
    """Re-read the TLS certificates on SIGHUP (``systemctl reload``, certbot deploy hooks).

    The signal handler only schedules the reload with ``reactor.callFromThread`` (safe from a
    signal handler); the previous handler is put back when the service stops.
    """

    def __init__(self, server_tls: Any, reactor: Any) -> None:
        self.server_tls = server_tls
        self.reactor = reactor
        self._previous: Any = None
        self._installed = False

    def startService(self) -> None:
        service.Service.startService(self)
        if hasattr(signal, "SIGHUP"):
            self._previous = signal.signal(signal.SIGHUP, self._on_signal)
            self._installed = True

    def stopService(self) -> Any:
        if self._installed:
            signal.signal(signal.SIGHUP, self._previous or signal.SIG_DFL)
            self._installed = False
        return service.Service.stopService(self)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self._reload)

    def _reload(self) -> None:
        log.info("SIGHUP: reloading TLS certificates")
        try:
            self.server_tls.reload()  # logs success, or failure while keeping the old ones
        except Exception:
            log.failure("SIGHUP: TLS reload failed")


def _extra_services(runtime: Runtime, worker: bool = False) -> list[service.Service]:
    """Non-listening services: the reactor's lag probe (exported on /metrics), mail
    authentication's worker pool, certificate reload, the outbound queue runner, the sweep of
    temporary files left by interrupted writes, the keeper of the disk space reserve.  A
    worker process (``worker``) leaves the last three to its supervisor: one of each per
    server."""
    lag = ReactorLag(runtime.reactor)
    runtime.metrics.watch_reactor(lag)
    out: list[service.Service] = [lag]
    if runtime.mail_auth is not None:
        out.append(runtime.mail_auth)
    if runtime.tls is not None:
        out.append(tls.TLSReloadService(runtime.tls, 60))
        out.append(ReloadOnHangup(runtime.tls, runtime.reactor))
    if not worker:
        out.append(queue_service(runtime))
        out.append(LeftoverSweeper(runtime))
        out.append(_reserve_service(runtime))
    if runtime.sandbox is not None:
        out.append(runtime.sandbox)
    return out


def _reserve_service(runtime: Runtime) -> service.Service:
    """Keep the space reserve in the mail folder (``mailsuite.store.space``): made at start,
    and again every minute once a full disk used it up and there is room."""
    mail_dir = runtime.config.mail_dir
    reactor = runtime.reactor

    def check() -> Any:
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), ensure_reserve, mail_dir)

    svc = TimerService(60, check)
    svc.clock = reactor
    return svc
