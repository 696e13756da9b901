"""A log event's message text, as ``twisted.logger.formatEvent`` gives it, made faster.

Why (issue 15): Twisted formats through ``string.Formatter`` (pure Python, for its ``{f()}``
call syntax), a third of a log call's cost.  The built-in ``str.format_map`` is tried first;
whatever it cannot format exactly (a ``{f()}`` field, a bad format, a flattened event) goes
the Twisted way, so the text is the same either way.  Used by both line formats: twistd's
text (:mod:`mailsuite.loglines`) and JSON (:mod:`mailsuite.jsonlog`).
"""

from __future__ import annotations

from typing import Any

from twisted.logger import formatEvent


def event_text(event: dict[str, Any]) -> str:
    """The event's message, as ``twisted.logger.formatEvent`` gives it."""
    fmt = event.get("log_format")
    if fmt.__class__ is str and "log_flattened" not in event:
        try:
            return fmt.format_map(event)
        except Exception:  # Twisted's way below says what could not be formatted
            pass
    return formatEvent(event)
