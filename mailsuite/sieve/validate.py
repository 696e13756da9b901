"""What Sieve commands mean syntactically: arguments, tags, extensions, placement.

:func:`compile_script` turns script text into a :class:`Script` of :class:`Node` s the
interpreter runs, or raises :class:`~.grammar.SieveParseError` with a line and a reason.
Everything that can be known before a message arrives is checked here, so a script a
client uploads either works or is refused at PUTSCRIPT (RFC 5804 2.6) with a reason:

* ``require`` comes first and names only extensions we implement (RFC 5228 3.2);
* every command and test exists, its extension was required, its tags are known, not
  repeated or combined with their alternatives, and its positional arguments have the
  right kinds (RFC 5228 2.7);
* ``elsif``/``else`` follow an ``if`` (RFC 5228 3.1), control commands take blocks and
  actions do not;
* comparators are known and support the match type (RFC 4790 9.1: ``i;ascii-numeric``
  has no substring match), relational operators are known (RFC 5231 4);
* constant arguments are well-formed: header names, address test headers (RFC 5228 5.1),
  envelope parts (5.4), redirect addresses (4.2), variable names (RFC 5229 3), date parts
  and zones (RFC 5260 4), include script names (RFC 6609 3.2).

``encoded-character`` (RFC 5228 2.4.2.4) is applied here, once, when it was required.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from mailsuite.sieve.grammar import Command, SieveParseError, Tag, Test, parse

#: Extensions a script may require (the ManageSieve SIEVE capability lists them).
EXTENSIONS = (
    "fileinto",
    "envelope",
    "encoded-character",
    "imap4flags",
    "copy",
    "body",
    "variables",
    "relational",
    "comparator-i;ascii-numeric",
    "comparator-i;octet",
    "comparator-i;ascii-casemap",
    "subaddress",
    "mailbox",
    "date",
    "index",
    "reject",
    "ereject",
    "vacation",
    "vacation-seconds",
    "include",
)
COMPARATORS = {
    "i;octet": None,
    "i;ascii-casemap": None,
    "i;ascii-numeric": "comparator-i;ascii-numeric",
}
RELATIONS = frozenset({"gt", "ge", "lt", "le", "eq", "ne"})
DATE_PARTS = frozenset(
    {
        "year",
        "month",
        "day",
        "date",
        "julian",
        "hour",
        "minute",
        "second",
        "time",
        "iso8601",
        "std11",
        "zone",
        "weekday",
    }
)
#: RFC 5228 5.1: the address test works on headers that hold addresses.
ADDRESS_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "sender",
        "reply-to",
        "resent-from",
        "resent-to",
        "resent-cc",
        "resent-bcc",
        "resent-sender",
        "resent-reply-to",
        "return-path",
        "delivered-to",
        "errors-to",
        "disposition-notification-to",
        "x-original-to",
        "envelope-to",
        "x-envelope-to",
        "x-delivered-to",
        "original-recipient",
        "mail-followup-to",
        "mail-reply-to",
        "approved",
    }
)
ENVELOPE_PARTS = frozenset({"from", "to"})

_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")  # RFC 5322 3.6.8 ftext
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ZONE = re.compile(r"[+-](?:[01][0-9]|2[0-3])[0-5][0-9]")
_ENCODED = re.compile(r"\$\{(hex|unicode):([^}]*)\}", re.IGNORECASE)


@dataclass(frozen=True)
class TagSpec:
    group: str  # tags of one group exclude each other; the node stores tags[group]
    takes: str | None = None  # None, "string", "strings" or "number"
    ext: str | None = None


@dataclass(frozen=True)
class Spec:
    kind: str  # "command", "control" or "test"
    positional: tuple[tuple[str, ...], ...] = ((),)  # accepted signatures
    tags: dict[str, TagSpec] = field(default_factory=dict)
    ext: str | tuple[str, ...] | None = None
    tests: str = "none"  # "none", "one", "list"
    required_groups: tuple[str, ...] = ()


_COMPARATOR = {"comparator": TagSpec("comparator", "string")}
_MATCH = {
    "is": TagSpec("match"),
    "contains": TagSpec("match"),
    "matches": TagSpec("match"),
    "count": TagSpec("match", "string", "relational"),
    "value": TagSpec("match", "string", "relational"),
}
_ADDRPART = {
    "all": TagSpec("addrpart"),
    "localpart": TagSpec("addrpart"),
    "domain": TagSpec("addrpart"),
    "user": TagSpec("addrpart", None, "subaddress"),
    "detail": TagSpec("addrpart", None, "subaddress"),
}
_INDEX = {"index": TagSpec("index", "number", "index"), "last": TagSpec("last", None, "index")}
_CM = {**_COMPARATOR, **_MATCH}
_FLAGS = {"flags": TagSpec("flags", "strings", "imap4flags")}

SPECS: dict[str, Spec] = {
    # control (RFC 5228 3)
    "require": Spec("control", (("strings",),)),
    "if": Spec("control", tests="one"),
    "elsif": Spec("control", tests="one"),
    "else": Spec("control"),
    "stop": Spec("command"),
    # actions (RFC 5228 4 and extensions)
    "keep": Spec("command", tags=_FLAGS),
    "discard": Spec("command"),
    "fileinto": Spec(
        "command",
        (("string",),),
        {
            "copy": TagSpec("copy", None, "copy"),
            **_FLAGS,
            "create": TagSpec("create", None, "mailbox"),
        },
        "fileinto",
    ),
    "redirect": Spec("command", (("string",),), {"copy": TagSpec("copy", None, "copy")}),
    "reject": Spec("command", (("string",),), ext="reject"),
    "ereject": Spec("command", (("string",),), ext="ereject"),
    "vacation": Spec(
        "command",
        (("string",),),
        {
            "days": TagSpec("period", "number"),
            "seconds": TagSpec("period", "number", "vacation-seconds"),
            "subject": TagSpec("subject", "string"),
            "from": TagSpec("from", "string"),
            "addresses": TagSpec("addresses", "strings"),
            "mime": TagSpec("mime"),
            "handle": TagSpec("handle", "string"),
        },
        "vacation",
    ),
    "setflag": Spec("command", (("strings",), ("string", "strings")), ext="imap4flags"),
    "addflag": Spec("command", (("strings",), ("string", "strings")), ext="imap4flags"),
    "removeflag": Spec("command", (("strings",), ("string", "strings")), ext="imap4flags"),
    "set": Spec(
        "command",
        (("string", "string"),),
        {
            "lower": TagSpec("case"),
            "upper": TagSpec("case"),
            "lowerfirst": TagSpec("first"),
            "upperfirst": TagSpec("first"),
            "quotewildcard": TagSpec("quote"),
            "length": TagSpec("length"),
        },
        "variables",
    ),
    "include": Spec(
        "command",
        (("string",),),
        {
            "personal": TagSpec("location"),
            "global": TagSpec("location"),
            "once": TagSpec("once"),
            "optional": TagSpec("optional"),
        },
        "include",
    ),
    "return": Spec("command", ext="include"),
    "global": Spec("command", (("strings",),), ext=("include", "variables")),
    # tests (RFC 5228 5 and extensions)
    "address": Spec("test", (("strings", "strings"),), {**_ADDRPART, **_CM, **_INDEX}),
    "envelope": Spec("test", (("strings", "strings"),), {**_ADDRPART, **_CM}, "envelope"),
    "header": Spec("test", (("strings", "strings"),), {**_CM, **_INDEX}),
    "exists": Spec("test", (("strings",),)),
    "size": Spec(
        "test",
        tags={"over": TagSpec("size", "number"), "under": TagSpec("size", "number")},
        required_groups=("size",),
    ),
    "allof": Spec("test", tests="list"),
    "anyof": Spec("test", tests="list"),
    "not": Spec("test", tests="one"),
    "true": Spec("test"),
    "false": Spec("test"),
    "body": Spec(
        "test",
        (("strings",),),
        {
            **_CM,
            "raw": TagSpec("transform"),
            "text": TagSpec("transform"),
            "content": TagSpec("transform", "strings"),
        },
        "body",
    ),
    "hasflag": Spec("test", (("strings",), ("strings", "strings")), _CM, "imap4flags"),
    "string": Spec("test", (("strings", "strings"),), _CM, "variables"),
    "date": Spec(
        "test",
        (("string", "string", "strings"),),
        {"zone": TagSpec("zone", "string"), "originalzone": TagSpec("zone"), **_CM, **_INDEX},
        "date",
    ),
    "currentdate": Spec(
        "test", (("string", "strings"),), {"zone": TagSpec("zone", "string"), **_CM}, "date"
    ),
    "mailboxexists": Spec("test", (("strings",),), ext="mailbox"),
}

#: Commands that count as actions for the ``max_actions`` limit.
ACTIONS = frozenset({"keep", "discard", "fileinto", "redirect", "reject", "ereject", "vacation"})


@dataclass
class Node:
    """One checked command or test: ``tags`` maps a tag group to (tag name, value)."""

    name: str
    tags: dict[str, tuple[str, Any]]
    args: list[Any]
    tests: list[Node]
    block: list[Node] | None
    line: int
    #: precompiled forms (see :mod:`.fastpath`), by "script uses variables"; filled lazily
    fast: dict[bool, Any] = field(default_factory=dict, compare=False, repr=False)
    #: the run of grouped rules this node is in (see :mod:`.plan`), by "uses variables"
    run: dict[bool, Any] = field(default_factory=dict, compare=False, repr=False)

    def tag(self, group: str, default: str | None = None) -> str | None:
        entry = self.tags.get(group)
        return entry[0] if entry else default

    def value(self, group: str, default: Any = None) -> Any:
        entry = self.tags.get(group)
        return entry[1] if entry else default


@dataclass
class Script:
    nodes: list[Node]
    requires: frozenset[str]
    #: the "uses variables" values :func:`mailsuite.sieve.plan.prepare` has prepared it for
    prepared: set[bool] = field(default_factory=set, compare=False, repr=False)


def compile_script(text: str, max_size: int | None = None) -> Script:
    """Parse and check a script; raises :class:`SieveParseError` with line and reason."""
    if max_size is not None and len(text.encode("utf-8", "surrogatepass")) > max_size:
        raise SieveParseError(1, f"script is larger than the limit of {max_size} bytes")
    tree = parse(text)
    return _Checker().run(tree)


def valid_script_name(name: str) -> bool:
    """RFC 5804 1.6 (no controls, no line/paragraph separators) plus what a file name
    needs: no ``/``, no leading dot, at most 128 characters."""
    if not name or len(name) > 128 or name.startswith(".") or "/" in name or "\\" in name:
        return False
    return not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029" for c in name)


def decode_encoded(value: str) -> str:
    """RFC 5228 2.4.2.4: ``${hex:41 42}`` and ``${unicode:263a}``; malformed sequences are
    left as they are."""
    if "${" not in value:
        return value

    def repl(m: re.Match[str]) -> str:
        kind, body = m.group(1).lower(), m.group(2).strip(" \t\r\n")
        items = body.split() if body else []
        try:
            if kind == "hex":
                raw = bytes(int(h, 16) for h in items if _hex_ok(h, 2))
                if len(raw) != len(items):
                    return m.group(0)
                return raw.decode("utf-8")
            chars = []
            for h in items:
                if not _hex_ok(h, 6):
                    return m.group(0)
                cp = int(h, 16)
                if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
                    return m.group(0)
                chars.append(chr(cp))
            return "".join(chars)
        except (ValueError, UnicodeDecodeError):
            return m.group(0)

    return _ENCODED.sub(repl, value)


def _hex_ok(h: str, max_len: int) -> bool:
    return 0 < len(h.lstrip("0") or "0") <= max_len and all(
        c in "0123456789abcdefABCDEF" for c in h
    )


class _Checker:
    def __init__(self) -> None:
        self.requires: set[str] = set()
        self.encoded = False

    def run(self, tree: tuple[Command, ...]) -> Script:
        nodes = self.block(tree, top=True)
        return Script(nodes, frozenset(self.requires))

    def block(self, commands: tuple[Command, ...], top: bool = False) -> list[Node]:
        out: list[Node] = []
        seen_other = not top
        previous: str | None = None
        for cmd in commands:
            if cmd.name == "require":
                if seen_other:
                    raise SieveParseError(cmd.line, "require must come before any other command")
                self.require(cmd)
                previous = "require"
                continue
            seen_other = True
            if cmd.name in ("elsif", "else") and previous not in ("if", "elsif"):
                raise SieveParseError(cmd.line, f"{cmd.name} without a preceding if")
            out.append(self.command(cmd))
            previous = cmd.name
        return out

    def require(self, cmd: Command) -> None:
        if cmd.block is not None or cmd.tests is not None or len(cmd.args) != 1:
            raise SieveParseError(cmd.line, "require takes one string or string list")
        arg = cmd.args[0]
        names = (arg,) if isinstance(arg, str) else arg
        if not isinstance(names, tuple):
            raise SieveParseError(cmd.line, "require takes one string or string list")
        for name in names:
            if name not in EXTENSIONS:
                raise SieveParseError(cmd.line, f"unsupported extension {name!r}")
            self.requires.add(name)
            if name == "encoded-character":
                self.encoded = True

    def _needs(self, line: int, what: str, ext: str | tuple[str, ...] | None) -> None:
        for e in (ext,) if isinstance(ext, str) else ext or ():
            if e not in self.requires:
                raise SieveParseError(line, f'{what} needs require "{e}"')

    def command(self, cmd: Command) -> Node:
        spec = SPECS.get(cmd.name)
        if spec is None or spec.kind == "test":
            raise SieveParseError(cmd.line, f"unknown command {cmd.name!r}")
        self._needs(cmd.line, f"command {cmd.name!r}", spec.ext)
        node = self.arguments(cmd.name, spec, cmd.args, cmd.tests, cmd.line)
        if spec.kind == "control" and cmd.name not in ("stop",):
            if cmd.block is None:
                raise SieveParseError(cmd.line, f"{cmd.name} needs a block {{ ... }}")
            node.block = self.block(cmd.block)
        elif cmd.block is not None:
            raise SieveParseError(cmd.line, f"{cmd.name} takes no block; end it with ';'")
        self.check_command(node)
        return node

    def test(self, test: Test) -> Node:
        spec = SPECS.get(test.name)
        if spec is None or spec.kind != "test":
            raise SieveParseError(test.line, f"unknown test {test.name!r}")
        self._needs(test.line, f"test {test.name!r}", spec.ext)
        node = self.arguments(test.name, spec, test.args, test.tests, test.line)
        self.check_test(node)
        return node

    def arguments(
        self,
        name: str,
        spec: Spec,
        args: tuple[Any, ...],
        tests: Test | tuple[Test, ...] | None,
        line: int,
    ) -> Node:
        tags: dict[str, tuple[str, Any]] = {}
        positional: list[Any] = []
        i = 0
        while i < len(args):
            arg = args[i]
            i += 1
            if not isinstance(arg, Tag):
                positional.append(self._decode(arg))
                continue
            if positional:
                raise SieveParseError(
                    line, f"tag :{arg.name} must come before the other arguments of {name}"
                )
            ts = spec.tags.get(arg.name)
            if ts is None:
                raise SieveParseError(line, f"{name} has no tag :{arg.name}")
            self._needs(line, f":{arg.name}", ts.ext)
            if ts.group in tags:
                other = tags[ts.group][0]
                what = "twice" if other == arg.name else f"together with :{other}"
                raise SieveParseError(line, f":{arg.name} used {what} in {name}")
            value: Any = None
            if ts.takes is not None:
                if i >= len(args):
                    raise SieveParseError(line, f":{arg.name} needs {_kind(ts.takes)}")
                value = args[i]
                i += 1
                if not _fits(value, ts.takes):
                    raise SieveParseError(line, f":{arg.name} needs {_kind(ts.takes)}")
                value = self._decode(value)
                if ts.takes == "strings" and isinstance(value, str):
                    value = [value]
            tags[ts.group] = (arg.name, value)
        for group in spec.required_groups:
            if group not in tags:
                options = " or ".join(f":{t}" for t, s in spec.tags.items() if s.group == group)
                raise SieveParseError(line, f"{name} needs {options}")
        for signature in spec.positional:
            if len(signature) == len(positional) and all(
                _fits(v, k) for v, k in zip(positional, signature, strict=True)
            ):
                positional = [
                    [v]
                    if k == "strings" and isinstance(v, str)
                    else list(v)
                    if isinstance(v, tuple)
                    else v
                    for v, k in zip(positional, signature, strict=True)
                ]
                break
        else:
            wanted = " or ".join(
                ", ".join(_kind(k) for k in sig) or "no arguments" for sig in spec.positional
            )
            raise SieveParseError(line, f"{name} takes {wanted}")
        sub: list[Node] = []
        if spec.tests == "none" and tests is not None:
            raise SieveParseError(line, f"{name} takes no test")
        if spec.tests == "one":
            if not isinstance(tests, Test):
                raise SieveParseError(line, f"{name} needs one test")
            sub = [self.test(tests)]
        if spec.tests == "list":
            if not isinstance(tests, tuple):
                raise SieveParseError(line, f"{name} needs a test list ( ... )")
            sub = [self.test(t) for t in tests]
        return Node(name, tags, positional, sub, None, line)

    def _decode(self, value: Any) -> Any:
        if not self.encoded:
            return value
        if isinstance(value, str):
            return decode_encoded(value)
        if isinstance(value, tuple):
            return tuple(decode_encoded(v) for v in value)
        return value

    # -- per command checks of constant arguments -------------------------------------------

    def check_comparison(self, node: Node) -> None:
        comparator = node.value("comparator", "i;ascii-casemap")
        if comparator not in COMPARATORS:
            raise SieveParseError(node.line, f"unknown comparator {comparator!r}")
        self._needs(node.line, f"comparator {comparator!r}", COMPARATORS[comparator])
        match = node.tag("match", "is")
        if comparator == "i;ascii-numeric" and match in ("contains", "matches"):
            raise SieveParseError(node.line, f"comparator i;ascii-numeric cannot do :{match}")
        if match in ("count", "value"):
            relation = str(node.value("match")).lower()
            if relation not in RELATIONS:
                raise SieveParseError(
                    node.line,
                    f"unknown relation {relation!r} for :{match} (use gt, ge, lt, le, eq or ne)",
                )
            node.tags["match"] = (match, relation)
        if node.tag("last") and "index" not in node.tags:
            raise SieveParseError(node.line, ":last needs :index")
        if "index" in node.tags and node.value("index") < 1:
            raise SieveParseError(node.line, ":index counts from 1")

    def check_test(self, node: Node) -> None:
        if "comparator" in SPECS[node.name].tags:
            self.check_comparison(node)
        if node.name in ("header", "address", "exists", "date"):
            names = node.args[0] if node.name != "date" else [node.args[0]]
            for name in names:
                if "${" in name:
                    continue
                if not _FIELD_NAME.fullmatch(name):
                    raise SieveParseError(node.line, f"{name!r} is not a header field name")
                if node.name == "address" and name.lower() not in ADDRESS_HEADERS:
                    raise SieveParseError(
                        node.line,
                        f"address test on {name!r}, which holds no addresses (use header)",
                    )
        if node.name == "envelope":
            for part in node.args[0]:
                if "${" not in part and part.lower() not in ENVELOPE_PARTS:
                    raise SieveParseError(node.line, f"unknown envelope part {part!r}")
        if node.name in ("date", "currentdate"):
            part = node.args[-2]
            if part.lower() not in DATE_PARTS:
                raise SieveParseError(node.line, f"unknown date part {part!r}")
            node.args[-2] = part.lower()
            zone = node.value("zone")
            if zone is not None and "${" not in zone and not _ZONE.fullmatch(zone):
                raise SieveParseError(node.line, f":zone {zone!r} is not of the form +hhmm")
        if node.name in ("hasflag",) and len(node.args) == 2:
            self._variables(node, node.args[0])

    def check_command(self, node: Node) -> None:
        name = node.name
        if name == "redirect":
            address = node.args[0]
            if "${" not in address and not _plausible_address(address):
                raise SieveParseError(node.line, f"redirect to {address!r}: not an address")
        elif name == "fileinto" and not node.args[0]:
            raise SieveParseError(node.line, "fileinto needs a mailbox name")
        elif name == "set":
            self._variables(node, [node.args[0]])
        elif name in ("setflag", "addflag", "removeflag") and len(node.args) == 2:
            self._needs(node.line, f"{name} with a variable name", "variables")
            self._variables(node, [node.args[0]])
        elif name == "global":
            self._variables(node, node.args[0])
        elif name == "include":
            if not valid_script_name(node.args[0]):
                raise SieveParseError(node.line, f"include {node.args[0]!r}: not a script name")
        elif (
            name == "vacation"
            and "from" in node.tags
            and "${" not in node.value("from")
            and not _plausible_address(node.value("from"))
        ):
            raise SieveParseError(node.line, ":from is not an address")

    def _variables(self, node: Node, names: list[str]) -> None:
        for name in names:
            if not _VAR_NAME.fullmatch(name):
                raise SieveParseError(node.line, f"{name!r} is not a variable name")


def _plausible_address(text: str) -> bool:
    """An addr-spec, or a name-addr with one (RFC 5228 4.2 allows both forms)."""
    from email.utils import parseaddr

    _, addr = parseaddr(text)
    local, at, domain = addr.rpartition("@")
    if not (at and local and domain) or " " in addr:
        return False
    return "." in domain or domain == "localhost"


def _fits(value: Any, kind: str) -> bool:
    if kind == "number":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str)
    return isinstance(value, (str, tuple, list))


def _kind(kind: str) -> str:
    return {"number": "a number", "string": "a string", "strings": "a string list"}[kind]
