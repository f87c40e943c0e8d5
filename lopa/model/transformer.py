"""The shared transformer of every model family: a Qwen2/LLaMA block stack (optionally with Qwen3's per-head q/k
norm) run without a causal mask, as a pure forward. Dream checkpoints load into it as they are; other families
(LLaDA, SDAR) map their tensor names onto it (:mod:`lopa.model.families`), so the fused fast path applies to all of
them. A block-causal family's attention pattern reaches the forward as the caller's ``attn_mask``.

``forward(ids, positions, cache, valid, logits_idx)`` runs a batch of branch *rows*. Every row sees the
committed prefix held in ``cache`` (if any) and attends fully inside its own window; keys of padded window
positions (``valid == False``) are masked out. A block-causal model (``config.attention``) also applies its block
rule (:func:`lopa.model.kv_access.block_causal`). An optional boolean ``attn_mask`` narrows attention further
(training uses it for the block-causal layout). Logits are computed only at ``logits_idx``.

This is the one layer loop of every runner: eager or graph-captured, one sequence or many, they differ only in
the K/V access strategy the forward is given (:mod:`lopa.model.kv_access`).

The forward returns raw logits; which token a raw logit predicts is the family's ``logit_shift`` (Dream: the
logit at window index ``j`` predicts the token at ``j + 1``; LLaDA: at ``j``), applied once, by
:func:`lopa.model.families.predicting_index` in the runner. Parameter names are exactly Qwen2's, so a state dict from
a Dream or Qwen2 checkpoint loads as is.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lopa.model.cache import StaticKVCache
from lopa.model.config import ModelConfig
from lopa.model.kv_access import CacheWrite, KVAccess, attention_block
from lopa.model.layers import RMSNorm, Rotary, apply_rotary
from lopa.model.moe import feed_forward


class Attention(nn.Module):
    """GQA self-attention (q/k/v biases or not, optional per-head q/k RMSNorm); the K/V access strategy decides
    what the window's keys meet."""

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
        # Qwen3: RMSNorm over each head's queries and keys, before RoPE
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def projections(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries (B, T, H * D) and keys / values (B, T, Hkv * D)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: KVAccess) -> Tensor:
        rows, length, _ = x.shape
        q, k, v = self.projections(x)
        q = q.view(rows, length, self.heads, self.head_dim)  # (B, T, H, D)
        k = k.view(rows, length, self.kv_heads, self.head_dim)  # (B, T, Hkv, D)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D), (B, Hkv, T, D)
        v = v.view(rows, length, self.kv_heads, self.head_dim).transpose(1, 2)
        out = kv.attend(self.layer, apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v)  # (B, T, H * D)
        return self.o_proj(out)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = feed_forward(cfg.hidden_size, cfg.intermediate_size, cfg.moe, layer)  # dense MLP or experts
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: KVAccess) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """``model.*`` in the checkpoint: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
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
        cache: StaticKVCache | KVAccess | None = None,
        valid: Tensor | None = None,
        logits_idx: Tensor | None = None,
        attn_mask: Tensor | None = None,
        out: Tensor | None = None,
    ) -> Tensor:
        """Run the window of each row: the one layer loop of every runner.

        ids, positions: (rows, L) token ids and absolute positions.
        cache: committed prefix every row attends to; the window's K/V are pre-written after it. Or a K/V access
        strategy (:mod:`lopa.model.kv_access`), which then owns the masking (``valid`` and ``attn_mask`` unused).
        valid: (rows, L) bool, False on padding; padded keys are masked out.
        logits_idx: (rows, n) window indices whose logits to return; None returns all L.
        attn_mask: (rows, L, L) bool, extra restriction among window positions (True = may attend).
        out: a contiguous (rows, n, vocab) buffer the head writes into (graphs share one); needs a bias-free head.
        Returns raw (unshifted) logits (rows, n, vocab) in the model dtype.
        """
        if not isinstance(cache, KVAccess):
            cache = CacheWrite.build(ids, cache, valid, attn_mask, positions, attention_block(self.config))
        kv = cache
        x = self.model.embed_tokens(kv.tokens(ids))  # (B, T, hidden): (rows, L) unless the strategy packs
        cos, sin = self.rotary(kv.tokens(positions), x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, kv)
        h = self.model.norm(kv.gather(x, logits_idx))  # (rows, n, hidden)
        if out is None:
            return self.lm_head(h)
        flat = h.reshape(-1, h.shape[-1])  # (rows * n, hidden)
        torch.mm(flat, self.lm_head.weight.t(), out=out.view(flat.shape[0], -1))
        return out
