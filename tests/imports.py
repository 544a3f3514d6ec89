"""The project's import graph, read statically: every import statement of `function_app`,
`functions/` and `shared/`, function-level ones included (those under `if TYPE_CHECKING:` never
run and are left out), and the registry's imports by name."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

from shared.backends.registry import BACKENDS, plugin

REPO = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {
    module_name(path): path
    for path in [REPO / "function_app.py", *(REPO / "functions").rglob("*.py"), *(REPO / "shared").rglob("*.py")]
}


def runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node that can run: `if TYPE_CHECKING:` blocks are for the type checker only."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            yield from (inner for child in node.orelse for inner in [child, *runtime_nodes(child)])
            continue
        yield node
        yield from runtime_nodes(node)


def imports_of(module: str) -> set[str]:
    """The project modules `module` imports, at module level or inside functions."""
    found = set()
    for node in runtime_nodes(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                     for alias in node.names]  # fmt: skip
        else:
            continue
        found.update(name for name in names if name in MODULES and name != module)
    return found


def loaded_by_name(backends: Iterable[str] = BACKENDS) -> set[str]:
    """What the registry imports by name for these backends: each package, and its backend class's
    module."""
    return {module for name in backends for module in (BACKENDS[name], plugin(name).backend_class.partition(":")[0])}


def reachable(modules: Iterable[str]) -> set[str]:
    """Every project module importing `modules` can run, with the packages that hold them."""
    seen: set[str] = set()
    pending = list(modules)
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        parents = (".".join(module.split(".")[:depth]) for depth in range(1, module.count(".") + 1))
        pending.extend({*imports_of(module), *(parent for parent in parents if parent in MODULES)})
    return seen
