"""The SDAR family (JetAstra's block-diffusion models on Qwen3): config fields, block-causal attention, shift 0.

SDAR checkpoints are Qwen3 (RMSNorm, SwiGLU, RoPE, GQA with an explicit ``head_dim``, per-head q/k RMSNorm, no
attention biases) trained and decoded as block diffusion: attention is block-causal with blocks of the config's
``block_size`` aligned to absolute position 0 (query ``i`` sees key ``j`` iff ``j // block_size <= i //
block_size``), and the output at position ``i`` predicts the token at ``i`` (no shift). Tensor names are Qwen3's,
which are the shared transformer's names plus ``self_attn.q_norm`` / ``self_attn.k_norm``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from lopa.errors import CorruptCheckpointError
from lopa.model.config import ModelConfig
from lopa.model.families.base import Family
from lopa.model.families.dream import qwen2_fields


def parse(d: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """An SDAR config.json (Qwen3 fields plus ``block_size`` and ``mask_token_id``) as a ModelConfig."""
    if "block_size" not in d:
        raise CorruptCheckpointError(
            f"{source}: an SDAR config.json needs block_size (the attention block the model was trained with)."
        )
    fields = qwen2_fields(d, source)  # the Qwen2 fields are spelled the same in Qwen3
    fields.update(
        attention_bias=bool(d.get("attention_bias", False)),  # Qwen3's default: no q/k/v biases
        block_size=int(d["block_size"]),
        qk_norm=True,
    )
    return FAMILY.make_config(**fields)


def export(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json of an SDAR checkpoint of this shape."""
    d = asdict(cfg)
    for name in ("extra", "family", "logit_shift", "attention", "qk_norm"):
        d.pop(name)
    d["model_type"] = "sdar"
    d["architectures"] = ["SDARForCausalLM"]
    d["hidden_act"] = "silu"
    return {k: v for k, v in d.items() if v is not None}


FAMILY = Family(
    name="sdar",
    model_types=("sdar", "SDAR"),
    checkpoints=("SDAR-1.7B-Chat", "SDAR-4B-Chat", "SDAR-8B-Chat"),
    logit_shift=0,
    attention="block_causal",
    parse=parse,
    export=export,
    mask_token="<|MASK|>",
    end_tokens=("<|im_end|>", "<|endoftext|>"),
)
