"""Measure lopa's import graph: circles, upward imports, modules at the package root, files over 300 lines.

Usage: ``python scripts/import_graph.py [--verbose]`` (reads ``lopa/`` under the current directory).

Definitions (as in docs/architecture-review.md, "How this was measured"):
- Every ``import`` / ``from`` of a ``lopa`` module found by ``ast`` is an edge. One inside a function is *lazy*;
  one under ``if TYPE_CHECKING`` is *typing*.
- **Circles** are the strongly connected components (size > 1) of the module graph over every edge (a typing
  edge cannot run, but it still ties the two modules' designs together). A package's ``__init__`` counts as the package.
- **Rooms**: each folder directly under ``lopa/`` is one room, each root module another. A room's **floor** is
  1 + the highest floor it imports over top-level edges (rooms in one top-level circle share a floor).
- **Upward**: an edge of any kind (top-level, lazy or typing) from a room to a room on a higher floor, or between
  two rooms that share a top-level circle.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path("lopa")


def module_name(path: Path) -> str:
    parts = list(path.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, modules: set[str]) -> list[tuple[str, str]]:
    """(target module, kind) for every import of a lopa module in ``path``; kind: top, lazy or typing."""
    tree = ast.parse(path.read_text())
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: list[tuple[str, str]] = []

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST, kind: str) -> None:
        for child in ast.iter_child_nodes(node):
            child_kind = kind
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and kind == "top":
                child_kind = "lazy"
            if isinstance(child, ast.If) and _is_type_checking(child):
                child_kind = "typing"
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("lopa") and (t := resolve(alias.name)):
                        found.append((t, kind))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if not base.startswith("lopa"):
                    continue
                for alias in child.names:
                    t = resolve(f"{base}.{alias.name}") or resolve(base)
                    if t:
                        found.append((t, kind))
            visit(child, child_kind)

    visit(tree, "top")
    return [(t, k) for t, k in found if t != me]


def strongly_connected(nodes: list[str], edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; returns the components with more than one node."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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

    for v in nodes:
        if v not in index:
            visit(v)
    return out


def room_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    if (ROOT / parts[1]).is_dir():
        return parts[1] + "/"
    return parts[1]


def main() -> int:
    verbose = "--verbose" in sys.argv
    files = sorted(ROOT.rglob("*.py"))
    modules = {module_name(p) for p in files}
    edges: list[tuple[str, str, str]] = []
    for p in files:
        edges += [(module_name(p), t, k) for t, k in imports_of(p, modules)]

    graph: dict[str, set[str]] = defaultdict(set)
    for a, b, _ in edges:
        graph[a].add(b)
    circles = strongly_connected(sorted(modules), graph)

    rooms = sorted({room_of(m) for m in modules})
    top_rooms: dict[str, set[str]] = defaultdict(set)
    for a, b, k in edges:
        ra, rb = room_of(a), room_of(b)
        if k == "top" and ra != rb:
            top_rooms[ra].add(rb)
    room_circles = strongly_connected(rooms, top_rooms)
    group = {r: r for r in rooms}
    for comp in room_circles:
        for r in comp:
            group[r] = comp[0]
    floor: dict[str, int] = {}

    def floor_of(r: str, seen: frozenset[str] = frozenset()) -> int:
        g = group[r]
        if g in floor:
            return floor[g]
        below = [
            floor_of(t, seen | {g})
            for m in rooms
            if group[m] == g
            for t in top_rooms[m]
            if group[t] != g and group[t] not in seen
        ]
        floor[g] = 1 + max(below, default=0)
        return floor[g]

    kinds: dict[tuple[str, str], set[str]] = defaultdict(set)
    for a, b, k in edges:
        kinds[(a, b)].add(k)
    upward = sorted(
        {
            (a, b, "+".join(sorted(kinds[(a, b)])))
            for a, b, _ in edges
            if room_of(a) != room_of(b)
            and (
                floor_of(room_of(a)) < floor_of(room_of(b))
                or (group[room_of(a)] == group[room_of(b)] and room_of(a) != room_of(b))
            )
        }
    )
    root_modules = sorted(p.name for p in ROOT.glob("*.py"))
    big = sorted((sum(1 for _ in p.open()), str(p)) for p in files if sum(1 for _ in p.open()) > 300)
    room_arrows = {(room_of(a), room_of(b)) for a, b, _ in edges if room_of(a) != room_of(b)}

    print(f"modules: {len(modules)}  rooms: {len(rooms)}  room arrows: {len(room_arrows)}")
    print(f"circles: {len(circles)}")
    for c in circles:
        print("  " + " <-> ".join(c))
    print(f"upward imports: {len(upward)}")
    for a, b, k in upward:
        print(f"  {a} (floor {floor_of(room_of(a))}) -> {b} (floor {floor_of(room_of(b))}) [{k}]")
    print(f"root modules: {len(root_modules)}  ({', '.join(root_modules)})")
    print(f"files over 300 lines: {len(big)}")
    for n, p in big:
        print(f"  {p} {n}")
    if verbose:
        for r in sorted(rooms, key=lambda r: (floor_of(r), r)):
            print(f"  floor {floor_of(r):2d}  {r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
