"""The Dream family (Dream-v0 Base / Instruct, DiffuCoder, D2F-Dream adapters): Qwen2 config fields, shift 1.

Dream checkpoints are Qwen2 (RMSNorm, SwiGLU, RoPE, GQA, q/k/v biases) run without a causal mask; their tensor
names are the shared transformer's own, so no name table is needed. The parser accepts Dream's field names and
Qwen2's (they are the same for everything the forward needs), plus the newer ``rope_parameters`` spelling of RoPE
settings. Dream was adapted from an autoregressive model and keeps its offset: the output at position ``i``
predicts the token at ``i + 1`` (``logit_shift = 1``).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from lopa.errors import CorruptCheckpointError, UnsupportedModelError
from lopa.model.config import ModelConfig, first_int, int_or_none, rope_fields
from lopa.model.families.base import Family

# ModelConfig fields a Dream config.json does not carry: the family's own (name, shift, attention) and Qwen3's
_NOT_WRITTEN = ("extra", "family", "logit_shift", "attention", "block_size", "qk_norm")


def qwen2_fields(d: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """The ModelConfig fields of a Qwen2-style config.json (Dream's, and the base of Qwen3's)."""
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
    return dict(
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


def parse(d: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """A Dream / Qwen2 config.json as a ModelConfig."""
    return FAMILY.make_config(**qwen2_fields(d, source))


def export(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json of a Dream checkpoint of this shape (also readable by transformers)."""
    d = asdict(cfg)
    for name in _NOT_WRITTEN:
        d.pop(name)
    d["model_type"] = "Dream"
    d["architectures"] = ["DreamModel"]
    d["hidden_act"] = "silu"
    return {k: v for k, v in d.items() if v is not None}


FAMILY = Family(
    name="dream",
    model_types=("Dream", "dream", "qwen2", "Qwen2"),
    checkpoints=("Dream-v0-Base-7B", "Dream-v0-Instruct-7B", "DiffuCoder-7B-Instruct", "D2F-Dream (LoRA)"),
    logit_shift=1,
    attention="bidirectional",
    parse=parse,
    export=export,
    end_tokens=("<|im_end|>",),
)
