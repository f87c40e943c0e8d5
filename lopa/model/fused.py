"""Fused weights for a loaded :class:`~lopa.model.transformer.Transformer`.

:func:`fuse` concatenates each layer's q/k/v projections into one ``qkv_proj`` and gate/up into one
``gate_up_proj`` (one matmul instead of three / two: fewer kernel launches, one read of the input), swapping
the modules in place; a mixture-of-experts block (:mod:`lopa.model.moe`) stays as it is. The fused model keeps
Transformer's forward exactly (the same layer loop, any K/V access strategy), so every runner can drive it; only
its state-dict names change, so fuse after loading (and LoRA merging), never before saving. Called by the fast
runners (:mod:`lopa.engine.fast`, :mod:`lopa.engine.fast_batch`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lopa.model.layers import MLP
from lopa.model.moe import SparseMoeBlock
from lopa.model.transformer import Attention, Transformer


def _concat_linear(parts: list[nn.Linear]) -> nn.Linear:
    """One Linear whose output is the concatenation of ``parts``' outputs (same input width, device, dtype)."""
    w = parts[0].weight
    bias = parts[0].bias is not None
    out = nn.Linear(w.shape[1], sum(p.weight.shape[0] for p in parts), bias=bias, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(torch.cat([p.weight for p in parts]))  # (sum of out, in)
        if bias:
            out.bias.copy_(torch.cat([p.bias for p in parts]))
    return out.requires_grad_(False)


class FusedAttention(Attention):
    """Attention with one ``qkv_proj``; same forward as :class:`~lopa.model.transformer.Attention`."""

    def __init__(self, attn: Attention) -> None:
        nn.Module.__init__(self)
        self.layer, self.heads, self.kv_heads, self.head_dim = attn.layer, attn.heads, attn.kv_heads, attn.head_dim
        self.qkv_proj = _concat_linear([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = attn.o_proj
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.split = (q, kv, kv)

    def projections(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        return q, k, v


class FusedMLP(nn.Module):
    """SwiGLU with one ``gate_up_proj``; same output as :class:`~lopa.model.layers.MLP`."""

    def __init__(self, mlp: MLP) -> None:
        super().__init__()
        self.gate_up_proj = _concat_linear([mlp.gate_proj, mlp.up_proj])
        self.down_proj = mlp.down_proj

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def fuse(model: Transformer) -> Transformer:
    """Fuse q/k/v and gate/up of every layer in place (idempotent); returns ``model``.

    Layers are swapped one at a time, so peak extra memory is one layer's projections, not a model copy.
    """
    for layer in model.model.layers:
        if not isinstance(layer.self_attn, FusedAttention):
            layer.self_attn = FusedAttention(layer.self_attn)
        if isinstance(layer.mlp, MLP):
            layer.mlp = FusedMLP(layer.mlp)
    return model


def is_fused(model: nn.Module) -> bool:
    """True when every layer of a Transformer has fused projections."""
    if not isinstance(model, Transformer):
        return False
    return all(
        isinstance(layer.self_attn, FusedAttention) and isinstance(layer.mlp, (FusedMLP, SparseMoeBlock))
        for layer in model.model.layers
    )
