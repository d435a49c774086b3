"""The package layout (DESIGN.md, Layout): imports go one way and never in a cycle.

Every ``import mta…`` counts, also inside functions and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mta

ROOT = Path(mta.__file__).parent

#: Each top-level part of ``mta`` and how low it sits: a module imports only parts at
#: its own level or below. The shared leaves sit below everything that uses them.
LEVELS = {
    "mta": 0, "errors": 0, "concurrency": 0, "faults": 0, "mail": 0, "allocator": 0,
    "config": 1,
    "admin": 2,
    "queue": 3, "journal": 3,
    "intake": 4, "delivery": 4,
    "node": 5, "supervision": 5, "node_loops": 5,
    "supervisor": 6,
    "fleet": 7,
    "cli": 8, "__main__": 9,
}
#: Parts on one level that must not import each other.
STRANGERS = [{"intake", "delivery"}, {"queue", "journal"}]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The ``mta`` modules ``path`` imports (a package counts as its ``__init__``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "mta" or name.startswith("mta.")}


def graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in ROOT.rglob("*.py")}
    return {name: {target for target in imports_of(path) if target in modules and target != name}
            for name, path in modules.items()}


def part(module: str) -> str:
    return module.split(".")[1] if "." in module else "mta"


def test_every_part_of_the_package_has_a_level() -> None:
    assert {part(module) for module in graph()} <= set(LEVELS)


def test_imports_never_go_upwards_nor_between_strangers() -> None:
    wrong = []
    for module, targets in graph().items():
        for target in targets:
            here, there = part(module), part(target)
            if here == there:
                continue
            if LEVELS[there] > LEVELS[here] or {here, there} in STRANGERS:
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_there_is_no_import_cycle() -> None:
    edges = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target):], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []
