"""The flags shared by several commands, and what turns them into objects: model, decoding, threads, mesh.

Decoder flags are generated from :class:`~lopa.config.DecodeConfig`'s fields, so defaults and help texts live
once, in ``config.py``. A flag left out is None here and takes the config's (or the checkpoint's) default.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from lopa.config import BASES, BRANCH_SCORES, CONFIDENCES, DECODERS, HELP, ORDERS, RECOMMENDABLE, DecodeConfig
from lopa.errors import ConfigError, LopaError

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
    lopa.model.family.recommended_settings (the family's recommendations under the checkpoint's own)."""
    from lopa.model.config import read_json
    from lopa.model.family import recommended_settings

    if model_dir is None:
        from lopa.tiny import default_checkpoint_dir

        path = default_checkpoint_dir()
    else:
        from lopa.model.hub import resolve_model

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
    from lopa.model.hub import resolve_model

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


def add_dist_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--dist-timeout / --dist-port, for commands that take --bp / --branch-parallel."""
    parser.add_argument("--dist-timeout", type=float, default=None, help="seconds before a silent rank is an error")
    parser.add_argument("--dist-port", type=int, default=None, help="rendezvous port for --bp (default: a free one)")


def add_tp_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--tp N, for commands that can run a tensor-parallel mesh."""
    parser.add_argument(
        "--tp", type=int, default=1, metavar="N",
        help="tensor-parallel ranks per branch group (with --bp M: M x N ranks; under torchrun: divides the world)",
    )  # fmt: skip
