"""Mutation testing of the decision code: mutmut over four areas, each against its own fast tests.

    pip install -e ".[dev,mutation]"
    nice -n 10 python scripts/mutation.py                 # every area, then the score table
    nice -n 10 python scripts/mutation.py aup usage       # some areas
    python scripts/mutation.py --report                   # the table of the last run, nothing re-run

Each area runs in its own scratch copy of the repository (``.mutation/<area>/``: ``lopa/``, the area's test files
and the files they import, a ``pyproject.toml`` holding only the ``[tool.mutmut]`` section), so a mutant is only
ever run against the area's tests, and among them mutmut runs only those that reach the mutated function. The
areas, their tests and the score are listed in docs/testing.md; this script prints the table that page quotes.
Not part of CI: it takes tens of minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRATCH = ROOT / ".mutation"
SUPPORT = ["tests/conftest.py", "tests/support/engine_utils.py"]  # imported by the test files


@dataclass(frozen=True)
class Area:
    files: tuple[str, ...]  # source files mutmut mutates (only_mutate)
    mutants: tuple[str, ...]  # mutant name patterns run and scored (mutmut's fnmatch), "" = all of ``files``
    tests: tuple[str, ...]  # the test files the area's mutants run against


AREAS = {
    "decoding": Area(
        ("lopa/decoding/*",),
        ("lopa.decoding.*",),
        ("tests/decoding/test_pinned_decoding.py",),
    ),
    "sequence": Area(
        ("lopa/engine/sequence.py",),
        ("lopa.engine.sequence.*",),
        ("tests/engine/test_pinned_sequence.py",),
    ),
    "aup": Area(
        ("lopa/metrics.py",),
        ("lopa.metrics.*",),
        ("tests/eval/test_pinned_aup.py",),
    ),
    "usage": Area(
        ("lopa/server/protocol.py", "lopa/server/output_cut.py"),
        (
            "lopa.server.protocol.x_usage_dict__mutmut_*",
            "lopa.server.protocol.x_sum_usage__mutmut_*",
            "lopa.server.output_cut.xǁOutputCutterǁ*",
        ),
        ("tests/server/test_pinned_usage.py",),
    ),
}

STATUS = {1: "killed", 3: "killed", 0: "survived", 36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout"}


def toml_list(values: tuple[str, ...] | list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def package_files(rels: tuple[str, ...]) -> list[str]:
    """``rels`` and the ``__init__.py`` of every folder above them up to ``tests/`` (the tests are a package)."""
    folders = {parent for rel in rels for parent in Path(rel).parents if parent.parts[:1] == ("tests",)}
    return [*sorted(str(folder / "__init__.py") for folder in folders), *rels]


def prepare(name: str, area: Area) -> Path:
    """A fresh scratch copy for ``area``: lopa/, its tests and a pyproject.toml with only mutmut's section."""
    work = SCRATCH / name
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(ROOT / "lopa", work / "lopa", ignore=shutil.ignore_patterns("__pycache__"))
    for rel in package_files((*SUPPORT, *area.tests)):
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, work / rel)
    (work / "pyproject.toml").write_text(
        "[tool.mutmut]\n"
        'source_paths = ["lopa"]\n'
        f"only_mutate = {toml_list(area.files)}\n"
        f"pytest_add_cli_args_test_selection = {toml_list(area.tests)}\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q"]\n'
        "timeout_constant = 5.0\n"  # CPU seconds on top of 15x the clean run: a kill is a failed test, not a stall
        "\n[tool.pytest.ini_options]\n"
        'testpaths = ["tests"]\n'
        'markers = ["gpu: needs CUDA", "slow: longer CPU tests"]\n'
    )
    return work


def run_area(name: str, area: Area, max_children: int) -> float:
    """Run mutmut on one area; returns the wall seconds it took."""
    work = prepare(name, area)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # import the mutated copy, not the tree
    # one torch thread: mutmut forks a child per mutant, and a child forked from a process whose OpenMP pool is
    # running can hang in its first parallel op (a stall that would be scored as a timeout, not a kill)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children), *area.mutants]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=work, env=env, check=False, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def results(name: str) -> dict[str, str]:
    """mutant name -> status (killed, survived, timeout, ...) from mutmut's .meta files of the area's last run."""
    area = AREAS[name]
    from fnmatch import fnmatch

    out = {}
    for meta in sorted((SCRATCH / name / "mutants").rglob("*.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        for mutant, code in codes.items():
            if any(fnmatch(mutant, p) for p in area.mutants):
                out[mutant] = STATUS.get(code, "not checked" if code is None else f"exit {code}")
    return out


def diff(name: str, mutant: str) -> list[str]:
    """The changed lines of one mutant (mutmut show), for the list of survivors."""
    shown = subprocess.run(
        [sys.executable, "-m", "mutmut", "show", mutant], cwd=SCRATCH / name, capture_output=True, text=True
    ).stdout
    return [line for line in shown.splitlines() if line[:2] in ("- ", "+ ")]


def report(names: list[str], show: bool = False) -> int:
    """Print per area killed / total and list every mutant not killed (with its diff if ``show``); returns how
    many were not killed."""
    survivors = 0
    print(f"{'area':10} {'killed':>7} {'total':>6} {'score':>7}")
    for name in names:
        res = results(name)
        killed = sum(s in ("killed", "timeout") for s in res.values())
        total = len(res)
        print(f"{name:10} {killed:7d} {total:6d} {100 * killed / max(total, 1):6.1f}%")
        for mutant, status in sorted(res.items()):
            if status not in ("killed", "timeout"):
                survivors += 1
                print(f"    {status:10} {mutant}")
                for line in diff(name, mutant) if show else []:
                    print(f"        {line}")
    return survivors


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("areas", nargs="*", choices=[[], *AREAS], help="areas to run (default: all)")
    p.add_argument("--report", action="store_true", help="only print the last run's table")
    p.add_argument("--show", action="store_true", help="print each surviving mutant's diff")
    p.add_argument("--max-children", type=int, default=os.cpu_count() or 1, help="mutants run at once")
    args = p.parse_args(argv)
    names = args.areas or list(AREAS)
    if not args.report:
        total = 0.0
        for name in names:
            seconds = run_area(name, AREAS[name], args.max_children)
            total += seconds
            print(f"{name}: {seconds:.0f} s", flush=True)
        print(f"all areas: {total:.0f} s wall")
    report(names, args.show)


if __name__ == "__main__":
    main()
