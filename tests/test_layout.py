"""The package's import graph: data flows one way (api -> ops -> dispatch -> backends), with no circle, so
any module can be imported first and each layer can be read without the ones above it."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "znorm_kernels"


def _module_name(path: pathlib.Path) -> str:
    parts = ["znorm_kernels", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, name: str) -> set[str]:
    """Package modules imported anywhere in the file (at the top or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            module = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
            if module.startswith("znorm_kernels"):
                found.add(module)
                found.update(f"{module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("znorm_kernels"))
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        graph[name] = {m for m in _imports(path, name) if m in files and m != name}
    return graph


def test_no_import_circle():
    graph = _graph()
    # A package's __init__ re-exporting its children is not a dependency of those children on it.
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


@pytest.mark.parametrize(
    ("module", "never"),
    [
        ("znorm_kernels.dispatch", {"znorm_kernels.api", "znorm_kernels.ops", "znorm_kernels.reference"}),
        ("znorm_kernels.ops", {"znorm_kernels.api"}),
        ("znorm_kernels.backends.reference", {"znorm_kernels.dispatch", "znorm_kernels.api"}),
        ("znorm_kernels.backends.triton_host", {"znorm_kernels.dispatch", "znorm_kernels.api"}),
        ("znorm_kernels.backends.native", {"znorm_kernels.dispatch", "znorm_kernels.api"}),
    ],
)
def test_layers_import_downwards_only(module, never):
    assert not (_graph()[module] & never), f"{module} imports a layer above it"
