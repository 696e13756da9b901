"""Reading mbox files and Maildir trees for import; progress display; the resume record."""

from __future__ import annotations

import calendar
import io
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailsuite.store.index import FolderIndex
from mailsuite.store.maildir import ensure_folder
from mailsuite.transfer.importer import JOURNAL, ImportJournal
from mailsuite.transfer.progress import Progress
from mailsuite.transfer.sources import (
    SourceError,
    maildir_flags,
    open_source,
    read_mbox,
    read_uidlist,
)


def utc(*args: int) -> float:
    return float(calendar.timegm((*args, 0, 0, 0)))


def test_mbox_messages_dates_flags_and_quoting(tmp_path: Path) -> None:
    mbox = tmp_path / "box"
    mbox.write_bytes(
        b"\n"
        b"From alice@example.org Thu Nov 29 10:00:05 2026\n"
        b"From: alice@example.org\nSubject: one\nStatus: RO\nX-Status: AF\n\n"
        b">From here\n>>From there\n>not from\n\n"
        b"From bob@example.org  Sat Jan  3 01:05:34 1996 remote from x\r\n"
        b"Subject: two\r\nDate: Mon, 2 Jan 2006 15:04:05 -0700\r\n\r\ncrlf body\r\n\r\n"
        b"From MAILER-DAEMON nonsense-date\n"
        b"Subject: three\nDate: Mon, 2 Jan 2006 15:04:05 -0700\nX-Mozilla-Status: 1003\n\n"
        b"last line without newline"
    )
    one, two, three = read_mbox(mbox)
    assert one.data == (
        b"From: alice@example.org\nSubject: one\nStatus: RO\nX-Status: AF\n\n"
        b"From here\n>From there\n>not from\n"
    )
    assert one.internaldate == utc(2026, 11, 29, 10, 0, 5)
    assert one.flags == {"\\Seen", "\\Answered", "\\Flagged"}
    assert two.data == b"Subject: two\nDate: Mon, 2 Jan 2006 15:04:05 -0700\n\ncrlf body\n"
    assert two.internaldate == utc(1996, 1, 3, 1, 5, 34)  # the From line wins over Date:
    assert two.flags == frozenset()
    assert three.internaldate == utc(2006, 1, 2, 22, 4, 5)  # no From date: the Date: header
    assert three.flags == {"\\Seen", "\\Answered", "$Forwarded"}
    assert three.data.endswith(b"last line without newline")
    (mboxo,) = list(read_mbox(_one(tmp_path, b">From a\n>>From b\n"), "mboxo"))[:1]
    assert mboxo.data.endswith(b"From a\n>>From b\n")


def _one(tmp_path: Path, body: bytes) -> Path:
    path = tmp_path / "one"
    path.write_bytes(b"From x Thu Nov 29 10:00:05 2026\nSubject: s\n\n" + body)
    return path


def test_from_lines_inside_bodies_split_only_after_a_blank_line_or_with_a_date(
    tmp_path: Path,
) -> None:
    mbox = tmp_path / "box"
    mbox.write_bytes(
        b"From a Thu Nov 29 10:00:05 2026\nSubject: 1\n\nbody\nFrom me, unquoted\n\n"
        b"From b Thu Nov 29 10:00:06 2026\nSubject: 2\n\nx\n"
    )
    first, second = read_mbox(mbox)
    assert b"From me, unquoted" in first.data
    assert second.data == b"Subject: 2\n\nx\n"


def test_not_an_mbox_or_a_maildir(tmp_path: Path) -> None:
    (tmp_path / "text").write_text("hello\n")
    with pytest.raises(SourceError, match="not an mbox file"):
        open_source(tmp_path / "text")
    (tmp_path / "dir").mkdir()
    with pytest.raises(SourceError, match="not a Maildir"):
        open_source(tmp_path / "dir")
    with pytest.raises(SourceError, match="does not exist"):
        open_source(tmp_path / "missing")


def _mboxrd(bodies: list[bytes]) -> bytes:
    """What an mboxrd writer makes of these messages."""
    out = []
    for body in bodies:
        quoted = re.sub(rb"(?m)^(>*From )", rb">\1", body)
        out.append(b"From writer@example.org Thu Nov 29 10:00:05 2026\n" + quoted + b"\n")
    return b"".join(out)


_line = st.one_of(
    st.sampled_from([b"From x", b">From y", b">>From z", b"", b"From", b">", b"text"]),
    st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")),
)


@given(st.lists(st.lists(_line, min_size=1, max_size=8), min_size=1, max_size=5))
@settings(max_examples=200, deadline=None)
def test_mboxrd_round_trip(tmp_path_factory: pytest.TempPathFactory, messages: list) -> None:
    bodies = [b"Subject: s\n\n" + b"\n".join(lines) + b"\n" for lines in messages]
    path = tmp_path_factory.mktemp("rd") / "box"
    path.write_bytes(_mboxrd(bodies))
    assert [m.data for m in read_mbox(path)] == bodies


def test_maildir_flags_keywords_and_uidlist(tmp_path: Path) -> None:
    keywords = {"a": "$Label1", "b": "Important"}
    assert maildir_flags("cur", "1.M1P1.h,S=5:2,FPRSab", keywords) == {
        "\\Flagged",
        "$Forwarded",
        "\\Answered",
        "\\Seen",
        "$Label1",
        "Important",
    }
    assert maildir_flags("new", "1.M1P1.h:2,S", keywords) == frozenset()
    assert maildir_flags("cur", "1.M1P1.h", keywords) == frozenset()
    (tmp_path / "dovecot-uidlist").write_text(
        "3 V1275660208 N25022 G3085f01b7f11094c501100008c4a11c1\n"
        "7 :1655390418.M1P2.host,S=3734\n"
        "9 W120 :1655390419.M1P2.host,S=3734:2,S\n"
        "garbage\n"
    )
    assert read_uidlist(tmp_path) == {
        "1655390418.M1P2.host,S=3734": 7,
        "1655390419.M1P2.host,S=3734": 9,
    }


def test_progress_plain_lines_and_terminal_redraws() -> None:
    now = [0.0]
    out = io.StringIO()
    p = Progress(
        "import", out, total_messages=100, total_bytes=10_000_000, tty=False, clock=lambda: now[0]
    )
    for _ in range(100):
        now[0] += 0.01
        p.advance(1, 100_000)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in out.getvalue()
    assert lines[0] == "import: 10/100 messages, 1.0/10.0 MB, 100 msg/s, ETA 0:00:00"
    assert lines[-1].startswith("import: 100/100 messages, 10.0/10.0 MB")
    assert p.finish() == "import: 100 messages (10.0 MB) in 1.0 s, 100 msg/s"
    tty = io.StringIO()
    p = Progress("export", tty, total_messages=1000, tty=True, clock=lambda: now[0])
    for _ in range(10):
        now[0] += 1
        p.advance(10, 1000)
    assert tty.getvalue().count("\r") == 10 and "\n" not in tty.getvalue()
    assert "ETA 0:01:30" in tty.getvalue().split("\r")[-1]  # 10% in 10 s
    p.finish()
    assert tty.getvalue().endswith("\r")


def test_resume_record_counts_an_interrupted_batch_by_what_reached_the_folder(
    tmp_path: Path,
) -> None:
    folder = ensure_folder(tmp_path / "box")
    index = FolderIndex(folder)
    (folder / "cur" / "1700000000.M1P1Q1.h,S=3,W=3:2,S").write_bytes(b"hi\n")
    (folder / JOURNAL).write_text(
        "old#0 1699999999.M1P1Q0.h\n.\n"  # a finished batch
        "in#0 1700000000.M1P1Q1.h\n"  # the crash: this one made it ...
        "lost#0 1700000000.M2P1Q2.h\n"  # ... this one did not
    )
    journal = ImportJournal(folder, index)
    assert journal.done == {"old#0", "in#0"}
    journal.close()
    again = ImportJournal(folder, index)  # the record was rewritten: same answer
    assert again.done == {"old#0", "in#0"}
    again.close()
    index.close()
    assert (folder / JOURNAL).exists()
