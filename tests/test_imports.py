"""The package's architecture, read from its source (ast; nothing is imported): no import cycle between modules,
the method imports nothing from the bridge, the files layer, the evaluation or the lab, and only the bridge
(``ece_plugin/easyedit.py``) imports easyeditor."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "ece_plugin"
PACKAGE = PACKAGE_DIR.name
BRIDGE = f"{PACKAGE}.easyedit"
METHOD = f"{PACKAGE}.method"
NOT_FROM_METHOD = (BRIDGE, f"{PACKAGE}.lab", f"{PACKAGE}.files", f"{PACKAGE}.evaluation", "easyeditor")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (inside the package: the deepest module that exists)
    line: int
    type_checking: bool  # under ``if TYPE_CHECKING:`` (never run)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _resolve(name: str) -> str:
    """The deepest module of the package ``name`` names (``pkg.mod.func`` -> ``pkg.mod``); outside: as given."""
    if not (name == PACKAGE or name.startswith(PACKAGE + ".")):
        return name
    parts = name.split(".")
    while parts and ".".join(parts) not in MODULES:
        parts.pop()
    return ".".join(parts)


def _absolute(source: str, is_package: bool, level: int, module: str | None) -> str:
    if not level:
        return module or ""
    base = source.split(".") if is_package else source.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(name: str) -> Iterator[Import]:
    """Every import in module ``name``: statements at any depth (function-level ones included) and the
    :data:`IMPORT_CALLS` with a literal module name."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    guarded = _type_checking_lines(tree)
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [_resolve(alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(name, is_package, node.level, node.module)
            # ``from pkg import sub``: the submodule when it is one, else the package itself
            targets = [_resolve(f"{base}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and _is_import_call(node):
            targets = [_resolve(node.args[0].value)]  # type: ignore[attr-defined]
        for target in targets:
            if target and target != name:
                yield Import(name, target, node.lineno, node.lineno in guarded)


#: Calls that import (or look up) the module their literal first argument names; ``import_easyedit`` is the
#: bridge's own, so a module calling it with an EasyEdit module's name reaches into EasyEdit past the bridge.
IMPORT_CALLS = ("import_module", "__import__", "find_spec", "import_easyedit")


def _is_import_call(node: ast.Call) -> bool:
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return (called in IMPORT_CALLS and bool(node.args)
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str))


ALL_IMPORTS: list[Import] = [imp for name in MODULES for imp in imports_of(name)]


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def package_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports when run (``TYPE_CHECKING`` imports left out). A package's
    ``__init__`` that its own submodule imports is no edge of a cycle that Python would reject, but it is kept:
    an ``__init__`` should import only downwards."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for imp in ALL_IMPORTS:
        if imp.target in MODULES and not imp.type_checking:
            graph[imp.source].add(imp.target)
    return graph


def test_the_walk_sees_the_package() -> None:
    assert {BRIDGE, f"{METHOD}.editor", f"{METHOD}.variants", f"{PACKAGE}.lab.cli"} <= set(MODULES)
    graph = package_graph()
    assert f"{METHOD}.update" in graph[f"{METHOD}.editor"]  # relative imports resolve
    assert f"{METHOD}.variants.prompt_keys" in graph[f"{METHOD}.variants"]
    assert any(imp.target == "easyeditor" or imp.target.startswith("easyeditor.")
               for imp in ALL_IMPORTS if imp.source == BRIDGE)


def test_no_import_cycle_between_modules() -> None:
    found = cycles(package_graph())
    assert not found, "import cycles (function-level imports included): " + "; ".join(
        " <-> ".join(c) for c in found
    )


def test_the_method_imports_nothing_from_the_bridge_files_evaluation_or_lab() -> None:
    bad = [f"{imp.source}:{imp.line} imports {imp.target}" for imp in ALL_IMPORTS
           if _within(imp.source, METHOD) and any(_within(imp.target, t) for t in NOT_FROM_METHOD)]
    assert not bad, bad


def test_only_the_bridge_imports_easyeditor() -> None:
    bad = [f"{imp.source}:{imp.line}" for imp in ALL_IMPORTS
           if _within(imp.target, "easyeditor") and imp.source != BRIDGE]
    assert not bad, bad


@pytest.mark.parametrize(
    ("edges", "expected"),
    [({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]), ({"a": {"b"}, "b": set()}, [])],
)
def test_cycles_finds_strongly_connected_modules(edges: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert cycles(edges) == expected
