"""``lopa bench``: the decoders side by side on held-out problems of the bundled task.

The default run answers "what does LoPA buy here" in a few minutes (:data:`QUICK`, 400 problems): threshold
τ = 0.9, the no-search control ``threshold+1``, d2f, and LoPA over threshold at k = 2, 4, 8, with the AUP of each
family (:data:`QUICK_FAMILIES`). ``--full`` is the complete sweep (:data:`FULL`, 28 rows, 600 problems: every τ of
threshold and d2f, LoPA over both bases at k = 1, 2, 4, 8, both branch scores) with :data:`FAMILIES`.

Prints one table (decoder, settings, exact-answer accuracy with its binomial standard error, well-formedness, TPF,
forwards/sample, aggregate tok/s, mean latency, agreement of final answers with threshold τ=0.9), then the AUP of
each decoder family over its sweep (τ for threshold and d2f, k for lopa, k = 0 being the base decoder itself), then
one JSON line with the same numbers plus device, dtype and versions. ``--plot`` draws accuracy vs TPF, one curve
per family. The problems are the test split's fixed set, so every run and every decoder sees the same ones
(``--problem-seed S``: a fresh test set drawn from seed S, disjoint from the fixed set's first 600). Each
decoder's prompts go to ``LLM.generate`` together, which batches them. On CPU the decoders are spread over
``--workers`` processes (default: one per core, one torch thread each): the tiny model's forwards are too small for
intra-op threads to pay, while separate processes scale with the cores. The progress bar advances by each finished
row's estimated cost, so its ETA counts LoPA's rows as the slow ones.

This module is the run (the printed header and JSON line); its flags are :mod:`lopa.commands.bench`. The rows and
families it knows are :mod:`lopa.tiny.bench_sweep`; measuring a row, the AUP of a family and the tables are
:mod:`lopa.tiny.bench_rows`; spreading the rows over processes is :mod:`lopa.tiny.bench_workers`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lopa.parallel.launch import BranchParallelGroup
from lopa.parallel.process_group import resolve_timeout
from lopa.tiny.bench_rows import family_aup, format_aup, format_table, measure, set_agreement
from lopa.tiny.bench_sweep import FAMILIES, FULL, FULL_N, QUICK, QUICK_FAMILIES, QUICK_N, variants
from lopa.tiny.bench_workers import run_workers, worker_count


def selection(args: Any) -> tuple[list[str], dict[str, list[str]], int, int]:
    """(decoder rows, families, problems, fewest points a family's AUP needs) for the parsed flags."""
    from lopa.errors import ConfigError

    if args.full and args.decoders:
        raise ConfigError("--full runs every decoder; leave out --decoders (or --full)")
    quick = not (args.decoders or args.full)
    n = (QUICK_N if quick else FULL_N) if args.n is None else args.n  # 0 is a value (refused later), not "unset"
    if quick:
        return list(QUICK), QUICK_FAMILIES, n, 1
    return list(args.decoders or FULL), FAMILIES, n, 2


def run(args: Any, load_llm: Callable[[], Any], local_model: Callable[[], str | None]) -> int:
    """The bench of the parsed ``lopa bench`` flags (``commands/bench.py``); ``load_llm`` loads the model they
    name, ``local_model`` gives it as a local directory (for the ranks of --bp / --tp)."""
    from lopa.errors import ConfigError
    from lopa.tiny.task import fixed_set, fresh_set

    names, families_of, args.n, min_points = selection(args)
    if args.n < 1:
        raise ConfigError(f"--n must be >= 1 (problems per decoder), got {args.n}")
    torch.set_num_threads(max(1, args.threads))
    llm = load_llm()
    gen = llm.checkpoint.generation_config
    block = args.block_size or int(gen.get("block_size", 32))
    max_new = args.max_new_tokens or int(gen.get("max_new_tokens", 2 * block))
    table = variants(block, max_new)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ConfigError(f"unknown bench decoder(s) {unknown}; choose from {list(table)}")
    problems = fixed_set("test", args.n) if args.problem_seed is None else fresh_set("test", args.n, args.problem_seed)
    prompts = [p.prompt for p in problems]
    t_start = time.perf_counter()
    workers = worker_count(args, llm.device, len(names))
    if workers > 1:
        rows = run_workers(args, names, table, block, max_new, workers)
        set_agreement(rows)
    else:
        with contextlib.ExitStack() as stack:
            if args.bp or args.tp != 1:
                group = BranchParallelGroup(
                    max(args.bp, 1),
                    local_model(),
                    tp=args.tp,
                    lora=args.lora,
                    device=args.device,
                    dtype=args.dtype,
                    timeout_s=resolve_timeout(args.dist_timeout),
                    port=args.dist_port,
                )
                generate = stack.enter_context(group).generate
            else:
                generate = functools.partial(llm.generate, progress=not (args.json_only or args.emit_answers))
            rows = measure(generate, names, table, problems, prompts, args)
        if not args.emit_answers:
            set_agreement(rows)
    order = {n: i for i, n in enumerate(names)}
    rows.sort(key=lambda r: order[r.name])
    dtype = str(next(llm.model.parameters()).dtype).replace("torch.", "")
    header = {
        "model": llm.model_name,
        "n": len(problems),
        "problem_seed": args.problem_seed,  # None: the test split's fixed set
        "device": str(llm.device),
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "workers": workers,  # processes the decoders were spread over, each with `threads` torch threads
        "block_size": block,
        "max_new_tokens": max_new,
        "bp": args.bp,  # branch-parallel ranks (0: one process)
        "tp": args.tp,  # tensor-parallel ranks per branch group
    }
    families = family_aup(rows, families_of, min_points)
    if not args.json_only:
        print(format_table(rows, header))
        print(format_aup(families))
        print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.plot:
        from lopa.tiny.plots import plot_bench

        plot_bench(rows, families, Path(args.plot))
        if not args.json_only:
            print(f"plot written to {args.plot}")
    versions = {"lopa": _version(), "torch": torch.__version__, "python": platform.python_version()}
    print(
        json.dumps(
            {
                "bench": "tiny",
                **header,
                "versions": versions,
                "rows": [r.as_dict(answers=args.emit_answers) for r in rows],
                "aup": families,
            }
        )
    )
    return 0


def _version() -> str:
    from lopa import __version__

    return __version__
