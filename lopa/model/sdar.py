"""The SDAR family (JetAstra's block-diffusion models on Qwen3): config fields.

SDAR checkpoints are Qwen3 (RMSNorm, SwiGLU, RoPE, GQA with an explicit ``head_dim``, per-head q/k RMSNorm, no
attention biases) trained and decoded as block diffusion: attention is block-causal with blocks of the config's
``block_size`` aligned to absolute position 0 (query ``i`` sees key ``j`` iff ``j // block_size <= i //
block_size``), and the output at position ``i`` predicts the token at ``i`` (no shift). Tensor names are Qwen3's,
which are the shared transformer's names plus ``self_attn.q_norm`` / ``self_attn.k_norm``.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

from lopa.errors import CorruptCheckpointError
from lopa.model.config import ModelConfig, dream_config_from_hf


def sdar_config_from_hf(d: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """An SDAR config.json (Qwen3 fields plus ``block_size`` and ``mask_token_id``) as a ModelConfig."""
    if "block_size" not in d:
        raise CorruptCheckpointError(
            f"{source}: an SDAR config.json needs block_size (the attention block the model was trained with)."
        )
    base = dream_config_from_hf(d, source)  # the Qwen2 fields are spelled the same in Qwen3
    return replace(
        base,
        attention_bias=bool(d.get("attention_bias", False)),  # Qwen3's default: no q/k/v biases
        attention="block_causal",
        block_size=int(d["block_size"]),
        qk_norm=True,
    )


def sdar_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json of an SDAR checkpoint of this shape."""
    d = asdict(cfg)
    for name in ("extra", "attention", "qk_norm"):
        d.pop(name)
    d["model_type"] = "sdar"
    d["architectures"] = ["SDARForCausalLM"]
    d["hidden_act"] = "silu"
    return {k: v for k, v in d.items() if v is not None}
