"""Model families: what differs between checkpoint lineages that run on the one shared transformer.

Every family runs on :class:`lopa.model.dream.DreamModel` (a bidirectional LLaMA/Qwen2 block stack) and its fused
twin, so the fast path, the cache and the runners apply to all of them unchanged. A :class:`Family` owns only
what differs between lineages:

- config parsing: its ``config.json`` field names → :class:`~lopa.model.config.ModelConfig` (and back, for saving);
- weight names: its checkpoint's module names ↔ the shared (Qwen2) module names, for tensors and LoRA modules;
- the prediction offset ``logit_shift``: the raw output at window index ``j`` predicts the token at ``j + shift``
  (Dream 1, LLaDA 0); :func:`predicting_index` is the one place that applies it;
- special tokens: fallback names of the mask / eos tokens and the tokens that end a turn;
- recommended decoding settings, which a checkpoint's ``generation_config.json`` can still override.

The engine, decoders, cache, server, eval and dist code read these properties through the model's config
(``model.config.logit_shift``); none of them branches on a family's name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor

from lopa.errors import LopaError, UnsupportedModelError

if TYPE_CHECKING:
    from lopa.model.config import ModelConfig

NameTable = tuple[tuple[str, str], ...]  # (checkpoint module pattern, shared module pattern); "{i}" = layer index


@dataclass(frozen=True, eq=False)
class Family:
    """One checkpoint lineage: see the module docstring for what it owns."""

    name: str
    model_types: tuple[str, ...]  # config.json "model_type" values this family loads
    checkpoints: tuple[str, ...]  # example checkpoint names (docs, error messages)
    logit_shift: int
    parse: Callable[[dict[str, Any], str], ModelConfig]  # (config.json dict, source) -> ModelConfig
    export: Callable[[ModelConfig], dict[str, Any]]  # ModelConfig -> the config.json this family writes
    names: NameTable = ()  # empty: the checkpoint uses the shared names
    mask_token: str = "<|mask|>"
    eos_token: str = "<|endoftext|>"
    end_tokens: tuple[str, ...] = ()  # besides eos, tokens that end a turn when the vocabulary has them
    decode_defaults: Mapping[str, Any] = field(default_factory=dict)
    _compiled: tuple[tuple[tuple[re.Pattern[str], str], ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.logit_shift not in (0, 1):
            raise ValueError(f"family {self.name}: logit_shift must be 0 or 1, got {self.logit_shift}")
        to_shared = tuple((_pattern(ck), sh) for ck, sh in self.names)
        to_ckpt = tuple((_pattern(sh), ck) for ck, sh in self.names)
        object.__setattr__(self, "_compiled", (to_shared, to_ckpt))

    def to_shared(self, module: str) -> str | None:
        """The shared module name of a checkpoint module name; None when the name is not one of this family's."""
        return module if not self.names else _translate(module, self._compiled[0])

    def to_checkpoint(self, module: str) -> str:
        """The checkpoint module name of a shared module name."""
        if not self.names:
            return module
        out = _translate(module, self._compiled[1])
        if out is None:
            raise KeyError(f"{module!r} has no {self.name} checkpoint name")
        return out

    def tensor_to_shared(self, key: str) -> str | None:
        """``model.transformer.blocks.0.q_proj.weight`` → ``model.layers.0.self_attn.q_proj.weight`` (LLaDA)."""
        module, _, param = key.rpartition(".")
        shared = self.to_shared(module) if module else None
        return f"{shared}.{param}" if shared is not None else None

    def tensor_to_checkpoint(self, key: str) -> str:
        module, _, param = key.rpartition(".")
        return f"{self.to_checkpoint(module)}.{param}"


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)"))


def _translate(name: str, table: tuple[tuple[re.Pattern[str], str], ...]) -> str | None:
    for pattern, template in table:
        m = pattern.fullmatch(name)
        if m is not None:
            return template.format(**m.groupdict())
    return None


def predicting_index(position: int | Tensor, shift: int) -> int | Tensor:
    """Index of the raw output that predicts the token at ``position``: ``position - shift``."""
    return position - shift


def _registry() -> dict[str, Family]:
    from lopa.model.config import dream_config_from_hf, dream_config_to_hf
    from lopa.model.llada import LLADA_NAMES, llada_config_from_hf, llada_config_to_hf
    from lopa.model.sdar import sdar_config_from_hf, sdar_config_to_hf

    dream = Family(
        name="dream",
        model_types=("Dream", "dream", "qwen2", "Qwen2"),
        checkpoints=("Dream-v0-Base-7B", "Dream-v0-Instruct-7B", "DiffuCoder-7B-Instruct", "D2F-Dream (LoRA)"),
        logit_shift=1,
        parse=dream_config_from_hf,
        export=dream_config_to_hf,
        end_tokens=("<|im_end|>",),
    )
    llada = Family(
        name="llada",
        model_types=("llada", "LLaDA"),
        checkpoints=("LLaDA-8B-Base", "LLaDA-8B-Instruct", "LLaDA-1.5", "D2F-LLaDA (LoRA)"),
        logit_shift=0,
        parse=llada_config_from_hf,
        export=llada_config_to_hf,
        names=LLADA_NAMES,
        mask_token="<|mdm_mask|>",
        end_tokens=("<|eot_id|>", "<|endoftext|>"),
        decode_defaults={"block_size": 32},
    )
    sdar = Family(
        name="sdar",
        model_types=("sdar", "SDAR"),
        checkpoints=("SDAR-1.7B-Chat", "SDAR-4B-Chat", "SDAR-8B-Chat"),
        logit_shift=0,
        parse=sdar_config_from_hf,
        export=sdar_config_to_hf,
        mask_token="<|MASK|>",
        end_tokens=("<|im_end|>", "<|endoftext|>"),
    )
    return {f.name: f for f in (dream, llada, sdar)}


_FAMILIES: dict[str, Family] = {}


def families() -> dict[str, Family]:
    """Every supported family by name (built on first use)."""
    if not _FAMILIES:
        _FAMILIES.update(_registry())
    return _FAMILIES


def family_for_model_type(model_type: Any, source: str = "config.json") -> Family:
    """The family that loads ``model_type``; UnsupportedModelError listing every supported family otherwise."""
    for fam in families().values():
        if model_type in fam.model_types:
            return fam
    supported = "; ".join(f"{f.name} (model_type {', '.join(map(repr, f.model_types))})" for f in families().values())
    raise UnsupportedModelError(
        f"{source}: model_type {model_type!r} is not supported; lopa loads these model families: {supported}."
    )


def recommended_settings(config_json: dict[str, Any], generation_config: dict[str, Any]) -> dict[str, Any]:
    """Decoding settings recommended for a checkpoint: its family's, overridden by its generation_config's."""
    try:
        defaults = dict(family_for_model_type(config_json.get("model_type")).decode_defaults)
    except UnsupportedModelError:  # reported by the loader, with the full story
        defaults = {}
    from lopa.model.config import ModelConfig

    try:  # a block-causal model decodes with its own attention block
        config = ModelConfig.from_hf_dict(config_json)
        if config.attention == "block_causal":
            defaults["block_size"] = config.block_size
    except LopaError:  # reported by the loader
        pass
    return {**defaults, **generation_config}
