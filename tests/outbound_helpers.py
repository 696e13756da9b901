"""What the outbound tests share: the SMTP client session driven by hand (``Harness``: a
StringTransport and a task.Clock, the server's lines fed in, what the client sent read back),
and the relay with an in-memory DNS authority and a scripted deliver() (``make``, ``run``)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet import error as ierror
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mailsuite.config import parse_config
from mailsuite.outbound.client import SessionParameters, SMTPClientSession
from mailsuite.outbound.relay import Relay
from mailsuite.outbound.result import Outcome, TransactionResult
from mailsuite.outbound.wire import MessageInfo
from mailsuite.smtp.replies import Reply
from mailsuite.testing.dns import MemoryAuthority

# -- the SMTP client session -------------------------------------------------------------------

BODY = b"Subject: test\n\nline one\n.leading dot\n"


class Transport(StringTransport):
    """StringTransport that records writes separately and pretends to start TLS."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.tls_context = None

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def startTLS(self, context) -> None:
        self.tls_context = context


class Harness:
    def __init__(self, tmp_path, body: bytes = BODY, **overrides) -> None:
        path = tmp_path / "message"
        path.write_bytes(body)
        values = dict(
            host="mx.test",
            helo_name="client.test",
            mail_from="alice@client.test",
            rcpts=("bob@mx.test", "carol@mx.test"),
            message_path=str(path),
            size=len(body),
            tls="none",
        )
        values.update(overrides)
        self.clock = Clock()
        self.session = SMTPClientSession(SessionParameters(**values), self.clock)
        self.t = Transport()
        self.session.makeConnection(self.t)
        self.results: list[TransactionResult] = []
        self.session.done.addCallback(self.results.append)

    def server(self, *lines: str) -> None:
        self.session.dataReceived(b"".join(x.encode() + b"\r\n" for x in lines))

    def sent(self) -> list[str]:
        data = self.t.value()
        self.t.clear()
        self.t.writes.clear()
        return [x.decode() for x in data.split(b"\r\n")[:-1]]

    def pump_body(self) -> bytes:
        self.t.clear()
        while self.t.producer is not None:
            self.t.producer.resumeProducing()
        data = self.t.value()
        self.t.clear()
        return data

    def close(self) -> TransactionResult:
        assert self.t.disconnecting
        self.session.connectionLost(Failure(ierror.ConnectionDone()))
        assert self.results
        return self.results[0]

    def greet_ehlo(self, *extensions: str) -> None:
        self.server("220 mx.test ESMTP")
        assert self.sent() == ["EHLO client.test"]
        lines = ["mx.test hi", *extensions]
        self.server(*[f"250-{x}" for x in lines[:-1]], f"250 {lines[-1]}")


# -- the relay ---------------------------------------------------------------------------------

ZONE = {
    "origin": "test",
    "names": {
        "two.test": {"MX": [[20, "b.two.test"], [10, "a.two.test"]]},
        "a.two.test": {"A": ["192.0.2.1"]},
        "b.two.test": {"A": ["192.0.2.2"]},
        "nomx.test": {"A": ["192.0.2.3"]},
        "null.test": {"MX": [[0, "."]]},
        "broken.test": "servfail",
        "relay.test": {"A": ["192.0.2.9"]},
        "mx.example.test": {"A": ["192.0.2.50"]},
        "loop.test": {"MX": [[10, "mx.example.test"], [20, "b.two.test"]]},
        "backup.test": {"MX": [[5, "a.two.test"], [10, "mx.example.test"], [20, "b.two.test"]]},
        "addrloop.test": {"MX": [[10, "alias.test"], [20, "b.two.test"]]},
        "alias.test": {"A": ["192.0.2.60"]},
        "implicitloop.test": {"A": ["192.0.2.60"]},
        "lo.test": {"MX": [[10, "lo-mx.test"]]},
        "lo-mx.test": {"A": ["127.0.0.1"]},
    },
}
INFO = MessageInfo(100, False, 20)


class ScriptedDeliver:
    """deliver() stand-in: ``script[host]`` is an Outcome, a Reply for all, or a function."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.script: dict[str, Any] = {}

    def __call__(
        self,
        reactor: Any,
        host: str,
        port: int,
        addresses: Any,
        helo: str,
        mail_from: str,
        rcpts: Any,
        path: Any,
        **kw: Any,
    ) -> Any:
        self.calls.append(
            {
                "host": host,
                "port": port,
                "addresses": list(addresses),
                "helo": helo,
                "rcpts": list(rcpts),
                **kw,
            }
        )
        what = self.script.get(host, Reply(250, "2.0.0", "ok"))
        if callable(what):
            what = what(list(rcpts))
        if isinstance(what, TransactionResult):
            return defer.succeed(what)
        if isinstance(what, Outcome):
            reply = Reply(451, "4.4.1", "no connection", remote=False)
            return defer.succeed(
                TransactionResult(what, reply, "connect", {r: reply for r in rcpts}, host)
            )
        if isinstance(what, dict):
            return defer.succeed(
                TransactionResult(
                    Outcome.DELIVERED, Reply(250, None, "ok"), "done", what, host, address="x"
                )
            )
        outcome = Outcome.DELIVERED if what.positive else Outcome.ALL_RECIPIENTS_REFUSED
        return defer.succeed(
            TransactionResult(outcome, what, "done", {r: what for r in rcpts}, host, address="x")
        )


def make(
    tmp_path: Path, listen: dict[str, list[str]] | None = None, **relay: Any
) -> tuple[Relay, ScriptedDeliver]:
    data: dict[str, Any] = {
        "server": {"hostname": "mx.example.test"},
        "relay": {"port": 2525, **relay},
    }
    if listen is not None:
        data["listen"] = listen
    cfg = parse_config(data, None, tmp_path)
    fake = ScriptedDeliver()
    r = Relay(cfg, None, resolver=MemoryAuthority(ZONE), deliver_fn=fake, rng=random.Random(1))
    return r, fake


def run(relay: Relay, route: str, rcpts: list[str], sender: str = "a@x.test") -> Any:
    d = relay.send(route, sender, rcpts, Path("/nonexistent"), INFO)
    results = []
    d.addBoth(results.append)
    assert results, "the relay should finish synchronously with these fakes"
    return results[0]
