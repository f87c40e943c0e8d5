"""The batched verification forward over many sequences, each with its own committed prefix in a KV pool.

Rows are branch windows of different sequences. Row ``r`` belongs to pool slot ``row_slot[r]``, whose
committed prefix ``[0, prefix_len[r])`` it attends to, plus its own window (keys of padded window positions
masked out). Prefixes of different lengths are padded to the longest one and masked per row, so one forward
serves sequences at any point of their decoding. Nothing is written to the pool here: the window's K/V come
back to the caller, who commits the winner's span into its slot (``cache.KVPool``). Works on a plain or fused
:class:`~lopa.model.dream.DreamModel`; the logits are Dream's raw (unshifted) logits, like ``forward``.
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
    prefix = int(prefix_len.max()) if rows else 0
    x = model.model.embed_tokens(ids)  # (R, W, hidden)
    cos, sin = model.rotary(positions, x.dtype)
    mask = None
    if valid is not None or bool((prefix_len != prefix).any()):
        in_prefix = torch.arange(prefix, device=ids.device)[None, :] < prefix_len[:, None]  # (R, P)
        window = valid if valid is not None else torch.ones(rows, width, dtype=torch.bool, device=ids.device)
        mask = torch.cat([in_prefix, window], dim=1)[:, None, None, :]  # (R, 1, 1, P + W)
    layers = model.model.layers
    first = layers[0].self_attn
    win_k = x.new_empty(len(layers), rows, first.kv_heads, width, first.head_dim)  # (layers, R, Hkv, W, D)
    win_v = torch.empty_like(win_k)
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        q, k, v = attn._qkv(layer.input_layernorm(x), cos, sin)  # (R, H, W, D), (R, Hkv, W, D)
        win_k[i], win_v[i] = k, v
        if prefix:
            k = torch.cat([pool_k[i, :, :, :prefix].index_select(0, row_slot), k], dim=2)  # (R, Hkv, P + W, D)
            v = torch.cat([pool_v[i, :, :, :prefix].index_select(0, row_slot), v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=attn.kv_heads != attn.heads)
        x = x + attn.o_proj(out.transpose(1, 2).reshape(rows, width, attn.heads * attn.head_dim))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    x = torch.gather(x, 1, logits_idx[..., None].expand(-1, -1, x.shape[-1]))  # (R, n, hidden)
    return model.lm_head(model.model.norm(x)), win_k, win_v
