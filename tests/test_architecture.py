"""docs/architecture.md stays true: every module named, no import circle, no huge module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
BROKER = ROOT / "broker"
#: "No module over ~700 lines" (the renovation's promise): a little room, not a rule to game.
MAX_LINES = 720


def modules() -> dict[str, Path]:
    found = {}
    for path in BROKER.rglob("*.py"):
        parts = ("broker", *path.relative_to(BROKER).with_suffix("").parts)
        found[".".join(parts).removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The broker modules ``name`` imports when it is imported (module level; an import
    inside a function or under TYPE_CHECKING is not a dependency at import time)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("broker"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("broker"))
    deps = set()
    for module in found:
        parts = module.split(".")
        for i in range(2, len(parts) + 1):  # importing a.b.c imports a.b first
            deps.add(".".join(parts[:i]))
    # A package's modules import each other through the package: not a circle of concerns.
    own_package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return {d for d in deps if d in known and d != name and d != own_package}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            component.append(v)
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_one_that_imports_it_back():
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert circles(graph) == []


def test_the_circle_finder_can_find_one():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_no_module_is_much_over_700_lines():
    long = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    assert {n: k for n, k in long.items() if k > MAX_LINES} == {}


def test_the_module_table_names_every_module_and_no_other():
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("## The modules", 1)[1].split("\n## ", 1)[0]
    named = set()
    for cell in re.findall(r"^\| ([^|]+) \|", table, re.M):
        for word in re.findall(r"`([^`]+)`", cell):
            named.add(word)
    files = set()
    for path in BROKER.rglob("*.py"):
        relative = path.relative_to(BROKER)
        files.add(str(relative))
    said = set()
    for word in named:
        word = word.removeprefix("broker/")
        if word.endswith("/"):  # a package: every module in it is named by its cell
            said.update(f for f in files if f.startswith(word))
        elif word.endswith(".py"):
            said.update(f for f in files if f == word or f.endswith("/" + word))
    assert files - said == set(), "modules docs/architecture.md does not name"
    packages = {w.removeprefix("broker/").rstrip("/") for w in named if w.endswith("/")}
    plain = {w.removeprefix("broker/") for w in named if w.endswith(".py")}
    missing = [w for w in plain if not any(f == w or f.endswith("/" + w) for f in files)]
    assert missing == [] and all((BROKER / p).is_dir() for p in packages)


def test_every_package_broker_imports_is_declared():
    """An import of a package only another dependency pulls in works until that one drops
    it: each third-party import (at any depth, even inside a function) is declared."""
    import sys
    import tomllib
    from importlib.metadata import packages_distributions

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = (re.match(r"[A-Za-z0-9._-]+", d) for d in project["dependencies"])
    declared = {m[0].lower().replace("_", "-") for m in names if m}
    owners = packages_distributions()
    imported: set[str] = set()
    for path in BROKER.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"broker"}
    undeclared = {
        name: owners.get(name)
        for name in third_party
        if not {d.lower().replace("_", "-") for d in owners.get(name, [name])} & declared
    }
    assert undeclared == {}


def test_no_pattern_ends_with_a_dollar_that_lets_a_newline_through():
    """Python's ``$`` also matches before a final newline: ``^[a-z]+$`` accepts "name\\n",
    which then splits a log line or a URL. A validating pattern ends in ``\\Z``."""
    found = []
    for path in BROKER.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and ast.unparse(node.func) == "re.compile"
                and isinstance(pattern := node.args[0], ast.Constant)
                and isinstance(pattern.value, str)
                and re.search(r"(?<!\\)\$$", pattern.value)
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []
