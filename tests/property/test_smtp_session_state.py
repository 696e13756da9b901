"""Hypothesis stateful test of the SMTP session: random command sequences, random outcomes of
the actions the adapter fulfils, random message data.  Whatever happens, no exception escapes
the session, every reply is well-formed on the wire (one code, ``-`` continuations, CRLF,
enhanced status codes where due), and the session's state stays consistent."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from mailsuite.smtp import replies as R
from mailsuite.smtp.policy import Check, Facts, ReceivedMessage, Verdict, refuse
from mailsuite.smtp.sasl import encode_plain
from mailsuite.smtp.session import (
    COMMAND_STATES,
    AbortMessage,
    CheckMessage,
    Close,
    Deliver,
    Login,
    LoginAnswer,
    OpenMessage,
    ReceiveData,
    Session,
    StartTLS,
    State,
    Step,
)
from tests.smtp_session_helpers import check_wire, reader_of, run, session

ADDRESSES = [
    "alice@example.test",
    "bob+tag@example.test",
    "nobody@example.test",
    "x@elsewhere.test",
    "jörg@example.test",
    "",
    "Postmaster",
    "bad address",
    "a@[127.0.0.1]",
]
PARAMS = [
    "",
    " SIZE=100",
    " SIZE=999999999999",
    " BODY=8BITMIME",
    " BODY=9BIT",
    " SMTPUTF8",
    " FOO=bar",
    " NOTIFY=NEVER",
    " SIZE",
]
VERBS = [
    "EHLO",
    "HELO",
    "MAIL",
    "RCPT",
    "DATA",
    "RSET",
    "NOOP",
    "QUIT",
    "VRFY",
    "EXPN",
    "HELP",
    "STARTTLS",
    "AUTH",
    "BDAT",
    "ehlo",
    "X",
]


@st.composite
def command_lines(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=40))
    if kind == 1:
        return draw(st.text(max_size=30)).encode("utf-8")
    if kind <= 3:
        address = draw(st.sampled_from(ADDRESSES))
        verb = draw(st.sampled_from(["MAIL FROM:", "RCPT TO:", "mail from: "]))
        return f"{verb}<{address}>{draw(st.sampled_from(PARAMS))}".encode()
    if kind == 4:
        mechanism = draw(st.sampled_from(["PLAIN", "LOGIN", "CRAM-MD5", ""]))
        initial = draw(
            st.sampled_from(
                [
                    "",
                    " =",
                    " *",
                    " " + encode_plain("alice@example.test", "pw"),
                    " " + encode_plain("alice@example.test", "pw", "bob@example.test"),
                    " !!",
                    " a b",
                ]
            )
        )
        return f"AUTH {mechanism}{initial}".encode()
    verb = draw(st.sampled_from(VERBS))
    arg = draw(st.sampled_from(["", " client.example", " x y", " (evil)\tname"]))
    return f"{verb}{arg}".encode()


VERDICTS = st.sampled_from(
    [
        Verdict(),
        refuse(R.AUTH_POLICY_REJECT, "dmarc"),
        refuse(R.Reply(451, "4.7.1", "try later")),
        Verdict(junk=True, prepend=("Authentication-Results: mx; dkim=pass",)),
        Verdict(prepend=("Bad field without colon",)),
        Verdict(remove=(b"Subject: x",)),
    ]
)


class Scripted(Check):
    """An end-of-data check whose verdict the state machine chooses."""

    def __init__(self) -> None:
        self.verdict = Verdict()

    async def end_of_data(self, facts: Facts, message: ReceivedMessage) -> Verdict:
        assert await message.read() == b"(message)"
        return self.verdict


class SessionMachine(RuleBasedStateMachine):
    """Plays the adapter: feeds lines and data, fulfils the session's actions."""

    def __init__(self) -> None:
        super().__init__()
        self.s: Session = session()
        self.check = Scripted()

    @initialize(
        name=st.sampled_from(["mx", "submission"]),
        tls=st.booleans(),
        tls_available=st.booleans(),
        allow_plaintext=st.booleans(),
        trusted=st.booleans(),
        with_check=st.booleans(),
        max_errors=st.integers(2, 12),
    )
    def start(
        self,
        name: str,
        tls: bool,
        tls_available: bool,
        allow_plaintext: bool,
        trusted: bool,
        with_check: bool,
        max_errors: int,
    ) -> None:
        self.s = session(
            name,
            tls=tls,
            tls_available=tls_available,
            allow_plaintext=allow_plaintext,
            trusted=trusted,
            extra=[self.check] if with_check else [],
            max_errors=max_errors,
            max_message_size=2048,
            line_length=100,
        )
        self.apply(self.s.greeting())

    def apply(self, step: Step) -> None:
        for reply in step.replies:
            check_wire(reply)
            assert "\r" not in reply.text
        assert all(isinstance(line, str) for line in step.log)
        action = step.action
        if isinstance(action, StartTLS):
            assert step.replies == (R.READY_TLS,)
            self.s.tls_started()  # the adapter does so at once
        elif isinstance(action, Close):
            assert self.s.state is State.CLOSED
        elif isinstance(action, Login):
            assert self.s.state is State.LOGIN and not step.replies
        elif isinstance(action, OpenMessage):
            assert self.s.state is State.OPENING
        elif isinstance(action, ReceiveData):
            assert self.s.state is State.DATA and step.replies == (R.START_DATA,)
        elif isinstance(action, CheckMessage):
            assert self.s.state is State.CHECKING and not step.replies
        elif isinstance(action, Deliver):
            assert self.s.state is State.DELIVERING and not step.replies
        elif isinstance(action, AbortMessage):
            assert len(step.replies) == 1 and step.replies[0].code >= 400

    @precondition(lambda self: self.s.state in COMMAND_STATES or self.s.state is State.SASL)
    @rule(line=command_lines())
    def command(self, line: bytes) -> None:
        self.apply(self.s.line(line))

    @precondition(lambda self: self.s.state in COMMAND_STATES)
    @rule(choice=st.integers(0, 7))
    def progress(self, choice: int) -> None:
        """A command that fits the state, mostly the one a well-behaved client sends next
        (random lines rarely get far), sometimes one out of sequence."""
        s = self.s
        auth = "AUTH PLAIN " + encode_plain("alice@example.test", "pw")
        options = {
            State.CONNECTED: ["EHLO client.example"] * 5
            + ["HELO c", "MAIL FROM:<a@b.test>", "STARTTLS"],
            State.READY: [auth if s.auth_permitted and s.user is None else "NOOP"] * 2
            + ["MAIL FROM:<alice@example.test>"] * 3
            + ["MAIL FROM:<alice@example.test> SMTPUTF8", "RCPT TO:<a@example.test>", "DATA"],
            State.MAIL: [
                "RCPT TO:<alice@example.test>",
                "RCPT TO:<bob@example.test>",
                "RCPT TO:<x@elsewhere.test>",
                "RCPT TO:<jörg@example.test>",
                "DATA",
                "MAIL FROM:<a@b.test>",
                "RSET",
                auth,
            ],
            State.RCPT: ["DATA"] * 4
            + ["RCPT TO:<bob@example.test>", "RSET", "STARTTLS", "EHLO again"],
        }[s.state]
        self.apply(self.s.line(options[choice].encode()))

    @precondition(lambda self: self.s.state is State.CLOSED)
    @rule(line=command_lines())
    def after_close(self, line: bytes) -> None:
        assert self.s.line(line) == Step()

    @precondition(lambda self: self.s.state is State.LOGIN)
    @rule(answer=st.sampled_from([LoginAnswer.OK, *LoginAnswer]), ok_user=st.booleans())
    def login_result(self, answer: LoginAnswer, ok_user: bool) -> None:
        user = "alice@example.test" if ok_user else None
        self.apply(self.s.login_finished(answer, user))
        assert self.s.state in (State.READY, State.CLOSED)

    @precondition(lambda self: self.s.state is State.OPENING)
    @rule(ok=st.sampled_from([True, True, False]))
    def open_result(self, ok: bool) -> None:
        self.apply(self.s.message_opened(ok))

    @precondition(lambda self: self.s.state is State.DATA)
    @rule(
        data=st.one_of(
            st.binary(max_size=600),
            st.sampled_from(
                [
                    b"Subject: x\r\nFrom: alice@example.test\r\n\r\nbody\r\n",
                    b"Received: a\r\n" * 60,
                    b"x" * 500 + b"\r\n",
                    b"\xc3\xa4\r\n.\n.\r\n",
                ]
            ),
        ),
        end=st.booleans(),
        rest=st.sampled_from([b"", b"NOOP\r\n"]),
    )
    def data(self, data: bytes, end: bool, rest: bytes) -> None:
        chunk = self.s.data(data + (b"\r\n.\r\n" + rest if end else b""))
        assert not (chunk.drop and chunk.store)
        assert chunk.newlines == chunk.store.count(b"\n")
        if chunk.rest is not None:
            assert self.s.state is State.CHECKING
            self.apply(self.s.end_of_data(reader_of(b"(message)")))

    @precondition(lambda self: self.s.state is State.CHECKING)
    @rule(verdict=VERDICTS)
    def checks_result(self, verdict: Verdict) -> None:
        self.check.verdict = verdict
        self.apply(
            self.s.checks_done(
                run(
                    self.s.profile.policy.end_of_data(
                        self.s, ReceivedMessage("", (), b"", 0, reader_of(b"(message)"))
                    )
                )
            )
        )

    @precondition(lambda self: self.s.state is State.DELIVERING)
    @rule(ok=st.booleans())
    def delivery_result(self, ok: bool) -> None:
        step = self.s.delivery_finished(ok)
        self.apply(step)
        assert step.replies[0].code == (250 if ok else 451)
        assert self.s.transaction is None

    @invariant()
    def consistent(self) -> None:
        s = self.s
        assert s.errors < s.options.max_errors or s.state is State.CLOSED
        if s.state in (State.CONNECTED, State.READY, State.SASL, State.LOGIN):
            assert s.transaction is None
        if s.state is State.CONNECTED:
            assert s.helo is None
        if s.state is State.MAIL:
            assert s.transaction is not None and not s.transaction.recipients
        if s.state in (State.RCPT, State.OPENING, State.DATA, State.CHECKING, State.DELIVERING):
            assert s.transaction is not None and s.transaction.recipients
        if s.user is not None:
            assert s.profile.auth


TestSessionMachine = SessionMachine.TestCase
TestSessionMachine.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
