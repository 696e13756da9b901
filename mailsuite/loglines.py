"""The server log as lines, formatted once, in the process where the event happens.

Why (issue 15): with ``[server] workers`` > 1 a worker used to send every log event to the
supervisor as Twisted's JSON serialisation (``jsonFileLogObserver``: flattening, UUIDs of
the level constants), and the supervisor decoded it, published it again and formatted it
for the file: about 0.25 ms of supervisor CPU per SMTP message, for one log line.  Now the
worker formats the line itself, exactly as the supervisor's observer would (the same
:func:`classic_line` or :func:`mailsuite.jsonlog.event_as_json`, with ``w<N>`` in front
of its system), and sends the finished line down a pipe in a small frame
(:func:`frame`); the supervisor only writes the bytes to the log it owns
(:meth:`LineLog.write_lines`).  One process still writes the log, so twistd's rotation
(by size, and on SIGUSR1) and ``twistd -n``'s stdout keep working, and a line is never
torn or interleaved with another.

For that the supervisor must own the log's output: :func:`twistd_observer` builds the
observer twistd would build (its log file, or stdout with ``-n``) and :mod:`mailsuite.tap`
hands it to twistd as the application's ``ILogObserver``.  With ``--syslog`` or
``--logger`` twistd's choice stands and workers send events as before
(:mod:`mailsuite.workers`).

An event's message text comes from :func:`mailsuite.logtext.event_text` (Twisted's
``formatEvent``, faster), shared with the JSON format.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import IO, Any

from twisted.logger import ILogObserver, formatTime
from twisted.python import logfile
from zope.interface import implementer

from mailsuite.jsonlog import event_as_json
from mailsuite.logtext import event_text

Formatter = Callable[[dict[str, Any]], "str | None"]


class _Stamp:
    """``twisted.logger.formatTime`` (RFC 3339 to the second, local offset), computed once
    per second: the text cannot change within one."""

    def __init__(self) -> None:
        self.second: int | None = None
        self.text = "-"

    def __call__(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = int(round(when, 6))  # datetime.fromtimestamp rounds to the microsecond
        if second != self.second:
            self.text = formatTime(second)
            self.second = second
        return self.text


_stamp = _Stamp()


def system_of(event: dict[str, Any]) -> str:
    """What twistd's text format shows between the brackets: the event's ``log_system``,
    else ``namespace#level``."""
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        name = "-" if level is None else level.name
        return f"{event.get('log_namespace', '-')}#{name}"
    try:
        return str(system)
    except Exception:
        return "UNFORMATTABLE"


def classic_line(event: dict[str, Any]) -> str | None:
    """``twisted.logger.formatEventAsClassicLogText``, the format of twistd's log file:
    ``{time} [{system}] {message}`` plus the traceback of a failure, continuation lines
    indented by a tab; None when there is nothing to write."""
    text = event_text(event)
    if "log_failure" in event:
        try:
            traceback = event["log_failure"].getTraceback()
        except BaseException as e:
            traceback = "(UNABLE TO OBTAIN TRACEBACK FROM EVENT):" + str(e)
        text = f"{text}\n{traceback}"
    if not text:
        return None
    line = f"{_stamp(event.get('log_time'))} [{system_of(event)}] {text}"
    return line.replace("\n", "\n\t") + "\n"


def formatter(log_format: str) -> Formatter:
    """The line format of ``[server] log_format``: "text" (twistd's) or "json"."""
    if log_format == "json":
        return event_as_json
    return classic_line


@implementer(ILogObserver)
class LineLog:
    """An observer writing each event as one line (``format``) to ``out`` -- twistd's
    ``LogFile`` or stdout -- and the owner of that output for lines formatted elsewhere
    (:meth:`write_lines`: a worker's)."""

    def __init__(self, out: IO[Any] | logfile.LogFile, format: Formatter) -> None:
        self.out = out
        self.format = format
        #: twistd's LogFile takes bytes as they are (and counts them toward its rotation);
        #: a text stream takes text
        self._bytes = isinstance(out, logfile.BaseLogFile)

    def __call__(self, event: dict[str, Any]) -> None:
        text = self.format(event)
        if text:
            self.out.write(text)
            self.out.flush()

    def write_lines(self, data: bytes) -> None:
        """Write whole lines formatted by another process (UTF-8) in one write."""
        if not data:
            return
        if self._bytes:
            self.out.write(data)
        else:
            self.out.write(data.decode("utf-8", "replace"))
        self.out.flush()


def twistd_observer(twistd_options: Any, log_format: str) -> Callable[[], LineLog] | None:
    """What makes the observer twistd would make (``twisted.scripts._twistd_unix.UnixAppLogger``),
    as a :class:`LineLog`: stdout for ``-n`` without ``--logfile`` or with ``--logfile -``,
    else the ``--logfile`` (default ``twistd.log``, rotated by twistd's ``LogFile`` at 1 MB
    and on SIGUSR1, as twistd does).  None when ``--syslog`` or ``--logger`` asks for
    something else, and for ``--logfile -`` without ``-n`` (twistd refuses that itself).
    Called when the server joins twistd's application (nothing is opened before)."""
    get = twistd_options.get if twistd_options is not None else {}.get
    if get("syslog") or get("logger"):
        return None
    name = get("logfile") or ""
    if name == "-" and not get("nodaemon"):
        return None
    if name == "-" or (get("nodaemon") and not name):
        return lambda: LineLog(sys.stdout, formatter(log_format))

    def open_log_file() -> LineLog:
        log_file = logfile.LogFile.fromFullPath(name or "twistd.log")
        if hasattr(signal, "SIGUSR1") and not signal.getsignal(signal.SIGUSR1):

            def rotate(signum: int, frame: Any) -> None:
                from twisted.internet import reactor

                reactor.callFromThread(log_file.rotate)  # type: ignore[attr-defined]

            signal.signal(signal.SIGUSR1, rotate)
        return LineLog(log_file, formatter(log_format))

    return open_log_file


# -- between a worker and the supervisor ------------------------------------------------------


def frame(line: str) -> bytes:
    """One finished line for the pipe: its length in bytes, a colon, the UTF-8 bytes (a
    line may hold newlines -- a traceback's -- so a newline cannot end a record)."""
    data = line.encode("utf-8", "replace")
    return b"%d:%s" % (len(data), data)


class Frames:
    """The supervisor's reader of a worker's frames: whole records out, a partial one kept."""

    #: a length longer than this is not a frame (a stray writer on the pipe): dropped
    MAX_RECORD = 16 * 1024 * 1024

    def __init__(self) -> None:
        self.rest = b""

    def feed(self, data: bytes) -> bytes:
        """The payloads of the records completed by ``data``, joined."""
        buf = self.rest + data if self.rest else data
        out: list[bytes] = []
        pos, size = 0, len(buf)
        while pos < size:
            colon = buf.find(b":", pos, pos + 12)
            if colon < 0:
                if size - pos >= 12:  # not a length: resynchronise on nothing, drop it
                    pos = size
                break
            head = buf[pos:colon]
            if not head.isdigit() or int(head) > self.MAX_RECORD:
                pos = size  # garbage: drop what is here
                break
            end = colon + 1 + int(head)
            if end > size:
                break
            out.append(buf[colon + 1 : end])
            pos = end
        self.rest = buf[pos:]
        return b"".join(out)


class WorkerLines:
    """A worker's log observer: each event formatted as the supervisor's log would format it,
    ``w<index>`` in front of its system, framed, written down ``fd`` at once (one write:
    nothing is held back for a worker that dies a moment later)."""

    def __init__(self, fd: int, index: int, format: Formatter) -> None:
        self.fd = fd
        self.prefix = f"w{index} "
        self.format = format

    def __call__(self, event: dict[str, Any]) -> None:
        line = self.format({**event, "log_system": self.prefix + system_of(event)})
        if not line:
            return
        data = memoryview(frame(line))
        try:
            while data:
                data = data[os.write(self.fd, data) :]
        except OSError:  # the supervisor is gone (this process dies with it)
            pass
