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
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mailsuite.sieve.actions import Action, Discard, Keep, Redirect, Reject, VacationRequest
from mailsuite.sieve.grammar import SieveParseError
from mailsuite.sieve.interpreter import Interpreter, Limits, SieveEnvelope
from mailsuite.sieve.match import Budget, SieveRuntimeError
from mailsuite.sieve.message import MessageView
from mailsuite.sieve.plan import Probe, screen
from mailsuite.sieve.storage import ACTIVE_LINK, SUFFIX, ScriptStore
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


class _ActiveCache:
    """Each Maildir root's active script, by the identity of its ``.dovecot.sieve`` (the
    link's own, from ``lstat``) and of the file it leads to (``stat``): a delivery that finds
    both unchanged costs those two calls, without reading the link or the script again.

    Activating replaces the link (a new inode); a script written by ManageSieve or the CLI
    is a new file renamed into place (a new inode); an edit in place changes size or
    mtime; a rename links and unlinks the file, which changes its ctime.  Anything else
    takes the full path (:meth:`ScriptStore.active_path`: the link's target checked, then
    the file read through :class:`_ScriptCache`).  Bounded, shared by the delivery threads.
    """

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self.lock = threading.Lock()
        self.items: dict[str, tuple[tuple[int, ...], tuple[str, Script]]] = {}

    def get(self, root: Path, settings: SieveSettings) -> tuple[str, Script] | None:
        """(name, compiled script) of the active script, None when there is none;
        raises as :meth:`_ScriptCache.get` does when it does not load."""
        key = str(root)
        link = f"{key}/{ACTIVE_LINK}"
        try:
            lst = os.lstat(link)
        except OSError:
            return None  # no active script: the common case, one system call
        if stat.S_ISLNK(lst.st_mode):
            try:
                st = os.stat(link)  # noqa: PTH116 -- a str path: no Path on the hot path
            except OSError:
                return None  # a link to nothing (ScriptStore.active agrees)
        else:
            st = lst
        stamp = (
            lst.st_ino,
            lst.st_mtime_ns,
            lst.st_ctime_ns,
            st.st_dev,
            st.st_ino,
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
        )
        hit = self.items.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        store = ScriptStore(root, settings.max_scripts, settings.max_script_size)
        path = store.active_path()
        if path is None:
            return None
        # the script's name: the linked file's, or the plain file's own (no second readlink)
        name = path.name[: -len(SUFFIX)] if path != store.link else path.name
        try:
            script = _cache.get(path, settings.max_script_size)
        except FileNotFoundError:
            return None  # deactivated meanwhile
        except (SieveParseError, OSError) as e:
            raise _LoadError(name, e) from None
        found = (name, script)
        with self.lock:
            self.items.pop(key, None)
            self.items[key] = (stamp, found)
            while len(self.items) > self.size:
                del self.items[next(iter(self.items))]
        return found


class _LoadError(Exception):
    def __init__(self, name: str, error: Exception) -> None:
        super().__init__(str(error))
        self.name = name


_active = _ActiveCache()
_clock = time.monotonic  # the interpreter's default clock (its run-time limit)


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
    contents: Callable[[], bytes] | None = None,
) -> SieveOutcome:
    """Run the active script of the user whose Maildir root is ``root``.

    ``message_path[offset:]`` is the message as it will be stored; ``size`` its CRLF size if
    known; ``contents``, when given, returns the file's bytes (delivery still has a small
    message in memory), called only when there is a script to run.  ``delivered_to_added``:
    the file already carries this delivery's own ``Delivered-To: <user>`` line (delivery.py
    writes it first), so one more such line means the message has been here before and
    redirects are dropped (loop, RFC 5228 4.2).
    """
    try:
        active = _active.get(root, settings)
    except _LoadError as e:
        store = ScriptStore(root, settings.max_scripts, settings.max_script_size)
        return _failed(store, e.name, f"script does not compile: {e}", now or datetime.now(UTC))
    if active is None:
        return KEEP
    name, script = active
    when = now or datetime.now(UTC)
    store = ScriptStore(root, settings.max_scripts, settings.max_script_size)
    try:
        if contents is not None:
            message = MessageView.from_buffer(contents(), offset, size)
        else:
            message = MessageView.from_file(message_path, offset, size)
    except OSError as e:
        return _failed(store, name, f"message unreadable: {e}", when)
    limits = settings.limits
    probe = Probe(message, envelope, Budget(limits.max_steps, _clock() + limits.max_run_time))
    try:
        if screen(script, "variables" in script.requires, probe):
            # no rule is true: the implicit keep, without an interpreter (see plan.screen)
            return SieveOutcome((Keep(),), name)
        if mailbox_exists is None:
            mailbox_exists = _mailbox_checker(root)
        interpreter = Interpreter(
            message,
            envelope,
            limits,
            mailbox_exists=mailbox_exists,
            load_script=_loader(store, settings),
            now=when,
            probe=probe,
        )
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
    def exists(name: str) -> bool:
        from mailsuite.sieve.apply import folder_for  # (apply imports this module)

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
        root: Path | None = None,
        contents: Callable[[], bytes] | None = None,
    ) -> SieveOutcome:
        """``root``: the user's Maildir root when the caller has it (delivery's LocalBox);
        ``contents``: see :func:`evaluate`."""
        if root is None:
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
            contents=contents,
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
