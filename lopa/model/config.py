"""ModelConfig: the architecture numbers of a checkpoint, read from its ``config.json``.

:meth:`ModelConfig.from_hf_dict` hands the parsing to the checkpoint's family (:mod:`lopa.model.family`), found by
``model_type``. The Dream family's parser lives here: it accepts Dream's field names and Qwen2's (they are the same
for everything the forward needs), plus the newer ``rope_parameters`` spelling of RoPE settings. Special token ids
are part of the config because the decoders need them; they come from the checkpoint (config / generation_config /
tokenizer), never from code. ``logit_shift`` is the family's prediction offset, the one property the engine reads.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lopa.errors import CheckpointNotFoundError, CorruptCheckpointError, UnsupportedModelError

if TYPE_CHECKING:
    from lopa.model.family import Family
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
    model_type: str = "Dream"
    # Attention pattern among positions: "bidirectional" (every position sees every other: Dream, LLaDA) or
    # "block_causal" (block-diffusion models such as SDAR: query i sees key j iff j // block_size <= i //
    # block_size, blocks aligned to absolute position 0). ``block_size`` is that attention block (None when
    # bidirectional).
    attention: str = "bidirectional"
    block_size: int | None = None
    qk_norm: bool = False  # per-head RMSNorm of queries and keys before RoPE (Qwen3)
    moe: MoEConfig | None = None  # mixture-of-experts numbers (lopa/model/moe.py); None: every layer is dense
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def family(self) -> Family:
        """The model family this checkpoint belongs to (by ``model_type``)."""
        from lopa.model.family import family_for_model_type

        return family_for_model_type(self.model_type)

    @property
    def logit_shift(self) -> int:
        """The raw output at window index ``j`` predicts the token at ``j + logit_shift`` (Dream 1, LLaDA 0)."""
        return self.family.logit_shift

    @property
    def padding_id(self) -> int:
        """The token that fills padded positions of a batch: the pad token, else the mask token, else 0."""
        return int(self.pad_token_id if self.pad_token_id is not None else self.mask_token_id or 0)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json a checkpoint of this shape and family carries."""
        return self.family.export(self)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a parsed config.json; raises a named error on anything unsupported or missing."""
        from lopa.model.family import family_for_model_type

        family = family_for_model_type(d.get("model_type"), source)
        try:
            config = family.parse(d, source)
        except (TypeError, ValueError, ArithmeticError) as e:  # int("abc"), int(inf), float([1]), heads=0
            raise CorruptCheckpointError(f"{source}: a field has an invalid value ({e}); fix config.json.") from e
        return check_config(config, source)


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


def dream_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json of a Dream checkpoint of this shape."""
    d = asdict(cfg)
    for name in ("extra", "attention", "block_size", "qk_norm"):  # Dream: bidirectional, no q/k norm
        d.pop(name)
    d["model_type"] = "Dream"
    d["architectures"] = ["DreamModel"]
    d["hidden_act"] = "silu"
    return {k: v for k, v in d.items() if v is not None}


def dream_config_from_hf(d: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """A Dream / Qwen2 config.json as a ModelConfig."""
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{source}: hidden_act {act!r} is not supported (only 'silu').")
    if d.get("use_sliding_window"):
        raise UnsupportedModelError(f"{source}: use_sliding_window=true is not supported.")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if k not in d]
    if missing:
        raise CorruptCheckpointError(f"{source}: missing required field(s) {missing}.")
    heads = int(d["num_attention_heads"])
    kv_heads = int(d.get("num_key_value_heads") or heads)
    hidden = int(d["hidden_size"])
    head_dim = int(d.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise CorruptCheckpointError(
            f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}."
        )
    rope_theta, rope_scaling = rope_fields(d, source)
    return ModelConfig(
        vocab_size=int(d["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(d["intermediate_size"]),
        num_hidden_layers=int(d["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bool(d.get("attention_bias", True)),
        mask_token_id=int_or_none(d.get("mask_token_id")),
        eos_token_id=first_int(d.get("eos_token_id")),
        pad_token_id=int_or_none(d.get("pad_token_id")),
        bos_token_id=int_or_none(d.get("bos_token_id")),
        model_type=str(d.get("model_type")),
    )


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
