"""Logging for the code that imports nothing from Twisted (the protocol cores and the store).

Those modules write their log lines through a :class:`Log` they are given instead of
creating a ``twisted.logger.Logger``: the adapters and the runtime pass a Twisted logger
(which provides this protocol as it is, so the server's log keeps one format, the JSON lines
and the namespaces it had), and code run without a reactor -- the command-line tools, unit
tests -- gets :class:`StdLog`, over the standard library's ``logging``.

The format strings are Twisted's (PEP 3101 fields filled from the keyword arguments), so one
line reads the same whichever logger writes it.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol


class Log(Protocol):
    """The part of ``twisted.logger.Logger`` the Twisted-free code uses.  ``failure`` is
    called inside an ``except`` block and logs the exception being handled, traceback
    included."""

    def failure(self, format: str, **fields: Any) -> None: ...

    def warn(self, format: str, **fields: Any) -> None: ...

    def info(self, format: str, **fields: Any) -> None: ...

    def debug(self, format: str, **fields: Any) -> None: ...


class StdLog:
    """A :class:`Log` over ``logging.getLogger(namespace)``: for code run outside the server
    (where no Twisted log observer is started, so a Twisted logger's lines would be lost)."""

    def __init__(self, namespace: str) -> None:
        self._logger = logging.getLogger(namespace)

    def _text(self, format: str, fields: dict[str, Any]) -> str:
        try:
            return format.format(**fields)
        except (KeyError, IndexError, ValueError):  # a bad format must not hide the event
            return f"{format} {fields!r}"

    def failure(self, format: str, **fields: Any) -> None:
        self._logger.error(self._text(format, fields), exc_info=True)

    def warn(self, format: str, **fields: Any) -> None:
        self._logger.warning(self._text(format, fields))

    def info(self, format: str, **fields: Any) -> None:
        self._logger.info(self._text(format, fields))

    def debug(self, format: str, **fields: Any) -> None:
        self._logger.debug(self._text(format, fields))
