"""The package's layers import one way only, and no module imports itself back through others.

Layers, lowest first (CONTRIBUTING.md): errors; GPU kernels (pure functions of tensors); core SSF (sites, the SSF
layer and routing); architecture adapters; the model and fold; the application (registry, training, the engine,
export, task files); the server. A module may import its own layer or lower ones. Imports inside functions count;
imports only for type checkers (``if TYPE_CHECKING:``) do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ssf_tasks"

LAYERS: list[tuple[str, set[str]]] = [
    ("errors", {"errors"}),
    ("kernels", {"kernels"}),
    ("core", {"sites", "ssf"}),
    ("adapters", {"adapters"}),
    ("model", {"model", "fold", "graphed"}),
    (
        "application",
        {
            "atomic_files", "backbones", "catalog", "config", "data", "decode_workers", "engine", "export",
            "image_input", "plot", "predictions_csv", "registry", "routing", "taskfiles", "train", "training_job",
            "data_parallel", "distributed",
        },
    ),
    ("server", {"serve"}),
]  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for rank, (_, members) in enumerate(LAYERS):
        if top in members:
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to CONTRIBUTING.md)")


def imports_of(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports, at run time."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ssf_tasks"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("ssf_tasks"):
                names = [f"{target}.{a.name}" for a in node.names]
                found.update(n for n in names if (PACKAGE.parent / (n.replace(".", "/") + ".py")).exists()
                             or (PACKAGE.parent / n.replace(".", "/")).is_dir())  # fmt: skip
                found.add(target)
    return {m for m in found if m != "ssf_tasks"}


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if module_name(p) != "ssf_tasks"}
GRAPH = {name: {m for m in imports_of(path) if m != name} for name, path in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module):
    upward = [m for m in GRAPH[module] if layer_of(m) > layer_of(module)]
    assert not upward, f"{module} ({LAYERS[layer_of(module)][0]}) imports a higher layer: {sorted(upward)}"


def test_kernels_know_nothing_of_modules_or_tasks():
    for module, imported in GRAPH.items():
        if module.startswith("ssf_tasks.kernels"):
            assert all(m.startswith("ssf_tasks.kernels") or m == "ssf_tasks.errors" for m in imported), module


def test_no_import_cycles():
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(GRAPH.get(module, ())):
            target = target if target in GRAPH else target.rsplit(".", 1)[0]
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join([*path, module, target]))
            if target in GRAPH and target not in state:
                visit(target, [*path, module])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [])
