"""What one sandboxed sample is and what its outcome means: :class:`SandboxLimits`, :class:`Program` (the model's
solution, the task's tests and entry points), :class:`SandboxResult`, the standard-library names the tests read
without importing them, and :func:`classify` (the tests process's exit status → pass / fail / timeout / error).

Owned by :mod:`lopa.eval.sandbox`; the exit codes are the ones :mod:`lopa.eval.sandbox.boot` and
:mod:`lopa.eval.sandbox.split` exit with.
"""

from __future__ import annotations

import ast
import builtins
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from lopa.errors import ConfigError
from lopa.eval.code_extract import parse_python

Status = Literal["pass", "fail", "timeout", "error"]
EXIT_DETAIL = {3: "assertion failed", 4: "exception", 5: "memory limit exceeded", 6: "exit() called"}
TAIL_CHARS = 2000  # characters of stderr kept as the detail of a failure
_NOT_MODULES = {"this", "antigravity"}  # standard-library modules that act when imported


@dataclass(frozen=True)
class SandboxLimits:
    """Per-sample limits. ``timeout_s`` is wall time; the CPU limit is the same number, rounded up.

    ``memory_mb`` bounds each process's address space and, where a cgroup is available, the memory of all the
    sample's processes together; ``max_processes`` bounds each process's user id (root: a fresh id per process)
    and, with a cgroup, the sample's processes and threads together (plus the few the sandbox's setup needs).
    """

    timeout_s: float = 10.0
    memory_mb: int = 2048
    max_processes: int = 16
    max_file_mb: int = 64
    max_open_files: int = 128

    def validate(self) -> SandboxLimits:
        if not self.timeout_s > 0:
            raise ConfigError(f"sandbox timeout must be > 0 seconds, got {self.timeout_s!r}")
        if self.memory_mb < 64:
            raise ConfigError(f"sandbox memory limit must be >= 64 MB (Python needs it to start), got {self.memory_mb}")
        return self


@dataclass(frozen=True)
class Program:
    """One sample: the model's code and the task's tests, which run in two processes.

    ``solution`` is untrusted and runs alone in its process. ``tests`` (and ``context``, task code run before them,
    such as a HumanEval prompt's helper functions) run in the other, in a namespace that holds builtins, the
    standard-library modules they use, and one proxy per name in ``entry_points``: the only names of the solution
    the tests can reach.
    """

    solution: str
    tests: str
    entry_points: tuple[str, ...] = ()
    context: str = ""

    def __post_init__(self) -> None:
        bad = [n for n in self.entry_points if not (isinstance(n, str) and n.isidentifier())]
        if bad:
            raise ValueError(f"entry points must be Python identifiers, got {bad!r}")


@dataclass(frozen=True)
class SandboxResult:
    status: Status
    detail: str
    seconds: float
    uid: int | None = None  # the user id the solution ran as (None: the harness's own)

    @property
    def passed(self) -> bool:
        return self.status == "pass"


def stdlib_names_used(*sources: str, exclude: Sequence[str] = ()) -> list[str]:
    """Standard-library module names that ``sources`` read without binding them (``math`` in ``math.pi``)."""
    loaded: set[str] = set()
    bound: set[str] = set(exclude) | set(dir(builtins))
    for source in sources:
        try:
            tree = parse_python(source)
        except SyntaxError:
            continue  # the tests process reports it
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                bound.add(node.name)
            elif isinstance(node, ast.alias):
                bound.add((node.asname or node.name).split(".")[0])
            elif isinstance(node, ast.arg):
                bound.add(node.arg)
    return sorted(n for n in loaded - bound if n in sys.stdlib_module_names and n not in _NOT_MODULES)


def classify(rc: int, timed_out: bool, oom: bool, stderr: str, seconds: float, uid: int | None) -> SandboxResult:
    detail = stderr[-TAIL_CHARS:].strip()
    if rc == 0 and not timed_out:
        return SandboxResult("pass", "", seconds, uid)
    if oom:
        reason = "memory limit exceeded (the sample's processes together)"
        return SandboxResult("error", f"{reason}: {detail}" if detail else reason, seconds, uid)
    if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL):
        return SandboxResult("timeout", detail or "time limit exceeded", seconds, uid)
    if rc == 3:
        return SandboxResult("fail", detail, seconds, uid)
    if rc == -signal.SIGXFSZ:
        detail = "output file size limit exceeded"
    reason = EXIT_DETAIL.get(rc, f"exit status {rc}")
    return SandboxResult("error", f"{reason}: {detail}" if detail else reason, seconds, uid)
