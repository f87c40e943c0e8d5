"""Command line: ``lopa generate | bench | train | eval | sweep | serve``.

Each subcommand lives in the module that owns the feature and exposes ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them up and turns :class:`~lopa.errors.LopaError` into a clean
message and exit code 2. Decoder flags are generated from :class:`~lopa.config.DecodeConfig`, so defaults
and help texts live once, in ``config.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import typing
from collections.abc import Sequence

from lopa.config import BASES, BRANCH_SCORES, CONFIDENCES, DECODERS, HELP, ORDERS, RECOMMENDABLE, DecodeConfig
from lopa.errors import ConfigError, LopaError

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("lopa.generate_cli", "decode prompts and print the text with stats"),
    "bench": ("lopa.tiny.bench", "compare the decoders side by side on held-out problems"),
    "train": ("lopa.tiny.train", "train the bundled tiny dLLM (Dream format)"),
    "eval": ("lopa.eval.cli", "score a model on a benchmark task (score, TPF, tok/s)"),
    "sweep": ("lopa.eval.sweep", "run a grid of decoder settings and plot the trade-offs"),
    "serve": ("lopa.server.cli", "OpenAI-compatible HTTP server"),
}

_CHOICES = {
    "decoder": DECODERS,
    "base": BASES,
    "confidence": CONFIDENCES,
    "order": ORDERS,
    "branch_score": BRANCH_SCORES,
}


def add_decode_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per DecodeConfig field, kebab case; defaults shown from the dataclass.

    A flag left out takes the checkpoint's recommendation (DecodeConfig.recommended), as ``LLM`` does.
    """
    group = parser.add_argument_group(
        "decoding (DecodeConfig)",
        "Flags left out take the checkpoint's recommended settings (its generation_config.json: decoder, base, "
        "branches, block size, max new tokens, thresholds, confidence), else the engine defaults shown.",
    )
    hints = typing.get_type_hints(DecodeConfig)
    for f in dataclasses.fields(DecodeConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{HELP.get(f.name, '')} (default: {default!r})"
        if f.name in RECOMMENDABLE:
            help_text = f"{HELP.get(f.name, '')} (default: the checkpoint's generation_config.json, else {default!r})"
        if f.name == "stop":
            group.add_argument(flag, action="append", default=None, help=help_text)
        elif hints[f.name] is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = {int: int, float: float}.get(type(default), str)
            group.add_argument(flag, type=kind, default=None, choices=_CHOICES.get(f.name), help=help_text)


def checkpoint_decode_defaults(model_dir: str | None, revision: str | None = None) -> DecodeConfig:
    """The decoding defaults for a checkpoint (the bundled one when None): see DecodeConfig.recommended and
    lopa.model.families.recommended_settings (the family's recommendations under the checkpoint's own)."""
    from lopa.model.config import read_json
    from lopa.model.families import recommended_settings

    if model_dir is None:
        from lopa.checkpoint.bundled import default_checkpoint_dir

        path = default_checkpoint_dir()
    else:
        from lopa.checkpoint.hub import resolve_model

        try:
            path = resolve_model(model_dir, revision)
        except LopaError:  # reported by the loader, which resolves the same name the same way
            return DecodeConfig()
    try:
        settings = recommended_settings(read_json(path / "config.json"), read_json(path / "generation_config.json"))
        return DecodeConfig.recommended(settings)
    except LopaError:  # a broken file is reported by the loader, with the full story
        return DecodeConfig()


def decode_config_from_args(args: argparse.Namespace, base: DecodeConfig | None = None) -> DecodeConfig:
    """DecodeConfig from parsed flags: only flags the user gave override ``base``.

    Without ``base``: the defaults of the checkpoint named by ``--model`` (engine defaults + its recommendations).
    """
    if base is None:
        base = checkpoint_decode_defaults(getattr(args, "model", None), getattr(args, "revision", None))
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(DecodeConfig)
        if getattr(args, f.name, None) is not None
    }
    if "stop" in given:
        given["stop"] = tuple(given["stop"])
    return base.replace(**given).validate()


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model / --lora / --device / --dtype / --enforce-eager, shared by every command that loads a model."""
    parser.add_argument(
        "--model",
        default=None,
        help="checkpoint directory or Hugging Face hub id ORG/NAME (needs lopa[hub]; default: the bundled tiny model)",
    )
    parser.add_argument("--revision", default=None, help="hub branch, tag or commit of a hub --model (default: main)")
    parser.add_argument("--lora", default=None, help="peft-format LoRA adapter directory merged at load")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="model dtype")
    parser.add_argument(
        "--enforce-eager",
        action="store_true",
        default=None,
        help="eager forward only: no fused weights, padded buckets or CUDA graphs (default: fast path on CUDA)",
    )
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        help="sequences decoded together in one forward per iteration (default: 16 on CPU, 32 on CUDA)",
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="longest prompt + max_new_tokens served; sizes the KV pool (default: the model's context, <= 8192)",
    )


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """--threads: torch's CPU thread count (generate, serve)."""
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads torch may use (default: torch's choice, one per core; on a busy machine 1 is often faster)",
    )


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's thread count from --threads (no-op when not given)."""
    threads = getattr(args, "threads", None)
    if threads is None:
        return
    if threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def load_llm(args: argparse.Namespace, **extra: object):
    """The LLM named by the model flags of ``add_model_arguments``."""
    from lopa import LLM

    extra.setdefault("max_num_seqs", getattr(args, "max_num_seqs", None))
    extra.setdefault("max_model_len", getattr(args, "max_model_len", None))
    return LLM(
        args.model,
        lora=args.lora,
        device=args.device,
        dtype=args.dtype,
        enforce_eager=args.enforce_eager,
        revision=getattr(args, "revision", None),
        **extra,
    )


def local_model_arg(args: argparse.Namespace) -> str | None:
    """``--model`` as a local directory (a hub id fetched now, at ``--revision``), for ranks started elsewhere."""
    if args.model is None:
        return None
    from lopa.checkpoint.hub import resolve_model

    return str(resolve_model(args.model, getattr(args, "revision", None)))


def check_branch_parallel_batch(args: argparse.Namespace) -> None:
    """Branch- and tensor-parallel decoding run one sequence at a time: refuse a batch size with them, by name."""
    from lopa.errors import BatchingError

    bp = getattr(args, "bp", 0) or getattr(args, "branch_parallel", False)
    tp = getattr(args, "tp", 1) or 1
    if (bp or tp > 1) and (getattr(args, "max_num_seqs", None) or 1) > 1:
        raise BatchingError(
            "--bp / --tp / --branch-parallel decode one sequence at a time (the ranks split one sequence's branches "
            "or weights); drop --max-num-seqs or set it to 1"
        )


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lopa", description="Diffusion LLM inference with LoPA.")
    from lopa import __version__

    parser.add_argument("--version", action="version", version=f"lopa {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # import only the module the user asked for (keeps `lopa --help` fast)
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args._run(args) or 0)
    except LopaError as e:
        print(f"lopa {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
