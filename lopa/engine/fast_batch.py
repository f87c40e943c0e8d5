"""FastBatchRunner: the batched runner's fast path (fused weights, shape buckets, CUDA graphs).

Same calls as :class:`~lopa.engine.batch.BatchRunner` and the same scoring; only the forward differs. A batched
verification of ``R`` rows (all candidates of all running sequences) of width ``W`` over committed prefixes of at
most ``P`` positions is padded up to the bucket ``(R rounded up to a power of two, W rounded up to
window_granularity, P rounded up to kv_granularity)``: padded rows attend only to their own pad window (no slot
prefix), padded window positions are masked as keys and padded prefix positions per row, so padding changes no
logit of a real position beyond rounding. Every input (ids, valid, positions, logits indices, each row's slot and
prefix length) travels in one ``(6, rows, W)`` device tensor, and the forward (:func:`lopa.model.pooled.
pooled_forward` with a fixed prefix) has no host sync or data-dependent shape, so on CUDA each bucket is captured
as a CUDA graph on first use and replayed after (:class:`~lopa.engine.graphs.GraphBuckets`); logits and the
window's K/V land in static buffers that the scheduler reads (and commits from) before the next replay. On CPU,
or for shapes over ``max_graph_rows`` / ``max_graph_window``, the same padded forward runs eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lopa.engine.batch import BatchRunner
from lopa.engine.fast import graph_settings
from lopa.engine.graphs import GraphBuckets, GraphCounters, Key, round_up
from lopa.errors import ConfigError
from lopa.model.fused import fuse
from lopa.model.pooled import pooled_forward
from lopa.model.transformer import Transformer


@dataclass
class FastBatchRunner(GraphCounters, BatchRunner):
    """BatchRunner with fused weights, bucketed padding and per-bucket CUDA graphs (see the module docstring)."""

    use_graphs: bool | None = None  # None: on when the device is CUDA
    window_granularity: int | None = None  # None: 16 with graphs, 1 without
    kv_granularity: int | None = None  # None: 256 with graphs, 1 without
    max_graph_rows: int = 256
    max_graph_window: int = 128
    max_graphs: int = 64

    def __post_init__(self) -> None:
        if not isinstance(self.model, Transformer):
            raise ConfigError(f"the fast path needs a Transformer, got {type(self.model).__name__}; use BatchRunner")
        super().__post_init__()
        self.device = torch.device(self.device)
        self.use_graphs, self.window_granularity, self.kv_granularity = graph_settings(
            self.device, self.use_graphs, self.window_granularity, self.kv_granularity
        )
        fuse(self.model)
        self.graphs = GraphBuckets(
            self.device, self._run, self._shapes, self.pool.k.dtype, self.use_graphs, self.max_graph_rows,
            self.max_graph_window, self.max_graphs,
        )  # fmt: skip

    def bucket(self, rows: int, width: int, prefix: int) -> Key:
        """(rows, window, prefix) a forward of ``rows x width`` window tokens over prefixes <= ``prefix`` runs at."""
        padded_prefix = min(round_up(prefix, self.kv_granularity), self.max_model_len) if prefix else 0
        return 1 << (rows - 1).bit_length(), round_up(width, self.window_granularity), padded_prefix

    @torch.inference_mode()
    def _forward(
        self, ids: Tensor, positions: Tensor, valid: Tensor | None, idx: Tensor, row_slot: Tensor, prefix: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        rows, width = ids.shape
        key = self.bucket(rows, width, int(prefix.max()))
        packed = _pack(ids, positions, valid, idx, row_slot, prefix, key[0], key[1], self.pad_id)  # (6, rows, W)
        logits, win_k, win_v = self.graphs(key, packed)
        return logits[:rows, : idx.shape[1]], win_k[:, :rows, :, :width], win_v[:, :rows, :, :width]

    def _run(self, packed: Tensor, prefix: int, out: tuple[Tensor, ...] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The padded batched forward on device inputs (6, rows, W), static shapes only. Captured as is."""
        ids, valid, positions, idx = packed[0], packed[1].bool(), packed[2], packed[3]
        row_slot, prefix_len = packed[4, :, 0], packed[5, :, 0]  # (rows,)
        k, v = self.pool.k, self.pool.v
        return pooled_forward(self.model, ids, positions, valid, idx, k, v, row_slot, prefix_len, prefix, out)

    def _shapes(self, key: Key) -> list[tuple[int, ...]]:
        """Logits (rows, W, vocab) and window K / V (layers, rows, Hkv, W, D)."""
        rows, width, _ = key
        cfg = self.model.config
        kv = (cfg.num_hidden_layers, rows, cfg.num_key_value_heads, width, cfg.head_dim)
        return [(rows, width, cfg.vocab_size), kv, kv]


def _pack(
    ids: Tensor,
    positions: Tensor,
    valid: Tensor | None,
    idx: Tensor,
    row_slot: Tensor,
    prefix: Tensor,
    rows: int,
    width: int,
    pad_id: int,
) -> Tensor:
    """(6, rows, width) long planes: ids, valid, positions, logits indices, row slot, row prefix length.

    Padded rows: every window key valid, no prefix, slot 0 (never read back), so no query sees only masked keys.
    """
    real, length = ids.shape
    out = torch.zeros(6, rows, width, dtype=torch.long)  # (planes, rows, width)
    out[0].fill_(pad_id)
    out[0, :real, :length] = ids
    out[1] = 1
    out[1, :real] = 0
    out[1, :real, :length] = 1 if valid is None else valid.long()
    out[2, :real] = positions[:, :1] + torch.arange(width)
    out[2, real:] = torch.arange(width)
    out[3, :real, : idx.shape[1]] = idx
    out[4, :real] = row_slot[:, None]
    out[5, :real] = prefix[:, None]
    return out
