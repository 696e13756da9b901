"""The one call local delivery makes: run the recipient's active script on a stored message.

``SieveFilter(settings, directory).evaluate(message_path, envelope)`` -> :class:`SieveOutcome`.
Blocking (reads the script, the message headers, the vacation record): call it from the
delivery's thread, after the message file is written and fsynced and before it is renamed
into place.  It never raises for anything a script or a message can do: a script that does
not compile, a run-time error or a limit exceeded gives ``actions == (Keep(),)`` with
``error`` set, and the error is appended to the user's sieve log (``mailsuite sieve log``).

How delivery applies the outcome is described in :mod:`mailsuite.sieve.apply`, which has the
blocking helpers for it.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mailsuite.sieve.actions import Action, Discard, Keep, Redirect, Reject, VacationRequest
from mailsuite.sieve.grammar import SieveParseError
from mailsuite.sieve.interpreter import Interpreter, Limits, SieveEnvelope
from mailsuite.sieve.match import SieveRuntimeError
from mailsuite.sieve.message import MessageView
from mailsuite.sieve.storage import SUFFIX, ScriptStore
from mailsuite.sieve.vacation import VacationStore, build_reply, decide
from mailsuite.sieve.validate import Script, compile_script


@dataclass(frozen=True)
class SieveSettings:
    """The ``[sieve]`` config as the engine needs it."""

    limits: Limits = field(default_factory=Limits)
    max_script_size: int = 1024 * 1024
    max_scripts: int = 100
    hostname: str = "localhost"
    #: where ``include :global`` looks (``<data_dir>/sieve-global/NAME.sieve``)
    global_dir: Path | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> SieveSettings:
        s = cfg.sieve
        return cls(
            limits=Limits(
                max_actions=s.max_actions,
                max_redirects=s.max_redirects,
                max_run_time=float(s.max_run_time),
                vacation_min_period=s.vacation_min_period,
                vacation_max_period=s.vacation_max_period,
                vacation_default_period=max(
                    s.vacation_min_period, min(7 * 86400, s.vacation_max_period)
                ),
            ),
            max_script_size=s.max_script_size,
            max_scripts=s.max_scripts,
            hostname=cfg.hostname,
            global_dir=cfg.data_dir / "sieve-global",
        )


@dataclass(frozen=True)
class VacationReply:
    """A reply to queue: ``message`` (LF line ends) from ``sender`` ("" -- the null
    reverse-path, RFC 5230 5.1 / RFC 3834 3.3) to ``recipient``."""

    sender: str
    recipient: str
    message: bytes


@dataclass(frozen=True)
class SieveOutcome:
    """What to do with one message for one recipient.

    ``actions`` holds :class:`~.actions.Keep`, :class:`~.actions.FileInto`,
    :class:`~.actions.Redirect`, :class:`~.actions.Reject` or a lone
    :class:`~.actions.Discard` -- never empty; ``vacation`` is a reply to queue (already
    recorded, so send it once); ``error`` is set when the script failed and the outcome is
    the fall-back keep; ``notes`` are lines for the server log (vacation suppressed, a
    redirect loop broken)."""

    actions: tuple[Action, ...]
    script: str | None = None
    vacation: VacationReply | None = None
    error: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def ran(self) -> bool:
        return self.script is not None


KEEP = SieveOutcome((Keep(),))


class _ScriptCache:
    """Compiled scripts by file identity (inode, size, mtime): a delivery re-reads only a
    ``stat`` when the script did not change.  Bounded, shared by the delivery threads."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self.lock = threading.Lock()
        self.items: OrderedDict[Path, tuple[tuple[int, int, int], Script]] = OrderedDict()

    def get(self, path: Path, max_size: int) -> Script:
        st = path.stat()
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self.lock:
            hit = self.items.get(path)
            if hit is not None and hit[0] == stamp:
                self.items.move_to_end(path)
                return hit[1]
        data = path.read_bytes()
        if len(data) > max_size:
            raise SieveParseError(1, f"script is larger than the limit of {max_size} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SieveParseError(
                data.count(b"\n", 0, e.start) + 1, "script is not valid UTF-8"
            ) from None
        script = compile_script(text)
        with self.lock:
            self.items[path] = (stamp, script)
            self.items.move_to_end(path)
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return script


_cache = _ScriptCache()


def _delivered_to_count(message: MessageView, user: str) -> int:
    user = user.lower()
    return sum(1 for v in message.raw("delivered-to") if v.strip().strip("<>").lower() == user)


def evaluate(
    root: Path,
    message_path: Path,
    envelope: SieveEnvelope,
    settings: SieveSettings,
    *,
    offset: int = 0,
    size: int | None = None,
    own_addresses: Iterable[str] = (),
    mailbox_exists: Callable[[str], bool] | None = None,
    delivered_to_added: bool = True,
    now: datetime | None = None,
) -> SieveOutcome:
    """Run the active script of the user whose Maildir root is ``root``.

    ``message_path[offset:]`` is the message as it will be stored; ``size`` its CRLF size if
    known.  ``delivered_to_added``: the file already carries this delivery's own
    ``Delivered-To: <user>`` line (delivery.py writes it first), so one more such line means
    the message has been here before and redirects are dropped (loop, RFC 5228 4.2).
    """
    store = ScriptStore(root, settings.max_scripts, settings.max_script_size)
    path = store.active_path()
    if path is None:
        return KEEP
    # the script's name: the linked file's, or the plain file's own (no second readlink)
    name = path.name[: -len(SUFFIX)] if path != store.link else path.name
    when = now or datetime.now(UTC)
    try:
        script = _cache.get(path, settings.max_script_size)
    except FileNotFoundError:
        return KEEP  # deactivated meanwhile
    except (SieveParseError, OSError) as e:
        return _failed(store, name, f"script does not compile: {e}", when)
    try:
        message = MessageView.from_file(message_path, offset, size)
    except OSError as e:
        return _failed(store, name, f"message unreadable: {e}", when)
    if mailbox_exists is None:
        mailbox_exists = _mailbox_checker(root)
    interpreter = Interpreter(
        message,
        envelope,
        settings.limits,
        mailbox_exists=mailbox_exists,
        load_script=_loader(store, settings),
        now=when,
    )
    try:
        actions = interpreter.run(script)
    except SieveRuntimeError as e:
        return _failed(store, name, str(e), when)
    except Exception as e:  # a bug must cost a keep, never the message
        return _failed(store, name, f"internal error: {type(e).__name__}: {e}", when)

    notes: list[str] = []
    final: list[Action] = []
    request: VacationRequest | None = None
    for action in actions:
        if isinstance(action, VacationRequest):
            request = action
        else:
            final.append(action)
    if any(isinstance(a, Redirect) for a in final) and (
        _delivered_to_count(message, envelope.user) >= (2 if delivered_to_added else 1)
    ):
        notes.append(
            f"redirect loop: {envelope.user} delivered this message before; redirects dropped"
        )
        final = [a for a in final if not isinstance(a, Redirect)]
        if not final:
            final = [Keep()]
        store.append_log(f"script {name!r}: redirect loop detected, message kept", when)
    reply = None
    if request is not None:
        reply, why = _vacation(store, request, message, envelope, own_addresses, settings, when)
        if why:
            notes.append(f"vacation: no reply ({why})")
    if len(final) > 1 and any(isinstance(a, Discard) for a in final):
        final = [a for a in final if not isinstance(a, Discard)]
    return SieveOutcome(tuple(final), name, reply, None, tuple(notes))


def _vacation(
    store: ScriptStore,
    request: VacationRequest,
    message: MessageView,
    envelope: SieveEnvelope,
    own: Iterable[str],
    settings: SieveSettings,
    when: datetime,
) -> tuple[VacationReply | None, str]:
    decision = decide(request, message, envelope, own)
    if not decision.reply:
        return None, decision.why
    vstore = VacationStore(store.vacation_path)
    try:
        claimed = vstore.claim(envelope.sender, request.handle, request.seconds, when.timestamp())
    except OSError as e:
        return None, f"vacation record unavailable: {e}"
    if not claimed:
        return None, f"already replied to {envelope.sender} within the period"
    data = build_reply(request, message, envelope, decision, settings.hostname, when)
    return VacationReply("", envelope.sender, data), ""


def _failed(store: ScriptStore, name: str, error: str, when: datetime) -> SieveOutcome:
    """RFC 5228 2.10.6: a failed script means the implicit keep; the user is told."""
    with contextlib.suppress(OSError):  # the log is a courtesy; the message must not be lost
        store.append_log(f"script {name!r} failed, message kept in INBOX: {error}", when)
    return SieveOutcome((Keep(),), name, None, error)


def _loader(store: ScriptStore, settings: SieveSettings) -> Callable[[str, str], Script]:
    def load(location: str, name: str) -> Script:
        if location == "global":
            if settings.global_dir is None:
                raise LookupError(name)
            path = settings.global_dir / f"{name}.sieve"
        else:
            path = store.path(name)
        try:
            return _cache.get(path, settings.max_script_size)
        except FileNotFoundError:
            raise LookupError(name) from None

    return load


def _mailbox_checker(root: Path) -> Callable[[str], bool]:
    from mailsuite.sieve.apply import folder_for

    def exists(name: str) -> bool:
        try:
            return (folder_for(root, name) / "cur").is_dir()
        except ValueError:
            return False

    return exists


class _OwnAddresses:
    """The user's own addresses, looked up in the directory only when iterated: only a
    vacation reply needs them (RFC 5230 4.5), and most deliveries have none."""

    def __init__(self, directory: Any, user: str) -> None:
        self.directory = directory
        self.user = user

    def __iter__(self) -> Iterator[str]:
        try:
            return iter(self.directory.send_as(self.user))
        except ValueError:
            return iter(())


class SieveFilter:
    """Bound to the server's directory and settings: what delivery holds on to.

    ``evaluate(message_path, envelope)`` runs ``envelope.user``'s active script; the user's
    own addresses (for vacation) are the account, its aliases and ``send_as`` list."""

    def __init__(self, settings: SieveSettings, directory: Any) -> None:
        self.settings = settings
        self.directory = directory

    def evaluate(
        self,
        message_path: Path,
        envelope: SieveEnvelope,
        *,
        offset: int = 0,
        size: int | None = None,
        delivered_to_added: bool = True,
    ) -> SieveOutcome:
        root = self.directory.mailbox_root(envelope.user)
        own = _OwnAddresses(self.directory, envelope.user)
        outcome = evaluate(
            root,
            message_path,
            envelope,
            self.settings,
            offset=offset,
            size=size,
            own_addresses=own,
            delivered_to_added=delivered_to_added,
        )
        return outcome


__all__ = [
    "KEEP",
    "Reject",
    "SieveEnvelope",
    "SieveFilter",
    "SieveOutcome",
    "SieveSettings",
    "VacationReply",
    "evaluate",
]
