"""The package's layers, checked from its source: who may import whom, and no cycles.

Every `import` of a `paligemma_cli` module counts, at the top of a file or inside a function: a cycle
hidden behind a function-level import is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "paligemma_cli"

# What each part may import from the package (besides itself). Lower layers never import higher ones:
# errors, outputs, machine, device < distributed, model, processing < speed < checkpoints < data < inference <
# evaluation, training, server < settings, commands, cli.
ALLOWED = {
    "errors": set(),
    "outputs": {"errors"},  # where outputs may go; like errors, every part may use it
    "machine": set(),  # what this CPU is (standard library only)
    "device": {"errors"},
    "distributed": {"errors", "device"},  # torchrun: ranks, devices, shares of the work, DDP / FSDP2
    "model": {"errors"},
    "speed": {"errors", "machine", "model"},
    "processing": {"errors"},
    "checkpoints": {"errors", "outputs", "device", "model", "speed", "processing"},
    "data": {"errors", "outputs", "processing"},
    "inference": {"errors", "outputs", "device", "model", "speed", "checkpoints", "processing"},
    "evaluation": {"errors", "outputs", "data", "processing", "inference"},
    "training": {"errors", "outputs", "distributed", "model", "checkpoints", "processing", "data"},
    "settings": {"errors", "checkpoints"},
    "server": {"errors", "model", "processing", "inference"},  # the HTTP app over inference's engine
    "core": {"model"},  # the deprecated alias of the old layout
    "options": set(),
    "commands": {"errors", "outputs", "machine", "device", "distributed", "model", "speed", "checkpoints",
                 "processing", "data", "inference", "evaluation", "training", "settings", "options", "cli", "server"},
    "cli": {"errors", "outputs", "__init__"},  # __version__
    "__init__": {"checkpoints", "inference", "model"},
    "__main__": {"cli"},
}
LAZY_IMPORTS_ALLOWED = {"commands", "cli", "__init__", "core"}  # `paligemma --help` must not import torch


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    rest = module.split(".")[1:]
    return rest[0] if rest else "__init__"


def package_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported paligemma_cli module, imported inside a function?) for each import in the file."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function) for a in child.names if a.name.startswith("paligemma_cli"))
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("paligemma_cli"):
                for alias in child.names:  # `from paligemma_cli.model import config` imports a module
                    candidate = f"{child.module}.{alias.name}"
                    is_module = (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").exists()
                    found.append((candidate if is_module else child.module, in_function))
            elif isinstance(child, ast.If) and getattr(child.test, "id", "") == "TYPE_CHECKING":
                continue  # never executed
            else:
                visit(child, nested)

    visit(tree, False)
    return found


GRAPH = {module_name(p): package_imports(p) for p in PACKAGE.rglob("*.py")}


def test_the_walk_sees_the_package():
    assert "paligemma_cli.model.paligemma" in GRAPH and "paligemma_cli.commands.ask" in GRAPH
    assert ("paligemma_cli.model.gemma", False) in GRAPH["paligemma_cli.model.paligemma"]


def layer_violations(graph: dict) -> list[str]:
    found = []
    for module, imports in sorted(graph.items()):
        part = part_of(module)
        if part not in ALLOWED:
            found.append(f"{module}: a new top-level part; give it a place in ALLOWED")
            continue
        for target, _ in imports:
            other = part_of(target)
            if part == "commands" and other == "commands":
                if target not in ("paligemma_cli.commands", "paligemma_cli.commands.common"):
                    found.append(f"{module} imports {target}: commands never import each other")
            elif other != part and other not in ALLOWED[part]:
                found.append(f"{module} ({part}) may not import {target} ({other})")
    return found


def test_imports_respect_the_layers():
    assert layer_violations(GRAPH) == []


def test_the_layer_check_can_fail():
    graph = {**GRAPH, "paligemma_cli.model.gemma": [("paligemma_cli.speed.quantize", False)],
             "paligemma_cli.commands.ask": [("paligemma_cli.commands.chat", True)]}
    assert len(layer_violations(graph)) == 2


def test_model_imports_nothing_above_it():
    for module, imports in GRAPH.items():
        if part_of(module) == "model":
            assert all(part_of(t) in ("model", "errors") for t, _ in imports), (module, imports)


def test_package_imports_are_at_the_top():
    lazy = [(m, t) for m, imports in sorted(GRAPH.items()) if part_of(m) not in LAZY_IMPORTS_ALLOWED
            for t, in_function in imports if in_function]
    assert lazy == [], "import these at the top of the module (a function-level import hides cycles)"


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def walk(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target, _ in GRAPH.get(module, []):
            if target not in GRAPH:
                continue
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                walk(target)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            walk(module)


def test_the_cycle_check_can_fail(monkeypatch):
    monkeypatch.setitem(GRAPH, "paligemma_cli.model.gemma",
                        GRAPH["paligemma_cli.model.gemma"] + [("paligemma_cli.model.paligemma", True)])
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycles()
