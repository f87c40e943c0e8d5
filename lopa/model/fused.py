"""Fused weights and a graph-friendly forward for a loaded :class:`~lopa.model.dream.DreamModel`.

:func:`fuse` concatenates each layer's q/k/v projections into one ``qkv_proj`` and gate/up into one
``gate_up_proj`` (one matmul instead of three / two: fewer kernel launches, one read of the input), swapping
the modules in place. The fused model keeps DreamModel's forward contract exactly, so the eager runner can
still drive it; only its state-dict names change, so fuse after loading (and LoRA merging), never before saving.

:func:`static_forward` is the forward the fast runner captures in a CUDA graph. It differs from
``DreamModel.forward`` only in how it reaches the cache: the window's K/V go to cache slots named by a device
tensor (``index_copy_``) and attention reads a fixed-length slice of the cache with a key mask, so no shape or
slice offset depends on the committed length. Called by :mod:`lopa.engine.fast` and ``bench/gpu_step.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lopa.cache import StaticKVCache
from lopa.model.dream import Attention, DreamModel
from lopa.model.layers import MLP, apply_rotary


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


class FusedAttention(nn.Module):
    """Attention with one ``qkv_proj``; same forward as :class:`~lopa.model.dream.Attention`."""

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        self.layer, self.heads, self.kv_heads, self.head_dim = attn.layer, attn.heads, attn.kv_heads, attn.head_dim
        self.qkv_proj = _concat_linear([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = attn.o_proj
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.split = (q, kv, kv)

    def _qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        rows, length, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = q.view(rows, length, self.heads, self.head_dim).transpose(1, 2)  # (rows, H, L, D)
        k = k.view(rows, length, self.kv_heads, self.head_dim).transpose(1, 2)  # (rows, Hkv, L, D)
        v = v.view(rows, length, self.kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def _out(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        rows, _, length, _ = q.shape
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(out.transpose(1, 2).reshape(rows, length, self.heads * self.head_dim))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: StaticKVCache | None) -> Tensor:
        q, k, v = self._qkv(x, cos, sin)
        if cache is not None:
            k, v = cache.write(self.layer, k, v)  # (rows, Hkv, committed + L, D)
        return self._out(q, k, v, mask)

    def forward_static(
        self, x: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor, k_buf: Tensor, v_buf: Tensor, slots: Tensor
    ) -> Tensor:
        """k_buf/v_buf: (rows, Hkv, S, D) cache views; slots: (L,) cache slots of the window; key_mask (rows,1,1,S)."""
        q, k, v = self._qkv(x, cos, sin)
        k_buf.index_copy_(2, slots, k)  # pre-write the window at device-given slots: no host offset baked in
        v_buf.index_copy_(2, slots, v)
        rows, _, length, dim = q.shape
        # Fold each KV group's query heads into the query axis (query head h uses KV head h // groups), so a
        # masked SDPA reads every K/V head once on any backend, with or without GQA support.
        groups = self.heads // self.kv_heads
        q = q.reshape(rows, self.kv_heads, groups * length, dim)  # (rows, Hkv, G * L, D)
        out = F.scaled_dot_product_attention(q, k_buf, v_buf, attn_mask=key_mask)  # (rows, Hkv, G * L, D)
        # Unfold with reshape, never view: CUDA's kernels return this output strided (query axis outermost), and
        # a view cannot merge (Hkv, G) of such a layout. Head h = kv * G + g, as folded above; one copy at most.
        out = out.reshape(rows, self.kv_heads, groups, length, dim).permute(0, 3, 1, 2, 4)  # (rows, L, Hkv, G, D)
        return self.o_proj(out.reshape(rows, length, self.heads * dim))


class FusedMLP(nn.Module):
    """SwiGLU with one ``gate_up_proj``; same output as :class:`~lopa.model.layers.MLP`."""

    def __init__(self, mlp: MLP) -> None:
        super().__init__()
        self.gate_up_proj = _concat_linear([mlp.gate_proj, mlp.up_proj])
        self.down_proj = mlp.down_proj

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def fuse(model: DreamModel) -> DreamModel:
    """Fuse q/k/v and gate/up of every layer in place (idempotent); returns ``model``.

    Layers are swapped one at a time, so peak extra memory is one layer's projections, not a model copy.
    """
    for layer in model.model.layers:
        if isinstance(layer.self_attn, Attention):
            layer.self_attn = FusedAttention(layer.self_attn)
        if isinstance(layer.mlp, MLP):
            layer.mlp = FusedMLP(layer.mlp)
    return model


def is_fused(model: nn.Module) -> bool:
    """True when every layer of a DreamModel has fused projections."""
    if not isinstance(model, DreamModel):
        return False
    return all(
        isinstance(layer.self_attn, FusedAttention) and isinstance(layer.mlp, FusedMLP) for layer in model.model.layers
    )


def key_mask(start: Tensor, valid: Tensor, kv_len: int) -> Tensor:
    """Which cache slots each row may attend to: the committed prefix and its own valid window keys.

    start: (1,) long, committed length; valid: (rows, L) bool. Returns (rows, 1, 1, kv_len) bool. Built from
    device tensors only, so it can live inside a captured graph.
    """
    rows, length = valid.shape
    rel = torch.arange(kv_len, device=valid.device)[None, :] - start  # (1, S) slot index relative to the window
    in_window = (rel >= 0) & (rel < length)
    window_ok = valid.gather(1, rel.clamp(0, length - 1).expand(rows, kv_len))  # (rows, S)
    return ((rel < 0) | (in_window & window_ok))[:, None, None, :]


def static_forward(
    model: DreamModel,
    ids: Tensor,
    positions: Tensor,
    valid: Tensor,
    logits_idx: Tensor,
    cache: StaticKVCache,
    kv_len: int,
    out: Tensor | None = None,
) -> Tensor:
    """The verification forward over a fixed cache slice; needs a fused model.

    ids, positions: (rows, L); valid: (rows, L) bool; logits_idx: (rows, n) window indices to return.
    Writes the window's K/V at slots ``positions[0]`` of the first ``rows`` cache rows and attends over cache
    slots ``[0, kv_len)``. Returns raw logits (rows, n, vocab), as ``DreamModel.forward`` does; with ``out``
    (a contiguous (rows, n, vocab) buffer) the head writes into it, so graphs can share one logits buffer.
    """
    rows = ids.shape[0]
    slots = positions[0]  # (L,) every row's window sits at the same absolute positions
    mask = key_mask(slots[:1], valid, kv_len)  # (rows, 1, 1, S)
    x = model.model.embed_tokens(ids)  # (rows, L, hidden)
    cos, sin = model.rotary(positions, x.dtype)
    for i, layer in enumerate(model.model.layers):
        k_buf, v_buf = cache.k[i, :rows, :, :kv_len], cache.v[i, :rows, :, :kv_len]  # (rows, Hkv, S, D) views
        x = x + layer.self_attn.forward_static(layer.input_layernorm(x), cos, sin, mask, k_buf, v_buf, slots)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    x = torch.gather(x, 1, logits_idx[..., None].expand(-1, -1, x.shape[-1]))  # (rows, n, hidden)
    if out is None:
        return model.lm_head(model.model.norm(x))
    h = model.model.norm(x).reshape(-1, x.shape[-1])  # (rows * n, hidden)
    torch.mm(h, model.lm_head.weight.t(), out=out.view(h.shape[0], -1))  # the head has no bias
    return out
