"""``lopa bench``: the decoders side by side on held-out problems of the bundled task.

The default run answers "what does LoPA buy here" in a few minutes (:data:`QUICK`, 400 problems): threshold
τ = 0.9, the no-search control ``threshold+1``, d2f, and LoPA over threshold at k = 2, 4, 8, with the AUP of each
family (:data:`QUICK_FAMILIES`). ``--full`` is the complete sweep (:data:`FULL`, 28 rows, 600 problems: every τ of
threshold and d2f, LoPA over both bases at k = 1, 2, 4, 8, both branch scores) with :data:`FAMILIES`.

Prints one table (decoder, settings, exact-answer accuracy with its binomial standard error, well-formedness, TPF,
forwards/sample, aggregate tok/s, mean latency, agreement of final answers with threshold τ=0.9), then the AUP of
each decoder family over its sweep (τ for threshold and d2f, k for lopa, k = 0 being the base decoder itself), then
one JSON line with the same numbers plus device, dtype and versions. ``--plot`` draws accuracy vs TPF, one curve
per family. The problems are the test split's fixed set, so every run and every decoder sees the same ones. Each
decoder's prompts go to ``LLM.generate`` together, which batches them. On CPU the decoders are spread over
``--workers`` processes (default: one per core, one torch thread each): the tiny model's forwards are too small for
intra-op threads to pay, while separate processes scale with the cores. The progress bar advances by each finished
row's estimated cost, so its ETA counts LoPA's rows as the slow ones.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lopa.config import DecodeConfig
from lopa.eval.aup import aup
from lopa.parallel.launch import BranchParallelGroup
from lopa.parallel.process_group import resolve_timeout

BRANCHES = (1, 2, 4, 8)
THRESHOLDS = (0.95, 0.9, 0.8, 0.7, 0.5)  # the τ sweep of threshold and d2f (0.9 is the reference)


@dataclass
class Row:
    name: str
    settings: str
    accuracy: float
    wellformed: float
    tpf: float
    tpf_paper: float
    forwards: float
    tok_s: float
    latency: float
    agreement: float | None  # None when threshold was not run
    branches: int
    base: str
    score: str
    threshold: float
    answers: list[int | None] | None = None  # final answers, for the agreement column (kept out of the JSON)
    accuracy_se: float = 0.0  # binomial standard error of accuracy: sqrt(acc (1 - acc) / n)

    def as_dict(self, answers: bool = False) -> dict:
        d = self.__dict__.copy()
        if not answers:
            d.pop("answers")
        return d


def _tau_name(decoder: str, tau: float) -> str:
    return decoder if tau == 0.9 else f"{decoder}@{tau}"


def variants(block_size: int, max_new_tokens: int) -> dict[str, DecodeConfig]:
    """Name → DecodeConfig of every decoder the bench knows, in table order."""
    common = DecodeConfig(block_size=block_size, max_new_tokens=max_new_tokens, threshold=0.9)
    out = {"vanilla": common.replace(decoder="vanilla")}
    for tau in THRESHOLDS:
        out[_tau_name("threshold", tau)] = common.replace(decoder="threshold", threshold=tau)
    out["threshold+1"] = common.replace(decoder="threshold", extra_fill=1)
    for tau in THRESHOLDS:
        out[_tau_name("d2f", tau)] = common.replace(decoder="d2f", threshold=tau)
    for base in ("threshold", "d2f"):
        for score in ("mean", "shared"):
            for k in BRANCHES:
                suffix = "" if score == "mean" else "-shared"
                out[f"lopa-{base}-k{k}{suffix}"] = common.replace(
                    decoder="lopa", base=base, branches=k, branch_score=score
                )
    return out


FULL = list(variants(32, 64))  # --full: every decoder row
QUICK = ["threshold", "threshold+1", "d2f", "lopa-threshold-k2", "lopa-threshold-k4", "lopa-threshold-k8"]
QUICK_N, FULL_N = 400, 600  # problems per decoder; at 400 the standard error of an accuracy is at most 2.5 points

# the default run's families: a single point's AUP is ρ₁·y₁ (docs/algorithm.md §5)
QUICK_FAMILIES: dict[str, list[str]] = {
    "threshold (τ = 0.9)": ["threshold"],
    "threshold+1 (no search)": ["threshold+1"],
    "d2f (τ = 0.9)": ["d2f"],
    "lopa over threshold (k sweep)": ["threshold", "lopa-threshold-k2", "lopa-threshold-k4", "lopa-threshold-k8"],
}

# family → the rows of its sweep (lopa families start at k = 0: the base decoder at τ = 0.9)
FAMILIES: dict[str, list[str]] = {
    "threshold (τ sweep)": [_tau_name("threshold", t) for t in THRESHOLDS],
    "d2f (τ sweep)": [_tau_name("d2f", t) for t in THRESHOLDS],
    "lopa over threshold (k sweep)": ["threshold"] + [f"lopa-threshold-k{k}" for k in BRANCHES],
    "lopa over d2f (k sweep)": ["d2f"] + [f"lopa-d2f-k{k}" for k in BRANCHES],
    "lopa over threshold, shared score": ["threshold"] + [f"lopa-threshold-k{k}-shared" for k in BRANCHES],
    "lopa over d2f, shared score": ["d2f"] + [f"lopa-d2f-k{k}-shared" for k in BRANCHES],
}


def settings_of(cfg: DecodeConfig) -> str:
    extra = " +1" if cfg.extra_fill else ""
    shared = " score=shared" if cfg.decoder == "lopa" and cfg.branch_score == "shared" else ""
    return cfg.describe() + extra + shared


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
    from lopa.tiny.task import fixed_set

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
    problems = fixed_set("test", args.n)
    prompts = [p.prompt for p in problems]
    t_start = time.perf_counter()
    workers = _worker_count(args, llm.device, len(names))
    if workers > 1:
        rows = _run_workers(args, names, table, block, max_new, workers)
        _set_agreement(rows)
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
            rows = _measure(generate, names, table, problems, prompts, args)
        if not args.emit_answers:
            _set_agreement(rows)
    order = {n: i for i, n in enumerate(names)}
    rows.sort(key=lambda r: order[r.name])
    dtype = str(next(llm.model.parameters()).dtype).replace("torch.", "")
    header = {
        "model": llm.model_name,
        "n": len(problems),
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


def _measure(generate, names: list[str], table: dict[str, DecodeConfig], problems, prompts, args) -> list[Row]:
    """Run every named decoder on the prompts; each row keeps its final answers for the agreement column."""
    from lopa.tiny.grammar import parse
    from lopa.tiny.task import extract_answer

    rows: list[Row] = []
    for name in names:
        cfg = table[name]
        t0 = time.perf_counter()
        outs = generate(prompts, cfg, raw=True)
        wall = time.perf_counter() - t0
        answers = [extract_answer(o.text) for o in outs]
        tokens = sum(o.stats.tokens for o in outs)
        forwards = sum(o.stats.forwards for o in outs)
        n = len(outs)
        rows.append(
            Row(
                name=name,
                settings=settings_of(cfg),
                accuracy=(acc := sum(a == p.answer for a, p in zip(answers, problems, strict=True)) / n),
                accuracy_se=math.sqrt(acc * (1 - acc) / n),
                wellformed=sum(parse(o.text) for o in outs) / n,
                tpf=tokens / forwards,
                tpf_paper=sum(o.stats.tpf_paper for o in outs) / n,
                forwards=forwards / n,
                tok_s=tokens / wall if wall > 0 else 0.0,
                latency=sum(o.stats.seconds for o in outs) / n,
                agreement=None,
                branches=cfg.num_branches,
                base=cfg.base_decoder,
                score=cfg.branch_score if cfg.decoder == "lopa" else "",
                threshold=cfg.threshold,
                answers=answers,
            )
        )
        if not args.json_only or args.emit_answers:
            print(f"  {name}: {wall:.1f}s", file=sys.stderr, flush=True)
    return rows


def _set_agreement(rows: list[Row]) -> None:
    """Agreement of each row's final answers with threshold τ=0.9's (None when threshold was not run)."""
    reference = next((r.answers for r in rows if r.name == "threshold"), None)
    for r in rows:
        if reference is not None and r.answers is not None:
            r.agreement = sum(a == b for a, b in zip(r.answers, reference, strict=True)) / len(reference)


def _cost(name: str, cfg: DecodeConfig) -> float:
    """Rough relative cost of a decoder's run: forwards per answer x rows per forward (for splitting the work)."""
    if cfg.decoder == "vanilla":
        tpf = 1.0
    elif cfg.decoder == "lopa":
        tpf = 1.3 + 0.3 * cfg.num_branches
    else:
        tpf = 2.4 if cfg.extra_fill else 1.3
    return cfg.max_new_tokens / tpf * (cfg.num_branches + 1)  # k lookahead rows + the anchor (k = 0 without lopa)


def _worker_count(args: Any, device: torch.device, n_decoders: int) -> int:
    if args.emit_answers or args.bp or args.tp != 1:
        return 1
    if args.workers:
        return max(1, min(args.workers, n_decoders))
    if device.type != "cpu":
        return 1
    return max(1, min(len(os.sched_getaffinity(0)), n_decoders))


def _run_workers(
    args: Any, names: list[str], table: dict[str, DecodeConfig], block: int, max_new: int, workers: int
) -> list[Row]:
    """Spread the decoders over ``workers`` processes (longest first onto the least loaded); merge their rows."""
    from lopa.errors import LopaError

    groups: list[list[str]] = [[] for _ in range(workers)]
    load = [0.0] * workers
    for name in sorted(names, key=lambda n: -_cost(n, table[n])):
        i = load.index(min(load))
        groups[i].append(name)
        load[i] += _cost(name, table[name])
    base = [sys.executable, "-m", "lopa", "bench", "--n", str(args.n), "--json-only", "--emit-answers"]
    base += ["--threads", str(max(1, args.threads)), "--block-size", str(block), "--max-new-tokens", str(max_new)]
    for flag in ("model", "revision", "lora", "device", "dtype", "max_num_seqs", "max_model_len"):
        value = getattr(args, flag, None)
        if value is not None:
            base += [f"--{flag.replace('_', '-')}", str(value)]
    if args.enforce_eager:
        base.append("--enforce-eager")
    procs = [
        subprocess.Popen([*base, "--decoders", *group], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for group in groups
        if group
    ]
    # the bar advances by each finished row's estimated cost, so its ETA weighs LoPA's rows as the slow ones
    bar = tqdm(
        total=round(sum(_cost(n, table[n]) for n in names)),
        desc=f"bench: {len(names)} decoders, {len(procs)} workers",
        bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]",
        disable=args.json_only,
    )
    lock = threading.Lock()

    def relay(stream) -> None:  # a worker's "  name: 12.3s" lines advance the bar; anything else is passed on
        for line in stream:
            done = re.fullmatch(r"  (\S+): [0-9.]+s", line.rstrip("\n"))
            with lock:
                if done and done.group(1) in table:
                    bar.update(round(_cost(done.group(1), table[done.group(1)])))
                    bar.set_postfix_str(done.group(1))
                else:
                    bar.write(line.rstrip("\n"), file=sys.stderr)

    relays = [threading.Thread(target=relay, args=(proc.stderr,), daemon=True) for proc in procs]
    for t in relays:
        t.start()
    rows: list[Row] = []
    try:
        for proc in procs:
            out = proc.stdout.read()  # stderr belongs to the relay thread
            if proc.wait() != 0:
                raise LopaError(f"a bench worker process failed (exit {proc.returncode}); see its error above")
            record = json.loads(out.strip().splitlines()[-1])
            rows += [Row(**r) for r in record["rows"]]
    finally:  # a failure or Ctrl-C leaves no worker behind
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for t in relays:
            t.join(timeout=5)
        bar.close()
    return rows


def family_aup(rows: list[Row], families: dict[str, list[str]] | None = None, min_points: int = 2) -> dict[str, dict]:
    """AUP of every family (default :data:`FAMILIES`) with at least ``min_points`` measured points (accuracy in %).

    The default run's families (``min_points`` 1) are measured whole; a partial sweep (``--decoders``) reports a
    family only from two points on, so one stray row is not reported as a family."""
    by_name = {r.name: r for r in rows}
    if not rows:
        return {}
    y_max = 100 * max(r.accuracy for r in rows)
    out: dict[str, dict] = {}
    for family, members in (FAMILIES if families is None else families).items():
        pts = [(by_name[m].tpf, 100 * by_name[m].accuracy) for m in members if m in by_name]
        if len(pts) < max(1, min_points) or (min_points < 2 and len(pts) < len(members)):
            continue
        result = aup(pts, y_max)
        out[family] = {
            "aup": round(result.value, 2),
            "points": [[round(t, 3), round(a, 2)] for t, a in result.points],
            "members": [m for m in members if m in by_name],
        }
    return out


def format_table(rows: list[Row], header: dict) -> str:
    head = " ".join(f"{k}={v}" for k, v in header.items())
    cols = ("decoder", "settings", "acc", "±", "well-formed", "tpf", "fwd/sample", "tok/s", "latency", "agree")
    lines = [f"lopa bench: {head}", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        agree = "-" if r.agreement is None else f"{100 * r.agreement:.0f}%"
        lines.append(
            f"| {r.name} | {r.settings} | {100 * r.accuracy:.1f}% | {100 * r.accuracy_se:.1f} | "
            f"{100 * r.wellformed:.1f}% | {r.tpf:.2f} | "
            f"{r.forwards:.1f} | {r.tok_s:.0f} | {1000 * r.latency:.0f} ms | {agree} |"
        )
    return "\n".join(lines)


def format_aup(families: dict[str, dict]) -> str:
    lines = ["| family | AUP | points (tpf, accuracy %) |", "|---|---|---|"]
    for family, f in families.items():
        pts = " ".join(f"({t:.2f}, {a:.1f})" for t, a in f["points"])
        lines.append(f"| {family} | {f['aup']:.1f} | {pts} |")
    return "\n".join(lines)


def _version() -> str:
    from lopa import __version__

    return __version__
