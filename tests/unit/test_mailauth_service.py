"""MailAuth as part of the server: one resolver for the whole server, the worker pool's life
cycle, and who is checked at all."""

from __future__ import annotations

import threading
import tomllib
from pathlib import Path

from mailsuite.config import parse_config
from mailsuite.mailauth.service import MailAuth
from mailsuite.mailauth.workers import WorkersStopped
from mailsuite.service import makeService
from tests.harness import wait_until
from tests.reactor_thread import in_reactor

TOML = """
[server]
hostname = "mx.example.test"
data_dir = "data"
[listen]
smtp = ["tcp:0:interface=127.0.0.1"]
[relay]
trusted_networks = ["10.1.0.0/16"]
[dns]
nameservers = ["127.0.0.1:9"]
"""


def config(tmp_path: Path, extra: str = ""):
    return parse_config(tomllib.loads(TOML + extra), None, tmp_path)


def test_one_resolver_is_shared_by_relay_and_mail_auth(tmp_path, reactor):
    top = makeService(config(tmp_path), reactor=reactor)
    runtime = top.runtime
    assert isinstance(runtime.mail_auth, MailAuth)
    assert runtime.mail_auth in list(top)  # started and stopped with the server
    runner = next(s for s in top if type(s).__name__ == "QueueRunner")
    assert runner.relay.resolver is runtime.resolver
    assert runtime.mail_auth.dns.resolver is runtime.resolver


def _pool_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("PoolThread-mailauth")]


def test_worker_pool_starts_and_stops_with_the_service(tmp_path, reactor):
    auth = MailAuth(config(tmp_path), reactor, resolver=None)
    auth.startService()
    assert in_reactor(
        reactor, auth.workers.run, lambda: threading.current_thread().name
    ).startswith("PoolThread-mailauth")
    in_reactor(reactor, auth.stopService)
    wait_until(lambda: _pool_threads() == [], 10, "the worker threads to end")
    failure = []
    in_reactor(reactor, lambda: auth.workers.run(lambda: 1).addErrback(failure.append))
    assert failure and failure[0].check(WorkersStopped)


def test_who_is_checked(tmp_path, reactor):
    auth = MailAuth(config(tmp_path), reactor, resolver=None)
    assert auth.applies_to("192.0.2.7", authenticated=False)
    assert not auth.applies_to("192.0.2.7", authenticated=True)  # submission
    assert not auth.applies_to("10.1.2.3", authenticated=False)  # trusted network
    off = MailAuth(
        config(tmp_path, "[mail_auth]\nspf = false\ndkim = false\ndmarc = false\narc = false\n"),
        reactor,
        resolver=None,
    )
    assert not off.applies_to("192.0.2.7", authenticated=False)


def test_signing_can_be_turned_off(tmp_path, reactor):
    from mailsuite.mailauth.dkim_keys import KeyStore

    cfg = config(tmp_path, "[mail_auth]\nsign = false\n")
    KeyStore(cfg.dkim_dir).generate("example.test", "e1", "ed25519")
    auth = MailAuth(cfg, reactor, resolver=None)
    auth.startService()
    try:
        msg = b"From: a@example.test\n\nx\n"
        assert in_reactor(auth.reactor, auth.sign, msg) == b""
        assert b"s=e1" in auth.signer.signature_headers(msg)
    finally:
        in_reactor(auth.reactor, auth.stopService)


def test_worker_pool_answers_reports_errors_and_finishes_queued_work(reactor):
    """The pool's own threads (not twisted's ThreadPool): a result or the job's exception
    comes back on the reactor, and stopping lets the jobs already handed over finish."""
    from mailsuite.mailauth.workers import WorkerPool

    pool = WorkerPool(reactor, 2, name="mailauth-test")
    in_reactor(reactor, pool.startService)
    assert in_reactor(reactor, pool.run, lambda a, b=0: a + b, 40, b=2) == 42

    def boom() -> None:
        raise ValueError("from the job")

    caught = in_reactor(reactor, lambda: pool.run(boom).addErrback(lambda f: f.value))
    assert isinstance(caught, ValueError) and str(caught) == "from the job"

    gate = threading.Event()
    done: list[int] = []

    def job(i: int) -> None:
        gate.wait(10)
        done.append(i)

    stopped: list[object] = []

    def hand_over_then_stop() -> None:
        for i in range(6):
            pool.run(job, i)
        pool.stopService().addCallback(stopped.append)

    in_reactor(reactor, hand_over_then_stop)
    gate.set()
    wait_until(lambda: stopped, 10, "the pool to stop")
    assert sorted(done) == list(range(6))
    assert not [t for t in threading.enumerate() if t.name.startswith("PoolThread-mailauth-test")]
