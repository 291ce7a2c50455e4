"""The package's shape, kept true by test: data flows one way (API -> checks and grouping -> backend ->
kernel), with no import circle, no upward import and no private name used outside its module; every module
is small enough to read in one sitting; every extension point is one table. docs/extending.md describes the
layout these tests hold."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "znorm_kernels"

# Each module's layer: a module imports from its own layer or below, never above. A package's __init__ is
# its own module (re-exporting its children is not a dependency of the children on it).
LAYERS: list[tuple[str, ...]] = [
    # 0: leaves, shared by everything above: facts about tensors and the environment, the accuracy rule
    ("memory", "naming", "accuracy", "stats", "guards", "dtensors", "deepspeed_zero", "cuda_archs", "version",
     "tensor_types", "transfer", "backends"),
    # 1: the backends and their kernels (a backend may use another backend's module, never anything above)
    ("backends.*",),
    # 2: which backend serves what
    ("registry",),
    # 3: checks and grouping
    ("options", "overlap", "check_cache", "validation", "grad_watch"),
    # 4: routing to backends, the per-step cache, the distributed path
    ("dispatch", "step_cache", "distributed", "distributed.*"),
    # 5: the public entry points and what every hook shares
    ("ops", "api", "reference", "step_hooks", "baselines"),
    # 6: the hook, the optimizers, the diagnostics
    ("hook", "optim", "optim.*", "info"),
    # 7: integrations, the training script, the package root
    ("integrations", "integrations.*", "cifar", "cifar.*", "", "__main__"),
]  # fmt: skip

# A module reads in one sitting; LONGER names any that may exceed it (a kernel that is one piece).
MAX_LINES = 420
LONGER: dict[str, int] = {}


def _module_name(path: pathlib.Path) -> str:
    parts = ["znorm_kernels", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _files() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(node: ast.ImportFrom, name: str, path: pathlib.Path) -> str:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    base = package
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    if not node.level:
        return node.module or ""
    return f"{base}.{node.module}" if node.module else base


def _imports(path: pathlib.Path, name: str, files) -> set[str]:
    """Package modules imported anywhere in the file (at the top or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = _resolve(node, name, path)
            if module.startswith("znorm_kernels"):
                # ``from pkg import mod`` depends on mod (and on pkg only for names that are not modules)
                for a in node.names:
                    child = f"{module}.{a.name}"
                    found.add(child if child in files else module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("znorm_kernels"))
    return {m for m in found if m in files and m != name}


def _graph() -> dict[str, set[str]]:
    files = _files()
    return {name: _imports(path, name, files) for name, path in files.items()}


def _layer(module: str) -> int:
    short = module.removeprefix("znorm_kernels").removeprefix(".")
    for rank, members in enumerate(LAYERS):
        for m in members:
            if short == m or (m.endswith(".*") and short.startswith(m[:-1])):
                return rank
    raise AssertionError(f"{module} has no layer in tests/test_layout.py: give it one")


def test_no_import_circle():
    graph = _graph()
    edges = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                cycle = [*path[path.index(d) :], d] if d in path else [m, d]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


def test_every_module_imports_downwards_only():
    upward = []
    for module, deps in _graph().items():
        for d in deps:
            if d.startswith(module + "."):  # a package re-exporting its children
                continue
            if _layer(d) > _layer(module):
                upward.append(f"{module} (layer {_layer(module)}) imports {d} (layer {_layer(d)})")
    assert not upward, "\n".join(sorted(upward))


def _private_uses(path: pathlib.Path, name: str, files) -> list[str]:
    """Names starting with one underscore that this file takes from another module of the package: imported
    by name, or read as an attribute of an imported module."""
    tree = ast.parse(path.read_text())
    modules: dict[str, str] = {}  # local name -> package module
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = _resolve(node, name, path)
            if not module.startswith("znorm_kernels"):
                continue
            for a in node.names:
                full = f"{module}.{a.name}"
                if full in files:
                    modules[a.asname or a.name] = full
                elif a.name.startswith("_") and not a.name.startswith("__") and module != name:
                    out.append(f"{name} imports {a.name} from {module}")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and modules[node.value.id] != name
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            out.append(f"{name} reads {modules[node.value.id]}.{node.attr}")
    return out


def test_no_private_name_crosses_a_module():
    files = _files()
    found = [use for name, path in files.items() for use in _private_uses(path, name, files)]
    assert not found, "\n".join(found)


def test_every_module_reads_in_one_sitting():
    long = []
    for name, path in _files().items():
        short = name.removeprefix("znorm_kernels.")
        lines = len(path.read_text().splitlines())
        if lines > LONGER.get(short, MAX_LINES):
            long.append(f"{name}: {lines} lines")
    assert not long, "split by concern: " + ", ".join(long)


def test_every_module_has_a_layer():
    for name in _files():
        _layer(name)


def test_extension_points_are_tables():
    # The backends, the fused updates and the Triton update kernels are each one table; every ZNorm
    # optimizer names an entry of the fused updates, and each family has its kernels on both paths.
    from znorm_kernels import optim, registry
    from znorm_kernels.backends import native_optim, triton_optim
    from znorm_kernels.optim.updates import FUSED_UPDATES

    assert set(registry.BACKENDS) == {"triton", "cuda", "cpu", "reference"}
    for cls in (optim.ZNormSGD, optim.ZNormAdam, optim.ZNormAdamW):
        assert cls._fused_kind in FUSED_UPDATES, cls
    families = {u.family for u in FUSED_UPDATES.values()}
    assert families == set(triton_optim.KERNELS) == set(triton_optim.STEPS) == set(native_optim.STEPS)
