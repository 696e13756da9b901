"""The relay's routing decisions with an in-memory DNS authority and a scripted deliver():
MX order and fallback, batches of 100, DNS failures, smarthost routing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer

from mailsuite.outbound.relay import SMARTHOST_ROUTE
from mailsuite.outbound.result import Outcome, TransactionResult
from mailsuite.smtp.replies import Reply
from tests.outbound_helpers import INFO, make, run


def test_preference_order_and_port(tmp_path: Path) -> None:
    relay, fake = make(tmp_path)
    out = run(relay, "two.test", ["u@two.test"])
    assert [c["host"] for c in fake.calls] == ["a.two.test"]
    assert fake.calls[0]["port"] == 2525 and fake.calls[0]["helo"] == "mx.example.test"
    assert fake.calls[0]["tls"] == "opportunistic"
    assert out["u@two.test"].reply.positive and out["u@two.test"].host == "a.two.test"


def test_fallback_on_connection_failure_and_4xx(tmp_path: Path) -> None:
    relay, fake = make(tmp_path)
    fake.script["a.two.test"] = Outcome.CONNECT_FAILED
    out = run(relay, "two.test", ["u@two.test"])
    assert [c["host"] for c in fake.calls] == ["a.two.test", "b.two.test"]
    assert out["u@two.test"].reply.positive and out["u@two.test"].host == "b.two.test"

    fake.calls.clear()
    fake.script["a.two.test"] = Reply(451, "4.3.0", "busy")
    fake.script["b.two.test"] = Reply(452, "4.3.1", "full")
    out = run(relay, "two.test", ["u@two.test"])
    assert [c["host"] for c in fake.calls] == ["a.two.test", "b.two.test"]
    assert out["u@two.test"].reply.code == 452  # the last host's word


def test_no_fallback_after_a_definite_answer(tmp_path: Path) -> None:
    relay, fake = make(tmp_path)
    fake.script["a.two.test"] = lambda rcpts: {
        "ok@two.test": Reply(250, "2.0.0", "ok"),
        "no@two.test": Reply(550, "5.1.1", "unknown"),
        "wait@two.test": Reply(451, "4.2.1", "later"),
    }
    out = run(relay, "two.test", ["ok@two.test", "no@two.test", "wait@two.test"])
    assert [c["host"] for c in fake.calls] == ["a.two.test"]  # DATA went through: stop
    assert [out[r].reply.code for r in ("ok@two.test", "no@two.test", "wait@two.test")] == [
        250,
        550,
        451,
    ]


def test_implicit_mx_null_mx_nxdomain_servfail(tmp_path: Path) -> None:
    relay, fake = make(tmp_path)
    assert run(relay, "nomx.test", ["u@nomx.test"])["u@nomx.test"].reply.positive
    assert fake.calls[0]["addresses"] == ["192.0.2.3"]
    null = run(relay, "null.test", ["u@null.test"])["u@null.test"].reply
    assert null.permanent and null.status == "5.1.10" and not null.remote
    nx = run(relay, "missing.test", ["u@missing.test"])["u@missing.test"].reply
    assert nx.permanent and nx.status == "5.1.2"
    sf = run(relay, "broken.test", ["u@broken.test"])["u@broken.test"].reply
    assert sf.transient and sf.status == "4.4.3"
    assert len(fake.calls) == 1


def test_at_most_100_recipients_per_transaction(tmp_path: Path) -> None:
    relay, fake = make(tmp_path)
    rcpts = [f"u{i}@two.test" for i in range(250)]
    out = run(relay, "two.test", rcpts)
    assert [len(c["rcpts"]) for c in fake.calls] == [100, 100, 50]
    assert len(out) == 250 and all(v.reply.positive for v in out.values())


def test_greeting_5xx_and_auth_failure_are_not_bounces(tmp_path: Path) -> None:
    relay, fake = make(tmp_path)

    def refused(rcpts: list[str]) -> Any:
        reply = Reply(554, "5.7.1", "go away")
        return TransactionResult(
            Outcome.GREETING_REFUSED, reply, "greeting", {r: reply for r in rcpts}, "x", address="x"
        )

    fake.script["a.two.test"] = refused
    fake.script["b.two.test"] = refused
    out = run(relay, "two.test", ["u@two.test"])
    assert len(fake.calls) == 2 and out["u@two.test"].reply.transient

    fake.calls.clear()
    smart, fake2 = make(tmp_path, smarthost="relay.test:587", smarthost_user="me")
    reply = Reply(535, "5.7.8", "bad credentials")
    fake2.script["relay.test"] = TransactionResult(
        Outcome.AUTH_FAILED, reply, "auth", {"u@two.test": reply}, "relay.test"
    )
    out = run(smart, SMARTHOST_ROUTE, ["u@two.test"])
    assert out["u@two.test"].reply.transient and "5.7.8" in out["u@two.test"].reply.text


def test_smarthost_takes_every_domain(tmp_path: Path) -> None:
    relay, fake = make(
        tmp_path, smarthost="relay.test:587", smarthost_user="me", smarthost_password="pw"
    )
    assert relay.route_key("x@null.test") == relay.route_key("y@two.test") == SMARTHOST_ROUTE
    out = run(relay, SMARTHOST_ROUTE, ["x@null.test", "y@two.test"])
    (call,) = fake.calls
    assert call["host"] == "relay.test" and call["port"] == 587
    assert call["addresses"] == ["192.0.2.9"]
    assert call["tls"] == "required" and call["auth"] == ("me", "pw") and call["tls_verify"]
    assert all(v.reply.positive for v in out.values())


@pytest.mark.parametrize("verify", [True, False])
def test_mx_tls_verification_follows_config(tmp_path: Path, verify: bool) -> None:
    relay, fake = make(tmp_path, tls_verify=verify)
    run(relay, "two.test", ["u@two.test"])
    assert fake.calls[0]["tls_verify"] is verify
    assert fake.calls[0]["tls_client_context"] is not None


# ------------------------------------------------------------------ the loop rule (RFC 5321 5.1)


def test_our_hostname_as_best_mx_bounces_5_4_6_without_connecting(tmp_path: Path) -> None:
    relay, fake = make(tmp_path)
    out = run(relay, "loop.test", ["u@loop.test"])["u@loop.test"].reply
    assert out.permanent and out.status == "5.4.6" and not out.remote
    assert "loops back to myself" in out.text
    assert fake.calls == []  # neither ourselves nor the worse backup b.two.test


def test_we_are_a_backup_mx_only_better_hosts_are_tried(tmp_path: Path) -> None:
    relay, fake = make(tmp_path)
    fake.script["a.two.test"] = Outcome.CONNECT_FAILED
    out = run(relay, "backup.test", ["u@backup.test"])["u@backup.test"].reply
    assert [c["host"] for c in fake.calls] == ["a.two.test"]  # not us, not b.two.test (20)
    assert out.transient  # the primary is down: keep it queued, as a backup MX does


def test_an_mx_host_on_one_of_our_listening_addresses_is_us(tmp_path: Path) -> None:
    listen = {"smtp": ["tcp:25:interface=192.0.2.60"], "imap": ["tcp6:143:interface=\\:\\:1"]}
    relay, fake = make(tmp_path, listen=listen)
    for domain in ("addrloop.test", "implicitloop.test"):
        reply = run(relay, domain, [f"u@{domain}"])[f"u@{domain}"].reply
        assert reply.status == "5.4.6", domain
    assert fake.calls == []
    assert relay.is_self.addresses == {"192.0.2.60", "::1"}
    # without that listener the same domain is someone else's
    other, fake2 = make(tmp_path, listen={"smtp": ["tcp:25:interface=127.0.0.1"]})
    assert run(other, "addrloop.test", ["u@addrloop.test"])["u@addrloop.test"].reply.positive
    assert [c["host"] for c in fake2.calls] == ["alias.test"]


def test_a_wildcard_listener_owns_every_local_address(tmp_path: Path) -> None:
    relay, fake = make(tmp_path, listen={"smtp": ["tcp:25"]})
    assert relay.is_self.wildcard
    assert relay.is_self.is_own_address("127.0.0.1")
    assert not relay.is_self.is_own_address("192.0.2.77")  # TEST-NET: not on this host
    reply = run(relay, "lo.test", ["u@lo.test"])["u@lo.test"].reply
    assert reply.status == "5.4.6" and fake.calls == []


# ------------------------------------------------------------- "452 too many recipients"

TOO_MANY = Reply(452, "4.5.3", "too many recipients")


def limited(limit: int, reply: Reply = TOO_MANY) -> Any:
    """A server that accepts ``limit`` recipients per transaction and refuses the rest."""

    def answer(rcpts: list[str]) -> dict[str, Reply]:
        return {r: Reply(250, "2.0.0", "ok") if i < limit else reply for i, r in enumerate(rcpts)}

    return answer


def test_too_many_recipients_go_at_once_in_new_transactions(tmp_path: Path) -> None:
    relay, fake = make(tmp_path)
    fake.script["a.two.test"] = limited(2)
    rcpts = [f"u{i}@two.test" for i in range(5)]
    out = run(relay, "two.test", rcpts)
    assert [c["rcpts"] for c in fake.calls] == [rcpts, rcpts[2:], rcpts[4:]]
    assert {c["host"] for c in fake.calls} == {"a.two.test"}  # same host, not the backup
    assert all(out[r].reply.positive for r in rcpts)


def test_too_many_recipients_within_the_cap_of_100(tmp_path: Path) -> None:
    relay, fake = make(tmp_path)
    fake.script["a.two.test"] = limited(60)
    rcpts = [f"u{i}@two.test" for i in range(150)]
    out = run(relay, "two.test", rcpts)
    assert [len(c["rcpts"]) for c in fake.calls] == [100, 40, 50]
    assert max(len(c["rcpts"]) for c in fake.calls) <= 100
    assert all(out[r].reply.positive for r in rcpts)


def test_too_many_recipients_without_progress_is_an_ordinary_temporary_failure(
    tmp_path: Path,
) -> None:
    relay, fake = make(tmp_path)
    fake.script["a.two.test"] = limited(0)
    fake.script["b.two.test"] = limited(0)
    out = run(relay, "two.test", ["u@two.test", "v@two.test"])
    assert len(fake.calls) == 1  # no new transaction without progress
    assert all(r.reply.transient for r in out.values())


def test_552_for_the_recipient_limit_is_temporary(tmp_path: Path) -> None:
    relay, fake = make(tmp_path)
    old_style = Reply(552, None, "Too many recipients")
    calls = {"n": 0}

    def once_limited(rcpts: list[str]) -> dict[str, Reply]:
        calls["n"] += 1
        return (
            limited(1, old_style)(rcpts)
            if calls["n"] == 1
            else {r: Reply(421, "4.3.2", "shutting down") for r in rcpts}
        )

    fake.script["a.two.test"] = once_limited
    out = run(relay, "two.test", ["u@two.test", "v@two.test"])
    assert out["u@two.test"].reply.positive
    assert out["v@two.test"].reply.transient  # not bounced

    relay2, fake2 = make(tmp_path)
    fake2.script["a.two.test"] = limited(1, Reply(452, "4.2.2", "mailbox full"))
    out = run(relay2, "two.test", ["u@two.test", "v@two.test"])
    assert len(fake2.calls) == 1  # a full mailbox is not the recipient limit


# ------------------------------------------------------------- 8-bit downgrade (RFC 6152 3)


def test_one_7bit_copy_per_send_shared_by_every_host_then_removed(tmp_path: Path) -> None:
    relay, _ = make(tmp_path)
    message = tmp_path / "msg"
    message.write_bytes("Subject: x\n\nGrüße\n".encode())
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    copies: list[tuple[str, int]] = []

    async def deliver(
        reactor: Any,
        host: str,
        port: int,
        addresses: Any,
        helo: str,
        sender: str,
        rcpts: Any,
        path: Any,
        **kw: Any,
    ) -> TransactionResult:
        path, size = await kw["downgrade"]()
        copies.append((path, size))
        assert Path(path).read_bytes().isascii() and Path(path).parent == scratch
        if host == "a.two.test":
            reply = Reply(451, "4.4.1", "no connection", remote=False)
            return TransactionResult(
                Outcome.CONNECT_FAILED, reply, "connect", {r: reply for r in rcpts}, host
            )
        ok = Reply(250, "2.0.0", "ok")
        return TransactionResult(
            Outcome.DELIVERED,
            ok,
            "done",
            {r: ok for r in rcpts},
            host,
            address="x",
            downgraded=True,
        )

    relay.deliver_fn = lambda *a, **kw: defer.ensureDeferred(deliver(*a, **kw))
    d = relay.send(
        "two.test", "a@x.test", ["u@two.test"], message, INFO, body_8bit=True, scratch_dir=scratch
    )
    out: list[Any] = []
    d.addBoth(out.append)
    assert out[0]["u@two.test"].reply.positive
    assert len(copies) == 2 and copies[0] == copies[1]  # converted once, used twice
    assert list(scratch.iterdir()) == []  # and removed at the end


def test_no_downgrade_offered_for_a_7bit_message(tmp_path: Path) -> None:
    relay, fake = make(tmp_path)
    run(relay, "two.test", ["u@two.test"])
    assert fake.calls[0]["downgrade"] is None
