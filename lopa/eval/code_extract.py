"""Turn a code completion into a program: cut at stop strings, take the fenced block, sanitize.

Called by :mod:`lopa.eval.tasks.code` and the lm-eval adapter. ``sanitize`` follows the authors' post-processing
(EvalPlus style): find the longest syntactically valid span of lines, keep imports, classes, functions and simple
assignments (dropping top-level test code, prints and ``if __name__`` blocks), and, given an entry point, keep only
the definitions it can reach through names. Source text is kept as written (not re-emitted), so comments and
formatting survive. It also owns :func:`parse_python`, the one way lopa's evaluation parses Python text.
"""

from __future__ import annotations

import ast
import re
import threading
from collections.abc import Iterable

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
_MAX_LINES = 200  # the longest-valid-span search is quadratic in lines
_PARSE_LOCK = threading.Lock()


def parse_python(source: str) -> ast.Module:
    """``ast.parse``, one thread at a time.

    CPython 3.11 keeps the recursion depth of its C-to-Python AST conversion per interpreter, not per thread: two
    threads converting at once (a finalizer run by the garbage collector lets another thread in) fail with
    ``SystemError: AST constructor recursion depth mismatch``. The evaluation parses in the generating thread and in
    the sandbox's worker threads, so every parse goes through this lock. Raises what ``ast.parse`` raises.
    """
    with _PARSE_LOCK:
        return ast.parse(source)


def cut_at_stops(text: str, stops: Iterable[str]) -> str:
    """Text before the earliest stop string (the engine stops there too; this also covers raw outputs)."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The program inside a completion: the first fenced block defining ``entry_point`` (else the first fenced
    block, else the whole text); MBPP's ``[BEGIN]``/``[DONE]`` markers are removed."""
    text = text.replace("\r\n", "\n").replace("[BEGIN]", "")
    text = text.split("[DONE]")[0]
    blocks = [m.group(2) for m in _FENCE.finditer(text)]
    if not blocks:
        return text
    if entry_point:
        for block in blocks:
            if re.search(rf"def\s+{re.escape(entry_point)}\s*\(", block):
                return block
    return blocks[0]


def longest_valid_span(code: str) -> str:
    """The longest contiguous run of lines that parses (the whole text when it parses)."""
    lines = code.split("\n")[:_MAX_LINES]
    whole = "\n".join(lines)
    if _parses(whole):
        return whole
    best, best_len = "", 0
    for start in range(len(lines)):
        if len(lines) - start <= best_len:
            break  # no remaining start can give a longer span
        for end in range(len(lines), start + best_len, -1):  # longest first; the first that parses wins
            chunk = "\n".join(lines[start:end])
            if chunk.strip() and _parses(chunk):
                best, best_len = chunk, end - start
                break
    return best


def sanitize(code: str, entry_point: str | None = None, roots: Iterable[str] = ()) -> str:
    """Keep the definitions a test can use; drop top-level statements that would run on import.

    With ``entry_point``, only definitions reachable from it or from ``roots`` (e.g. the names the prompt
    defines, which HumanEval's tests call directly) are kept.
    """
    code = longest_valid_span(code.replace("\t", "    "))
    try:
        tree = parse_python(code)
    except SyntaxError:
        return ""
    lines = code.split("\n")
    imports, defs = [], {}  # defs: name -> (first line, last line, names it uses)
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(_segment(lines, node))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defs[node.name] = (node, _used_names(node))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name):
                    defs[t.id] = (node, _used_names(node))
    keep = set(defs) if not entry_point or entry_point not in defs else _reachable([entry_point, *roots], defs)
    kept_nodes = sorted({id(defs[n][0]): defs[n][0] for n in keep}.values(), key=lambda n: n.lineno)
    parts = imports + [_segment(lines, n) for n in kept_nodes]
    return "\n".join(parts) + "\n" if parts else ""


def _reachable(start: list[str], defs: dict[str, tuple[ast.AST, set[str]]]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        name = todo.pop()
        if name in seen or name not in defs:
            continue
        seen.add(name)
        todo.extend(defs[name][1] - seen)
    return seen


def _used_names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _segment(lines: list[str], node: ast.stmt) -> str:
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return "\n".join(lines[first - 1 : node.end_lineno])


def _parses(code: str) -> bool:
    try:
        parse_python(code)
    except (SyntaxError, ValueError):
        return False
    return True
