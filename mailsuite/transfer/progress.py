"""Progress of a long job (import, export, reindex): messages, MB, rate and ETA.

On a terminal one line is redrawn in place (carriage return) at most five times a second; into
a pipe or a log file, where carriage returns make a mess, a plain line is written at every
tenth of the work and at least every :data:`PLAIN_INTERVAL` seconds.  The ETA comes from the
bytes done when the total size is known (an mbox file's count of messages is not), else from
the messages.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import IO

PLAIN_INTERVAL = 10.0
TTY_INTERVAL = 0.2
MB = 1_000_000


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts what a job did and shows it on ``out``."""

    def __init__(
        self,
        what: str,
        out: IO[str],
        total_messages: int | None = None,
        total_bytes: int | None = None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self.out = out
        self.total_messages = total_messages
        self.total_bytes = total_bytes
        self.tty = out.isatty() if tty is None else tty
        self.clock = clock
        self.started = clock()
        self.messages = 0  # done (including skipped)
        self.bytes = 0
        self.skipped = 0
        self.skipped_bytes = 0
        self._last_shown = self.started
        self._last_tenth = 0
        self._width = 0

    def advance(self, messages: int = 1, nbytes: int = 0, skipped: int = 0) -> None:
        """Record work done: ``messages`` handled, ``nbytes`` of source; ``skipped``: those
        messages needed no work (all of them, when given: pass skipped messages alone)."""
        self.messages += messages
        self.bytes += nbytes
        self.skipped += skipped
        if skipped:
            self.skipped_bytes += nbytes
        now = self.clock()
        if self.tty:
            if now - self._last_shown >= TTY_INTERVAL:
                self._show(now)
            return
        tenth = int(self.fraction() * 10)
        if tenth > self._last_tenth or now - self._last_shown >= PLAIN_INTERVAL:
            self._last_tenth = max(tenth, self._last_tenth)
            self._show(now)

    def fraction(self) -> float:
        """How much of the job is done (0 when the totals are unknown)."""
        if self.total_bytes:
            return min(1.0, self.bytes / self.total_bytes)
        if self.total_messages:
            return min(1.0, self.messages / self.total_messages)
        return 0.0

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        elapsed = max(now - self.started, 1e-9)
        done = f"{self.messages:,}"
        if self.total_messages is not None:
            done += f"/{self.total_messages:,}"
        size = f"{self.bytes / MB:,.1f}"
        if self.total_bytes is not None:
            size += f"/{self.total_bytes / MB:,.1f}"
        parts = [
            f"{self.what}: {done} messages",
            f"{size} MB",
            f"{self.messages / elapsed:,.0f} msg/s",
        ]
        if self.skipped:
            parts.append(f"{self.skipped:,} already there")
        fraction = self.fraction()
        if 0 < fraction < 1:
            parts.append(f"ETA {_duration(elapsed * (1 - fraction) / fraction)}")
        return ", ".join(parts)

    def _show(self, now: float) -> None:
        self._last_shown = now
        text = self.line(now)
        if self.tty:
            pad = max(0, self._width - len(text))
            self.out.write("\r" + text + " " * pad)
            self._width = len(text)
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def finish(self) -> str:
        """End the display (a newline after a redrawn line); returns a one-line summary."""
        now = self.clock()
        elapsed = max(now - self.started, 1e-9)
        if self.tty and self._width:
            self.out.write("\r" + " " * self._width + "\r")
            self.out.flush()
        summary = (
            f"{self.what}: {self.messages - self.skipped:,} messages"
            f" ({(self.bytes - self.skipped_bytes) / MB:,.1f} MB) in {elapsed:.1f} s,"
            f" {(self.messages - self.skipped) / elapsed:,.0f} msg/s"
        )
        if self.skipped:
            summary += f"; {self.skipped:,} were there already"
        return summary
