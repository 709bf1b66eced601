"""No code path of medtl can execute code from a file it loads.

The whole package source is parsed (AST, so ``model.eval()`` is not confused with the
builtin ``eval``) and checked for: ``torch.load`` without ``weights_only=True``; ``pickle``,
``dill``, ``marshal``, ``shelve``, ``joblib.load``; ``yaml.load``/``unsafe_load`` or
non-safe YAML loaders; the ``eval``/``exec`` builtins; ``np.load(..., allow_pickle=True)``;
``subprocess`` with ``shell=True`` and ``os.system``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "medtl"
_UNSAFE_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "cloudpickle"}


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _dotted(node: ast.expr) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    parts.append(node.id if isinstance(node, ast.Name) else "<expr>")  # f().eval() is a method, not eval
    return ".".join(reversed(parts))


def find_unsafe(source: str, filename: str = "<src>") -> list[str]:
    """Unsafe loading patterns in ``source``, as ``"file:line: what"`` strings."""
    problems = []
    for node in ast.walk(ast.parse(source, filename)):
        line = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            bad = sorted({n.split(".")[0] for n in names} & _UNSAFE_MODULES)
            if bad:
                problems.append(f"{line}: imports {bad[0]}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name in ("eval", "exec", "compile", "__import__"):
            problems.append(f"{line}: builtin {name}()")
        elif name == "torch.load" or name.endswith(".torch.load"):
            if not _is_true(_kw(node, "weights_only")):
                problems.append(f"{line}: torch.load without weights_only=True")
        elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
            problems.append(f"{line}: {name} (use yaml.safe_load)")
        elif name.endswith(("np.load", "numpy.load")) and _is_true(_kw(node, "allow_pickle")):
            problems.append(f"{line}: np.load(allow_pickle=True)")
        elif name in ("joblib.load", "os.system", "os.popen"):
            problems.append(f"{line}: {name}")
        elif name.startswith("subprocess.") and _is_true(_kw(node, "shell")):
            problems.append(f"{line}: {name}(shell=True)")
    return problems


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_checker_catches_each_pattern() -> None:
    bad = """
import pickle
from dill import loads
import torch, yaml, numpy as np, subprocess, os
torch.load("w.pt")
torch.load("w.pt", weights_only=False)
yaml.load(text, Loader=yaml.Loader)
yaml.unsafe_load(text)
np.load("a.npy", allow_pickle=True)
eval("1+1")
exec("x=1")
subprocess.run("ls", shell=True)
os.system("ls")
"""
    found = find_unsafe(bad)
    assert len(found) == 11, found
    ok = """
import torch, yaml, numpy as np
model.eval()
Ensemble([m]).eval()
torch.load("w.pt", map_location="cpu", weights_only=True)
yaml.safe_load(text)
np.load("a.npz")
"""
    assert find_unsafe(ok) == []


def test_package_source_has_no_unsafe_loading() -> None:
    files = _sources()
    assert len(files) > 20, f"medtl sources not found under {PACKAGE}"
    problems = [p for f in files for p in find_unsafe(f.read_text(), str(f.relative_to(PACKAGE.parent)))]
    assert problems == [], "unsafe loading patterns:\n" + "\n".join(problems)
