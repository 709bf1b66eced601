"""The one-way rule of the package's floors, and no import cycles between files.

errors -> config -> ground floor (_version, _io, _runtime, _fastpath, _compute) -> data -> models -> adapt
-> training -> {evaluate, explain} -> workflows -> {cli, medtl/__init__.py, __main__}.

A module may import from its own package and from floors below its own; evaluate and explain
share a floor and may not import each other. Every import counts, including imports inside
functions. Plain ``ast``: no dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medtl"

FLOORS: list[tuple[str, ...]] = [
    ("errors",),
    ("config",),
    ("_version", "_io", "_runtime", "_fastpath", "_compute"),
    ("data",),
    ("models",),
    ("adapt",),
    ("training",),
    ("evaluate", "explain"),
    ("workflows",),
    ("cli", "__init__", "__main__"),
]
# floors whose units may import each other (the ground floor's small modules; the package face and the CLI)
OPEN_FLOORS = {2, 9}


def module_files(root: Path) -> dict[str, Path]:
    """``{"medtl.data.readers": path, "medtl.data": path/__init__.py, ...}``."""
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """The package modules ``name`` imports, as ``(module, line)``; ``from pkg import sub`` counts as ``pkg.sub``."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                found.append((sub if sub in modules else mod, node.lineno))
    root = PACKAGE.name
    return [(m, line) for m, line in found if m == root or m.startswith(root + ".")]


def unit_of(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def floor_of(unit: str) -> int:
    for i, units in enumerate(FLOORS):
        if unit in units:
            return i
    raise AssertionError(f"'{unit}' is on no floor: add it to FLOORS in tests/test_layering.py")


def layering_violations(root: Path) -> list[str]:
    modules = module_files(root)
    bad = []
    for name, path in modules.items():
        src = unit_of(name)
        for target, line in imports_of(name, path, modules):
            dst = unit_of(target)
            if dst == src:
                continue
            fs, fd = floor_of(src), floor_of(dst)
            if fd < fs or (fd == fs and fs in OPEN_FLOORS):
                continue
            bad.append(f"{path.relative_to(root.parent)}:{line} imports {target} ({dst}, floor {fd}) from "
                       f"{src} (floor {fs})")
    return bad


def import_cycles(root: Path) -> list[list[str]]:
    """Strongly connected components of more than one file (Tarjan), plus files importing themselves."""
    modules = module_files(root)
    graph = {n: sorted({t for t, _ in imports_of(n, p, modules) if t in modules and t != n})
             for n, p in modules.items()}
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_every_import_runs_down_the_floors():
    assert layering_violations(PACKAGE) == []


def test_no_import_cycles_between_files():
    assert import_cycles(PACKAGE) == []


def test_every_package_folder_is_on_a_floor():
    for p in PACKAGE.iterdir():
        if p.is_dir() and (p / "__init__.py").exists() or p.suffix == ".py":
            floor_of(p.stem if p.suffix == ".py" else p.name)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "medtl"
    for rel, text in files.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return root


@pytest.mark.parametrize("source, text", [
    ("training/loop.py", "from medtl.evaluate.metrics import compute_metrics\n"),        # upward
    ("data/readers.py", "def f():\n    from medtl.workflows.rundir import RunDir\n"),   # upward, inside a function
    ("evaluate/metrics.py", "from medtl.explain import attribution\n"),                  # sibling floor
    ("models/records.py", "from medtl import __version__\n"),                            # the package face
])
def test_the_checker_catches_a_planted_upward_import(tmp_path, source, text):
    files = {"__init__.py": "", "errors.py": "", "data/__init__.py": "", "data/readers.py": "",
             "models/__init__.py": "", "models/records.py": "", "training/__init__.py": "", "training/loop.py": "",
             "evaluate/__init__.py": "", "evaluate/metrics.py": "", "explain/__init__.py": "",
             "explain/attribution.py": "", "workflows/__init__.py": "", "workflows/rundir.py": ""}
    files[source] = text
    bad = layering_violations(_tree(tmp_path, files))
    assert len(bad) == 1 and source in bad[0]


def test_the_checker_catches_a_planted_cycle(tmp_path):
    root = _tree(tmp_path, {"__init__.py": "", "models/__init__.py": "from medtl.models.encoders import f\n",
                            "models/encoders.py": "from medtl.models.inflate import g\n",
                            "models/inflate.py": "def g():\n    from medtl.models import encoders\n"})
    assert import_cycles(root) == [["medtl.models.encoders", "medtl.models.inflate"]]
