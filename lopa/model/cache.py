"""Static KV cache: preallocated key/value buffers shared by the branch rows of one request.

Layout per layer: ``(rows, kv_heads, max_len, head_dim)``; keys are stored after RoPE. Positions
``[0, committed)`` hold the committed prefix and are identical in every row. A forward writes its window's
K/V at ``[committed, committed + L)`` of each row it runs (the *pre-write*); nothing is committed until the
engine calls :meth:`commit`, which advances ``committed`` over the leading ``n`` window positions and copies
the winning row's span to all rows. :meth:`rollback` forgets uncommitted writes (they are simply overwritten
by the next forward). The cache holds no policy: which span and which row come from the engine.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lopa.errors import ConfigError


def _zeros_kv(
    num_layers: int,
    rows: int,
    kv_heads: int,
    max_len: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> tuple[Tensor, Tensor]:
    """Zeroed K and V buffers, each (layers, rows, kv_heads, max_len, head_dim): a cache's rows or a pool's slots."""
    shape = (num_layers, rows, kv_heads, max_len, head_dim)
    return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)


class StaticKVCache:
    """Preallocated K/V for ``rows`` branch rows of up to ``max_len`` positions."""

    def __init__(
        self,
        num_layers: int,
        rows: int,
        max_len: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if rows < 1 or max_len < 1:
            raise ConfigError(f"cache needs rows >= 1 and max_len >= 1, got rows={rows}, max_len={max_len}")
        self.k, self.v = _zeros_kv(num_layers, rows, kv_heads, max_len, head_dim, dtype, device)
        self.rows, self.max_len = rows, max_len
        self.committed = 0  # committed prefix length, identical in all rows
        self.written = 0  # end of the last pre-write (>= committed)

    # ---- used by the model forward -------------------------------------------------------------------
    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Pre-write a window's K/V (rows, kv_heads, L, head_dim) after the committed prefix.

        Returns views of keys/values ``(rows, kv_heads, committed + L, head_dim)`` for attention.
        """
        rows, length = k.shape[0], k.shape[2]
        start, end = self.committed, self.committed + length
        if rows > self.rows:
            raise ConfigError(f"forward has {rows} rows but the cache was allocated for {self.rows}")
        if end > self.max_len:
            raise ConfigError(f"cache overflow: need {end} positions, capacity is {self.max_len}")
        self.k[layer, :rows, :, start:end] = k
        self.v[layer, :rows, :, start:end] = v
        self.written = end
        return self.k[layer, :rows, :, :end], self.v[layer, :rows, :, :end]

    # ---- used by the engine --------------------------------------------------------------------------
    def commit(self, n: int, from_row: int = 0) -> None:
        """Commit the first ``n`` pre-written positions of ``from_row``; every row gets that row's copy."""
        if n < 0 or self.committed + n > self.written:
            raise ConfigError(f"cannot commit {n} positions: only {self.written - self.committed} are written")
        start, end = self.committed, self.committed + n
        if n and self.rows > 1:
            self.k[:, :, :, start:end] = self.k[:, from_row : from_row + 1, :, start:end]
            self.v[:, :, :, start:end] = self.v[:, from_row : from_row + 1, :, start:end]
        self.committed = end
        self.written = end

    def rollback(self) -> None:
        """Forget every uncommitted write."""
        self.written = self.committed

    def reset(self) -> None:
        """Empty the cache for a new request (buffers are kept)."""
        self.committed = self.written = 0

    def span(self, start: int, end: int, row: int = 0) -> tuple[Tensor, Tensor]:
        """K and V of ``row`` over ``[start, end)``: each (layers, kv_heads, end - start, head_dim)."""
        return self.k[:, row, :, start:end], self.v[:, row, :, start:end]

    def overwrite(self, start: int, k: Tensor, v: Tensor) -> None:
        """Write a span (layers, kv_heads, n, head_dim) into every row at ``start`` (used by branch commit)."""
        end = start + k.shape[2]
        self.k[:, :, :, start:end] = k[:, None]
        self.v[:, :, :, start:end] = v[:, None]

    def committed_view(self) -> tuple[Tensor, Tensor]:
        """Row 0's committed K/V, (layers, kv_heads, committed, head_dim) each; all rows hold the same."""
        return self.span(0, self.committed, row=0)

    def memory_bytes(self) -> int:
        """Bytes held by the K and V buffers."""
        return 2 * self.k.numel() * self.k.element_size()


class KVPool:
    """Committed K/V of up to ``slots`` sequences decoded together, one slot per sequence.

    Layout per layer: ``(slots, kv_heads, max_len, head_dim)``, keys after RoPE. A slot holds only its
    sequence's committed prefix ``[0, committed[slot])`` (branch windows are never written here: the batched
    forward returns them and the engine commits the winner's span with :meth:`commit`). Slots are allocated
    up front, so the pool never grows: when none is free, new sequences wait.
    """

    def __init__(
        self,
        num_layers: int,
        slots: int,
        max_len: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if slots < 1 or max_len < 1:
            raise ConfigError(f"the KV pool needs slots >= 1 and max_len >= 1, got slots={slots}, max_len={max_len}")
        self.k, self.v = _zeros_kv(num_layers, slots, kv_heads, max_len, head_dim, dtype, device)
        self.slots, self.max_len = slots, max_len
        self.committed = [0] * slots
        self._free = list(range(slots))

    @staticmethod
    def bytes_needed(
        num_layers: int, slots: int, max_len: int, kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """What a pool of this shape holds, before allocating it."""
        return 2 * num_layers * slots * max_len * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        """The lowest free slot, emptied; None when every slot is taken."""
        if not self._free:
            return None
        slot = self._free.pop(0)
        self.committed[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.slots:
            raise ConfigError(f"slot {slot} is not in use")
        self._free.append(slot)
        self._free.sort()

    def commit(self, slot: int, k: Tensor, v: Tensor) -> None:
        """Append ``n`` positions (layers, kv_heads, n, head_dim) each to ``slot``'s committed prefix."""
        start, n = self.committed[slot], k.shape[2]
        if start + n > self.max_len:
            raise ConfigError(f"KV pool overflow: slot needs {start + n} positions, capacity is {self.max_len}")
        self.k[:, slot, :, start : start + n] = k
        self.v[:, slot, :, start : start + n] = v
        self.committed[slot] = start + n

    def span(self, slot: int, start: int, end: int) -> tuple[Tensor, Tensor]:
        """K and V of ``slot`` over ``[start, end)``: each (layers, kv_heads, end - start, head_dim)."""
        return self.k[:, slot, :, start:end], self.v[:, slot, :, start:end]

    def memory_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
