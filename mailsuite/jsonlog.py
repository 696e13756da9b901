"""``[server] log_format = "json"``: the server log as one JSON object per line.

For log collectors (journald with a JSON parser, Loki, Vector, Elasticsearch): each twisted.logger
event becomes ``{"time", "level", "system", "namespace", "event", "fields"}`` plus ``"traceback"``
when the event carries a failure.  ``time`` is ISO 8601 in UTC with milliseconds, ``level`` is
twisted's level name (debug, info, warn, error, critical), ``system`` is the connection's log
system where Twisted sets one (e.g. ``"ESMTP,12,127.0.0.1"``) else the namespace, ``event`` is
the formatted message and ``fields`` the event's own keys (those given to ``log.info(...)``),
values that JSON cannot hold written as text.

twisted's own ``jsonFileLogObserver`` is not used: it writes its internal event serialisation
(``log_format`` templates, level objects, record separators) for twisted to read back, not for
people and collectors.

twistd creates the log observer before the service starts, so
:func:`mailsuite.loglines.twistd_observer` builds one that writes where twistd would have
written (``--logfile`` or stdout with ``-n``), and :mod:`mailsuite.tap` puts it on the
application, where twistd looks first.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from twisted.logger import LogLevel

from mailsuite.logtext import event_text

#: Keys of events from the legacy twisted.python.log API that are not the caller's fields.
_LEGACY_KEYS = frozenset(("message", "isError", "system", "time", "format", "why", "failure"))
_MAX_FIELD = 2000  # characters of one field value's text form


def _jsonable(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return value[:_MAX_FIELD]
    if isinstance(value, bytes):
        return value[:_MAX_FIELD].decode("utf-8", "replace")
    if depth < 3 and isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v, depth + 1) for v in list(value)[:100]]
    if depth < 3 and isinstance(value, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in list(value.items())[:100]}
    return str(value)[:_MAX_FIELD]


def event_as_json(event: dict[str, Any]) -> str:
    """One log event as one line of JSON (ending in a newline)."""
    level = event.get("log_level")
    if isinstance(level, type(LogLevel.info)):
        level_name = level.name
    else:
        level_name = "error" if event.get("isError") else "info"
    stamp = event.get("log_time")
    when = datetime.fromtimestamp(stamp if stamp is not None else 0, UTC)
    namespace = event.get("log_namespace") or "-"
    text = event_text(event)
    failure = event.get("log_failure")
    if not text and failure is not None:
        text = f"{failure.type.__name__}: {failure.getErrorMessage()}"
    record: dict[str, Any] = {
        "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": level_name,
        "system": event.get("log_system") or namespace,
        "namespace": namespace,
        "event": text,
        "fields": {
            k: _jsonable(v)
            for k, v in event.items()
            if not k.startswith("log_") and k not in _LEGACY_KEYS
        },
    }
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:  # a broken failure object must not lose the log line
            record["traceback"] = repr(failure)
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
