"""The architecture's rules about who imports whom (README, "Architecture"), checked on the
source so they stay true:

* no import cycles between mailsuite modules (imports inside functions count too: they only
  hide a cycle from import time, not from the design);
* ``store/`` imports no protocol (smtp, imap, pop3, managesieve), queue, outbound or delivery
  code: the store is what they all build on;
* IMAP and POP3 never import each other (they share the store, not each other's code);
* ``config.py`` imports nothing of mailsuite (everything reads it; it reads nothing);
* the protocol cores (``smtp/session.py``, ``imap/session.py``, ``pop3/session.py``,
  ``managesieve/session.py``) import nothing from Twisted, directly or through the mailsuite
  modules they import: a core without I/O is one that can be driven by a test or another
  adapter without a reactor.  Every module of the IMAP and POP3 cores is named
  (``CORE_MODULES``: the state machine's parts, the parser, search, FETCH responses, the
  interface to the adapter), so one that the session stops importing stays checked;
* no module over 800 lines.

Every module under ``mailsuite/`` is parsed with ``ast`` (never imported), and every
``import`` statement anywhere in it counts, whether at module level, in a function or under
``if TYPE_CHECKING``.

``KNOWN_VIOLATIONS`` lists what does not hold yet, each with who removes it; a violation not in
it fails the test, and so does an entry that no longer is a violation (the list only
shrinks: remove the entry with the change that fixes it).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from functools import cache
from itertools import pairwise
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[2] / "mailsuite"
MAX_LINES = 800
PROTOCOLS = ("smtp", "imap", "pop3", "managesieve")
CORES = tuple(f"mailsuite.{p}.session" for p in PROTOCOLS)
#: every module of the protocol cores in the real tree (the adapters are imap/server.py and
#: pop3/server.py; pop3/maildrop.py is the store side the adapter opens)
CORE_MODULES = (
    *CORES,
    *(
        f"mailsuite.imap.{m}"
        for m in (
            "session_base",
            "mailbox_commands",
            "message_commands",
            "interface",
            "parser",
            "search",
            "fetch_response",
            "fetch_source",
            "message",
            "sequence",
            "address",
        )
    ),
    "mailsuite.pop3.policy",
    "mailsuite.pacing",
)
NOT_FOR_THE_STORE = (*PROTOCOLS, "queue", "outbound", "delivery")

KNOWN_VIOLATIONS: set[str] = set()


# -- the import graph ------------------------------------------------------------------------


@dataclass
class Graph:
    """Modules (dotted name -> file) and, for each, the mailsuite modules and the other
    top-level packages it imports (with the line of the first such import)."""

    root: Path
    files: dict[str, Path]
    imports: dict[str, dict[str, int]] = field(default_factory=dict)  # mailsuite modules
    external: dict[str, dict[str, int]] = field(default_factory=dict)  # top-level packages


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Dotted names an import statement reaches: ``from a import b`` gives ``a.b`` (a module
    or a name in ``a``; the caller keeps whichever is a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: from the module's own package, one level up per extra dot
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = package[: len(package) - (node.level - 1)]
        prefix = ".".join([*base, *([node.module] if node.module else [])])
    else:
        prefix = node.module or ""
    return [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]


def build_graph(root: Path) -> Graph:
    """The import graph of the package in ``root`` (a folder with ``__init__.py``)."""
    graph = Graph(root, {module_name(root, p): p for p in sorted(root.rglob("*.py"))})
    top = root.name
    for module, path in graph.files.items():
        internal: dict[str, int] = {}
        external: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            names = imported_names(module, path, node)
            if isinstance(node, ast.ImportFrom):
                # "from pkg import mod" reaches pkg.mod; "from mod import name" reaches mod
                names = [n for n in names[:-1] if n in graph.files] or names[-1:]
            for name in names:
                if name == top or name.startswith(top + "."):
                    while name not in graph.files and "." in name:
                        name = name.rsplit(".", 1)[0]
                    if name != module:
                        internal.setdefault(name, node.lineno)
                elif name:
                    external.setdefault(name.split(".")[0], node.lineno)
        graph.imports[module] = internal
        graph.external[module] = external
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """Every import cycle: one per strongly connected component of more than one module,
    as a closed path through it (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in graph.imports:
        if start in index:
            continue
        work = [(start, iter(sorted(graph.imports[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.imports[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return [closed_path(graph, component) for component in sorted(components)]


def closed_path(graph: Graph, component: list[str]) -> list[str]:
    """A path from the component's first module back to itself through the component."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph.imports[node]):
            if child == start:
                return [*paths[node], start]
            if child in members and child not in paths:
                paths[child] = [*paths[node], child]
                queue.append(child)
    raise AssertionError(f"no cycle through {component}")  # pragma: no cover


def reaches(graph: Graph, module: str, package: str) -> list[str] | None:
    """An import chain from ``module`` to one that imports ``package`` itself (``module``
    alone when it does so directly), or None."""
    paths = {module: [module]}
    queue = [module]
    while queue:
        node = queue.pop(0)
        if package in graph.external[node]:
            return paths[node]
        for child in sorted(graph.imports[node]):
            if child not in paths:
                paths[child] = [*paths[node], child]
                queue.append(child)
    return None


# -- the rules -------------------------------------------------------------------------------


def shown(graph: Graph, module: str) -> Path:
    """The module's file as a path from the package's parent (``mailsuite/...``)."""
    return graph.files[module].relative_to(graph.root.parent)


def where(graph: Graph, module: str, target: str) -> str:
    return f"{shown(graph, module)}:{graph.imports[module][target]}"


CONFIG_MODULES = ("mailsuite.config", "mailsuite.config_model")


def violations(graph: Graph, cores: tuple[str, ...] = CORES) -> dict[str, str]:
    """Every broken rule: a stable key (what KNOWN_VIOLATIONS holds) -> the detail."""
    found: dict[str, str] = {}
    for path in cycles(graph):
        steps = ", ".join(where(graph, a, b) for a, b in pairwise(path))
        found["cycle: " + " -> ".join(path)] = f"imports at {steps}"
    for module, targets in graph.imports.items():
        area = module.split(".")[1] if "." in module else ""
        for target in targets:
            target_area = target.split(".")[1] if "." in target else ""
            if area == "store" and target_area in NOT_FOR_THE_STORE:
                found[f"store imports {target}: {module}"] = where(graph, module, target)
            if {area, target_area} == {"imap", "pop3"}:
                found[f"imap/pop3 import each other: {module} -> {target}"] = where(
                    graph, module, target
                )
            # the configuration (reading and model) is the bottom layer: it imports nothing
            # of mailsuite but its own model
            if module in CONFIG_MODULES and target not in CONFIG_MODULES:
                found[f"config imports {target}"] = where(graph, module, target)
    for core in cores:
        if core not in graph.files:
            found[f"missing protocol core: {core}"] = (
                "the rule cannot hold for a module that is not there"
            )
            continue
        chain = reaches(graph, core, "twisted")
        if chain is not None:
            line = graph.external[chain[-1]]["twisted"]
            found[f"Twisted in a protocol core: {core}"] = (
                " -> ".join(chain) + f", which imports twisted at {shown(graph, chain[-1])}:{line}"
            )
    for module, path in graph.files.items():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES:
            found[f"over {MAX_LINES} lines: {shown(graph, module)}"] = f"{lines} lines"
    return found


@cache
def mailsuite_violations() -> dict[str, str]:
    return violations(build_graph(SOURCE), CORE_MODULES)


def check(prefix: str) -> None:
    """Fail on every violation whose key starts with ``prefix`` that is not known."""
    new = {
        k: v
        for k, v in mailsuite_violations().items()
        if k.startswith(prefix) and k not in KNOWN_VIOLATIONS
    }
    assert not new, "\n".join(f"{k}  ({v})" for k, v in sorted(new.items()))


def test_no_import_cycles() -> None:
    check("cycle: ")


def test_the_store_imports_no_protocol_queue_outbound_or_delivery_code() -> None:
    check("store imports ")


def test_imap_and_pop3_never_import_each_other() -> None:
    check("imap/pop3 import each other")


def test_config_imports_nothing_of_mailsuite() -> None:
    check("config imports ")


def test_protocol_cores_import_nothing_from_twisted() -> None:
    check("missing protocol core: ")
    check("Twisted in a protocol core: ")


def test_no_module_over_800_lines() -> None:
    check(f"over {MAX_LINES} lines: ")


def test_known_violations_are_still_violations() -> None:
    """An entry that no longer is a violation goes: the list only shrinks."""
    fixed = KNOWN_VIOLATIONS - set(mailsuite_violations())
    assert not fixed, f"no longer violated, remove from KNOWN_VIOLATIONS: {sorted(fixed)}"


# -- the checker itself, on packages made for the purpose ------------------------------------


def package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "mailsuite"
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.parent != root and not (path.parent / "__init__.py").exists():
            (path.parent / "__init__.py").write_text("")
        path.write_text(text)
    return root


def test_a_cycle_through_a_function_level_import_is_found(tmp_path: Path) -> None:
    root = package(
        tmp_path,
        {
            "a.py": "from mailsuite import b\n",
            "b.py": "def f():\n    from mailsuite.c import g\n    return g\n",
            "c.py": "import mailsuite.a\n\ndef g():\n    pass\n",
            "d.py": "from mailsuite.a import b\n",  # into the cycle, not part of it
        },
    )
    found = violations(build_graph(root))
    assert "cycle: mailsuite.a -> mailsuite.b -> mailsuite.c -> mailsuite.a" in found
    assert (
        "mailsuite/b.py:2"
        in found["cycle: mailsuite.a -> mailsuite.b -> mailsuite.c -> mailsuite.a"]
    )
    assert len([k for k in found if k.startswith("cycle")]) == 1


def test_relative_imports_and_each_rule_are_seen(tmp_path: Path) -> None:
    root = package(
        tmp_path,
        {
            "config.py": "from .directory import x\n",
            "directory.py": "x = 1\n",
            "store/mailbox.py": "from ..imap import utf7\nfrom . import maildir\n",
            "store/maildir.py": "",
            "imap/utf7.py": "",
            "imap/session.py": "from mailsuite.store import helper\n",
            "store/helper.py": "if False:\n    from twisted.internet import reactor\n",
            "pop3/session.py": "from mailsuite.imap.utf7 import *\n",
            "smtp/session.py": "x = 1\n" * (MAX_LINES + 1),
            "managesieve/session.py": "import email\n",
        },
    )
    found = violations(build_graph(root))
    assert set(found) == {
        "config imports mailsuite.directory",
        "store imports mailsuite.imap.utf7: mailsuite.store.mailbox",
        "imap/pop3 import each other: mailsuite.pop3.session -> mailsuite.imap.utf7",
        "Twisted in a protocol core: mailsuite.imap.session",
        "over 800 lines: mailsuite/smtp/session.py",
    }, found
    assert found["Twisted in a protocol core: mailsuite.imap.session"].startswith(
        "mailsuite.imap.session -> mailsuite.store.helper, which imports twisted at "
        "mailsuite/store/helper.py:2"
    )


@pytest.mark.parametrize("core", CORES)
def test_a_missing_core_is_a_violation_not_a_pass(tmp_path: Path, core: str) -> None:
    files = {c.replace("mailsuite.", "").replace(".", "/") + ".py": "" for c in CORES if c != core}
    assert set(violations(build_graph(package(tmp_path, files)))) == {
        f"missing protocol core: {core}"
    }
