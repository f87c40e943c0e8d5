"""The flags shared by several commands, and what turns them into objects: model, decoding, threads, mesh.

Decoder flags are generated from :class:`~lopa.config.DecodeConfig`'s fields, so defaults and help texts live
once, in ``lopa/config/``. A flag left out is None here and takes the config's (or the checkpoint's) default.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Sequence
from typing import TYPE_CHECKING

from lopa.config import (
    BASES,
    BRANCH_SCORES,
    CONFIDENCES,
    DECODERS,
    HELP,
    ORDERS,
    RECOMMENDABLE,
    DecodeConfig,
    EngineConfig,
    ServerConfig,
)
from lopa.errors import ConfigError, LopaError

if TYPE_CHECKING:
    from lopa.llm import LLM

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


MODEL_FLAGS = ("model", "revision", "lora", "device", "dtype", "enforce_eager", "max_num_seqs", "max_model_len")
Parser = argparse.ArgumentParser | argparse._ArgumentGroup


def add_config_arguments(parser: Parser, cls: type, names: Sequence[str]) -> None:
    """One flag per named field of the settings dataclass ``cls`` (kebab case): its type or Literal choices, its
    default, and its help from ``field(metadata={"help", "default"})``, so no default is written twice."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        f, kind = fields[name], hints[name]
        shown = f.metadata.get("default", f.default)
        help_text = f.metadata["help"] if shown is None else f"{f.metadata['help']} (default: {shown})"
        args = [a for a in typing.get_args(kind) if a is not type(None)] if typing.get_origin(kind) else []
        base = args[0] if len(args) == 1 else kind
        flag = "--" + name.replace("_", "-")
        if base is bool:
            parser.add_argument(flag, action="store_true", default=f.default, help=help_text)
        elif typing.get_origin(base) is typing.Literal:
            parser.add_argument(flag, default=f.default, choices=typing.get_args(base), help=help_text)
        else:
            parser.add_argument(flag, type=base, default=f.default, help=help_text)


def add_model_arguments(parser: Parser) -> None:
    """--model / --revision / --lora / --device / --dtype / --enforce-eager / --max-num-seqs / --max-model-len
    (EngineConfig), shared by every command that loads a model."""
    add_config_arguments(parser, EngineConfig, MODEL_FLAGS)


def add_threads_argument(parser: Parser) -> None:
    """--threads: torch's CPU thread count (generate, serve)."""
    add_config_arguments(parser, EngineConfig, ("threads",))


def add_tp_argument(parser: Parser) -> None:
    """--tp N, for commands that can run a tensor-parallel mesh."""
    add_config_arguments(parser, EngineConfig, ("tp",))


def add_dist_arguments(parser: Parser) -> None:
    """--dist-timeout / --dist-port, for commands that take --bp / --branch-parallel."""
    add_config_arguments(parser, EngineConfig, ("dist_timeout", "dist_port"))


def add_server_arguments(parser: Parser) -> None:
    """Every ServerConfig field: --host, --port, --queue-limit, the per-request limits, timeouts, ..."""
    add_config_arguments(parser, ServerConfig, [f.name for f in dataclasses.fields(ServerConfig)])


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig of the parsed flags (a field without a flag keeps its default), validated.

    ``--bp 0`` (``lopa generate``'s "no launcher") is one branch group."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig) if hasattr(args, f.name)}
    if "bp" in given:
        given["bp"] = max(given["bp"], 1)
    return EngineConfig(**given).validate()


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig of the parsed ``lopa serve`` flags, validated."""
    return ServerConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)}).validate()


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's thread count from --threads (no-op when not given)."""
    threads = getattr(args, "threads", None)
    if threads is None:
        return
    if threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def load_llm(args: argparse.Namespace) -> LLM:
    """The LLM named by the model flags of ``add_model_arguments``."""
    from lopa.llm import LLM

    return LLM.from_config(engine_config_from_args(args))


def local_model_arg(args: argparse.Namespace) -> str | None:
    """``--model`` as a local directory (a hub id fetched now, at ``--revision``), for ranks started elsewhere."""
    if args.model is None:
        return None
    from lopa.checkpoint.hub import resolve_model

    return str(resolve_model(args.model, getattr(args, "revision", None)))


def check_branch_parallel_batch(args: argparse.Namespace) -> None:
    """Branch- and tensor-parallel decoding run one sequence at a time: EngineConfig.validate refuses a batch size
    with them, by name. Under torchrun (--branch-parallel) the world has several ranks whatever --bp says."""
    cfg = engine_config_from_args(args)
    if getattr(args, "branch_parallel", False) and cfg.world_size == 1:
        cfg.replace(bp=2).validate()
