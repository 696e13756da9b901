"""Property tests for the mail-authentication parsers: any input gives a result or the one
documented error, never an exception from deep inside, and never a header someone else wrote."""

from __future__ import annotations

import re

from hypothesis import example, given, settings
from hypothesis import strategies as st

from mailsuite.mailauth.dkim_verify import DKIMResult, verify_dkim
from mailsuite.mailauth.dmarc import DMARCError, parse_record
from mailsuite.mailauth.headers import fields, from_domains, header_section, unfold
from mailsuite.mailauth.results import (
    authserv_id_of,
    parse_results,
    results_header,
    strip_forged_results,
)

ID = "mx.example.test"
header_text = st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=0x2FF), max_size=120)


@settings(max_examples=400)
@given(
    st.one_of(
        st.text(max_size=200),
        st.lists(
            st.sampled_from(
                [
                    "v=DMARC1",
                    "p=reject",
                    "p=",
                    "sp=none",
                    "pct=50",
                    "pct=x",
                    "rua=mailto:a@b.example",
                    "adkim=s",
                    "=",
                    "np=quarantine",
                    " ",
                    "v = DMARC1",
                    "p=none!",
                ]
            ),
            max_size=8,
        ).map("; ".join),
    )
)
def test_dmarc_records_parse_or_raise_dmarc_error(text):
    try:
        r = parse_record(text)
    except DMARCError:
        return
    assert r.p in ("none", "quarantine", "reject") and 0 <= r.pct <= 100
    assert r.adkim in ("r", "s") and r.aspf in ("r", "s")


field_line = st.one_of(
    st.builds(lambda v: f"Authentication-Results: {v}", header_text),
    st.builds(lambda v: f"Authentication-Results: {ID}; {v}", header_text),
    st.builds(lambda v: f"X-Other: {v}", header_text),
    st.builds(lambda v: f" {v}", header_text),  # continuation
    header_text,
)


@settings(max_examples=400)
@given(st.lists(field_line, max_size=12), st.sampled_from(["\r\n", "\n"]))
def test_stripping_removes_only_our_results(lines, eol):
    section = "".join(line.replace("\r", "").replace("\n", "") + eol for line in lines)
    raw = (section + eol).encode("utf-8")
    out, removed = strip_forged_results(raw, ID)
    before = fields(raw)
    after = fields(out)
    assert len(before) - len(after) == removed
    assert out.endswith(eol.encode())
    kept = [f.raw for f in after]
    it = iter(f.raw for f in before)
    assert all(any(k == b for b in it) for k in kept)  # an order-preserving subsequence
    for f in after:
        if f.lname == "authentication-results":
            assert authserv_id_of(unfold(f.raw.partition(b":")[2])) != ID


def split_by_lines(section: bytes) -> list[tuple[str, bytes]]:
    """How fields() split a section before it took a field per match (line by line): the
    reference it must agree with."""
    out: list[tuple[str, bytes]] = []
    lines: list[bytes] = []

    def field() -> tuple[str, bytes]:
        m = re.match(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:", lines[0])
        return (m.group(1).decode("ascii") if m else "", b"".join(lines))

    for line in re.findall(rb"[^\n]*\n|[^\n]+$", section):
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t") and lines:
            lines.append(line)
            continue
        if lines:
            out.append(field())
        lines = [line]
    if lines:
        out.append(field())
    return out


@settings(max_examples=500)
@given(
    st.lists(
        st.sampled_from(
            [b"From", b"a-b", b":", b" ", b"\t", b"\n", b"\r\n", b"\r", b"x: y", b"\xff"]
        ),
        max_size=20,
    ).map(b"".join)
)
@example(b" lead\n cont\nA: b\r\n\r\nbody: x\n")
def test_fields_split_as_line_by_line(section):
    assert [(f.name, f.raw) for f in fields(section)] == split_by_lines(section)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_header_helpers_never_fail(data):
    section = header_section(data)
    assert data.startswith(section)
    fields(section)
    domains = from_domains(section)
    assert domains is None or all(d and "." in d for d in domains)


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["pass", "fail", "permerror", "temperror"]),
            header_text,
            header_text,
            header_text,
            header_text,
        ),
        max_size=5,
    )
)
@example(rows=[("pass", "d.test", "0\n", "", "")])  # "$" matched before a final LF
def test_results_header_has_exactly_our_clauses(rows):
    results = [DKIMResult(r, d, s, a, reason) for r, d, s, a, reason in rows]
    header = results_header(ID, dkim=results)
    assert header.count(b"\n") == max(len(results), 1) + 1  # dkim=[] is one "dkim=none"
    text = header.decode("ascii")  # only ASCII ever reaches the header
    assert "\r" not in text and all(line.startswith("\t") for line in text.split("\n")[1:-1])
    parsed = parse_results(text.split(":", 1)[1].replace("\n\t", " ").strip())
    assert [r.result for r in parsed.results] == ([r.result for r in results] or ["none"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=6))
def test_garbage_signatures_never_raise(values):
    msg = (
        b"".join(
            b"DKIM-Signature: " + v.replace(b"\n", b" ").replace(b"\r", b" ") + b"\r\n"
            for v in values
        )
        + b"From: a@b.example\r\n\r\nbody\r\n"
    )
    results, skipped = verify_dkim(msg, lambda name: None, max_signatures=3)
    assert len(results) + skipped == len(values)
    assert all(r.result in ("pass", "fail", "permerror", "temperror", "neutral") for r in results)
