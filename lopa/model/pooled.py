"""The batched verification forward over many sequences, each with its own committed prefix in a KV pool.

Rows are branch windows of different sequences. Row ``r`` belongs to pool slot ``row_slot[r]``, whose
committed prefix ``[0, prefix_len[r])`` it attends to, plus its own window (keys of padded window positions
masked out). Prefixes of different lengths are padded to the longest one and masked per row, so one forward
serves sequences at any point of their decoding. Nothing is written to the pool here: the window's K/V come
back to the caller, who commits the winner's span into its slot (``cache.KVPool``). Works on a plain or fused
:class:`~lopa.model.dream.DreamModel`; the logits are Dream's raw (unshifted) logits, like ``forward``.

Windows differ in length (a joining sequence's first window holds its whole prompt, lookahead branches hold
one block), so when rows are padded the token-wise work (embeddings, norms, projections, MLP: nearly all the
FLOPs) runs on the packed valid tokens only, and only attention sees the padded ``(rows, window)`` layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lopa.model.dream import DreamModel


def pooled_forward(
    model: DreamModel,
    ids: Tensor,
    positions: Tensor,
    valid: Tensor | None,
    logits_idx: Tensor,
    pool_k: Tensor,
    pool_v: Tensor,
    row_slot: Tensor,
    prefix_len: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """One forward over the windows of all rows.

    ids, positions: (R, W); valid: (R, W) bool or None (no padding); logits_idx: (R, n) window indices;
    pool_k, pool_v: (layers, slots, Hkv, max_len, D); row_slot, prefix_len: (R,) long.
    Returns raw logits (R, n, vocab) and the window's keys / values (layers, R, Hkv, W, D) each.
    """
    rows, width = ids.shape
    dev = ids.device
    prefix = int(prefix_len.max()) if rows else 0
    mask = None
    if valid is not None or bool((prefix_len != prefix).any()):
        in_prefix = torch.arange(prefix, device=dev)[None, :] < prefix_len[:, None]  # (R, P)
        window = valid if valid is not None else torch.ones(rows, width, dtype=torch.bool, device=dev)
        mask = torch.cat([in_prefix, window], dim=1)[:, None, None, :]  # (R, 1, 1, P + W)
    packed = valid.flatten().nonzero().flatten() if valid is not None else None  # (T,) flat indices of real tokens
    flat_ids, flat_pos = ids.flatten(), positions.flatten()
    if packed is not None:
        flat_ids, flat_pos = flat_ids[packed], flat_pos[packed]
    x = model.model.embed_tokens(flat_ids)[None]  # (1, T, hidden)
    cos, sin = model.rotary(flat_pos[None], x.dtype)  # (1, T, D)
    layers = model.model.layers
    first = layers[0].self_attn
    win_k = x.new_empty(len(layers), rows, first.kv_heads, width, first.head_dim)  # (layers, R, Hkv, W, D)
    win_v = torch.empty_like(win_k)
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        q, k, v = attn._qkv(layer.input_layernorm(x), cos, sin)  # (1, H, T, D), (1, Hkv, T, D)
        q = _unpack(q, packed, rows, width)  # (R, H, W, D)
        k, v = _unpack(k, packed, rows, width, win_k[i]), _unpack(v, packed, rows, width, win_v[i])
        if prefix:
            k = torch.cat([pool_k[i, :, :, :prefix].index_select(0, row_slot), k], dim=2)  # (R, Hkv, P + W, D)
            v = torch.cat([pool_v[i, :, :, :prefix].index_select(0, row_slot), v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=attn.kv_heads != attn.heads)
        out = out.transpose(1, 2).reshape(rows * width, attn.heads * attn.head_dim)  # (R * W, H * D)
        out = out[packed] if packed is not None else out
        x = x + attn.o_proj(out[None])
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    flat = (torch.arange(rows, device=dev)[:, None] * width + logits_idx).flatten()  # (R * n,) into (R * W)
    if packed is not None:
        where = torch.full((rows * width,), -1, dtype=torch.long, device=dev)
        where[packed] = torch.arange(packed.numel(), device=dev)
        flat = where[flat]  # every wanted index is a real token (index 0 of a window always is)
    h = x[0, flat].view(rows, logits_idx.shape[1], -1)  # (R, n, hidden)
    return model.lm_head(model.model.norm(h)), win_k, win_v


def _unpack(t: Tensor, packed: Tensor | None, rows: int, width: int, out: Tensor | None = None) -> Tensor:
    """(1, heads, T, D) packed tokens → (R, heads, W, D) padded rows, zeros at padding (written into ``out``)."""
    heads, dim = t.shape[1], t.shape[3]
    flat = t[0].transpose(0, 1)  # (T, heads, D)
    if packed is not None:
        padded = t.new_zeros(rows * width, heads, dim)  # (R * W, heads, D)
        padded[packed] = flat
        flat = padded
    rowwise = flat.reshape(rows, width, heads, dim).transpose(1, 2)  # (R, heads, W, D)
    if out is None:
        return rowwise
    out.copy_(rowwise)
    return out
