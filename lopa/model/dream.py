"""The shared transformer of every model family: a Qwen2/LLaMA block stack run without a causal mask, as a pure
forward. Dream checkpoints load into it as they are; other families (LLaDA) map their tensor names onto it
(:mod:`lopa.model.family`), so the fused fast path applies to all of them.

``forward(ids, positions, cache, valid, logits_idx)`` runs a batch of branch *rows*. Every row sees the
committed prefix held in ``cache`` (if any) and attends fully inside its own window; keys of padded window
positions (``valid == False``) are masked out. An optional boolean ``attn_mask`` narrows attention further
(training uses it for the block-causal layout). Logits are computed only at ``logits_idx``.

The forward returns raw logits; which token a raw logit predicts is the family's ``logit_shift`` (Dream: the
logit at window index ``j`` predicts the token at ``j + 1``; LLaDA: at ``j``), applied once, by
:func:`lopa.model.family.predicting_index` in the runner. Parameter names are exactly Qwen2's, so a state dict from
a Dream or Qwen2 checkpoint loads as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lopa.cache import StaticKVCache
from lopa.model.config import ModelConfig
from lopa.model.layers import MLP, RMSNorm, Rotary, apply_rotary


class Attention(nn.Module):
    """GQA self-attention with q/k/v biases; reads and pre-writes the static cache."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.heads, self.kv_heads, self.head_dim = (
            layer,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)

    def _qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries (rows, H, L, D) and keys / values (rows, Hkv, L, D), RoPE applied to q and k."""
        rows, length, _ = x.shape
        q = self.q_proj(x).view(rows, length, self.heads, self.head_dim).transpose(1, 2)  # (rows, H, L, D)
        k = self.k_proj(x).view(rows, length, self.kv_heads, self.head_dim).transpose(1, 2)  # (rows, Hkv, L, D)
        v = self.v_proj(x).view(rows, length, self.kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: StaticKVCache | None) -> Tensor:
        rows, length, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        if cache is not None:
            k, v = cache.write(self.layer, k, v)  # (rows, Hkv, committed + L, D)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(out.transpose(1, 2).reshape(rows, length, self.heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: StaticKVCache | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """``model.*`` in the checkpoint: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DreamModel(nn.Module):
    """Bidirectional Qwen2/LLaMA with an LM head, for every family; see the module docstring for the contract."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)

    def forward(
        self,
        ids: Tensor,
        positions: Tensor,
        cache: StaticKVCache | None = None,
        valid: Tensor | None = None,
        logits_idx: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """Run the window of each row.

        ids, positions: (rows, L) token ids and absolute positions.
        cache: committed prefix every row attends to; the window's K/V are pre-written after it.
        valid: (rows, L) bool, False on padding; padded keys are masked out.
        logits_idx: (rows, n) window indices whose logits to return; None returns all L.
        attn_mask: (rows, L, L) bool, extra restriction among window positions (True = may attend).
        Returns raw (unshifted) logits (rows, n, vocab) in the model dtype.
        """
        x = self.model.embed_tokens(ids)  # (rows, L, hidden)
        cos, sin = self.rotary(positions, x.dtype)
        mask = _attention_mask(ids.shape, cache.committed if cache is not None else 0, valid, attn_mask, ids.device)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache)
        if logits_idx is not None:
            x = torch.gather(x, 1, logits_idx[..., None].expand(-1, -1, x.shape[-1]))  # (rows, n, hidden)
        return self.lm_head(self.model.norm(x))


def _attention_mask(
    shape: torch.Size, prefix: int, valid: Tensor | None, window_mask: Tensor | None, device: torch.device
) -> Tensor | None:
    """Boolean mask (rows, 1, L, prefix + L) or None when every key is visible to every query."""
    if valid is None and window_mask is None:
        return None
    rows, length = shape
    inner = torch.ones(rows, length, length, dtype=torch.bool, device=device)  # (rows, L, L)
    if valid is not None:
        inner = inner & valid[:, None, :]
    if window_mask is not None:
        inner = inner & window_mask
    outer = torch.ones(rows, length, prefix, dtype=torch.bool, device=device)  # (rows, L, prefix)
    return torch.cat([outer, inner], dim=-1)[:, None]
