"""What a login attempt ended in, as the protocol sessions see it.

Kept apart from :mod:`mailsuite.auth` (argon2, the Twisted thread pool and cred portal) so the
protocol cores (``*/session.py``) can name a login's result without importing any I/O: they
hand the credentials to their adapter and get one of these back.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Outcome(Enum):
    OK = "ok"
    BAD_CREDENTIALS = "bad"  # answer e.g. 535 5.7.8 / NO [AUTHENTICATIONFAILED] / -ERR [AUTH]
    THROTTLED = "throttled"  # answer a temporary failure: 454 4.7.0 / NO [UNAVAILABLE] / [SYS/TEMP]


@dataclass(frozen=True)
class LoginResult:
    outcome: Outcome
    user: str | None = None  # canonical address on success
