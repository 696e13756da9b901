"""mailsuite.loglines: lines formatted in the worker read exactly as Twisted's own
formatters would have written them in the supervisor, and the frames between the two
come out whole however the pipe cuts them."""

from __future__ import annotations

import io
import os
import time
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import (
    Logger,
    LogLevel,
    LogPublisher,
    formatEvent,
    formatEventAsClassicLogText,
)
from twisted.python.failure import Failure

from mailsuite import jsonlog, loglines
from mailsuite.logtext import event_text

NOW = 1_764_633_600.25


def events() -> list[dict[str, Any]]:
    """Events as the server makes them, and the odd ones Twisted formats its own way."""
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        failure = Failure()
    base = {"log_time": NOW, "log_namespace": "mailsuite.smtp", "log_level": LogLevel.info}
    return [
        {**base, "log_format": "{profile}: {ip}: {line}", "profile": "mx", "ip": "1", "line": "x"},
        {**base, "log_format": "plain"},
        {**base, "log_format": "{a!r} {b:>6} {c[0]} {d.real}", "a": "é", "b": 7, "c": [1], "d": 2},
        {**base, "log_format": "call {f()}", "f": lambda: "called"},
        {**base, "log_format": "missing {nothere}"},
        {**base, "log_format": "bad {"},
        {**base, "log_format": "positional {}"},
        {**base, "log_format": None},
        {**base, "log_format": b"bytes {x}", "x": 1},
        {**base, "log_format": "multi\nline {x}", "x": "a\nb"},
        {**base, "log_format": "oops", "log_failure": failure, "log_level": LogLevel.critical},
        {**base, "log_format": "", "log_failure": failure},
        {**base, "log_format": "", "log_system": "ESMTP,3,127.0.0.1"},
        {"log_format": "no time, no level"},
        {**base, "log_format": "{x}", "x": "t", "log_system": "ESMTP,3,127.0.0.1"},
        {**base, "log_format": "{log_text}", "log_text": "legacy message", "log_system": "-"},
        {**base, "log_format": "x", "log_time": NOW + 0.9999999},
    ]


def test_text_lines_are_twisteds_classic_text() -> None:
    for event in events():
        assert event_text(event) == formatEvent(event), event
        assert loglines.classic_line(event) == formatEventAsClassicLogText(event), event


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False), st.text(max_size=40))
def test_any_time_and_text_format_as_twisted_does(when: float, text: str) -> None:
    event = {"log_time": when, "log_format": "{t}", "t": text, "log_namespace": "n"}
    assert loglines.classic_line(event) == formatEventAsClassicLogText(event)


def test_a_worker_line_is_what_the_supervisor_relay_wrote() -> None:
    """The worker's line: its system behind ``w<N>``; namespace#level where it has none."""
    read, write = os.pipe()
    try:
        pub = LogPublisher()
        pub.addObserver(loglines.WorkerLines(write, 1, loglines.classic_line))
        Logger(namespace="mailsuite.smtp", observer=pub).info("hello {who}", who="you")
        pub({"log_format": "x", "log_system": "ESMTP,1,127.0.0.1", "log_time": NOW})
        data = os.read(read, 65536)
    finally:
        os.close(read)
        os.close(write)
    lines = loglines.Frames().feed(data).decode().splitlines()
    assert lines[0].endswith(" [w1 mailsuite.smtp#info] hello you"), lines
    assert lines[1].endswith(" [w1 ESMTP,1,127.0.0.1] x"), lines


def test_json_lines_from_a_worker_carry_its_system() -> None:
    read, write = os.pipe()
    try:
        observer = loglines.WorkerLines(write, 0, loglines.formatter("json"))
        observer({"log_format": "m {k}", "k": 1, "log_namespace": "ns", "log_time": NOW,
                  "log_level": LogLevel.warn})  # fmt: skip
        data = loglines.Frames().feed(os.read(read, 65536))
    finally:
        os.close(read)
        os.close(write)
    record = jsonlog.json.loads(data)
    assert record["system"] == "w0 ns#warn"
    assert record["event"] == "m 1"
    assert record["fields"] == {"k": 1}


@given(st.lists(st.text(min_size=0, max_size=300), max_size=20), st.data())
def test_frames_come_out_whole_however_the_pipe_cuts_them(
    lines: list[str], data: st.DataObject
) -> None:
    stream = b"".join(loglines.frame(line) for line in lines)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    frames = loglines.Frames()
    out = b""
    last = 0
    for cut in [*cuts, len(stream)]:
        out += frames.feed(stream[last:cut])
        last = cut
    assert out == "".join(lines).encode("utf-8", "replace")
    assert frames.rest == b""


def test_garbage_on_the_pipe_is_dropped_not_held() -> None:
    frames = loglines.Frames()
    assert frames.feed(b"not a frame at all, no colon here") == b""
    assert frames.rest == b""
    assert frames.feed(loglines.frame("after")) == b"after"


def test_line_log_writes_events_and_finished_lines_in_order(tmp_path: Any) -> None:
    from twisted.python import logfile

    out = io.StringIO()
    log = loglines.LineLog(out, loglines.classic_line)
    log({"log_format": "own", "log_time": NOW, "log_system": "s"})
    log.write_lines("2026 [w0 x] é\n".encode())
    assert out.getvalue().splitlines()[1] == "2026 [w0 x] é"
    f = logfile.LogFile.fromFullPath(str(tmp_path / "twistd.log"), rotateLength=40)
    log = loglines.LineLog(f, loglines.classic_line)
    log.write_lines(b"a" * 39 + b"\n")
    log.write_lines(b"second\n")  # past the rotate length: twistd's LogFile rotates first
    f.close()
    assert (tmp_path / "twistd.log").read_bytes() == b"second\n"
    assert (tmp_path / "twistd.log.1").read_bytes() == b"a" * 39 + b"\n"


def test_the_time_stamp_follows_the_clock() -> None:
    now = time.time()
    for when in (now, now + 1, now + 3600.5, now):
        event = {"log_time": when, "log_format": "x"}
        assert loglines.classic_line(event) == formatEventAsClassicLogText(event)
