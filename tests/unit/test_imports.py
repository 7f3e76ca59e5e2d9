"""The package's import graph: no cycles, and each layer imports only what CONTRIBUTING.md allows.

The graph is read from the sources (ast), so it counts every import a module can make: at module level
and inside functions (a lazy import is still a dependency, only a later one). Imports under `if
TYPE_CHECKING:` are left out: they exist for annotations and never run.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "compositor"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that can run (not under `if TYPE_CHECKING:`)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imported(name: str, path: Path) -> set[str]:
    """The modules `name` imports: the dotted names that are modules of any package (so `from
    compositor import policy` counts compositor.policy), resolved for relative imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
            continue
        if node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        out.add(target)
        out.update(f"{target}.{alias.name}" for alias in node.names)
    return out


GRAPH = {name: imported(name, path) for name, path in MODULES.items()}


def internal(name: str) -> set[str]:
    """What `name` imports of the compositor package, itself left out."""
    return {m for m in GRAPH[name] if m in MODULES and m != name}


def cycles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in MODULES:
        if root in index:
            continue
        work = [(root, iter(sorted(internal(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
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
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(internal(child)))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_the_graph_is_read() -> None:
    """The reader sees the imports a module really makes, relative, lazy and `from pkg import mod`."""
    assert "compositor.planner" in internal("compositor.daemon")
    assert "compositor.policy" in internal("compositor.planner")
    assert "compositor.kms.errors" in internal("compositor.kms.card")
    assert {"compositor.cli.run", "compositor.cli.check"} <= internal("compositor.cli")
    assert "compositor.daemon" in internal("compositor.cli.run")  # imported inside a function


def test_no_import_cycles() -> None:
    assert cycles() == []


def test_the_cycle_finder_finds_one(monkeypatch: pytest.MonkeyPatch) -> None:
    graph = dict(GRAPH)
    graph["compositor.topology"] = GRAPH["compositor.topology"] | {"compositor.planner"}
    monkeypatch.setitem(globals(), "GRAPH", graph)
    assert [c for c in cycles() if {"compositor.planner", "compositor.topology"} <= set(c)]


# What each layer may import of the package (CONTRIBUTING.md, "Imports"): a module under a prefix on
# the left imports only modules under the prefixes on the right (and its own package).
ALLOWED = {
    # pure data: the vocabulary, the policy model and the plan
    "compositor.formats": set(),
    "compositor.topology": set(),
    "compositor.policyfile": set(),
    "compositor.policy": {"compositor.policyfile", "compositor.topology", "compositor.formats",
                          "compositor.input.keys", "compositor.sources.qemu_target"},
    "compositor.planner": {"compositor.policy", "compositor.topology", "compositor.formats"},
    # the KMS layer knows nothing of policies, guests or sources
    "compositor.kms": {"compositor._native", "compositor.formats"},
}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_what_it_may(layer: str) -> None:
    allowed = ALLOWED[layer] | {layer, "compositor"}
    wrong = {name: sorted(m for m in internal(name) if not any(_under(m, a) for a in allowed))
             for name in MODULES if _under(name, layer)}
    assert {name: bad for name, bad in wrong.items() if bad} == {}


def test_sources_never_reach_up() -> None:
    """Sources hand frames to the daemon through their handler protocols; they never import the
    daemon, the scanout, the outputs or the planner."""
    above = ("compositor.daemon", "compositor.scanout", "compositor.output", "compositor.planner",
             "compositor.control", "compositor.cli")
    wrong = {name: sorted(m for m in internal(name) if any(_under(m, a) for a in above))
             for name in MODULES if _under(name, "compositor.sources")}
    assert {name: bad for name, bad in wrong.items() if bad} == {}


def test_the_product_imports_no_tool() -> None:
    """Only compositor.cli knows the tools exist (to list their commands); no other module of the
    product imports them, so the wheel, which does not hold them, is whole without them."""
    importers = sorted(name for name in MODULES if not _under(name, "compositor.cli")
                       and any(_under(m, "directflip_tools") for m in GRAPH[name]))
    assert importers == []
