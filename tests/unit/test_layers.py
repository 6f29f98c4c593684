"""The package's import graph: layers without cycles, an engine without I/O.

The graph is read from the source (ast), with every import counted: those
at the top of a module, those inside functions (imported late on purpose)
and those under `if TYPE_CHECKING:`, which a type checker follows and a
reader must too. A cycle anywhere fails; so does the engine reaching, by
any path through the package, a module that does I/O. A second test
imports the engine in a fresh interpreter and looks at what was loaded,
third-party modules included.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "relaymilter"

# The pure core: facts in, decision out. It must load none of IO_MODULES.
ENGINE = "relaymilter.engine"
IO_MODULES = ("sqlite3", "socket", "socketserver", "http", "ssl", "selectors", "asyncio",
              "Milter", "milter", "psycopg", "redis", "prometheus_client", "dns.resolver",
              "relaymilter.milter", "relaymilter.policyd", "relaymilter.metrics",
              "relaymilter.sqlitestore", "relaymilter.pgstore", "relaymilter.pgnotify",
              "relaymilter.storewatch", "relaymilter.rediscounter", "relaymilter.dnsbl",
              "relaymilter.cli", "smtplib", "relaymilter.probe", "relaymilter.fleettops")


def module_name(path: pathlib.Path) -> str:
    return "relaymilter." + path.stem if path.stem != "__init__" else "relaymilter"


def imports_of(path: pathlib.Path) -> set[str]:
    """Every module path imports, anywhere in it, as dotted names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # "from relaymilter import milter" imports a module, not a name.
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if (PACKAGE / f"{alias.name}.py").exists()
                         and node.module == "relaymilter")
    return found


GRAPH = {module_name(path): imports_of(path) for path in sorted(PACKAGE.glob("*.py"))}
OURS = set(GRAPH)


def package_edges(module: str) -> set[str]:
    return {name for name in GRAPH[module] if name in OURS and name != "relaymilter"}


def find_cycle() -> list[str] | None:
    """A cycle of package modules, as a path that ends where it starts; None if none."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(package_edges(module)):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(OURS):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def reachable(start: str) -> dict[str, str]:
    """Every module start reaches through the package -> the package module importing it."""
    seen: dict[str, str] = {}
    todo = [start]
    while todo:
        module = todo.pop()
        for name in GRAPH[module]:
            if name not in seen:
                seen[name] = module
                if name in OURS:
                    todo.append(name)
    return seen


def is_io(name: str) -> bool:
    return any(name == io or name.startswith(io + ".") for io in IO_MODULES)


def test_the_graph_is_read_from_every_module():
    assert {ENGINE, "relaymilter.milter", "relaymilter.config"} <= OURS
    assert "relaymilter.decision" in package_edges(ENGINE)


def test_the_package_has_no_import_cycle():
    cycle = find_cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_cycle_would_be_found():
    GRAPH["relaymilter.text"].add(ENGINE)
    try:
        assert find_cycle() is not None
    finally:
        GRAPH["relaymilter.text"].discard(ENGINE)


def test_the_engine_reaches_no_io_module():
    found = {name: importer for name, importer in reachable(ENGINE).items() if is_io(name)}
    assert not found, ", ".join(f"{name} (imported by {importer})"
                                for name, importer in sorted(found.items()))


@pytest.mark.parametrize("front_end", ["relaymilter.milter", "relaymilter.policyd"])
def test_the_front_ends_import_the_engine_and_hold_no_policy_of_their_own(front_end):
    edges = package_edges(front_end)
    assert ENGINE in edges
    assert not edges & {"relaymilter.relay", "relaymilter.domainpolicy", "relaymilter.store",
                        "relaymilter.logline", "relaymilter.metrics", "relaymilter.recorder"}


def test_importing_the_engine_loads_no_io_module():
    code = ("import sys, relaymilter.engine, relaymilter.reason\n"
            "print('\\n'.join(sorted(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.split()
    assert ENGINE in loaded
    assert not [name for name in loaded if is_io(name)]
