#!/usr/bin/env python
"""The package's structure in figures: lines of the orchestration modules, the longest functions,
import circles between modules, and imports that run against the pipeline's direction.

Every `import`/`from ... import` of a sparsellm module counts, at module level or inside a function.
The direction is load → calibrate → compress → export → evaluate → run → command line; a module may
import its own stage and the ones before it (RANKS), never a later one.

    python scripts/structure_report.py [--json out.json]"""
from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "sparsellm"

# module (or package prefix) -> its place along the pipeline; the longest matching prefix wins
RANKS = {
    "errors": 0, "faults": 0, "memory": 0, "stage": 0, "safe_yaml": 0,  # foundations every stage may use
    "loading": 1, "lowmem.tensors": 1, "formats": 1, "data": 1, "specs": 1, "optional": 1,  # load (and what a spec may name)
    "calibrate": 2, "measure": 2,  # calibrate, count
    "compress": 3, "allocate": 3, "recover": 3,  # the stages
    "export": 4, "checkpoint": 4,  # write
    "evaluate": 5,  # measure quality, render reports
    "lowmem": 6, "handle": 6, "recipe": 6, "pipeline": 6, "publish": 6,  # run a recipe
    "api": 7, "cli": 7, "__init__": 7, "__main__": 7,  # the user's entry points
    "reference": 7,  # generates docs/recipes.md from the registry
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def rank(mod: str) -> int:
    parts = mod.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in RANKS:
            return RANKS[key]
    raise KeyError(f"no rank for module {mod}; add it to RANKS")


def imports(path: Path, mod: str) -> set[str]:
    """sparsellm modules imported by `path` (relative imports resolved), anywhere in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("sparsellm"):
                target = node.module.removeprefix("sparsellm").lstrip(".")
            else:
                continue
            for alias in node.names:  # `from . import memory` names a module
                sub = f"{target}.{alias.name}" if target else alias.name
                found.add(sub if (PKG / sub.replace(".", "/")).with_suffix(".py").exists()
                          or (PKG / sub.replace(".", "/")).is_dir() else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("sparsellm."):
                    found.add(alias.name.removeprefix("sparsellm."))
    return {f for f in found if f and f != mod}


def longest_functions(paths: list[Path], n: int = 8) -> list[tuple[int, str]]:
    out = []
    for p in paths:
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((node.end_lineno - node.lineno + 1, f"{p.relative_to(ROOT)}:{node.name}"))
    return sorted(out, reverse=True)[:n]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    files = sorted(PKG.rglob("*.py"))
    graph = {module_name(p): imports(p, module_name(p)) for p in files}
    against = sorted((a, b) for a, deps in graph.items() for b in deps
                     if b in graph and rank(b) > rank(a))
    lines = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines())
             for p in (PKG / "pipeline.py", PKG / "cli.py", PKG / "recipe.py", PKG / "stage.py", PKG / "handle.py")
             if p.exists()}
    result = {"lines": lines, "package_lines": sum(len(p.read_text(encoding="utf-8").splitlines()) for p in files),
              "longest_functions": longest_functions(files), "import_cycles": cycles(graph),
              "imports_against_direction": against}
    for k, v in lines.items():
        print(f"{k}: {v} lines")
    print(f"package: {result['package_lines']} lines in {len(files)} files")
    print("longest functions:")
    for n, name in result["longest_functions"]:
        print(f"  {n:4d}  {name}")
    print(f"import cycles: {len(result['import_cycles'])}", *result["import_cycles"], sep="\n  ")
    print(f"imports against the pipeline direction: {len(against)}", *[f"{a} -> {b}" for a, b in against], sep="\n  ")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
