"""The SMTP policy checks one by one, and how a Policy runs them (plain objects)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mailsuite.smtp import replies as R
from mailsuite.smtp.address import Path
from mailsuite.smtp.data import MAX_HEADER_CAPTURE
from mailsuite.smtp.policy import (
    ACCEPT,
    Check,
    Facts,
    FromBinding,
    HopCount,
    KnownRecipient,
    Policy,
    ReceivedMessage,
    Recipient,
    RecipientLimit,
    RelayRule,
    RemoteDelivery,
    SenderBinding,
    Verdict,
    count_received,
    refuse,
)
from tests.smtp_session_helpers import Directory, config, profile, reader_of, run


@dataclass
class Client:
    client_ip: str = "192.0.2.7"
    helo: str | None = "client.example"
    tls: bool = False
    user: str | None = None
    trusted: bool = False
    recipients: Sequence[str] = ()


def rcpt(address: str, directory: Directory | None = None) -> Recipient:
    return Recipient(Path(address), directory or Directory())


def test_recipient_limit() -> None:
    check = RecipientLimit(2)
    assert check.rcpt(Client(recipients=["a@x"]), rcpt("b@example.test")) == ACCEPT
    assert check.rcpt(Client(recipients=["a@x", "b@x"]), rcpt("c@example.test")).reply == (
        R.TOO_MANY_RCPTS
    )


def test_known_recipient() -> None:
    check = KnownRecipient()
    assert check.rcpt(Client(), rcpt("alice@example.test")) == ACCEPT
    assert check.rcpt(Client(), rcpt("nobody@example.test")).reply == R.UNKNOWN_USER
    assert check.rcpt(Client(), rcpt("nobody@elsewhere.test")) == ACCEPT  # the relay rule's


def test_relay_rule_per_profile() -> None:
    mx, submission = RelayRule(trusted_networks_relay=True), RelayRule(False)
    remote = rcpt("x@elsewhere.test")
    for check in (mx, submission):
        assert check.rcpt(Client(), rcpt("alice@example.test")) == ACCEPT
        assert check.rcpt(Client(), remote).reply == R.RELAY_DENIED
        assert check.rcpt(Client(user="alice@example.test"), remote) == ACCEPT
    assert mx.rcpt(Client(trusted=True), remote) == ACCEPT
    assert submission.rcpt(Client(trusted=True), remote).reply == R.RELAY_DENIED
    assert mx.rcpt(Client(), remote).reason == "relay denied for <x@elsewhere.test>"


def test_remote_delivery_needs_the_queue() -> None:
    directory = Directory(aliases={"ext@example.test": ["x@remote.test"]})
    available = [False]
    check = RemoteDelivery(lambda: available[0])
    assert check.rcpt(Client(), rcpt("ext@example.test", directory)).reply == R.NO_REMOTE
    assert check.rcpt(Client(), rcpt("alice@example.test", directory)) == ACCEPT
    available[0] = True
    assert check.rcpt(Client(), rcpt("ext@example.test", directory)) == ACCEPT


def test_recipient_resolves_lazily_and_once() -> None:
    directory = Directory()
    r = rcpt("alice@example.test", directory)
    assert directory.lookups == 0
    assert r.resolution.local[0].user == "alice@example.test"
    assert r.resolution is r.resolution and directory.lookups == 1
    assert rcpt("x@elsewhere.test", directory).resolution.remote == ["x@elsewhere.test"]
    assert directory.lookups == 1  # other domains are not looked up


def test_sender_binding() -> None:
    check = SenderBinding(Directory(send_as={"alice@example.test": {"info@example.test"}}))
    alice = Client(user="alice@example.test")
    assert check.mail(alice, Path("alice@example.test")) == ACCEPT
    assert check.mail(alice, Path("INFO@example.test")) == ACCEPT
    assert check.mail(alice, Path("")) == ACCEPT  # null sender
    assert check.mail(alice, Path("bob@example.test")).reply == R.SENDER_NOT_OWNED
    assert check.mail(Client(), Path("alice@example.test")).reply == R.SENDER_NOT_OWNED


def test_from_binding() -> None:
    check = FromBinding(Directory())
    alice = Client(user="alice@example.test")
    assert check.data_headers(alice, b"From: Alice <alice@example.test>\nTo: x") == ACCEPT
    assert check.data_headers(alice, b"Subject: none") == ACCEPT  # no From: at all
    assert check.data_headers(alice, b"From: bob@example.test").reply == R.FROM_NOT_OWNED
    two = b"From: Alice <alice@example.test>, Bob <bob@example.test>"
    assert check.data_headers(alice, two).reply == R.FROM_NOT_OWNED
    hidden = b"From: alice@example.test\nfrom :\n\tBob <bob@example.test>\nSubject: x"
    assert check.data_headers(alice, hidden).reply == R.FROM_NOT_OWNED
    assert check.data_headers(alice, b"From: undisclosed").reply == R.FROM_UNUSABLE
    big = b"X-Pad: " + b"x" * MAX_HEADER_CAPTURE
    assert check.data_headers(alice, big).reply == R.HEADERS_TOO_BIG
    assert check.data_headers(Client(), b"From: alice@example.test").reply == R.AUTH_REQUIRED


def test_hop_count() -> None:
    assert count_received(b"Received: a\nX: b\nreceived: c\n\tfolded\nRECEIVED:d") == 3
    assert count_received(b"X-Received: a\nReceivedx: b") == 0
    check = HopCount(3)
    assert check.data_headers(Client(), b"Received: a\nReceived: b") == ACCEPT
    assert check.data_headers(Client(), b"Received: a\nReceived: b\nReceived: c").reply == (
        R.TOO_MANY_HOPS
    )


class Say(Check):
    """A check that answers every hook with ``verdict`` and counts its calls."""

    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict
        self.calls = 0

    def mail(self, facts: Facts, sender: Path) -> Verdict:
        self.calls += 1
        return self.verdict

    async def end_of_data(self, facts: Facts, message: ReceivedMessage) -> Verdict:
        self.calls += 1
        return self.verdict


def test_policy_runs_checks_in_order_and_the_first_refusal_wins() -> None:
    first = Say(refuse(R.Reply(550, "5.7.1", "first")))
    second = Say(refuse(R.Reply(551, "5.7.1", "second")))
    policy = Policy([Say(ACCEPT), first, second])
    assert policy.mail(Client(), Path("a@b.test")).reply == first.verdict.reply
    assert second.calls == 0
    assert Policy([]).mail(Client(), Path("a@b.test")) == ACCEPT


def test_policy_calls_only_the_hooks_a_check_overrides() -> None:
    policy = Policy([HopCount(10), KnownRecipient()])
    assert [type(c) for c in policy._by_hook["data_headers"]] == [HopCount]
    assert [type(c) for c in policy._by_hook["rcpt"]] == [KnownRecipient]
    assert policy._by_hook["mail"] == () and not policy.checks_messages


def test_end_of_data_verdicts_combine() -> None:
    message = ReceivedMessage(
        "a@b.test", ("c@example.test",), b"Subject: x", 10, reader_of(b"Subject: x\n\nbody\n")
    )
    policy = Policy(
        [
            Say(Verdict(prepend=("A: 1",), remove=(b"X: old",))),
            Say(Verdict(junk=True, prepend=("B: 2",))),
        ]
    )
    assert policy.checks_messages
    assert run(policy.end_of_data(Client(), message)) == Verdict(
        junk=True, prepend=("A: 1", "B: 2"), remove=(b"X: old",)
    )
    rejecting = policy.with_checks(Say(refuse(R.AUTH_POLICY_REJECT)), Say(ACCEPT))
    assert run(rejecting.end_of_data(Client(), message)).reply == R.AUTH_POLICY_REJECT
    assert len(rejecting.checks) == 4 and len(policy.checks) == 2


def test_profiles() -> None:
    cfg = config()
    mx, submission = profile("mx", cfg), profile("submission", cfg)
    assert (mx.name, mx.auth, mx.requires_auth) == ("mx", False, False)
    assert (submission.name, submission.auth, submission.requires_auth) == (
        "submission",
        True,
        True,
    )
    assert not any(isinstance(c, (SenderBinding, FromBinding)) for c in mx.policy.checks)
    assert any(isinstance(c, SenderBinding) for c in submission.policy.checks)
    assert any(isinstance(c, FromBinding) for c in submission.policy.checks)


class Settles(Say):
    """A check whose verdict is known at once (``Check.settle``), or not (None)."""

    def __init__(self, verdict: Verdict, at_once: bool = True) -> None:
        super().__init__(verdict)
        self.at_once = at_once

    def settle(self, facts: Facts, message: ReceivedMessage) -> Verdict | None:
        return self.verdict if self.at_once else None


def test_settle_gives_the_end_of_data_verdict_when_every_check_knows_it_at_once() -> None:
    message = ReceivedMessage(
        "a@b.test", ("c@example.test",), b"Subject: x", 10, reader_of(b"Subject: x\n\nbody\n")
    )
    checks = [
        Settles(Verdict(prepend=("A: 1",), remove=(b"X: old",), reason="first")),
        Settles(Verdict(junk=True, prepend=("B: 2",))),
    ]
    policy = Policy(checks)
    combined = Verdict(junk=True, prepend=("A: 1", "B: 2"), remove=(b"X: old",))
    assert policy.settle(Client(), message) == combined
    assert run(policy.end_of_data(Client(), message)) == combined
    # one accepting check: its verdict, without the reason (a check's own, never logged)
    assert Policy([checks[0]]).settle(Client(), message) == Verdict(
        prepend=("A: 1",), remove=(b"X: old",)
    )
    # a check that must run (reads the message, waits on DNS) sends it the long way
    assert policy.with_checks(Settles(ACCEPT, at_once=False)).settle(Client(), message) is None
    # a check without settle() is never skipped
    assert policy.with_checks(Say(ACCEPT)).settle(Client(), message) is None
    # a refusal known at once wins, as in end_of_data
    rejecting = Policy([Settles(refuse(R.AUTH_POLICY_REJECT)), Settles(ACCEPT, at_once=False)])
    assert rejecting.settle(Client(), message) == refuse(R.AUTH_POLICY_REJECT)


class _MailAuth:
    """The part of MailAuth the MX check asks before it reads anything."""

    def __init__(self, applies: bool) -> None:
        self.applies = applies
        self.inbound = type("Inbound", (), {"authserv_id": "mx.example.test"})()

    def applies_to(self, client_ip: str, authenticated: bool) -> bool:
        return self.applies


def test_mail_auth_settles_only_what_it_does_not_check() -> None:
    from mailsuite.smtp.mailauth_checks import DKIMSigning, MailAuthCheck, forged_results

    forged = b"Authentication-Results: MX.example.test; spf=pass"
    for headers, removed in (
        (b"From: a@b.test\nSubject: x", ()),
        (b"From: a@b.test\n" + forged + b"\nauthentication-results: other.test; none", (forged,)),
    ):
        assert forged_results(headers, "mx.example.test") == removed
        message = ReceivedMessage("a@b.test", ("c@example.test",), headers, 10, reader_of(b""))
        off = MailAuthCheck(_MailAuth(False), DKIMSigning(None, Directory(), trusted_only=True))
        settled = off.settle(Client(), message)
        assert settled == run(off.end_of_data(Client(), message)) == Verdict(remove=removed)
        # checked sessions, and mail it would sign (a trusted relay, From one of ours),
        # go the long way
        assert MailAuthCheck(_MailAuth(True)).settle(Client(), message) is None
        ours = ReceivedMessage(
            "a@example.test", ("c@b.test",), b"From: a@example.test", 10, reader_of(b"")
        )
        assert off.settle(Client(trusted=True), ours) is None
        assert off.settle(Client(trusted=False), ours) == ACCEPT


class _Checking(_MailAuth):
    """A MailAuth whose checks give ``verdict``: at once from check_now (or None: "not
    now", or raising), or from check_message, counting what was asked."""

    def __init__(self, verdict: object, now: str = "answer") -> None:
        super().__init__(True)
        self.verdict, self.now = verdict, now
        self.asked: list[tuple[str, bool]] = []

    def check_now(self, data: bytes, mail_from: str, helo: str, client_ip: str) -> object:
        self.asked.append(("now", True))
        if self.now == "raise":
            raise RuntimeError("a bug in a check")
        return self.verdict if self.now == "answer" else None

    def check_message(
        self, data: bytes, mail_from: str, helo: str, client_ip: str, inline: bool = True
    ) -> object:
        from twisted.internet import defer

        self.asked.append(("message", inline))
        return defer.succeed(self.verdict)


def test_mail_auth_settles_a_message_in_memory_judged_at_once() -> None:
    """A message held in memory whose checks run at once (cached DNS answers) is judged in
    settle(): no coroutine, the same verdict end_of_data gives; otherwise end_of_data sends
    it straight to the pool (inline=False), never checking it twice."""
    from mailsuite.mailauth.inbound import Verdict as AuthVerdict
    from mailsuite.smtp.mailauth_checks import MailAuthCheck

    forged = b"Authentication-Results: mx.example.test; dkim=pass"
    headers = b"From: a@b.test\n" + forged
    body = headers + b"\n\nbody\n"
    held = ReceivedMessage("a@b.test", ("c@example.test",), headers, 10, reader_of(body), body)
    on_disk = ReceivedMessage("a@b.test", ("c@example.test",), headers, 10, reader_of(body))
    passed = AuthVerdict("accept", b"Authentication-Results: mx.example.test; spf=pass\n", "x")
    want = Verdict(
        prepend=("Authentication-Results: mx.example.test; spf=pass",),
        remove=(forged,),
        reason="mail auth: accept",
    )
    auth = _Checking(passed)
    check = MailAuthCheck(auth)
    assert check.settle(Client(), held) == want
    assert auth.asked == [("now", True)]
    # a message on disk goes the long way, inline attempt included, to the same verdict
    assert check.settle(Client(), on_disk) is None
    assert run(check.end_of_data(Client(), on_disk)) == want
    assert auth.asked[1:] == [("message", True)]
    # held, but not checkable at once (budget spent, DNS not cached) or a check raising:
    # end_of_data, straight to the pool
    for now in ("later", "raise"):
        auth = _Checking(passed, now)
        check = MailAuthCheck(auth)
        assert check.settle(Client(), held) is None
        assert run(check.end_of_data(Client(), held)) == want
        assert auth.asked == [("now", True), ("message", False)]
    # settled, but another check of the policy could not: end_of_data reuses the verdict
    auth = _Checking(passed)
    check = MailAuthCheck(auth)
    assert Policy([check, Settles(ACCEPT, at_once=False)]).settle(Client(), held) is None
    assert run(check.end_of_data(Client(), held)) == want
    assert auth.asked == [("now", True)]
    # a DMARC reject known at once is the 550 (RFC 7372 3.2)
    rejected = AuthVerdict("reject", b"", "x")
    assert MailAuthCheck(_Checking(rejected)).settle(Client(), held) == Verdict(
        reply=R.AUTH_POLICY_REJECT, reason="DMARC fail, policy reject"
    )
