"""Runs a checked Sieve script against one message and envelope; returns actions.  Ours.

Pure: the message comes in as a :class:`~.message.MessageView`, the envelope as a
:class:`SieveEnvelope`, the world as two callables (does a mailbox exist, load an included
script); the answer is a list of :mod:`.actions`.  Nothing is stored, sent or logged here.

A run that goes wrong -- a limit exceeded (:class:`~.match.Budget`, actions, redirects,
includes), conflicting actions, an included script missing -- raises
:class:`~.match.SieveRuntimeError`; the caller turns that into a keep (RFC 5228 2.10.6).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timezone
from email.utils import parseaddr

from mailsuite.sieve.actions import Action, ActionList, VacationRequest
from mailsuite.sieve.dates import date_part, header_datetime, parse_zone
from mailsuite.sieve.fastpath import compile_test
from mailsuite.sieve.match import Budget, SieveRuntimeError, match_any
from mailsuite.sieve.message import MessageView, address_part
from mailsuite.sieve.plan import Probe, prepare
from mailsuite.sieve.validate import Node, Script
from mailsuite.sieve.variables import (
    INTERNAL_FLAGS,
    Scope,
    apply_modifiers,
    expand,
    flag_list,
    storable_flags,
)

DAY = 86400
_UNSET = object()


@dataclass(frozen=True)
class Limits:
    """Bounds on one run (RFC 5228 10); the ``[sieve]`` config fills them in."""

    max_actions: int = 32
    max_redirects: int = 4
    max_run_time: float = 5.0
    max_steps: int = 200_000
    max_include_depth: int = 10
    max_includes: int = 64
    vacation_min_period: int = DAY  # RFC 5230 4.1: at least 1 day unless sites allow less
    vacation_max_period: int = 90 * DAY
    vacation_default_period: int = 7 * DAY  # RFC 5230 4.1: 7 days is the recommended default


@dataclass(frozen=True)
class SieveEnvelope:
    """The SMTP envelope of this delivery."""

    sender: str  # MAIL FROM, "" for the null reverse-path
    recipient: str  # RCPT TO as the sender wrote it (keeps +detail for subaddress tests)
    user: str  # canonical address of the mailbox owner


#: (location "personal"/"global", name) -> compiled script; raises LookupError when the
#: script does not exist and SieveParseError when it does not compile.
ScriptLoader = Callable[[str, str], Script]


class _Stop(Exception):
    pass


class _Return(Exception):
    pass


@dataclass
class _Frame:
    requires: frozenset[str]
    scope: Scope

    def __post_init__(self) -> None:
        self.variables = "variables" in self.requires


class Interpreter:
    def __init__(
        self,
        message: MessageView,
        envelope: SieveEnvelope,
        limits: Limits = Limits(),
        *,
        mailbox_exists: Callable[[str], bool] = lambda name: name.upper() == "INBOX",
        load_script: ScriptLoader | None = None,
        now: datetime | None = None,
        local_zone: timezone | None = None,
        clock: Callable[[], float] = time.monotonic,
        fast: bool = True,
        probe: Probe | None = None,
    ) -> None:
        """``probe``: what :func:`.plan.screen` already spent and found for this message
        (its budget and group answers carry on here)."""
        self.message = message
        self.envelope = envelope
        self.limits = limits
        self.mailbox_exists = mailbox_exists
        self.load_script = load_script
        self.now = now or datetime.now(UTC)
        self.local_zone = local_zone
        self.budget = (
            probe.budget
            if probe is not None
            else Budget(limits.max_steps, clock() + limits.max_run_time, clock)
        )
        self.actions = ActionList(limits.max_actions, limits.max_redirects)
        self.shared: dict[str, str] = {}
        self.matches: list[str] = []
        self.included: set[tuple[str, str]] = set()
        self.include_count = 0
        self.stack: list[tuple[str, str]] = []
        self.fast = fast
        #: the answers of the test groups asked so far (see :mod:`.plan`), for this message
        self.group_hits: dict[object, set[int]] = probe.group_hits if probe is not None else {}

    # -- running -----------------------------------------------------------------------------

    def run(self, script: Script) -> list[Action]:
        try:
            self._script(script)
        except _Stop:
            pass
        except RecursionError:
            raise SieveRuntimeError("script nests too deeply") from None
        flags = storable_flags(self.shared.get(INTERNAL_FLAGS, ""))
        return self.actions.final(flags)

    def _script(self, script: Script) -> None:
        frame = _Frame(script.requires, Scope(self.shared))
        if self.fast:
            prepare(script, frame.variables)
        try:
            self._block(script.nodes, frame)
        except _Return:
            if not self.stack:
                raise _Stop() from None  # RFC 6609 3.3: return in the main script is stop

    def _block(self, nodes: list[Node], frame: _Frame) -> None:
        chain_done = True
        charge = self.budget.charge
        variables = frame.variables
        fast = self.fast
        i, n = 0, len(nodes)
        while i < n:
            node = nodes[i]
            if fast:
                run = node.run.get(variables)
                if run is not None:
                    # a run of rules with grouped tests (see .plan): on to the next whose
                    # test is true, one step for each rule passed, as walking them costs
                    j = run.next_true(self, i)
                    if j > i:
                        charge(j - i)
                        chain_done = False  # each rule passed was an ``if`` that failed
                        if j >= n:
                            return
                        i, node = j, nodes[j]
            i += 1
            charge()
            name = node.name
            if name == "if":
                # the common rule: ``if <test with a precompiled form> {...}``, called
                # directly (this loop is where a 50-rule script spends its time)
                test = node.tests[0]
                fn = test.fast.get(variables, _UNSET) if fast else None
                if fn is not None and fn is not _UNSET:
                    chain_done = bool(fn(self))
                else:
                    chain_done = self._test(test, frame)
                if chain_done:
                    self._block(node.block or [], frame)
            elif name == "elsif":
                if not chain_done:
                    chain_done = self._test(node.tests[0], frame)
                    if chain_done:
                        self._block(node.block or [], frame)
            elif name == "else":
                if not chain_done:
                    self._block(node.block or [], frame)
                chain_done = True
            else:
                self._command(node, frame)

    def _x(self, text: str, frame: _Frame) -> str:
        return expand(text, frame.scope, self.matches) if frame.variables else text

    def _xs(self, items: list[str], frame: _Frame) -> list[str]:
        if not frame.variables or not any("${" in s for s in items):
            return items
        return [expand(s, frame.scope, self.matches) for s in items]

    # -- commands ----------------------------------------------------------------------------

    def _command(self, node: Node, frame: _Frame) -> None:
        name = node.name
        if name == "stop":
            raise _Stop()
        if name == "keep":
            self.actions.keep(self._flags(node, frame))
        elif name == "discard":
            self.actions.discard()
        elif name == "fileinto":
            mailbox = self._x(node.args[0], frame)
            if not mailbox:
                raise SieveRuntimeError("fileinto with an empty mailbox name")
            self.actions.fileinto(
                mailbox, self._flags(node, frame), "create" in node.tags, "copy" in node.tags
            )
        elif name == "redirect":
            address = self._x(node.args[0], frame)
            _, addr = parseaddr(address)
            local, at, domain = addr.rpartition("@")
            if not (at and local and domain):
                raise SieveRuntimeError(f"redirect to {address!r}: not an address")
            self.actions.redirect(addr, "copy" in node.tags)
        elif name in ("reject", "ereject"):
            self.actions.add_reject(self._x(node.args[0], frame), name == "ereject")
        elif name == "vacation":
            self.actions.add_vacation(self._vacation(node, frame))
        elif name in ("setflag", "addflag", "removeflag"):
            self._flag_command(node, frame)
        elif name == "set":
            modifiers = {group: tag for group, (tag, _v) in node.tags.items()}
            value = apply_modifiers(self._x(node.args[1], frame), modifiers)
            frame.scope.set(node.args[0], value)
        elif name == "include":
            self._include(node, frame)
        elif name == "return":
            raise _Return()
        elif name == "global":
            frame.scope.global_names.update(n.lower() for n in node.args[0])
        else:  # the validator admits nothing else
            raise SieveRuntimeError(f"command {name!r} cannot run here")

    def _flags(self, node: Node, frame: _Frame) -> frozenset[str]:
        """RFC 5232 5: ``:flags`` replaces the internal variable for this action only."""
        if "flags" in node.tags:
            return storable_flags(self._xs(node.value("flags"), frame))
        return storable_flags(frame.scope.get(INTERNAL_FLAGS))

    def _flag_command(self, node: Node, frame: _Frame) -> None:
        target = node.args[0] if len(node.args) == 2 else INTERNAL_FLAGS
        given = flag_list(self._xs(node.args[-1], frame))
        current = flag_list([frame.scope.get(target)])
        if node.name == "setflag":
            new = given
        elif node.name == "addflag":
            new = flag_list([" ".join(current + given)])
        else:
            drop = {f.lower() for f in given}
            new = [f for f in current if f.lower() not in drop]
        frame.scope.set(target, " ".join(new))

    def _vacation(self, node: Node, frame: _Frame) -> VacationRequest:
        limits = self.limits
        period = node.tags.get("period")
        if period is None:
            seconds = limits.vacation_default_period
        else:
            seconds = period[1] * DAY if period[0] == "days" else period[1]
        seconds = max(limits.vacation_min_period, min(seconds, limits.vacation_max_period))
        reason = self._x(node.args[0], frame)
        subject = node.value("subject")
        from_addr = node.value("from")
        subject = self._x(subject, frame) if subject is not None else None
        from_addr = self._x(from_addr, frame) if from_addr is not None else None
        handle = node.value("handle")
        if handle is not None:
            handle = self._x(handle, frame)
        else:
            # RFC 5230 4.2: without :handle, the same reason/subject/from/mime is one handle
            basis = "\0".join([reason, subject or "", from_addr or "", str("mime" in node.tags)])
            handle = "auto:" + hashlib.sha256(basis.encode("utf-8", "replace")).hexdigest()[:32]
        return VacationRequest(
            reason=reason,
            seconds=seconds,
            subject=subject,
            from_addr=from_addr,
            addresses=tuple(self._xs(node.value("addresses", []), frame)),
            mime="mime" in node.tags,
            handle=handle,
        )

    def _include(self, node: Node, frame: _Frame) -> None:
        location = node.tag("location", "personal") or "personal"
        name = node.args[0]
        key = (location, name)
        if "once" in node.tags and key in self.included:
            return
        if key in self.stack:
            raise SieveRuntimeError(f"include loop through {name!r}")
        if len(self.stack) >= self.limits.max_include_depth:
            raise SieveRuntimeError("includes nest too deeply")
        self.include_count += 1
        if self.include_count > self.limits.max_includes:
            raise SieveRuntimeError("too many includes")
        if self.load_script is None:
            raise SieveRuntimeError("include is not available here")
        try:
            script = self.load_script(location, name)
        except LookupError:
            if "optional" in node.tags:
                return
            raise SieveRuntimeError(
                f"included script {name!r} ({location}) does not exist"
            ) from None
        except Exception as e:  # a broken included script is this run's error
            raise SieveRuntimeError(f"included script {name!r}: {e}") from None
        self.included.add(key)
        self.stack.append(key)
        try:
            self._script(script)
        finally:
            self.stack.pop()

    # -- tests -------------------------------------------------------------------------------

    def _test(self, node: Node, frame: _Frame) -> bool:
        if self.fast:
            fn = node.fast.get(frame.variables, _UNSET)
            if fn is _UNSET:
                fn = node.fast[frame.variables] = compile_test(node, frame.variables)
            if fn is not None:
                return bool(fn(self))  # (it charges the budget itself)
        self.budget.charge()
        name = node.name
        if name == "true":
            return True
        if name == "false":
            return False
        if name == "not":
            return not self._test(node.tests[0], frame)
        if name == "allof":
            return all(self._test(t, frame) for t in node.tests)
        if name == "anyof":
            return any(self._test(t, frame) for t in node.tests)
        if name == "size":
            which, limit = node.tags["size"]
            size = self.message.size
            return bool(size > limit if which == "over" else size < limit)
        if name == "exists":
            return all(self.message.exists(h) for h in self._xs(node.args[0], frame))
        if name == "mailboxexists":
            return all(self.mailbox_exists(m) for m in self._xs(node.args[0], frame))
        values, keys = self._values(node, frame)
        return self._match(node, values, keys, frame)

    def _match(self, node: Node, values: list[str], keys: list[str], frame: _Frame) -> bool:
        match, relation = node.tags.get("match", ("is", None))
        comparator = node.value("comparator", "i;ascii-casemap")
        ok, caps = match_any(values, keys, match, comparator, relation, self.budget)
        if ok and caps is not None and frame.variables:
            self.matches = caps  # RFC 5229 3.2: set by the last successful :matches
        return ok

    def _indexed(self, node: Node, items: list[str]) -> list[str]:
        """RFC 5260 6: ``:index N [:last]`` keeps only the Nth field (counted from the end
        with ``:last``)."""
        if "index" not in node.tags:
            return items
        n = node.value("index")
        if n > len(items):
            return []
        return [items[-n] if "last" in node.tags else items[n - 1]]

    def _values(self, node: Node, frame: _Frame) -> tuple[list[str], list[str]]:
        name = node.name
        keys = self._xs(node.args[-1], frame)
        msg = self.message
        if name == "header":
            values = []
            for h in self._xs(node.args[0], frame):
                values += self._indexed(node, msg.header(h))
            return values, keys
        if name == "address":
            part = node.tag("addrpart", "all") or "all"
            values = []
            for h in self._xs(node.args[0], frame):
                for addr in msg.addresses(self._indexed(node, msg.raw(h))):
                    value = address_part(addr, part)
                    if value is not None:
                        values.append(value)
            return values, keys
        if name == "envelope":
            part = node.tag("addrpart", "all") or "all"
            values = []
            for which in self._xs(node.args[0], frame):
                which = which.lower()
                if which == "from":
                    addr = self.envelope.sender
                elif which == "to":
                    addr = self.envelope.recipient
                else:
                    continue
                if not addr:
                    values.append("")  # RFC 5228 5.4: the null reverse-path is ""
                    continue
                value = address_part(addr, part)
                if value is not None:
                    values.append(value)
            return values, keys
        if name == "body":
            transform = node.tag("transform", "text")
            types = (
                None
                if transform == "raw"
                else (
                    self._xs(node.value("transform"), frame) if transform == "content" else ["text"]
                )
            )
            return msg.body_texts(types), keys
        if name == "hasflag":
            if len(node.args) == 2:
                source = [frame.scope.get(v) for v in node.args[0]]
            else:
                source = [frame.scope.get(INTERNAL_FLAGS)]
            flags = flag_list(source)
            if node.tag("match") != "count":
                keys = flag_list(keys) if node.tag("match", "is") == "is" else keys
            return flags, keys
        if name == "string":
            values = self._xs(node.args[0], frame)
            if node.tag("match") == "count":
                values = [v for v in values if v]  # RFC 5229 5: empty strings do not count
            return values, keys
        if name == "date":
            header = self._x(node.args[0], frame)
            dts = [header_datetime(v) for v in self._indexed(node, msg.header(header))]
            return [self._part(node, dt, frame) for dt in dts if dt], keys
        if name == "currentdate":
            return [self._part(node, self.now, frame)], keys
        raise SieveRuntimeError(f"test {name!r} cannot run here")

    def _part(self, node: Node, dt: datetime, frame: _Frame) -> str:
        zone = node.tags.get("zone")
        if zone is None:
            dt = dt.astimezone(self.local_zone) if self.local_zone else dt.astimezone()
        elif zone[0] == "zone":
            try:
                dt = dt.astimezone(parse_zone(self._x(zone[1], frame)))
            except ValueError as e:
                raise SieveRuntimeError(str(e)) from None
        # :originalzone keeps the header's own zone (RFC 5260 4.3)
        return date_part(dt, node.args[-2])
