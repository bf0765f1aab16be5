"""The import graph of the project's own packages, read from the syntax trees.

    python tools/import_graph.py [--json] [--verbose]

Counts, for ``moe/`` and ``parallel/``:
- import circles between modules (strongly connected components of the module graph,
  module-level and function-level imports together; a package's ``__init__`` is a module);
- import lines that cross from one package into the other, each way;
- imports of project modules written inside a function, split into the allowed kind
  (marked ``# deferred: <reason>`` on the import line: a heavy optional engine or a plug-in
  lookup) and the rest.

Exit status 0 always; ``tests/test_layers.py`` asserts the rule on the same numbers.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("moe", "parallel")
# Compiled extension modules: leaves of the graph (importing one runs no project Python).
EXTENSIONS = ("moe._C",)
DEFERRED_MARK = "# deferred:"

# The layers of the house, lowest first (CONTRIBUTING.md, "Layers"): a module may import its own
# layer or a lower one, never a higher one. A module belongs to the layer of its longest prefix here.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("parallel",),                                  # the floor: topology, primitives, engines
    ("moe",),                                       # the MoE library: configs, ops, routing, experts, MoELayer
    ("moe.data",),                                  # tokenizers and datasets
    ("moe.models",),                                # transformer, LM, LIMoE, their plans
    ("moe.tasks",),                                 # model + data + loss + eval
    ("moe.trainer",),                               # config, loop, engine choice, checkpoints
    ("moe.train",),                                 # the command line
)


@dataclass
class ImportEdge:
    src: str          # importing module, dotted
    dst: str          # imported project module, dotted
    line: int
    in_function: bool
    deferred: bool    # marked as an allowed deferred import


@dataclass
class Graph:
    modules: list[str]
    edges: list[ImportEdge] = field(default_factory=list)


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    """The absolute module named by a (possibly relative) ``from X import``."""
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(name: str, known: set[str]) -> list[str]:
    """The known module a dotted import resolves to (the longest known prefix)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        cand = ".".join(parts[:n])
        if cand in known:
            return [cand]
    return []


def _walk(tree: ast.AST):
    """Yield (import node, inside a function?)."""
    stack: list[tuple[ast.AST, bool]] = [(tree, False)]
    while stack:
        node, in_fn = stack.pop()
        for child in ast.iter_child_nodes(node):
            child_in_fn = in_fn or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_fn
            stack.append((child, child_in_fn))


def _type_checking_block(tree: ast.AST) -> set[int]:
    """Line numbers of imports under ``if TYPE_CHECKING:`` (never run: not edges)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                for sub in node.body:
                    for n in ast.walk(sub):
                        if isinstance(n, (ast.Import, ast.ImportFrom)):
                            lines.add(n.lineno)
    return lines


def build_graph(root: Path = ROOT) -> Graph:
    files = sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py"))
    names = {module_name(p, root): p for p in files}
    known = set(names)
    graph = Graph(modules=sorted(known))
    for mod, path in names.items():
        text = path.read_text()
        src_lines = text.splitlines()
        tree = ast.parse(text, filename=str(path))
        skip = _type_checking_block(tree)
        is_pkg = path.name == "__init__.py"
        for node, in_fn in _walk(tree):
            if node.lineno in skip:
                continue
            line_text = src_lines[node.lineno - 1]
            deferred = DEFERRED_MARK in line_text
            if isinstance(node, ast.Import):
                dsts = [t for a in node.names if a.name not in EXTENSIONS for t in _targets(a.name, known)]
            else:
                base = _resolve(mod, is_pkg, node)
                dsts = []
                for a in node.names:
                    sub = f"{base}.{a.name}" if base else a.name
                    if sub in EXTENSIONS:
                        continue
                    t = _targets(sub, known) if sub in known else _targets(base, known)
                    dsts.extend(t)
            for dst in dict.fromkeys(dsts):
                if dst != mod:
                    graph.edges.append(ImportEdge(mod, dst, node.lineno, in_fn, deferred))
    return graph


def circles(graph: Graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    adj: dict[str, set[str]] = {m: set() for m in graph.modules}
    for e in graph.edges:
        adj[e.src].add(e.dst)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = [0]

    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in adj[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in graph.modules:
        if m not in index:
            visit(m)
    return sorted(out)


def layer_of(mod: str) -> int:
    """Index in ``LAYERS`` of the longest prefix that names ``mod`` (or a package above it)."""
    best, best_len = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for pre in prefixes:
            if (mod == pre or mod.startswith(pre + ".")) and len(pre) > best_len:
                best, best_len = i, len(pre)
    return best


def _pkg(mod: str) -> str:
    return mod.split(".")[0]


def summary(graph: Graph) -> dict:
    cross: dict[str, list[str]] = {f"{a}->{b}": [] for a in PACKAGES for b in PACKAGES if a != b}
    fn_imports: list[str] = []
    deferred: list[str] = []
    upward: list[str] = []
    for e in graph.edges:
        where = f"{e.src}:{e.line} -> {e.dst}"
        # a package's __init__ is run by every import of a module below it: not an upward edge
        if layer_of(e.dst) > layer_of(e.src) and not e.src.startswith(e.dst + "."):
            upward.append(where)
        if _pkg(e.src) != _pkg(e.dst):
            cross[f"{_pkg(e.src)}->{_pkg(e.dst)}"].append(where)
        if e.in_function:
            (deferred if e.deferred else fn_imports).append(where)
    circ = circles(graph)
    return {
        "modules": len(graph.modules),
        "circles": circ,
        "modules_in_circles": sum(len(c) for c in circ),
        "cross_package": {k: len(v) for k, v in cross.items()},
        "cross_package_lines": cross,
        "upward_imports": upward,
        "function_level_project_imports": fn_imports,
        "deferred_imports": deferred,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the whole summary as JSON")
    ap.add_argument("--verbose", action="store_true", help="list every cross-package and function-level import")
    args = ap.parse_args(argv)
    s = summary(build_graph())
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    print(f"modules: {s['modules']}")
    print(f"import circles: {len(s['circles'])} ({s['modules_in_circles']} modules)")
    for c in s["circles"]:
        print("  " + " <-> ".join(c))
    for k, n in s["cross_package"].items():
        print(f"cross-package import lines {k}: {n}")
    print(f"imports into a higher layer: {len(s['upward_imports'])}")
    print(f"function-level project imports: {len(s['function_level_project_imports'])}"
          f" (+ {len(s['deferred_imports'])} marked '{DEFERRED_MARK}')")
    if args.verbose:
        for k, lines in s["cross_package_lines"].items():
            for w in lines:
                print(f"  [{k}] {w}")
        for w in s["upward_imports"]:
            print(f"  [upward] {w}")
        for w in s["function_level_project_imports"]:
            print(f"  [in function] {w}")
        for w in s["deferred_imports"]:
            print(f"  [deferred] {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
