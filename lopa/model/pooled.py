"""The batched verification forward over many sequences, each with its own committed prefix in a KV pool.

Rows are branch windows of different sequences. Row ``r`` belongs to pool slot ``row_slot[r]``, whose
committed prefix ``[0, prefix_len[r])`` it attends to, plus its own window (keys of padded window positions
masked out). Prefixes of different lengths are padded to the longest one and masked per row, so one forward
serves sequences at any point of their decoding. Nothing is written to the pool here: the window's K/V come
back to the caller, who commits the winner's span into its slot (``cache.KVPool``). Works on a plain or fused
:class:`~lopa.model.transformer.Transformer` (the same layer loop, with the :class:`~lopa.model.kv_access.PoolSlots`
strategy); the logits are the raw (unshifted) logits, like ``forward``. A block-causal model's block rule
(:func:`lopa.model.kv_access.block_causal`) is added to the mask from absolute positions.

Eagerly, windows that differ in length (a joining sequence's first window holds its whole prompt, lookahead
branches hold one block) run their token-wise work (embeddings, norms, projections, MLP: nearly all the FLOPs) on
the packed valid tokens only; only attention sees the padded ``(rows, window)`` layout. The graph path
(:mod:`lopa.engine.fast_batch`) passes a fixed ``prefix`` instead: no host sync and no data-dependent shape.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lopa.model.kv_access import PoolSlots, attention_block, block_causal
from lopa.model.transformer import Transformer


def pooled_forward(
    model: Transformer,
    ids: Tensor,
    positions: Tensor,
    valid: Tensor | None,
    logits_idx: Tensor,
    pool_k: Tensor,
    pool_v: Tensor,
    row_slot: Tensor,
    prefix_len: Tensor,
    prefix: int | None = None,
    out: tuple[Tensor, ...] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One forward over the windows of all rows.

    ids, positions: (R, W); valid: (R, W) bool or None (no padding); logits_idx: (R, n) window indices;
    pool_k, pool_v: (layers, slots, Hkv, max_len, D); row_slot, prefix_len: (R,) long.
    prefix: None (eager): the longest ``prefix_len`` (one host sync), masks only where something is padded and
    packed tokens when windows are. An int (graph-safe): the padded prefix to read, always masked, padded layout.
    out: buffers to write the results into (logits, window K, window V), else they are allocated.
    Returns raw logits (R, n, vocab) and the window's keys / values (layers, R, Hkv, W, D) each.
    """
    rows, width = ids.shape
    dev = ids.device
    static = prefix is not None
    if prefix is None:
        prefix = int(prefix_len.max()) if rows else 0
    mask = None
    if static or valid is not None or bool((prefix_len != prefix).any()):
        in_prefix = torch.arange(prefix, device=dev)[None, :] < prefix_len[:, None]  # (R, P)
        window = valid if valid is not None else torch.ones(rows, width, dtype=torch.bool, device=dev)
        mask = torch.cat([in_prefix, window], dim=1)[:, None, None, :]  # (R, 1, 1, P + W)
    block = attention_block(model.config)
    if block is not None:  # block-causal: the rule over absolute positions, prefix slot s at position s
        keys = torch.cat([torch.arange(prefix, device=dev)[None].expand(rows, prefix), positions], dim=1)  # (R, P+W)
        rule = block_causal(positions, keys, block)[:, None]  # (R, 1, W, P + W)
        mask = rule if mask is None else mask & rule
    if out is not None:
        logits, win_k, win_v = out
    else:
        cfg = model.config
        kv_shape = (cfg.num_hidden_layers, rows, cfg.num_key_value_heads, width, cfg.head_dim)
        logits, win_k, win_v = None, pool_k.new_empty(kv_shape), pool_v.new_empty(kv_shape)
    packed = valid.flatten().nonzero().flatten() if valid is not None and not static else None  # (T,) real tokens
    kv = PoolSlots(pool_k, pool_v, row_slot, prefix, mask, (win_k, win_v), packed)
    return model(ids, positions, kv, logits_idx=logits_idx, out=logits), win_k, win_v
