"""Property tests: a literal streamed from a message file in pieces is exactly the literal
built from the whole message in memory (``to_crlf`` of the section, then its
``<origin.length>`` window), for messages read whole and for messages left on disk."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from mailsuite.imap import fetch_source
from mailsuite.imap.fetch_source import CrlfStream, MessageFile
from mailsuite.imap.message import ParsedMessage, Section, partial, to_crlf
from tests.unit.test_imap_message import NESTED

# bytes that matter to line ends and sections, in runs long enough to cross piece edges
pieces_of_mail = st.lists(
    st.sampled_from(
        [b"\r", b"\n", b"\r\n", b"\x00", b".", b"a", b"From: x\n", b"\n\n", b"--b\n", b"zzzzz"]
    ),
    max_size=200,
).map(b"".join)

SECTIONS = [
    Section(),
    Section((), "TEXT"),
    Section((), "HEADER"),
    Section((), "MIME"),
    Section((), "HEADER.FIELDS", ("from", "subject")),
    Section((), "HEADER.FIELDS.NOT", ("to",)),
    Section((1,)),
    Section((1, 2)),
    Section((2,), "MIME"),
    Section((2,), "HEADER"),
    Section((2,), "TEXT"),
    Section((2,), "HEADER.FIELDS", ("subject",)),
    Section((2, 2)),
    Section((9,)),
]


@contextmanager
def stored(raw: bytes, piece: int, small: int) -> Iterator[MessageFile]:
    """``raw`` in a file, opened with tiny pieces (and read whole below ``small`` bytes)."""
    saved = fetch_source.PIECE, fetch_source.SMALL
    fetch_source.PIECE, fetch_source.SMALL = piece, small
    try:
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "cur").mkdir()
            (Path(d) / "cur" / "m:2,").write_bytes(raw)
            source = MessageFile.open(Path(d), "cur/m:2,")
            assert source is not None
            with source:
                yield source
    finally:
        fetch_source.PIECE, fetch_source.SMALL = saved


def sent(source: MessageFile, spec: Section | None, kind: str | None, window) -> bytes:  # type: ignore[no-untyped-def]
    size, content = source.literal(source.section(spec, kind), window)
    data = b"".join(content)
    assert len(data) == size
    return data


@given(pieces_of_mail, st.integers(1, 9))
def test_crlf_stream_joins_to_to_crlf(data: bytes, cut: int) -> None:
    conv = CrlfStream()
    out = [conv.feed(data[i : i + cut]) for i in range(0, len(data), cut)]
    lengths = CrlfStream()
    total = sum(lengths.feed_length(data[i : i + cut]) for i in range(0, len(data), cut))
    tail = conv.finish()
    assert b"".join(out) + tail == to_crlf(data)
    assert total + len(lengths.finish()) == len(to_crlf(data))


@settings(max_examples=200, deadline=None)
@given(
    pieces_of_mail,
    st.integers(1, 7),
    st.booleans(),
    st.none() | st.tuples(st.integers(0, 300), st.integers(0, 300)),
)
def test_streamed_literal_equals_the_in_memory_one(
    raw: bytes, piece: int, whole: bool, window: tuple[int, int] | None
) -> None:
    expected = to_crlf(raw)
    if window is not None:
        expected = partial(expected, *window)
    with stored(raw, piece, len(raw) if whole else -1) as source:
        assert (source.raw is not None) == whole
        assert sent(source, Section(), None, window) == expected


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 700), st.booleans(), st.integers(0, 3000))
def test_every_section_of_a_nested_message(piece: int, whole: bool, origin: int) -> None:
    raw = NESTED.replace(b"\r\n", b"\n")
    parsed = ParsedMessage(raw)
    with stored(raw, piece, len(raw) if whole else -1) as source:
        for spec in SECTIONS:
            assert sent(source, spec, None, None) == parsed.section(spec), spec
            assert sent(source, spec, None, (origin, 500)) == partial(
                parsed.section(spec), origin, 500
            )
        assert sent(source, None, "TEXT", None) == parsed.text()
        assert sent(source, None, "HEADER", None) == parsed.header()
        assert source.header_parsed().envelope() == parsed.envelope()
        assert source.parsed().bodystructure() == parsed.bodystructure()


def test_a_big_message_is_never_read_whole_for_its_body(tmp_path: Path) -> None:
    """BODY[] of a message above SMALL is sent from the open file in pieces: nothing the
    size of the message is ever in memory."""
    raw = b"Subject: big\n\n" + b"x" * 100 + b"\n" * (fetch_source.SMALL * 3)
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "m").write_bytes(raw)
    source = MessageFile.open(tmp_path, "new/m")
    assert source is not None and source.raw is None
    with source:
        size, content = source.literal(source.section(Section()), None)
        assert size == len(to_crlf(raw))
        biggest = 0
        total = 0
        for piece in content:
            biggest = max(biggest, len(piece))
            total += len(piece)
        assert total == size and biggest <= 2 * fetch_source.PIECE
    # the file may go away meanwhile (an expunge): what was opened is still sent
    source = MessageFile.open(tmp_path, "new/m")
    assert source is not None
    with source:
        (tmp_path / "new" / "m").unlink()
        size, content = source.literal(source.section(Section((), "TEXT")), (5, 10))
        assert b"".join(content) == to_crlf(raw)[len(b"Subject: big\r\n\r\n") + 5 :][:10]
