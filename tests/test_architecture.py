"""The shape of the code: no import cycles, and what ships never imports what only runs on a
developer's machine. Static, over every import statement (function-level ones included; those
under `if TYPE_CHECKING:` never run and are left out)."""

from __future__ import annotations

from tests.imports import MODULES, REPO, imports_of, loaded_by_name

DEV_PACKAGE = "shared.dev"
DEV_TOOLS = {"shared.cli"}  # the command line drives the dev package; it does not ship either


def _cycle() -> list[str] | None:
    dynamic = {"shared.backends.registry": loaded_by_name()}
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
