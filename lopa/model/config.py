"""ModelConfig: the architecture numbers of a checkpoint, read from its ``config.json``, and their checks.

A ModelConfig is built by its family (:mod:`lopa.model.families`): the family's parser reads ``config.json`` (found
by ``model_type``), and code that makes a model directly calls ``Family.make_config``; either way the family's name
and prediction offset (``family``, ``logit_shift``) are filled in once, as fields. Special token ids are part of the
config because the decoders need them; they come from the checkpoint (config / generation_config / tokenizer),
never from code. This module also holds the generic helpers the parsers share (RoPE fields, JSON files).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lopa.errors import CheckpointNotFoundError, CorruptCheckpointError, UnsupportedModelError

if TYPE_CHECKING:
    from lopa.model.moe import MoEConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
ATTENTION_PATTERNS = ("bidirectional", "block_causal")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and special ids of one checkpoint (immutable)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = True
    mask_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    # Attention pattern among positions: "bidirectional" (every position sees every other: Dream, LLaDA) or
    # "block_causal" (block-diffusion models such as SDAR: query i sees key j iff j // block_size <= i //
    # block_size, blocks aligned to absolute position 0). ``block_size`` is that attention block (None when
    # bidirectional).
    attention: str = "bidirectional"
    block_size: int | None = None
    qk_norm: bool = False  # per-head RMSNorm of queries and keys before RoPE (Qwen3)
    moe: MoEConfig | None = None  # mixture-of-experts numbers (lopa/model/moe.py); None: every layer is dense
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    # Filled by the family (Family.make_config), never guessed: the config.json spelling of the model type, the
    # family's name, and its prediction offset (the raw output at window index j predicts the token at
    # j + logit_shift: Dream 1, LLaDA and SDAR 0; see lopa.model.families).
    model_type: str = field(kw_only=True)
    family: str = field(kw_only=True)
    logit_shift: int = field(kw_only=True)

    @property
    def padding_id(self) -> int:
        """The token that fills padded positions of a batch: the pad token, else the mask token, else 0."""
        return int(self.pad_token_id if self.pad_token_id is not None else self.mask_token_id or 0)


_POSITIVE_INTS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)


def check_config(config: ModelConfig, source: str = "config.json") -> ModelConfig:
    """``config`` itself when its numbers can describe a model; CorruptCheckpointError naming the field otherwise.

    Sizes must be positive integers; ``rope_theta`` must be a finite positive number and ``rms_norm_eps`` a finite
    one >= 0, and every number in ``rope_scaling`` must be finite: a NaN there loads and decodes garbage.
    Whether the sizes match the weights is checked by the loader, against the tensor headers.
    """
    if config.logit_shift not in (0, 1):
        raise CorruptCheckpointError(f"{source}: logit_shift must be 0 or 1, got {config.logit_shift!r}.")
    for name in _POSITIVE_INTS:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CorruptCheckpointError(f"{source}: {name} must be a positive integer, got {value!r}.")
    if config.attention not in ATTENTION_PATTERNS:
        raise CorruptCheckpointError(
            f"{source}: attention must be one of {ATTENTION_PATTERNS}, got {config.attention!r}."
        )
    if config.attention == "block_causal":
        size = config.block_size
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise CorruptCheckpointError(f"{source}: block_size must be a positive integer, got {size!r}.")
    if not math.isfinite(config.rope_theta) or config.rope_theta <= 0:
        raise CorruptCheckpointError(f"{source}: rope_theta must be a finite number > 0, got {config.rope_theta!r}.")
    if not math.isfinite(config.rms_norm_eps) or config.rms_norm_eps < 0:
        raise CorruptCheckpointError(
            f"{source}: rms_norm_eps must be a finite number >= 0, got {config.rms_norm_eps!r}."
        )
    for key, value in (config.rope_scaling or {}).items():
        numbers = value if isinstance(value, list) else [value]
        for v in numbers:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if not math.isfinite(v) or (key == "factor" and v <= 0):
                raise CorruptCheckpointError(
                    f"{source}: rope_scaling.{key}={value!r} must be finite (and a factor > 0)."
                )
    return config


def rope_fields(d: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either the classic fields or ``rope_parameters``."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(d.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling")
    if scaling is not None:
        scaling = dict(scaling)
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"{source}: rope_scaling type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})."
            )
        scaling["rope_type"] = rope_type
        scaling.pop("type", None)
        if rope_type == "default":
            scaling = None
    return theta, scaling


def int_or_none(v: Any) -> int | None:
    return None if v is None else int(v)


def first_int(v: Any) -> int | None:
    """The id of a config field that may be one id or a list of ids (``eos_token_id``): the first one, or None."""
    if isinstance(v, list):
        return int(v[0]) if v else None
    return int_or_none(v)


def read_json(path: Path, required: bool = False) -> dict[str, Any]:
    """A checkpoint's JSON object file; {} when an optional file is absent; named errors otherwise.

    A path that exists but is not a regular file (a FIFO, a device, a directory) is refused without opening it:
    reading a FIFO would block until something writes to it.
    """
    if path.exists() and not path.is_file():
        raise CorruptCheckpointError(f"{path} is not a regular file; a checkpoint's files must be plain files.")
    if not path.is_file():
        if required:
            raise CheckpointNotFoundError(f"{path} does not exist; a checkpoint directory needs it.")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{path} is not valid JSON ({e}); fix or re-download it.") from e
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{path} must hold a JSON object.")
    return data
