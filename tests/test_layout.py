"""The package layout holds: no import circle among module-level imports, and the lower layers
(io, eval, models, ops) never import the upper ones (cli, training, benchmark). Read with `ast`,
without importing anything."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "decovae_fast"
LOWER = ("io", "eval", "models", "ops")
UPPER = ("cli", "training", "benchmark")


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _extensions() -> set[str]:
    """Compiled modules (decovae_fast._C): leaves of the graph."""
    return {f"decovae_fast.{p.name.split('.')[0]}" for p in PACKAGE.glob("*.so")} | {"decovae_fast._C"}


def _imports(tree: ast.Module, name: str, is_package: bool, modules) -> tuple[set[str], set[str]]:
    """(module-level imports, all imports) of one module, as names of the package's own modules."""
    top, every = set(), set()

    def resolve(node) -> set[str]:
        out = set()
        if isinstance(node, ast.Import):
            out = {a.name for a in node.names}
        else:
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_package else name.split(".")[:-1]
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            for a in node.names:  # `from package import submodule` depends on the submodule
                sub = f"{base}.{a.name}"
                out.add(sub if sub in modules or sub in _extensions() else base)
        return {m for m in out if m in modules}

    def walk(body, module_level: bool) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found = resolve(node)
                every.update(found)
                if module_level:
                    top.update(found)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                walk(node.body, False)
            elif isinstance(node, ast.ClassDef):
                walk(node.body, module_level)
            else:  # if/try/with at module level still run at import time
                children = [c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt)]
                children += [s for h in getattr(node, "handlers", []) for s in h.body]
                walk(children, module_level)

    walk(tree.body, True)
    return top, every


def _graph():
    modules = _modules()
    top, every = {}, {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        top[name], every[name] = _imports(tree, name, path.name == "__init__.py", modules)
    return top, every


def test_the_walk_sees_imports():
    top, every = _graph()
    assert "decovae_fast.models.auto" in top["decovae_fast.models"]
    assert "decovae_fast.ops" in top["decovae_fast.models.layers"]
    assert "decovae_fast.io.video" in top["decovae_fast.cli.codec"] | every["decovae_fast.cli.codec"]
    assert "decovae_fast.cli.main" in top["decovae_fast.cli.__main__"]


def test_no_import_circle():
    top, _ = _graph()
    state, stack, circles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(top[m]):
            if n == m:
                continue
            if state.get(n) == "open":
                circles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(top):
        if m not in state:
            visit(m)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_lower_layers_do_not_import_upper_ones():
    _, every = _graph()  # function-level imports too: a lazy import is still a dependency
    bad = []
    for m, deps in every.items():
        parts = m.split(".")
        if len(parts) > 1 and parts[1] in LOWER:
            bad += [f"{m} -> {d}" for d in deps if d.split(".")[1:2] and d.split(".")[1] in UPPER]
    assert not bad, "lower layer imports an upper one:\n" + "\n".join(sorted(bad))
