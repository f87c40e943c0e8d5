"""transformers twins of lopa's transformer: the same shape and weights in ``Qwen2ForCausalLM`` / ``LlamaConfig``,
run with full attention, for equivalence checks against an independent implementation (needs ``transformers``, a
dev dependency; it is imported only when a function is called)."""

from __future__ import annotations

from typing import Any

import torch

from lopa.model.config import ModelConfig
from lopa.model.transformer import Transformer


def qwen2_config(cfg: ModelConfig, attn_implementation: str = "eager") -> Any:
    """transformers' ``Qwen2Config`` of the same shape as ``cfg`` (needs the ``transformers`` package)."""
    from transformers import Qwen2Config

    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}
    hf_cfg = Qwen2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attn_implementation=attn_implementation,
    )
    hf_cfg.head_dim = cfg.head_dim  # Qwen2Config has no head_dim argument; the attention reads the attribute
    return hf_cfg


def llama_config(cfg: ModelConfig, attn_implementation: str = "eager") -> Any:
    """transformers' ``LlamaConfig`` of the same shape as ``cfg`` (LLaDA's blocks are LLaMA's; needs transformers)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})},
        tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=cfg.attention_bias,
        mlp_bias=False,
        attn_implementation=attn_implementation,
    )


def transformers_twin(model: Transformer) -> Any:
    """The same weights in transformers' ``Qwen2ForCausalLM`` (eager attention), for equivalence checks.

    Needs the ``transformers`` package (a dev dependency). The twin is causal as built; call it through
    :func:`transformers_bidirectional_logits` to get Dream's bidirectional logits.
    """
    from transformers import Qwen2ForCausalLM

    hf = Qwen2ForCausalLM(qwen2_config(model.config, "eager")).to(next(model.parameters()).dtype)
    hf.load_state_dict(model.state_dict(), strict=True)
    for layer in hf.model.layers:
        layer.self_attn.is_causal = False
    return hf.eval()


def transformers_bidirectional_logits(hf: Any, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Raw logits (rows, L, vocab) of a :func:`transformers_twin` with full attention.

    ``mask``: optional (rows, L, L) bool, True = may attend. An explicit 4D additive mask is required: without one
    transformers builds a causal mask even when ``is_causal`` is False.
    """
    rows, length = ids.shape
    dtype = next(hf.parameters()).dtype
    additive = torch.zeros(rows, 1, length, length, dtype=dtype)  # (rows, 1, L, L)
    if mask is not None:
        additive = additive.masked_fill(~mask[:, None], torch.finfo(dtype).min)
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=additive).logits
