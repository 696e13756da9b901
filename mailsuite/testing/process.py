"""How tests and benchmarks start the real server: ``twistd -n [...] mailsuite [...]``.

Through the running interpreter (``python -c "...twistd.run()"``) rather than a ``twistd``
found on PATH, so the server under test is the one installed for this Python, whatever the
PATH of a CI machine or a virtualenv says.
"""

from __future__ import annotations

import sys

_TWISTD = "from twisted.scripts.twistd import run; run()"


def twistd_argv(*twistd_args: str, python: str | None = None) -> list[str]:
    """argv for twistd with ``twistd_args`` (e.g. ``"-n", "--pidfile", "", "mailsuite"``)."""
    return [python or sys.executable, "-c", _TWISTD, *twistd_args]


def mailsuite_argv(
    config: str | None, logfile: str | None = None, python: str | None = None
) -> list[str]:
    """argv for ``twistd -n --pidfile '' [--logfile F] mailsuite [--config C]`` in the
    foreground, without a pid file (tests run several servers from one folder)."""
    args = ["-n", "--pidfile", ""]
    if logfile is not None:
        args += ["--logfile", logfile]
    args.append("mailsuite")
    if config is not None:
        args += ["--config", config]
    return twistd_argv(*args, python=python)
