"""``lopa generate``: decode prompts and print the text plus a one-line stats summary (or JSON lines).

``--trace-plot out.png`` / ``--trace-gif out.gif`` turn the trace on and save each prompt's filling-order map
(``server/trace_plot.py``); with several prompts the files are numbered: ``out-1.png``, ``out-2.png``, ...

Every prompt is checked (encoding, mask token, context length) before any is decoded; each result is printed as
soon as its prompt finishes. ``--trace`` prints the per-iteration trace: inside the JSON object with ``--json``,
as readable lines on stderr otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import BinaryIO

from lopa.checkpoint.tokenizer import check_text
from lopa.commands.flags import (
    add_decode_arguments,
    add_dist_arguments,
    add_model_arguments,
    add_threads_argument,
    add_tp_argument,
    apply_threads,
    check_branch_parallel_batch,
    decode_config_from_args,
    engine_config_from_args,
    load_llm,
    local_model_arg,
)
from lopa.config import DecodeConfig, EngineConfig
from lopa.engine.output import Completion
from lopa.engine.protocol import Engine
from lopa.errors import ConfigError, DistributedError, InvalidTextError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="*", help="prompt text(s); read one per line from stdin when none are given")
    add_model_arguments(p)
    add_threads_argument(p)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template to the prompts")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of text")
    p.add_argument("--branch-parallel", action="store_true", help="run as one rank of a torchrun launch")
    p.add_argument("--bp", type=int, default=0, metavar="N", help="launch N branch-parallel ranks on this machine")
    add_tp_argument(p)
    p.add_argument(
        "--trace-plot", default=None, metavar="PNG", help="save the filling-order map (positions x forwards)"
    )
    p.add_argument(
        "--trace-gif", default=None, metavar="GIF", help="save the filling-order map animated, one frame per forward"
    )
    add_dist_arguments(p)
    add_decode_arguments(p)


def summary(stats: dict, cfg_line: str) -> str:
    return (
        f"[{cfg_line}] tokens={stats['tokens']} forwards={stats['forwards']} tpf={stats['tpf']:.2f} "
        f"tpf_paper={stats['tpf_paper']:.2f} {stats['tokens_per_second']:.1f} tok/s latency={stats['seconds']:.2f}s"
    )


def read_prompt_lines(stream: BinaryIO) -> list[str]:
    """The non-blank lines of ``stream`` as prompts; InvalidTextError names the first line that is not UTF-8."""
    prompts = []
    for number, raw in enumerate(stream, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidTextError(
                f"line {number} of the standard input is not UTF-8: byte 0x{raw[e.start]:02X} at byte {e.start} "
                f"does not decode; convert the input to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
            ) from None
        line = line.rstrip("\r\n")
        if line.strip():
            prompts.append(line)
    return prompts


def run(args: argparse.Namespace) -> int:
    cfg = decode_config_from_args(args)
    worker_rank = args.branch_parallel and os.environ.get("RANK", "0") != "0"  # gets its prompts from rank 0
    prompts = args.prompts or ([] if worker_rank else read_prompt_lines(sys.stdin.buffer))
    for i, prompt in enumerate(args.prompts):
        check_text(prompt, f"prompt {i + 1} on the command line")
    if not prompts and not worker_rank:
        print("lopa generate: no prompt given", file=sys.stderr)
        return 2
    apply_threads(args)
    pictures = [(kind, path) for kind, path in (("plot", args.trace_plot), ("gif", args.trace_gif)) if path]
    if args.bp or args.branch_parallel or args.tp != 1:
        if pictures:
            raise ConfigError("--trace-plot / --trace-gif are not available with --bp / --tp / --branch-parallel")
        check_branch_parallel_batch(args)
        return run_generate(args, cfg, prompts)
    if pictures:
        cfg = cfg.replace(trace=True)
        _check_plotting()
    llm = load_llm(args)
    # every prompt is checked before the first one is decoded; the prompts decode together, and each result
    # is printed, in input order, as soon as it and every one before it have finished
    ready: dict[int, Completion] = {}
    shown = 0
    for index, completion in llm.generate_each(prompts, cfg, raw=args.raw):
        ready[index] = completion
        while shown in ready:
            done = ready.pop(shown)
            emit(done, cfg, args.json, llm)
            for kind, path in pictures:
                save_pictures(kind, numbered(path, shown, len(prompts)), done, cfg, llm)
            shown += 1
    return 0


def _check_plotting() -> None:
    try:
        import matplotlib  # noqa: F401

        import lopa.server.trace_plot  # noqa: F401  (numpy and matplotlib)
    except ImportError as e:
        raise ConfigError("--trace-plot / --trace-gif need matplotlib: pip install 'lopa[plot]'") from e


def numbered(path: str, index: int, count: int) -> Path:
    """``path`` itself for one prompt; ``stem-<index+1>.suffix`` for several."""
    p = Path(path)
    return p if count == 1 else p.with_name(f"{p.stem}-{index + 1}{p.suffix}")


def save_pictures(kind: str, path: Path, completion, cfg, llm) -> None:
    from lopa.server.trace_plot import save_trace_gif, save_trace_plot

    save = save_trace_plot if kind == "plot" else save_trace_gif
    out = save(completion, cfg, path, llm.end_ids, cfg.describe(), lambda t: llm.tokenizer.decode([t]))
    print(f"wrote {out}", file=sys.stderr, flush=True)


def format_trace(trace) -> str:
    """One readable line per iteration: candidates with their scores, the winner, what it filled."""
    lines = []
    for step in trace:
        cands = []
        for i, c in enumerate(step.candidates):
            at = c.get("extra_position")
            kind = f"{c['kind']}@{at}" if isinstance(at, int) and at >= 0 else c["kind"]
            mark = "*" if i == step.winner else ""
            cands.append(f"{mark}{kind}={c['score']:.3f}")
        lines.append(
            f"  iter {step.iteration:>3}: {' '.join(cands)} | filled {step.filled} | committed {step.committed}"
        )
    return "\n".join(["trace (score per candidate, * = winner):", *lines])


def emit(completion: Completion, cfg: DecodeConfig, as_json: bool, llm: Engine | None = None) -> None:
    """Print one result: a JSON line (with the settings, and ``llm``'s device and dtype), or the text on stdout
    and the trace and the stats summary on stderr."""
    stats = completion.stats.to_dict()
    if as_json:
        d = completion.to_dict()
        d["settings"] = cfg.to_dict()
        if llm is not None:
            d["device"], d["dtype"] = llm.device_name, llm.dtype_name
        print(json.dumps(d), flush=True)
    else:
        print(completion.text, flush=True)
        if completion.trace is not None:
            print(format_trace(completion.trace), file=sys.stderr, flush=True)
        print(summary(stats, cfg.describe()), file=sys.stderr, flush=True)


def run_generate(args: argparse.Namespace, cfg: DecodeConfig, prompts: list[str]) -> int:
    """``lopa generate --bp M [--tp N]``, ``--tp N`` alone, or ``--branch-parallel`` (under torchrun)."""
    from lopa.parallel.launch import BranchParallelGroup

    if args.tp < 1 or args.bp < 0:
        raise ConfigError(f"--bp and --tp must be positive, got --bp {args.bp} --tp {args.tp}")
    engine = engine_config_from_args(args)
    if args.branch_parallel:
        if args.bp:
            raise ConfigError("use either --bp N (start the ranks here) or --branch-parallel (under torchrun)")
        return _run_torchrun_rank(args, engine, cfg, prompts)
    with BranchParallelGroup.from_config(engine.replace(model=local_model_arg(args), revision=None)) as group:
        for completion in group.generate(prompts, cfg, raw=args.raw):
            emit(completion, cfg, args.json)
    return 0


def _run_torchrun_rank(args: argparse.Namespace, engine: EngineConfig, cfg: DecodeConfig, prompts: list[str]) -> int:
    from lopa.parallel.replicated_llm import join_mesh

    try:
        group = join_mesh(engine)  # WORLD_SIZE (from torchrun) = branch groups x tp
        if group is None:  # a worker rank: it replayed rank 0's requests
            return 0
        try:
            completions = group.generate(prompts, cfg, raw=args.raw)
        finally:
            if not group.broken:
                group.close()  # also after a user error on rank 0: the workers are told to stop
        for completion in completions:
            emit(completion, cfg, args.json, group)
        return 0
    except DistributedError as e:  # leave at once: the group's threads may never finish
        print(f"lopa generate: error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)
