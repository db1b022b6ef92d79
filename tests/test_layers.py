"""The package's layers, read from its source (every import statement, those inside functions included):

    errors, redaction, io, stores, sqlite_wal, data.layout, console -> config -> data -> models -> features -> track (MLflow)
    -> train -> sweep -> registry (promotion, the champion) -> report -> cli, demo, doctor, smoke

A module imports only from its own layer or the layers before it, so no import cycle can form across layers and
none may form within one. MLflow is imported by one adapter module and torch_xla by the runtime module only; an
import inside a function is kept for a command's start (the CLI's dispatch) or a heavy or optional dependency's
adapter, at most `LOCAL_IMPORT_LIMIT` of them outside `octft/cli.py`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "octft"
LAYERS = [
    ("octft.errors", "octft.redaction", "octft.io", "octft.stores", "octft.sqlite_wal", "octft.data.layout",
     "octft.console"),
    ("octft.config",),
    ("octft.data",),
    ("octft.models",),
    ("octft.features",),
    ("octft.track",),
    ("octft.train",),
    # The champion's model code sits below the sweep: a trial runner logs its checkpoint as an MLflow LoggedModel.
    ("octft.registry.inference", "octft.registry.model", "octft.registry.pyfunc_code"),
    ("octft.sweep",),
    ("octft.registry",),
    ("octft.report",),
    ("octft.cli", "octft.demo", "octft.doctor", "octft.smoke", "octft"),
]
LOCAL_IMPORT_LIMIT = 40
ADAPTERS = {"mlflow": {"octft.track.mlflow_store"}, "torch_xla": {"octft.train.runtime"}}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import statement of module `name`."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def visit(node, inside: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, inside) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join([*anchor[: len(anchor) - (child.level - 1)], *([base] if base else [])])
                found.extend((f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base, child.lineno, inside)
                             for alias in child.names)
            visit(child, inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(tree, False)
    return found


def _layer(name: str) -> int:
    matches = [(len(prefix), index) for index, layer in enumerate(LAYERS) for prefix in layer
               if name == prefix or name.startswith(prefix + ".")]
    return max(matches)[1]


def _internal(target: str) -> str | None:
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def test_every_module_imports_only_from_its_layer_or_the_layers_before_it():
    upward = []
    for name in MODULES:
        for target, line, _ in _imports(name):
            imported = _internal(target) if target.startswith("octft") else None
            if imported and _layer(imported) > _layer(name):
                upward.append(f"{name}:{line} imports {imported} (layer {_layer(imported)} > {_layer(name)})")
    assert upward == []


def test_no_import_cycle():
    edges = {name: {found for target, _, _ in _imports(name) if target.startswith("octft")
                    and (found := _internal(target)) and found != name} for name in MODULES}
    # A package's __init__ re-exporting its own submodules is no cycle.
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in edges[node]:
            if node.startswith(target + ".") or target.startswith(node + "."):
                continue
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for name in MODULES:
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_imports_inside_functions_are_few_and_heavy_dependencies_have_one_adapter_each():
    local = [f"{name}:{line} {target}" for name in MODULES if name != "octft.cli"
             for target, line, inside in _imports(name) if inside]
    assert len(local) <= LOCAL_IMPORT_LIMIT, "\n".join(local)
    for dependency, adapters in ADAPTERS.items():
        importers = {name for name in MODULES for target, _, _ in _imports(name)
                     if target == dependency or target.startswith(dependency + ".")}
        assert importers <= adapters, f"{dependency} imported outside its adapter: {sorted(importers - adapters)}"


@pytest.mark.parametrize("command_module", ["octft.cli", "octft.sweep.status", "octft.sweep.worker", "octft.sweep.launch"])
def test_light_commands_import_neither_torch_nor_what_they_do_not_use(command_module):
    code = f"import sys, {command_module}; print(sorted(m for m in ('torch', 'mlflow') if m in sys.modules))"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    expected = {"octft.cli": "[]", "octft.sweep.status": "[]", "octft.sweep.worker": "['mlflow']",
                "octft.sweep.launch": "['mlflow']"}[command_module]
    # A worker and a launch make MLflow runs and never train: a launch audits and prepares the data without torch
    # (2 s of imports on the path to the first trial, while its first runner imports torch on the other core).
    assert imported == expected
