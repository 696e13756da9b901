"""Property tests: SEARCH key trees of any depth are either answered or refused as bad syntax,
never a RecursionError (issue 10: a 400-term OR chain answered ``NO [SERVERBUG]``)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from mailsuite.imap.parser import BadCommand, Command, CommandReader, ParseError
from mailsuite.imap.search import MAX_SEARCH_DEPTH, parse_search, search
from tests.imap_helpers import Msg

#: One level of a spine: the key below it is nested one level deeper.
LEVELS = st.sampled_from(["NOT", "OR SEEN", "OR UNSEEN", "OR_RIGHT"])


@st.composite
def spines(draw: st.DrawFn) -> list[str]:
    """Spines of any depth up to 2,000 levels (deep ones as likely as shallow ones), with up
    to 40 parenthesised levels mixed in (the command reader refuses more than 32)."""
    depth = draw(st.integers(0, 2000))
    spine = draw(st.lists(LEVELS, min_size=depth, max_size=depth))
    for at in draw(st.lists(st.integers(0, depth), max_size=40)):
        spine.insert(at, "(")
    return spine


def build(spine: list[str], leaf: str) -> tuple[bytes, int]:
    """The SEARCH text of ``spine`` around ``leaf`` and its deepest nesting level."""
    text = leaf
    for level in reversed(spine):
        if level == "(":
            text = f"({text})"
        elif level == "OR_RIGHT":  # the deep part as the first operand of OR
            text = f"OR {text} SEEN"
        else:
            text = f"{level} {text}"
    return text.encode(), len(spine)


def reference(spine: list[str], leaf: str, seen: bool) -> bool:
    """The truth of the built key for a message, evaluated without recursion."""
    value = seen if leaf == "SEEN" else not seen
    for level in reversed(spine):
        if level == "NOT":
            value = not value
        elif level == "OR SEEN" or level == "OR_RIGHT":
            value = value or seen
        elif level == "OR UNSEEN":
            value = value or not seen
    return value


@settings(max_examples=100, deadline=None)
@given(spines(), st.sampled_from(["SEEN", "UNSEEN"]))
def test_any_depth_is_answered_or_refused(spine: list[str], leaf: str) -> None:
    text, depth = build(spine, leaf)
    parsed = CommandReader().feed_line(b"t SEARCH " + text)
    if isinstance(parsed, BadCommand):
        assert spine.count("(") > 32, parsed  # only the reader's own parenthesis cap refuses
        return
    assert isinstance(parsed, Command)
    try:
        program = parse_search(parsed.args)
    except ParseError as exc:
        assert depth > MAX_SEARCH_DEPTH, exc
        return
    assert depth <= MAX_SEARCH_DEPTH
    msgs = [Msg(1, 1, flags=frozenset({"\\Seen"})), Msg(2, 2)]
    got = [m.seq for m in search(program, msgs, 2, 2)]
    want = [m.seq for m in msgs if reference(spine, leaf, "\\Seen" in m.flags)]
    assert got == want
