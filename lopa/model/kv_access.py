"""How a forward reaches its keys and values: the one seam between the shared layer loop and the caches.

:meth:`lopa.model.transformer.Transformer.forward` runs every layer the same way for every runner and hands each layer's
queries, keys and values (RoPE applied) to a K/V access strategy, which puts the window's K/V where its cache
wants them, builds the keys each query sees, runs attention and returns the output in the forward's token layout.
The strategies differ only in that:

- :class:`CacheWrite`: eager, one sequence. Pre-writes the window after the committed prefix of a
  :class:`~lopa.model.cache.StaticKVCache` (``cache.write``), or uses no cache; an optional boolean mask.
- :class:`StaticRows`: the one-sequence graph path. Writes the window at cache slots given by a device tensor
  (``index_copy_``) and attends over a fixed-length slice of the cache with a key mask, so no shape or offset
  depends on the committed length.
- :class:`PoolSlots`: many sequences. Each row attends to its own slot's committed prefix in a
  :class:`~lopa.model.cache.KVPool` plus its own window; the window's K/V land in buffers the caller commits from.
  Eagerly, rows of different widths run their token-wise work on the packed real tokens only.

Block-causal models (``ModelConfig.attention == "block_causal"``, SDAR) add one rule, built by
:func:`block_causal` for every strategy from absolute positions (device tensors only, so it can be captured): the
query at position ``i`` sees the key at position ``j`` iff ``j // block <= i // block``. The committed prefix holds
whole earlier blocks only, so it stays fully visible; the rule acts inside the window.

A strategy is built per forward; it holds no state across forwards beyond the caches it points into.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lopa.model.cache import StaticKVCache
from lopa.model.config import ModelConfig


def _attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """q (rows, H, L, D), k / v (rows, Hkv, S, D) → (rows, L, H * D). Reshape, never view: CUDA's kernels return
    their output strided."""
    rows, heads, length, dim = q.shape
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != heads)
    return out.transpose(1, 2).reshape(rows, length, heads * dim)


def attention_block(cfg: ModelConfig) -> int | None:
    """The attention block of a block-causal model; None for a bidirectional one."""
    if cfg.attention != "block_causal":
        return None
    assert cfg.block_size, "a block-causal config carries its block_size"
    return int(cfg.block_size)


def block_causal(q_pos: Tensor, k_pos: Tensor, block: int) -> Tensor:
    """Which keys each query may see under block-causal attention (blocks aligned to absolute position 0).

    q_pos: (rows, L) absolute query positions; k_pos: (rows or 1, S) absolute key positions. Returns (rows, L, S)
    bool, True where ``k_pos // block <= q_pos // block``. Device tensors only: safe inside a captured graph.
    """
    return (k_pos // block)[:, None, :] <= (q_pos // block)[:, :, None]


class KVAccess:
    """A forward's K/V access; the default token layout is the padded ``(rows, L)`` one."""

    def tokens(self, t: Tensor) -> Tensor:
        """(rows, L) per-token inputs (ids, positions) → the layout the token-wise work runs on."""
        return t

    def gather(self, x: Tensor, logits_idx: Tensor | None) -> Tensor:
        """Hidden states in token layout → (rows, n, hidden) at window indices ``logits_idx`` (None: all)."""
        if logits_idx is None:
            return x
        return torch.gather(x, 1, logits_idx[..., None].expand(-1, -1, x.shape[-1]))

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q (B, H, T, D), k / v (B, Hkv, T, D) of layer ``layer`` → attention output (B, T, H * D)."""
        raise NotImplementedError


class CacheWrite(KVAccess):
    """Eager, one sequence: pre-write the window after the committed prefix (``cache.write``), or no cache."""

    def __init__(self, cache: StaticKVCache | None, mask: Tensor | None) -> None:
        self.cache, self.mask = cache, mask

    @classmethod
    def build(
        cls,
        ids: Tensor,
        cache: StaticKVCache | None,
        valid: Tensor | None,
        window_mask: Tensor | None,
        positions: Tensor | None = None,
        block: int | None = None,
    ) -> CacheWrite:
        """ids, positions (rows, L); valid (rows, L) bool, False on padded keys; window_mask (rows, L, L) bool, an
        extra restriction among window positions (True = may attend); block: the attention block of a
        block-causal model (needs ``positions``). No mask at all when nothing is restricted."""
        mask = None
        if valid is not None or window_mask is not None or block is not None:
            rows, length = ids.shape
            inner = torch.ones(rows, length, length, dtype=torch.bool, device=ids.device)  # (rows, L, L)
            if valid is not None:
                inner = inner & valid[:, None, :]
            if window_mask is not None:
                inner = inner & window_mask
            if block is not None:
                assert positions is not None, "block-causal attention needs the window's positions"
                inner = inner & block_causal(positions, positions, block)
            prefix = cache.committed if cache is not None else 0
            outer = torch.ones(rows, length, prefix, dtype=torch.bool, device=ids.device)  # (rows, L, prefix)
            mask = torch.cat([outer, inner], dim=-1)[:, None]  # (rows, 1, L, prefix + L)
        return cls(cache, mask)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.cache is not None:
            k, v = self.cache.write(layer, k, v)  # (rows, Hkv, committed + L, D)
        return _attention(q, k, v, self.mask)


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


class StaticRows(KVAccess):
    """The one-sequence graph path: window K/V at device-given slots of the first rows of a static cache,
    attention over its first ``kv_len`` slots with a key mask."""

    def __init__(
        self, cache: StaticKVCache, slots: Tensor, kv_len: int, mask: Tensor, block: Tensor | None = None
    ) -> None:
        self.cache, self.slots, self.kv_len, self.mask = cache, slots, kv_len, mask
        self.block = block  # (1, L, S) bool block-causal rule among window queries and cache slots, or None
        self._folded: Tensor | None = None  # mask with the block rule repeated over each KV group's query heads

    @classmethod
    def build(
        cls, cache: StaticKVCache, positions: Tensor, valid: Tensor, kv_len: int, block: int | None = None
    ) -> StaticRows:
        """positions, valid: (rows, L); every row's window sits at the same absolute positions ``positions[0]``.
        Cache slot ``s`` holds absolute position ``s``, so a block-causal rule compares slots with positions."""
        slots = positions[0]  # (L,)
        rule = None
        if block is not None:
            rule = block_causal(slots[None], torch.arange(kv_len, device=slots.device)[None], block)  # (1, L, S)
        return cls(cache, slots, kv_len, key_mask(slots[:1], valid, kv_len), rule)

    def _mask(self, groups: int) -> Tensor:
        """(rows, 1, 1 or G * L, S): the key mask, and the block rule for the folded query axis (g * L + l)."""
        if self.block is None:
            return self.mask
        if self._folded is None:
            self._folded = self.mask & self.block.repeat(1, groups, 1)[:, None]  # (rows, 1, G * L, S)
        return self._folded

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        rows, heads, length, dim = q.shape
        kv_heads = k.shape[1]
        k_buf, v_buf = self.cache.k[layer, :rows, :, : self.kv_len], self.cache.v[layer, :rows, :, : self.kv_len]
        k_buf.index_copy_(2, self.slots, k)  # (rows, Hkv, S, D) views: no host offset baked in
        v_buf.index_copy_(2, self.slots, v)
        # Fold each KV group's query heads into the query axis (query head h uses KV head h // groups), so a
        # masked SDPA reads every K/V head once on any backend, with or without GQA support.
        groups = heads // kv_heads
        q = q.reshape(rows, kv_heads, groups * length, dim)  # (rows, Hkv, G * L, D)
        out = F.scaled_dot_product_attention(q, k_buf, v_buf, attn_mask=self._mask(groups))  # (rows, Hkv, G * L, D)
        # Unfold with reshape, never view: CUDA's kernels return this output strided (query axis outermost), and
        # a view cannot merge (Hkv, G) of such a layout. Head h = kv * G + g, as folded above; one copy at most.
        out = out.reshape(rows, kv_heads, groups, length, dim).permute(0, 3, 1, 2, 4)  # (rows, L, Hkv, G, D)
        return out.reshape(rows, length, heads * dim)


class PoolSlots(KVAccess):
    """Many sequences: row ``r`` attends to the committed prefix ``[0, prefix_len[r])`` of pool slot
    ``row_slot[r]`` (gathered up to ``prefix``, masked per row) plus its own window; the window's K/V are written
    to ``win_k`` / ``win_v`` (layers, rows, Hkv, W, D), never to the pool. With ``packed`` (flat indices of the
    real tokens of the ``(rows, W)`` layout) the token-wise work runs on the real tokens only, as ``(1, T)``."""

    def __init__(
        self,
        pool_k: Tensor,
        pool_v: Tensor,
        row_slot: Tensor,
        prefix: int,
        mask: Tensor | None,
        win: tuple[Tensor, Tensor],
        packed: Tensor | None = None,
    ) -> None:
        self.pool_k, self.pool_v, self.row_slot, self.prefix, self.mask = pool_k, pool_v, row_slot, prefix, mask
        self.win_k, self.win_v = win
        self.packed = packed
        self.rows, self.width = self.win_k.shape[1], self.win_k.shape[3]

    def tokens(self, t: Tensor) -> Tensor:
        return t if self.packed is None else t.flatten()[self.packed][None]  # (1, T)

    def gather(self, x: Tensor, logits_idx: Tensor | None) -> Tensor:
        if self.packed is None:
            return super().gather(x, logits_idx)
        assert logits_idx is not None, "a packed forward returns logits at logits_idx only"
        rows, n = logits_idx.shape
        flat = (torch.arange(rows, device=x.device)[:, None] * self.width + logits_idx).flatten()  # into (R * W)
        where = torch.full((rows * self.width,), -1, dtype=torch.long, device=x.device)
        where[self.packed] = torch.arange(self.packed.numel(), device=x.device)
        return x[0, where[flat]].view(rows, n, -1)  # every wanted index is a real token (window index 0 always is)

    def _unpack(self, t: Tensor) -> Tensor:
        """(1, heads, T, D) packed tokens → (R, heads, W, D) padded rows, zeros at padding."""
        heads, dim = t.shape[1], t.shape[3]
        padded = t.new_zeros(self.rows * self.width, heads, dim)  # (R * W, heads, D)
        padded[self.packed] = t[0].transpose(0, 1)
        return padded.view(self.rows, self.width, heads, dim).transpose(1, 2)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.packed is not None:
            q, k, v = self._unpack(q), self._unpack(k), self._unpack(v)  # (R, heads, W, D)
        self.win_k[layer].copy_(k)
        self.win_v[layer].copy_(v)
        if self.prefix:
            prefix_k = self.pool_k[layer, :, :, : self.prefix].index_select(0, self.row_slot)  # (R, Hkv, P, D)
            prefix_v = self.pool_v[layer, :, :, : self.prefix].index_select(0, self.row_slot)
            k, v = torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2)  # (R, Hkv, P + W, D)
        out = _attention(q, k, v, self.mask)  # (R, W, H * D)
        return out if self.packed is None else out.reshape(self.rows * self.width, -1)[self.packed][None]
