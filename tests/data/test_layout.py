"""The layout of dptrain.data: small modules by job, no import circle, nothing imported from dptrain.trainers.

Checked on the source (AST) so that imports inside functions and ``if TYPE_CHECKING:`` blocks count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import dptrain.data

PACKAGE = Path(dptrain.data.__file__).parent
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    """``dptrain.data.NAME`` (the package itself as ``dptrain.data``) -> its file."""
    return {("dptrain.data" if p.stem == "__init__" else f"dptrain.data.{p.stem}"): p
            for p in sorted(PACKAGE.glob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports, anywhere in the file (relative imports resolved)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return out


def test_no_module_over_the_line_limit():
    long = {name: n for name, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_nothing_from_trainers():
    bad = {name: sorted(m for m in _imports(name, p) if m == "dptrain.trainers" or m.startswith("dptrain.trainers."))
           for name, p in _modules().items()}
    assert not {k: v for k, v in bad.items() if v}, bad


def test_no_import_circle():
    modules = _modules()
    graph = {name: {m for m in _imports(name, p) if m in modules and m != name} for name, p in modules.items()}
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, path + [node])
        done.add(node)

    for name in graph:
        visit(name, [])
    # Only the package's __init__ gathers the public names; no module imports the package back.
    assert not {name for name, deps in graph.items() if "dptrain.data" in deps}


def test_one_registry_of_builtins():
    from dptrain.data import registry

    kinds = {b.kind for b in registry.BUILTINS.values()}
    assert kinds == {"table", "image", "text"}
    assert list(registry.BUILTINS) == [*registry.BUILTIN_DATASETS, *registry.IMAGE_BUILTINS, *registry.TEXT_BUILTINS]
    assert registry.list_builtins() == (registry.list_datasets() + registry.list_image_datasets()
                                        + registry.list_text_datasets())
