"""Fixtures every test area shares: the real server, test certificates, a loopback DNS and
MX network, and the Twisted reactor thread.

Fixtures live here and nowhere else; what tests import (constants, clients, helpers) lives in
the helper modules next to this file (``harness``, ``clients``, ``loopback``,
``tls_helpers``, ``reactor_thread``, ``mailauth_helpers``).  A test module never imports
another test module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import values
from twisted.logger import formatEvent, globalLogPublisher

from mailsuite.testing.dns import LoopbackDNS
from mailsuite.testing.mx import RecordingSMTPServer
from tests.harness import ServerFactory, server_factory
from tests.loopback import Net
from tests.reactor_thread import in_reactor, running_reactor
from tests.tls_helpers import CertAuthority

# -- the reactor ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def reactor() -> Any:
    """The global reactor, running in a daemon thread (see ``tests/reactor_thread.py``);
    call into it with ``in_reactor(reactor, f, ...)``."""
    return running_reactor()


@pytest.fixture(autouse=True)
def _metrics_mode_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """``makeService`` of a server with worker processes ("auto" on a multi-core machine)
    puts the calling process's prometheus-client into multiprocess mode, as it must in the
    twistd process (``mailsuite.metrics.share_with_workers``); a test that calls it in this
    process must not leave that mode, or the variable that servers started later would
    inherit, to the tests after it."""
    monkeypatch.setattr(values, "ValueClass", values.ValueClass)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")


# -- certificates --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertAuthority:
    """A throw-away test CA for the whole run (``ca.ca_file``, ``ca.client_context()``)."""
    return CertAuthority(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def server_cert(ca: CertAuthority) -> tuple[Path, Path]:
    """(certificate chain, key) from ``ca`` for mx.example.test, localhost and 127.0.0.1."""
    return ca.issue()


# -- the server under test -----------------------------------------------------------------


@pytest.fixture
def servers(tmp_path: Path, server_cert: tuple[Path, Path]) -> Iterator[ServerFactory]:
    """Start servers for one test: ``servers(("smtp", "imap"), users=(ALICE,), tls=True,
    extra_toml=...)``; all are stopped (and their logs checked) when the test ends."""
    yield from server_factory(tmp_path / "servers", server_cert)


@pytest.fixture(scope="module")
def module_servers(
    tmp_path_factory: pytest.TempPathFactory, server_cert: tuple[Path, Path]
) -> Iterator[ServerFactory]:
    """``servers`` for servers that a whole test module shares."""
    yield from server_factory(tmp_path_factory.mktemp("servers"), server_cert)


# -- a loopback network --------------------------------------------------------------------


@pytest.fixture(scope="module")
def loopback_net(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., Net]]:
    """``loopback_net(names, ttl=1)``: a DNS server (child process) answering ``names``
    under the ``test`` origin with that TTL, and ``net.mx(address)`` recording SMTP servers;
    stopped at the end of the module."""
    nets: list[Net] = []

    def make(names: dict[str, Any], ttl: int = 1) -> Net:
        net = Net(tmp_path_factory.mktemp("net"))
        nets.append(net)
        net.start_dns(names, ttl)
        return net

    yield make
    for net in nets:
        net.stop()


@pytest.fixture(scope="module")
def loopback_dns(reactor: Any) -> Iterator[Callable[[dict[str, Any]], LoopbackDNS]]:
    """``loopback_dns(zone)``: a DNS server in the test reactor on 127.0.0.1 (UDP and TCP,
    ``server.nameserver`` is its address), stopped at the end of the module."""
    started: list[LoopbackDNS] = []

    def start(zone: dict[str, Any]) -> LoopbackDNS:
        server = LoopbackDNS(zone)
        in_reactor(reactor, server.start, reactor)
        started.append(server)
        return server

    yield start
    for server in started:
        in_reactor(reactor, server.stop)


@pytest.fixture
def mx_servers(reactor: Any) -> Iterator[Callable[..., RecordingSMTPServer]]:
    """``mx_servers(script=None, record_dir=None, address="127.0.0.2")``: a recording SMTP
    server in the test reactor on a free port of ``address``, stopped when the test ends."""
    started: list[RecordingSMTPServer] = []

    def start(
        script: dict[str, Any] | None = None,
        record_dir: str | None = None,
        address: str = "127.0.0.2",
    ) -> RecordingSMTPServer:
        server = RecordingSMTPServer(script, record_dir)
        in_reactor(reactor, server.start, reactor, address, 0)
        started.append(server)
        return server

    yield start
    for server in started:
        in_reactor(reactor, server.stop)


# -- logs ----------------------------------------------------------------------------------


class LogCapture:
    """The events twisted.logger emits while a test runs, and the same as text lines."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    @property
    def text(self) -> list[str]:
        return [formatEvent(e) or "" for e in self.events]


@pytest.fixture
def twisted_logs() -> Iterator[LogCapture]:
    """Every twisted.logger event published during the test (``.events``)."""
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    yield capture
    globalLogPublisher.removeObserver(capture)
