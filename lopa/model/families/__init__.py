"""Model families: what differs between checkpoint lineages that run on the one shared transformer.

Every family runs on :class:`lopa.model.transformer.Transformer` (a Qwen2/LLaMA block stack) and its fused twin,
so the fast path, the cache and the runners apply to all of them unchanged. Each family is one file here that
declares a :class:`~lopa.model.families.base.Family`; it owns only what differs between lineages:

- config parsing: its ``config.json`` field names → :class:`~lopa.model.config.ModelConfig` (and back, for saving);
- weight names: its checkpoint's module names ↔ the shared (Qwen2) module names, for tensors and LoRA modules;
- the prediction offset ``logit_shift`` (below) and the attention pattern (bidirectional or block-causal);
- special tokens: fallback names of the mask / eos tokens and the tokens that end a turn;
- recommended decoding settings, which a checkpoint's ``generation_config.json`` can still override.

**The logit shift.** The raw output at window index ``j`` predicts the token at ``j + logit_shift``. Dream was
adapted from an autoregressive model and keeps its next-token offset (shift 1: the first uncommitted position is
predicted by the last committed one, so the engine keeps that "frozen" logit at each commit); LLaDA and SDAR
predict each position from its own output (shift 0). :func:`predicting_index` is the one place that applies it.
The family's parser writes its name and shift into the ModelConfig once (``config.family``,
``config.logit_shift``); the engine, decoders, cache, server, eval and parallel code read those fields and never
branch on a family's name.

Adding a family = adding one file here that declares ``FAMILY`` and listing its module in ``_MODULES``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lopa.errors import CorruptCheckpointError, LopaError, UnsupportedModelError
from lopa.model.config import ModelConfig, check_config
from lopa.model.families import dream, llada, sdar
from lopa.model.families.base import Family

if TYPE_CHECKING:
    from torch import Tensor

_MODULES = (dream, llada, sdar)
_FAMILIES: dict[str, Family] = {m.FAMILY.name: m.FAMILY for m in _MODULES}


def families() -> dict[str, Family]:
    """Every supported family by name."""
    return dict(_FAMILIES)


def family_named(name: str) -> Family:
    """The family called ``name`` (``ModelConfig.family``); UnsupportedModelError listing the families otherwise."""
    if name not in _FAMILIES:
        raise UnsupportedModelError(f"no model family is called {name!r}; lopa has {sorted(_FAMILIES)}.")
    return _FAMILIES[name]


def family_for_model_type(model_type: Any, source: str = "config.json") -> Family:
    """The family that loads ``model_type``; UnsupportedModelError listing every supported family otherwise."""
    for fam in _FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    supported = "; ".join(f"{f.name} (model_type {', '.join(map(repr, f.model_types))})" for f in _FAMILIES.values())
    raise UnsupportedModelError(
        f"{source}: model_type {model_type!r} is not supported; lopa loads these model families: {supported}."
    )


def config_from_hf(d: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """A parsed config.json as a ModelConfig, by its ``model_type``'s family; a named error on anything unsupported."""
    family = family_for_model_type(d.get("model_type"), source)
    try:
        config = family.parse(d, source)
    except (TypeError, ValueError, ArithmeticError) as e:  # int("abc"), int(inf), float([1]), heads=0
        raise CorruptCheckpointError(f"{source}: a field has an invalid value ({e}); fix config.json.") from e
    return check_config(config, source)


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The config.json a checkpoint of this shape and family carries."""
    return family_named(config.family).export(config)


def recommended_settings(config_json: dict[str, Any], generation_config: dict[str, Any]) -> dict[str, Any]:
    """Decoding settings recommended for a checkpoint: its family's (and a block-causal model's own attention block),
    overridden by its generation_config's."""
    try:
        defaults = dict(family_for_model_type(config_json.get("model_type")).decode_defaults)
    except UnsupportedModelError:  # reported by the loader, with the full story
        defaults = {}
    try:  # a block-causal model decodes with its own attention block
        config = config_from_hf(config_json)
        if config.attention == "block_causal":
            defaults["block_size"] = config.block_size
    except LopaError:  # reported by the loader
        pass
    return {**defaults, **generation_config}


def predicting_index(position: int | Tensor, shift: int) -> int | Tensor:
    """Index of the raw output that predicts the token at ``position``: ``position - shift``."""
    return position - shift
