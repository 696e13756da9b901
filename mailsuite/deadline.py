"""Read deadlines for the protocol servers: per command line, per data block, until login and
for a whole session.  Our own code; it replaces ``policies.TimeoutMixin`` in the servers.

``TimeoutMixin`` restarts its timer on every byte received, so a client that sends one byte
every few seconds (slowloris) keeps a session open for ever.  Here a deadline is a point in
time fixed when the wait starts, and only *progress* moves it:

* a complete command line (the next line has ``timeout`` seconds from the moment the
  previous one was read: RFC 5321 4.5.3.2.7 gives an SMTP server 5 minutes per command);
* a block of :data:`DATA_BLOCK` octets of message data or literal (RFC 5321 4.5.3.2.5-6:
  3 minutes per data block; a slow upload that keeps moving is fine, a trickle is not: the
  rate it needs is ``DATA_BLOCK / timeout``, 218 bytes a second with the default 300 s);
* the server resuming input after work of its own (its time is not charged to the client;
  :meth:`ReadDeadline.hold` stops the clock meanwhile where the work is bounded, as the fsync
  at the end of SMTP DATA is).

Two caps do not move: the login deadline (a client that has not logged in within
``login_timeout`` of connecting is dropped, as Dovecot does after 3 minutes) and the
session deadline.  Whichever comes first ends the session through ``expired(reason)``.

No reactor at import: the clock (``IReactorTime``, e.g. ``task.Clock`` in tests) is passed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

#: Octets of message data (SMTP DATA) or literal (IMAP APPEND) that count as progress.
DATA_BLOCK = 64 * 1024

COMMAND = "command"
DATA = "data"
LOGIN = "login"
SESSION = "session"


class ReadDeadline:
    """One connection's pending read deadline; see the module docstring.

    ``expired(reason)`` is called once, with :data:`COMMAND`, :data:`DATA`, :data:`LOGIN`
    or :data:`SESSION`; the caller answers (421, ``* BYE``, ``-ERR``) and closes.
    """

    def __init__(
        self,
        clock: Any,
        expired: Callable[[str], None],
        *,
        login: float | None = None,
        session: float | None = None,
    ) -> None:
        self.clock = clock
        self.expired = expired
        now = clock.seconds()
        self.login_end = None if login is None else now + login
        self.session_end = None if session is None else now + session
        self._cap = math.inf  # the sooner of the two caps, and its reason
        self._cap_why = COMMAND
        self._set_cap()
        self._timer: Any = None
        self._timer_at = math.inf  # when the pending timer fires
        self._due = math.inf  # the deadline of the current wait, before the caps
        self._when = math.inf  # when it expires, caps included, and why
        self._why = COMMAND
        self._seconds = 0.0
        self._what = COMMAND
        self._block = 0  # data octets since the deadline last moved
        self._done = False

    def wait(self, seconds: float, what: str = COMMAND) -> None:
        """Start waiting for input: ``seconds`` from now for the next line (or data block)."""
        if self._done:
            return
        self._seconds = seconds
        self._what = what
        self._block = 0
        self._arm_at(self.clock.seconds() + seconds)

    def data(self, count: int) -> None:
        """``count`` octets of data arrived: a full :data:`DATA_BLOCK` moves the deadline."""
        self._block += count
        if self._block >= DATA_BLOCK:
            self.wait(self._seconds, self._what)

    def hold(self) -> None:
        """The server is working on a command: only the login and session caps run until
        the next :meth:`wait`."""
        if not self._done:
            self._arm_at(math.inf)

    def logged_in(self) -> None:
        """The client logged in: the login cap no longer applies."""
        self.login_end = None
        self._set_cap()
        if not self._done:
            self._arm_at(self._due)

    def cancel(self) -> None:
        """Stop for good (the connection is closing or closed)."""
        self._done = True
        self._disarm()

    # -- internals ---------------------------------------------------------------------------

    def _set_cap(self) -> None:
        self._cap, self._cap_why = math.inf, COMMAND
        for cap, reason in ((self.login_end, LOGIN), (self.session_end, SESSION)):
            if cap is not None and cap < self._cap:
                self._cap, self._cap_why = cap, reason

    def _arm_at(self, due: float) -> None:
        """Expire at ``due`` (or an earlier cap).  The timer is lazy: a deadline that only
        moves later -- every command line moves it -- keeps the pending timer, which on
        firing finds the deadline moved and waits for the rest (:meth:`_fire`).  Cancelling
        and scheduling a timer per line cost two heap operations and a ``DelayedCall`` each
        (measured: a tenth of the server's time per POP3 command); a timer is replaced only
        when the deadline comes sooner than it fires.  Per line this is a comparison or two:
        the caps are combined when they change, and the pending timer's time is kept here
        (it is ours alone: only :meth:`_fire` and :meth:`_disarm` end it)."""
        self._due = due
        if due <= self._cap:
            self._when, self._why = due, self._what
        else:
            self._when, self._why = self._cap, self._cap_why
        when = self._when
        if when == math.inf:
            return  # a pending timer fires, finds nothing due and stops
        if self._timer is not None:
            if self._timer_at <= when:
                return
            self._timer.cancel()
        self._schedule(when)

    def _schedule(self, when: float) -> None:
        self._timer_at = when
        self._timer = self.clock.callLater(max(0.0, when - self.clock.seconds()), self._fire)

    def _disarm(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
            self._timer_at = math.inf

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        if self._done or self._when == math.inf:
            return
        if self.clock.seconds() < self._when:  # moved since the timer was set: wait for the rest
            self._schedule(self._when)
            return
        self._done = True
        self.expired(self._why)
