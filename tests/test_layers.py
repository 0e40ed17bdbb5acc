"""The package's layering (issue 23): every import in src/deltamask goes to its own folder or a lower one,
and module-level imports form no cycle. A new top-level module or folder must be placed in LAYERS."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "deltamask"

#: lowest first; a module may import from its own layer and the layers before it, never after
LAYERS: list[tuple[str, ...]] = [
    ("__init__", "errors"),
    ("codecs",),
    ("config",),
    ("model",),
    ("data",),
    ("fl",),
    ("methods",),
    ("testing",),
    ("run",),
    ("export",),
    ("engines",),
    ("app",),
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(mod: str, path: Path, top_level_only: bool) -> set[str]:
    """Absolute deltamask modules that ``mod`` imports (``from a import b`` counts a.b when b is a module)."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    here = mod.split(".") if is_pkg else mod.split(".")[:-1]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # module level includes `if`/`try` blocks at the top, not function bodies
        nodes = [n for top in tree.body if not isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                 for n in ast.walk(top)]
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "deltamask"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "deltamask":
                continue
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}
    mods = _modules()
    return {m for m in found if m in mods}


def _layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_has_a_layer() -> None:
    unplaced = sorted({_layer(m) for m in _modules()} - set(RANK))
    assert not unplaced, f"place {unplaced} in tests/test_layers.py LAYERS (and docs/architecture.md)"


def test_no_import_reaches_a_higher_layer() -> None:
    bad = []
    for mod, path in _modules().items():
        for dep in _imports(mod, path, top_level_only=False):
            if RANK[_layer(dep)] > RANK[_layer(mod)]:
                bad.append(f"{mod} -> {dep}")
    assert not bad, "imports against the layer order:\n" + "\n".join(sorted(bad))


def test_module_level_imports_have_no_cycle() -> None:
    mods = _modules()
    graph = {m: {d for d in _imports(m, p, top_level_only=True) if d != m} for m, p in mods.items()}
    # a package imports its own submodules to re-export them; that is not a cycle back to the package
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if d.startswith(m + "."):
                continue
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_checker_sees_a_violation(tmp_path, monkeypatch) -> None:
    """The rule bites: a codec importing the round driver is reported."""
    path = tmp_path / "bad.py"
    path.write_text("from ..run.round import run_rounds\n")
    deps = _imports("deltamask.codecs.bad", path, top_level_only=False)
    assert deps == {"deltamask.run.round"}
    assert RANK[_layer("deltamask.run.round")] > RANK[_layer("deltamask.codecs.bad")]
