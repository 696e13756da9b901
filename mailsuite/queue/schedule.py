"""When to try a queued recipient again, and when to give up (RFC 5321 4.5.4.1).

Pure arithmetic over epoch seconds, no clock of its own: the runner passes ``now`` in, so tests
drive it with a ``task.Clock``. RFC 5321 4.5.4.1 asks for a retry interval of at least 30 minutes
and a give-up time of at least 4-5 days; the defaults (``[relay] retry_initial`` 5 min doubling up
to ``retry_max`` 4 h, ``lifetime`` 5 days) start sooner, because most temporary failures
(greylisting, a busy server) clear within minutes.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailsuite.config import RelayConfig

__all__ = ["RetrySchedule"]


@dataclass(frozen=True)
class RetrySchedule:
    """Growing delays between attempts, a lifetime, and the optional delay warning.

    ``initial`` seconds after the first failed attempt, doubling after every further one, never
    more than ``maximum``. An entry older than ``lifetime`` is not tried again: its pending
    recipients bounce. ``delay_warning`` (0 = never) is the age after which the sender is told
    once that delivery is delayed (RFC 3464 "delayed").
    """

    initial: int = 300
    maximum: int = 4 * 3600
    lifetime: int = 5 * 86400
    delay_warning: int = 4 * 3600

    @classmethod
    def from_config(cls, relay: RelayConfig) -> RetrySchedule:
        return cls(
            initial=relay.retry_initial,
            maximum=max(relay.retry_max, relay.retry_initial),
            lifetime=relay.lifetime,
            delay_warning=relay.delay_warning,
        )

    def delay(self, failed_attempts: int) -> float:
        """Seconds to wait after the ``failed_attempts``-th failed attempt (1 = the first)."""
        if failed_attempts < 1:
            return 0.0
        # Cap the exponent so the doubling cannot overflow before the maximum applies.
        step = self.initial * (2 ** min(failed_attempts - 1, 62))
        return float(min(step, self.maximum))

    def next_attempt(self, now: float, failed_attempts: int, created: float) -> float:
        """When to try next; never later than the moment the entry expires (its last chance
        is then taken at expiry, so a recipient is not bounced without a final try)."""
        return min(now + self.delay(failed_attempts), self.expires(created))

    def expires(self, created: float) -> float:
        return created + self.lifetime

    def expired(self, now: float, created: float) -> bool:
        return now >= self.expires(created)

    def warning_due(self, now: float, created: float) -> bool:
        return self.delay_warning > 0 and now - created >= self.delay_warning
