"""The shape of the code: no import cycles, and what ships never imports what only runs on a
developer's machine. Static, over every import statement (function-level ones included; those
under `if TYPE_CHECKING:` never run and are left out)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEV_PACKAGE = "shared.dev"
DEV_TOOLS = {"shared.cli"}  # the command line drives the dev package; it does not ship either


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {
    _module_name(path): path
    for path in [REPO / "function_app.py", *(REPO / "functions").rglob("*.py"), *(REPO / "shared").rglob("*.py")]
}


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node that can run: `if TYPE_CHECKING:` blocks are for the type checker only."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            yield from (inner for child in node.orelse for inner in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def imports_of(module: str) -> set[str]:
    """The project modules `module` imports, at module level or inside functions."""
    found = set()
    for node in _runtime_nodes(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                     for alias in node.names]  # fmt: skip
        else:
            continue
        found.update(name for name in names if name in MODULES and name != module)
    return found


def _dynamic_imports() -> dict[str, set[str]]:
    """The registry imports each backend's package, and its backend class, by name."""
    from shared.backends.registry import BACKENDS, plugin

    loaded = {*BACKENDS.values(), *(plugin(name).backend_class.partition(":")[0] for name in BACKENDS)}
    return {"shared.backends.registry": loaded}


def _cycle() -> list[str] | None:
    dynamic = _dynamic_imports()
    graph = {module: imports_of(module) | dynamic.get(module, set()) for module in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_no_module_imports_itself_through_others() -> None:
    """Imports by name count too: the registry loading a backend's package and class."""
    cycle = _cycle()
    assert cycle is None, " -> ".join(cycle or [])


def test_only_dev_tools_import_the_dev_package() -> None:
    offenders = {
        module: sorted(name for name in imports_of(module) if name.startswith(DEV_PACKAGE))
        for module in MODULES
        if not module.startswith(DEV_PACKAGE) and module not in DEV_TOOLS
    }
    assert {module: names for module, names in offenders.items() if names} == {}


def test_the_dev_package_is_left_out_of_the_azure_package() -> None:
    ignored = {line.strip() for line in (REPO / ".funcignore").read_text().splitlines()}
    assert DEV_PACKAGE.replace(".", "/") in ignored
    assert {tool.replace(".", "/") + ".py" for tool in DEV_TOOLS} <= ignored
