"""The Sieve interpreter, extension by extension, mostly with the RFCs' own examples."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from mailsuite.sieve.actions import (
    Discard,
    FileInto,
    Keep,
    Redirect,
    Reject,
    VacationRequest,
)
from mailsuite.sieve.grammar import SieveParseError
from mailsuite.sieve.interpreter import Interpreter, Limits, SieveEnvelope
from mailsuite.sieve.match import SieveRuntimeError
from mailsuite.sieve.message import MessageView
from mailsuite.sieve.validate import Script, compile_script

MSG = (
    b"Return-Path: <sender@example.org>\n"
    b"Received: from mx.example.org by mx.example.test; Tue, 1 Oct 2024 09:59:00 +0000\n"
    b"Received: from client by mx.example.org; Tue, 1 Oct 2024 09:58:00 +0200\n"
    b"From: Sender Person <sender@example.org>\n"
    b"To: Alice <alice+lists@example.test>, bob@example.com\n"
    b"Cc: carol@example.net\n"
    b"Subject: [acme-users] [fwd] version 1.0 is out\n"
    b"List-ID: Acme Users <acme-users@lists.example.org>\n"
    b"Date: Tue, 1 Oct 2024 10:00:00 +0200\n"
    b"X-Spam-Score: 12\n"
    b"Message-ID: <abc@example.org>\n"
    b"\n"
    b"Hello, MAKE MONEY FAST is not what this says.\n"
)

ENV = SieveEnvelope("sender@example.org", "alice+lists@example.test", "alice@example.test")


def run(
    script: str,
    message: bytes = MSG,
    envelope: SieveEnvelope = ENV,
    limits: Limits = Limits(),
    **kw: object,
) -> list[object]:
    """Run ``script`` the general way and with the precompiled fast path: same answer."""
    outs = []
    for fast in (False, True):
        compiled = compile_script(script)
        view = MessageView.from_bytes(message)
        outs.append(Interpreter(view, envelope, limits, fast=fast, **kw).run(compiled))  # type: ignore[arg-type]
    assert outs[0] == outs[1]
    return outs[1]


# -- RFC 5228 core ------------------------------------------------------------------------------


def test_empty_script_is_implicit_keep() -> None:
    assert run("") == [Keep()]


def test_rfc5228_section_9_example() -> None:
    script = """
    require "fileinto";
    if header :is "Sender" "owner-ietf-mta-filters@imc.org"
            { fileinto "filter"; }
    elsif address :DOMAIN :is ["From", "To"] "example.com"
            { keep; }
    elsif anyof (NOT address :all :contains ["To", "Cc", "Bcc"] "me@example.com",
                 header :matches "subject" ["*make*money*fast*", "*university*dipl*mas*"])
            { fileinto "spam"; }
    else { fileinto "personal"; }
    """
    # To has bob@example.com: the second branch keeps
    assert run(script) == [Keep()]
    other = MSG.replace(b"bob@example.com", b"bob@example.net")
    # "me@example.com" is not in To/Cc: the third branch files into spam
    assert run(script, other) == [FileInto("spam")]


def test_discard_cancels_implicit_keep_but_not_an_explicit_keep() -> None:
    assert run("discard;") == [Discard()]
    assert run("keep; discard;") == [Keep()]


def test_stop_ends_the_script() -> None:
    assert run('require "fileinto"; stop; fileinto "x";') == [Keep()]


def test_keep_and_fileinto_inbox_are_one_delivery() -> None:
    assert run('require "fileinto"; keep; fileinto "INBOX"; fileinto "inbox";') == [Keep()]


def test_fileinto_same_folder_twice_is_one_delivery() -> None:
    assert run('require "fileinto"; fileinto "A"; fileinto "A";') == [FileInto("A")]


def test_redirect_same_address_twice_is_one() -> None:
    out = run('redirect "x@Example.COM"; redirect "x@example.com";')
    assert out == [Redirect("x@Example.COM")]


def test_header_is_case_insensitive_by_default_and_octet_is_not() -> None:
    assert run('if header :is "x-spam-score" "12" { discard; }') == [Discard()]
    assert run('if header :contains "subject" "ACME" { discard; }') == [Discard()]
    script = 'if header :contains :comparator "i;octet" "subject" "ACME" { discard; }'
    assert run(script) == [Keep()]


def test_header_decodes_rfc2047() -> None:
    msg = MSG.replace(
        b"Subject: [acme-users] [fwd] version 1.0 is out", b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?="
    )
    assert run('if header :is "subject" "Grüße" { discard; }', msg) == [Discard()]


def test_exists_needs_every_header() -> None:
    assert run('if exists ["From", "Date"] { discard; }') == [Discard()]
    assert run('if exists ["From", "X-Nope"] { discard; }') == [Keep()]


def test_size_over_and_under() -> None:
    assert run("if size :over 100 { discard; }") == [Discard()]
    assert run("if size :under 1K { discard; }") == [Discard()]
    assert run("if size :over 1M { discard; }") == [Keep()]


def test_address_parts() -> None:
    assert run('if address :localpart "from" "sender" { discard; }') == [Discard()]
    assert run('if address :domain "cc" "example.net" { discard; }') == [Discard()]
    assert run('if address :all "from" "Sender Person" { discard; }') == [Keep()]


def test_envelope_rfc5228_5_4() -> None:
    script = 'require "envelope"; if envelope :all :is "from" "sender@example.org" { discard; }'
    assert run(script) == [Discard()]
    null = SieveEnvelope("", "alice@example.test", "alice@example.test")
    script = 'require "envelope"; if envelope :is "from" "" { discard; }'
    assert run(script, envelope=null) == [Discard()]


def test_matches_wildcards_and_escapes() -> None:
    assert run(r'if header :matches "subject" "*1.?*" { discard; }') == [Discard()]
    assert run(r'if header :matches "subject" "\\[acme*" { discard; }') == [Discard()]
    assert run(r'if header :matches "x-spam-score" "1\\?" { discard; }') == [Keep()]


# -- RFC 5229 variables -------------------------------------------------------------------------


def test_rfc5229_matches_variables() -> None:
    script = """
    require ["fileinto", "variables"];
    if header :matches "List-ID" "*<*@*" {
        fileinto "INBOX.lists.${2}"; stop;
    }
    """
    assert run(script) == [FileInto("INBOX.lists.acme-users")]
    script = """
    require ["fileinto", "variables"];
    if header :matches "Subject" "[*] *" { fileinto "${1}/${2}"; }
    """
    assert run(script) == [FileInto("acme-users/[fwd] version 1.0 is out")]


def test_set_modifiers_rfc5229_4_1() -> None:
    script = r"""
    require ["variables", "fileinto"];
    set "a" "juMBlEd lETteRS";
    set :length "b" "${a}";
    set :lower "c" "${a}";
    set :upperfirst "d" "${c}";
    set :upperfirst :lower "e" "${a}";
    set :quotewildcard "f" "a*b?c\\d";
    fileinto "${b}|${c}|${d}|${e}|${f}";
    """
    assert run(script) == [
        FileInto(r"15|jumbled letters|Jumbled letters|Jumbled letters|a\*b\?c\\d")
    ]


def test_string_test_and_unknown_variables_are_empty() -> None:
    script = """
    require "variables";
    set "x" "";
    if string :is "${x}${nothing}" "" { discard; }
    """
    assert run(script) == [Discard()]
    script = (
        'require ["variables", "relational"]; if string :count "eq" ["a", "", "b"] "2" { discard; }'
    )
    assert run(script) == [Discard()]


def test_variables_are_not_expanded_without_the_extension() -> None:
    assert run('require "fileinto"; fileinto "${1}";') == [FileInto("${1}")]


# -- RFC 5231 relational ------------------------------------------------------------------------


def test_relational_value_and_count() -> None:
    base = 'require ["relational", "comparator-i;ascii-numeric"];\n'
    assert run(
        base + 'if header :value "ge" :comparator "i;ascii-numeric" "x-spam-score" "5" { discard; }'
    ) == [Discard()]
    assert run(
        base + 'if header :value "lt" :comparator "i;ascii-numeric" "x-spam-score" "5" { discard; }'
    ) == [Keep()]
    # RFC 5231 example: three or more recipients in To and Cc
    assert run(
        base + 'if address :count "ge" :comparator "i;ascii-numeric" ["to", "cc"] '
        '["3"] { discard; }'
    ) == [Discard()]
    assert run(
        base + 'if address :count "ge" :comparator "i;ascii-numeric" ["to"] ["3"] { discard; }'
    ) == [Keep()]


def test_ascii_numeric_non_digits_are_infinity() -> None:
    base = 'require ["relational", "comparator-i;ascii-numeric"];\n'
    assert run(
        base + 'if header :value "gt" :comparator "i;ascii-numeric" "subject" "99999" { discard; }'
    ) == [Discard()]


# -- RFC 5233 subaddress ------------------------------------------------------------------------


def test_subaddress() -> None:
    base = 'require ["envelope", "subaddress", "fileinto"];\n'
    assert run(base + 'if envelope :detail "to" "lists" { fileinto "lists"; }') == [
        FileInto("lists")
    ]
    assert run(base + 'if envelope :user "to" "alice" { fileinto "a"; }') == [FileInto("a")]
    assert run(base + 'if address :detail "cc" "" { discard; }') == [Keep()]  # no "+"
    plain = SieveEnvelope("s@example.org", "alice+@example.test", "alice@example.test")
    assert run(base + 'if envelope :detail "to" "" { discard; }', envelope=plain) == [Discard()]


# -- RFC 5232 imap4flags ------------------------------------------------------------------------


def test_imap4flags() -> None:
    script = r"""
    require ["imap4flags", "fileinto"];
    addflag "\\flagged";
    addflag ["$Label1 \\Seen", "\\Flagged"];
    removeflag "\\Seen";
    fileinto "A";
    setflag "\\Answered";
    fileinto :flags "\\Deleted \\Recent bad(flag" "B";
    if hasflag :is "\\answered" { keep; }
    """
    assert run(script) == [
        Keep(frozenset({"\\Answered"})),
        FileInto("A", frozenset({"\\Flagged", "$Label1"})),
        FileInto("B", frozenset({"\\Deleted"})),
    ]


def test_implicit_keep_gets_the_final_flags() -> None:
    assert run(r'require "imap4flags"; addflag "\\Seen";') == [Keep(frozenset({"\\Seen"}))]


def test_flags_in_a_variable() -> None:
    script = r"""
    require ["imap4flags", "variables"];
    setflag "mine" "\\Seen";
    if hasflag "mine" "\\seen" { discard; }
    """
    assert run(script) == [Discard()]


# -- RFC 3894 copy ------------------------------------------------------------------------------


def test_copy_keeps_the_implicit_keep() -> None:
    script = 'require ["copy", "fileinto"]; redirect :copy "x@example.com"; fileinto :copy "A";'
    assert run(script) == [Keep(), FileInto("A", copy=True), Redirect("x@example.com", True)]
    assert run('redirect "x@example.com";') == [Redirect("x@example.com")]


# -- RFC 5173 body ------------------------------------------------------------------------------


MIME = (
    b"From: a@example.org\nTo: alice@example.test\nSubject: mime\nMIME-Version: 1.0\n"
    b'Content-Type: multipart/alternative; boundary="b"\n\n'
    b"--b\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: quoted-printable\n\n"
    b"caf=C3=A9 au lait\n--b\nContent-Type: text/html\n\n<p>html only words</p>\n"
    b"--b\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
    b"c2VjcmV0IGJpbmFyeQ==\n--b--\n"
)


def test_body_transforms() -> None:
    base = 'require "body";\n'
    assert run(base + 'if body :raw :contains "MAKE MONEY FAST" { discard; }') == [Discard()]
    assert run(base + 'if body :contains "café" { discard; }', MIME) == [Discard()]
    assert run(base + 'if body :text :contains "html only" { discard; }', MIME) == [Discard()]
    assert run(base + 'if body :content "text/plain" :contains "html only" { discard; }', MIME) == [
        Keep()
    ]
    assert run(
        base + 'if body :content "application" :contains "secret binary" { discard; }', MIME
    ) == [Discard()]
    assert run(base + 'if body :raw :contains "c2VjcmV0" { discard; }', MIME) == [Discard()]
    assert run(base + 'if body :contains "secret binary" { discard; }', MIME) == [Keep()]


# -- RFC 5260 date and index --------------------------------------------------------------------


def test_date_parts_and_zones() -> None:
    base = 'require ["date", "relational"];\n'
    assert run(base + 'if date :originalzone "date" "hour" "10" { discard; }') == [Discard()]
    assert run(base + 'if date :zone "+0000" "date" "hour" "08" { discard; }') == [Discard()]
    assert run(
        base + 'if date :zone "-0500" "date" "iso8601" "2024-10-01T03:00:00-05:00" { discard; }'
    ) == [Discard()]
    assert run(base + 'if date :originalzone "date" "weekday" "2" { discard; }') == [Discard()]
    assert run(base + 'if date :originalzone "date" "julian" "60584" { discard; }') == [Discard()]
    assert run(base + 'if date :originalzone "date" "zone" "+0200" { discard; }') == [Discard()]
    assert run(
        base + 'if date :value "ge" :originalzone "date" "date" "2024-01-01" { discard; }'
    ) == [Discard()]
    # no date at all: the test is false
    assert run(base + 'if date "x-none" "year" "2024" { discard; }') == [Keep()]


def test_currentdate_uses_the_given_time() -> None:
    now = datetime(2007, 6, 30, 23, 30, tzinfo=UTC)
    base = 'require ["date", "relational"];\n'
    script = base + 'if currentdate :zone "+0100" :value "ge" "date" "2007-07-01" { discard; }'
    assert run(script, now=now) == [Discard()]
    script = base + 'if currentdate :zone "+0000" "date" "2007-06-30" { discard; }'
    assert run(script, now=now) == [Discard()]
    local = timezone(timedelta(hours=-3))
    script = base + 'if currentdate "hour" "20" { discard; }'
    assert run(script, now=now, local_zone=local) == [Discard()]


def test_index_selects_one_field() -> None:
    base = 'require ["index", "date"];\n'
    assert run(base + 'if header :index 2 :contains "received" "client" { discard; }') == [
        Discard()
    ]
    assert run(base + 'if header :index 1 :last :contains "received" "client" { discard; }') == [
        Discard()
    ]
    assert run(base + 'if header :index 1 :contains "received" "client" { discard; }') == [Keep()]
    assert run(base + 'if header :index 9 :contains "received" "" { discard; }') == [Keep()]
    assert run(
        base + 'if date :index 1 :zone "+0000" "received" "time" "09:59:00" { discard; }'
    ) == [Discard()]


# -- RFC 5490 mailbox ---------------------------------------------------------------------------


def test_mailboxexists_and_create() -> None:
    script = """require ["mailbox", "fileinto"];
    if mailboxexists "Lists" { fileinto "Lists"; } else { fileinto :create "New"; }"""
    assert run(script, mailbox_exists=lambda n: n == "Lists") == [FileInto("Lists")]
    assert run(script, mailbox_exists=lambda n: False) == [FileInto("New", create=True)]


# -- RFC 5429 reject ----------------------------------------------------------------------------


def test_reject_and_ereject() -> None:
    assert run('require "reject"; reject "go away";') == [Reject("go away")]
    assert run('require "ereject"; ereject "no";') == [Reject("no", True)]


@pytest.mark.parametrize(
    "script",
    [
        'require ["reject"]; keep; reject "x";',
        'require ["reject", "fileinto"]; reject "x"; fileinto "A";',
        'require ["reject"]; reject "x"; redirect "a@example.com";',
        'require ["reject", "vacation"]; vacation "away"; reject "x";',
        'require ["reject", "ereject"]; reject "x"; ereject "y";',
    ],
)
def test_reject_conflicts_are_runtime_errors(script: str) -> None:
    with pytest.raises(SieveRuntimeError):
        run(script)


# -- RFC 5230 / 6131 vacation -------------------------------------------------------------------


def test_vacation_request() -> None:
    out = run(
        'require "vacation"; vacation :days 3 :subject "Away" '
        ':addresses ["me@example.test"] "I am away.";'
    )
    assert out[0] == Keep()
    request = out[1]
    assert isinstance(request, VacationRequest)
    assert request.seconds == 3 * 86400 and request.subject == "Away"
    assert request.addresses == ("me@example.test",)
    assert request.handle.startswith("auto:")


def test_vacation_period_limits() -> None:
    limits = Limits(vacation_min_period=3600, vacation_max_period=10 * 86400)
    seconds = 'require ["vacation", "vacation-seconds"]; vacation :seconds 60 "x";'
    assert run(seconds, limits=limits)[1].seconds == 3600  # type: ignore[attr-defined]
    days = 'require "vacation"; vacation :days 400 "x";'
    assert run(days, limits=limits)[1].seconds == 10 * 86400  # type: ignore[attr-defined]
    default = 'require "vacation"; vacation "x";'
    assert run(default)[1].seconds == 7 * 86400  # type: ignore[attr-defined]


def test_vacation_twice_is_an_error() -> None:
    with pytest.raises(SieveRuntimeError):
        run('require "vacation"; vacation "a"; vacation "b";')


def test_same_vacation_text_gives_the_same_handle() -> None:
    a = run('require "vacation"; vacation "text";')[1]
    b = run('require "vacation"; vacation "text";')[1]
    c = run('require "vacation"; vacation "other";')[1]
    assert a.handle == b.handle != c.handle  # type: ignore[attr-defined]


# -- RFC 5228 2.4.2.4 encoded-character ---------------------------------------------------------


def test_encoded_character() -> None:
    script = """require ["encoded-character", "fileinto"];
    fileinto "${hex: 24 24}${unicode:40}${hex:zz}";"""
    assert run(script) == [FileInto("$$@${hex:zz}")]
    assert run('require "fileinto"; fileinto "${hex:41}";') == [FileInto("${hex:41}")]


# -- RFC 6609 include ---------------------------------------------------------------------------


def test_include_return_once_optional_and_globals() -> None:
    scripts = {
        ("personal", "sub"): 'require ["include", "variables", "fileinto"]; global "dest";'
        'fileinto "${dest}"; return; fileinto "never";',
        ("global", "common"): 'require "fileinto"; fileinto "global";',
    }

    def load(location: str, name: str) -> Script:
        try:
            return compile_script(scripts[(location, name)])
        except KeyError:
            raise LookupError(name) from None

    main = """require ["include", "variables"];
    global "dest"; set "dest" "fromMain";
    include "sub"; include :once "sub"; include :once "sub";
    include :global "common";
    include :optional "missing";
    """
    assert run(main, load_script=load) == [FileInto("fromMain"), FileInto("global")]
    with pytest.raises(SieveRuntimeError):
        run('require "include"; include "missing";', load_script=load)


def test_include_loop_is_an_error() -> None:
    def load(location: str, name: str) -> Script:
        return compile_script('require "include"; include "self";')

    with pytest.raises(SieveRuntimeError):
        run('require "include"; include "self";', load_script=load)


def test_return_in_main_script_is_stop() -> None:
    assert run('require ["include", "fileinto"]; return; fileinto "x";') == [Keep()]


# -- limits -------------------------------------------------------------------------------------


def test_action_and_redirect_limits() -> None:
    with pytest.raises(SieveRuntimeError):
        run(
            'require "fileinto";' + "".join(f'fileinto "f{i}";' for i in range(5)),
            limits=Limits(max_actions=4),
        )
    with pytest.raises(SieveRuntimeError):
        run(
            "".join(f'redirect "r{i}@example.com";' for i in range(3)),
            limits=Limits(max_redirects=2),
        )


@pytest.mark.parametrize("fast", [False, True])
def test_run_time_limit(fast: bool) -> None:
    # every rule matches, so its action runs: work the fast path cannot skip (rules that do
    # not match cost it a step each, no look at the clock: see test_budget_bounds_skipped_rules)
    ticks = iter(range(10**6))
    clock = lambda: float(next(ticks))  # noqa: E731 -- each look at the clock is a second
    script = 'require "fileinto";' + 'if header :contains "subject" "acme" { keep; }' * 50
    with pytest.raises(SieveRuntimeError, match="too long"):
        Interpreter(
            MessageView.from_bytes(MSG), ENV, Limits(max_run_time=3), clock=clock, fast=fast
        ).run(compile_script(script))


def test_budget_bounds_skipped_rules() -> None:
    """Rules the fast path passes over at once still cost a step each (and their grouped
    tests theirs): a script of many non-matching rules ends in the step limit either way."""
    script = 'require "fileinto";' + 'if header :contains "subject" "x" { keep; }' * 300
    with pytest.raises(SieveRuntimeError, match="too many steps"):
        run(script, limits=Limits(max_steps=500))
    assert run(script, limits=Limits(max_steps=5000)) == [Keep()]


def test_matches_does_not_backtrack_exponentially() -> None:
    value = "a" * 5000
    msg = MSG.replace(b"X-Spam-Score: 12", b"X-Long: " + value.encode())
    pattern = "*a*a*a*a*a*a*a*a*a*a*a*b"
    out = run(
        f'if header :matches "x-long" "{pattern}" {{ discard; }}',
        msg,
        limits=Limits(max_run_time=5),
    )
    assert out == [Keep()]
    pattern = "*a?a*a?a*a*a*a*a*a*b"
    assert run(f'if header :matches "x-long" "{pattern}" {{ discard; }}', msg) == [Keep()]


def test_invalid_scripts_are_refused_before_running() -> None:
    with pytest.raises(SieveParseError):
        compile_script('fileinto "x";')
