"""The package's layering: which modules may import which, and that nothing outside the adapter kinds branches on a
kind's name. Read from the source (ast), so a violation fails here rather than as an import cycle later."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import rana_hf
from rana_hf.adapters import ENTRIES, KINDS

PACKAGE = Path(rana_hf.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """rana_hf modules (and the third-party top-level packages) a file imports, resolved to absolute names."""
    tree = ast.parse(path.read_text())
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from . import planning`
    return found


SOURCES = {_module_name(p): p for p in PACKAGE.rglob("*.py") if "data/build" not in str(p)}


def _internal(names: set[str]) -> set[str]:
    return {name for name in names if name in SOURCES}


def test_no_import_cycles_at_module_level():
    graph = {module: _internal(_imports(path, top_level_only=True)) - {module} for module, path in SOURCES.items()}
    # a package's __init__ importing its own submodules is how a package is assembled, not a cycle
    for module, deps in graph.items():
        graph[module] = {d for d in deps if not d.startswith(module + ".")}
    state: dict[str, int] = {}

    def visit(module, stack):
        state[module] = 1
        for dep in graph[module]:
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack, module, dep]))
            if dep not in state:
                visit(dep, [*stack, module])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


# module -> modules (prefixes) it must not import, anywhere in the file (function-level imports included)
FORBIDDEN = {
    "rana_hf.layers": ["rana_hf.calibration", "rana_hf.kernels", "triton", "rana_hf.adapters", "rana_hf.api"],
    "rana_hf.decomposition": ["rana_hf.", "transformers", "peft"],
    "rana_hf.allocation": ["rana_hf.api", "rana_hf.planning", "rana_hf.calibration", "transformers", "peft"],
    "rana_hf.evaluation": ["rana_hf.api", "rana_hf.planning", "rana_hf.calibration"],
    "rana_hf.calibration": ["rana_hf.api", "rana_hf.planning", "rana_hf.evaluation", "rana_hf.adapters"],
    "rana_hf.planning": ["rana_hf.api", "rana_hf.evaluation", "rana_hf.tuner"],
    "rana_hf.tuner": ["rana_hf.api", "rana_hf.planning", "rana_hf.calibration", "rana_hf.evaluation"],
    "rana_hf.config": ["rana_hf.api", "rana_hf.planning", "rana_hf.tuner", "rana_hf.evaluation"],
}
for _kind_module in [m for m in SOURCES if m.startswith("rana_hf.adapters")]:
    FORBIDDEN[_kind_module] = [
        "rana_hf.config",
        "rana_hf.planning",
        "rana_hf.api",
        "rana_hf.calibration",
        "rana_hf.evaluation",
        "rana_hf.tuner",
        "rana_hf.cli",
        "rana_hf.kernels",
        "transformers",
    ]


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_dependencies_point_one_way(module):
    imported = _imports(SOURCES[module], top_level_only=False)
    bad = sorted(name for name in imported for prefix in FORBIDDEN[module] if name.startswith(prefix))
    assert not bad, f"{module} imports {bad}"


def test_only_the_cli_imports_the_cli():
    users = [
        m
        for m, p in SOURCES.items()
        if not m.startswith("rana_hf.cli")
        and any(name.startswith("rana_hf.cli") for name in _imports(p, top_level_only=False))
    ]
    assert not users


KIND_NAMES = set(KINDS) | set(ENTRIES)
ORCHESTRATION = ["rana_hf.planning", "rana_hf.api", "rana_hf.tuner", "rana_hf.evaluation", "rana_hf.allocation"]
ORCHESTRATION += ["rana_hf.integrations.standalone", "rana_hf.hub", "rana_hf.training"]


@pytest.mark.parametrize("module", ORCHESTRATION)
def test_orchestration_never_names_a_kind(module):
    """Planner, API, tuner and loaders reach kinds through the registry only: no kind's name appears in their code."""
    tree = ast.parse(SOURCES[module].read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    keys = {id(key) for node in ast.walk(tree) if isinstance(node, ast.Dict) for key in node.keys}  # report keys
    named = sorted(
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in KIND_NAMES and id(node) not in docstrings | keys
    )
    assert not named, f"{module} names adapter kinds {named}"
