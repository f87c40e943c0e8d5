"""``lopa eval``: score a model on one benchmark task and report score, TPF and tok/s.

Loads the task's documents first (so a missing
data file fails before the model loads), then the model, then runs :func:`lopa.eval.runner.evaluate` and
writes ``samples.jsonl`` and ``summary.json`` under ``--out``. ``lopa sweep`` (``commands/sweep.py``) reuses the
flags and helpers here.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lopa.commands.flags import add_decode_arguments, add_model_arguments, decode_config_from_args, load_llm
from lopa.config import DecodeConfig
from lopa.engine.protocol import Engine
from lopa.eval.runner import evaluate, format_summary
from lopa.eval.sandbox import Sandbox, SandboxLimits
from lopa.eval.tasks import TASKS, Doc, Task, get_task


def add_task_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``lopa eval`` and ``lopa sweep``: task, data, limits, sandbox."""
    add_model_arguments(p)
    p.add_argument("--task", required=True, choices=sorted(TASKS), help="benchmark task")
    p.add_argument("--data", default=None, help="local data file (JSONL); every task except tiny/humaneval needs one")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N documents")
    p.add_argument(
        "--chat", choices=["auto", "on", "off"], default="auto", help="use the chat template (auto: per task)"
    )
    p.add_argument("--num-fewshot", type=int, default=None, help="number of few-shot examples (default: the task's)")
    p.add_argument("--timeout", type=float, default=10.0, help="code tasks: wall-time limit per program (seconds)")
    p.add_argument("--sandbox-memory-mb", type=int, default=2048, help="code tasks: memory limit per program")
    p.add_argument("--workers", type=int, default=2, help="code tasks: programs run in parallel")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_task_arguments(p)
    p.add_argument("--out", default=None, help="output directory (default: eval-out/<task>-<model>-<decoder>)")
    add_decode_arguments(p)


def load_docs(task: Task, args: argparse.Namespace) -> list[Doc]:
    from lopa.errors import ConfigError

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    docs = task.load_docs(Path(args.data) if args.data else None)
    return docs[: args.limit] if args.limit else docs


def task_config(task: Task, llm: Engine, args: argparse.Namespace) -> DecodeConfig:
    """The task's defaults (e.g. max_new_tokens), overridden by every decoder flag the user gave."""
    defaults = task.decode_defaults(dict(llm.generation_config))
    block = getattr(args, "block_size", None) or defaults.get("block_size", DecodeConfig.block_size)
    if getattr(args, "max_new_tokens", None) is None and "max_new_tokens" in defaults:
        defaults["max_new_tokens"] = -(-defaults["max_new_tokens"] // block) * block  # a multiple of the block
    return decode_config_from_args(args, llm.default_config.replace(**defaults))


def check_out_dir(out: Path) -> Path:
    """Create ``out`` and prove it is writable now, so a long run never ends with results nowhere to go."""
    from lopa.errors import ConfigError

    probe = out / ".lopa-write-check"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out {out} cannot be written ({e.strerror or e}); choose a writable directory") from e
    return out


def run_meta(args: argparse.Namespace) -> dict[str, Any]:
    """Command-line facts recorded in every summary."""
    keys = ("lora", "data", "limit", "enforce_eager")
    return {k: getattr(args, k, None) for k in keys}


def make_sandbox(task: Task, args: argparse.Namespace) -> Sandbox | None:
    if not task.is_code:
        return None
    return Sandbox(SandboxLimits(timeout_s=args.timeout, memory_mb=args.sandbox_memory_mb))


def evaluate_with_args(
    llm: Any,
    task: Task,
    docs: list[Doc],
    config: DecodeConfig,
    sandbox: Sandbox | None,
    args: argparse.Namespace,
    out: Path,
) -> Any:
    """One evaluation with the harness flags shared by ``lopa eval`` and ``lopa sweep``."""
    return evaluate(
        llm,
        task,
        docs,
        config,
        chat=args.chat,
        num_fewshot=args.num_fewshot,
        sandbox=sandbox,
        workers=args.workers,
        progress=not args.no_progress,
        out_dir=out,
        meta=run_meta(args),
    )


def run(args: argparse.Namespace) -> int:
    task = get_task(args.task)
    docs = load_docs(task, args)
    sandbox = make_sandbox(task, args)
    if args.out:
        check_out_dir(Path(args.out))  # before the model loads
    llm = load_llm(args)
    config = task_config(task, llm, args)
    out = check_out_dir(
        Path(args.out)
        if args.out
        else Path("eval-out") / f"{task.name}-{llm.model_name.replace('/', '--')}-{config.decoder}"
    )
    result = evaluate_with_args(llm, task, docs, config, sandbox, args, out)
    print(format_summary(result.summary))
    print(f"  wrote {out / 'samples.jsonl'} and {out / 'summary.json'}")
    return 0
