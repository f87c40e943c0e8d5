"""FastRunner: the runner's fast path (fused weights, shape buckets, CUDA graphs).

Same calls as :class:`~lopa.engine.runner.Runner` (``verify``, ``prediction``, ``commit``) and the same scoring
(:mod:`lopa.engine.scoring`); only the forward differs. :func:`make_runner` picks one (``LLM(enforce_eager=...)``,
``--enforce-eager``).

- Weights: q/k/v and gate/up are fused in place at construction (:func:`lopa.model.fused.fuse`).
- Buckets: a verification forward of ``rows x L`` window tokens over ``committed`` cached ones is padded up to
  ``(row bucket, L rounded up to window_granularity)`` and attends over the first ``kv_len`` cache slots
  (``committed + padded L`` rounded up to ``kv_granularity``), through the
  :class:`~lopa.model.kv_access.StaticRows` K/V access. Padded window positions are masked as keys (``valid``),
  padded rows are never read; so padding changes no logit of a real position beyond rounding.
- CUDA graphs (:class:`~lopa.engine.graphs.GraphBuckets`): each bucket ``(rows, L, kv_len)`` is captured on first
  use over the static cache, with a logits buffer shared by all graphs, then replayed. Shapes over
  ``max_graph_rows`` / ``max_graph_window`` (the prompt's prefill) and every shape on CPU run the same padded
  forward eagerly. Without graphs the granularities default to 1 (no window or kv padding: it would only cost
  compute).

``torch.compile`` is not used: on torch 2.13 CPU it took 166 s to compile the 2-layer test model's forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lopa.engine.graphs import GraphBuckets, GraphCounters, Key, round_up
from lopa.engine.runner import Batch, Candidate, Runner, build_batch
from lopa.errors import ConfigError
from lopa.model.fused import fuse
from lopa.model.kv_access import StaticRows, attention_block
from lopa.model.transformer import Transformer


def pack_inputs(b: Batch, rows: int, width: int, pad_id: int) -> Tensor:
    """Pad a batch to ``rows x width``: (4, rows, width) long planes ids, valid, logits_idx, positions.

    Padded window positions are invalid keys; padded rows see every key of their own (pad) window, so no
    query ever has all keys masked (softmax of nothing is NaN).
    """
    real_rows, length = b.ids.shape
    n = b.logits_idx.shape[1]
    packed = torch.zeros(4, rows, width, dtype=torch.long)  # (planes, rows, width)
    packed[0].fill_(pad_id)
    packed[0, :real_rows, :length] = b.ids
    packed[1, :real_rows, :length] = 1 if b.valid is None else b.valid.long()
    packed[1, real_rows:] = 1
    packed[2, :real_rows, :n] = b.logits_idx
    packed[3] = int(b.positions[0, 0]) + torch.arange(width)
    return packed


@dataclass
class FastRunner(GraphCounters, Runner):
    """Runner with fused weights, bucketed padding and per-bucket CUDA graphs (see the module docstring)."""

    use_graphs: bool | None = None  # None: on when the device is CUDA
    window_granularity: int | None = None  # None: 16 with graphs, 1 without (padding only buys graph reuse)
    kv_granularity: int | None = None  # None: 256 with graphs, 1 without
    max_graph_rows: int = 32
    max_graph_window: int = 256
    max_graphs: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.model, Transformer):
            raise ConfigError(f"the fast path needs a Transformer, got {type(self.model).__name__}; use Runner")
        self.device = torch.device(self.device)
        self.use_graphs, self.window_granularity, self.kv_granularity = graph_settings(
            self.device, self.use_graphs, self.window_granularity, self.kv_granularity
        )
        fuse(self.model)
        self._kept = None  # the static cache survives cache-less (vanilla) requests, and with it the graphs
        dtype = next(self.model.parameters()).dtype
        self.graphs = GraphBuckets(
            self.device, self._run, self._shapes, dtype, self.use_graphs, self.max_graph_rows,
            self.max_graph_window, self.max_graphs, reserve=self._reserve,
        )  # fmt: skip

    def begin(self, max_len: int, rows: int, use_cache: bool = True) -> None:
        """As Runner.begin; the cache gets slack so any padded window and kv bucket fits inside it."""
        self.cache = self._kept
        super().begin(round_up(max_len + self.window_granularity, self.kv_granularity), rows, use_cache)
        if self.cache is not None and self.cache is not self._kept:
            self.graphs.clear()  # graphs hold the old cache's addresses
            self._kept = self.cache

    def release(self) -> None:
        """As Runner.release; the captured graphs point into the dropped cache, so they go too."""
        self._kept = None
        self.graphs.clear()
        super().release()

    # ---- the forward -----------------------------------------------------------------------------------
    def _run(self, packed: Tensor, kv_len: int, out: tuple[Tensor, ...] | None = None) -> tuple[Tensor]:
        """The padded forward on device inputs (4, rows, L): logits (rows, L, vocab). Captured as is."""
        ids, valid, idx, positions = packed[0], packed[1].bool(), packed[2], packed[3]
        assert self.cache is not None
        kv = StaticRows.build(self.cache, positions, valid, kv_len, attention_block(self.model.config))
        return (self.model(ids, positions, kv, logits_idx=idx, out=out[0] if out else None),)

    def _shapes(self, key: Key) -> list[tuple[int, ...]]:
        rows, width, _ = key
        return [(rows, width, self.model.config.vocab_size)]

    def _reserve(self, key: Key) -> Key:
        """The logits buffer is first sized for every cache row and a 64-rounded window."""
        assert self.cache is not None
        return (self.cache.rows, round_up(key[1], 64), key[2])

    def bucket(self, rows: int, length: int, start: int) -> Key:
        """(rows, window, kv_len) a forward of ``rows x length`` window tokens after ``start`` runs at."""
        assert self.cache is not None
        if rows > self.cache.rows:
            raise ConfigError(f"forward has {rows} rows but the cache was allocated for {self.cache.rows}")
        padded_rows = min(1 << (rows - 1).bit_length(), self.cache.rows)
        width = round_up(length, self.window_granularity)
        kv_len = min(round_up(start + width, self.kv_granularity), self.cache.max_len)
        if start + width > kv_len:
            raise ConfigError(f"cache overflow: need {start + width} positions, capacity is {self.cache.max_len}")
        return padded_rows, width, kv_len

    @torch.inference_mode()
    def raw_logits(self, window_start: int, commit_len: int, cands: list[Candidate]) -> tuple[Tensor, Batch]:
        """Runner.raw_logits through the padded static forward (graph replay when captured)."""
        if self.cache is None:  # vanilla decoding re-encodes everything without a cache: nothing to capture
            return super().raw_logits(window_start, commit_len, cands)
        if self.cache.committed != window_start:
            raise RuntimeError(f"window starts at {window_start} but the cache holds {self.cache.committed}")
        b = build_batch(window_start, commit_len, cands, self.pad_id, self.shift)
        rows, length = b.ids.shape
        key = self.bucket(rows, length, window_start)
        (logits,) = self.graphs(key, pack_inputs(b, key[0], key[1], self.pad_id))  # (rows, L, vocab)
        self.cache.written = window_start + length  # what cache.write would have recorded
        self.forwards += 1
        # A view of the static output: it is read (and the winner's last logit cloned) before the next replay.
        return logits[:rows, : b.logits_idx.shape[1]], b


def graph_settings(
    device: torch.device, use_graphs: bool | None, window: int | None, kv: int | None
) -> tuple[bool, int, int]:
    """(use_graphs, window_granularity, kv_granularity) with their defaults filled in: graphs on CUDA, and
    padding to 16 / 256 only with graphs (it buys graph reuse, and costs compute)."""
    if use_graphs is None:
        use_graphs = device.type == "cuda"
    if use_graphs and device.type != "cuda":
        raise ConfigError(f"CUDA graphs need a CUDA device, the model is on {device}; pass use_graphs=False")
    window = window if window is not None else (16 if use_graphs else 1)
    kv = kv if kv is not None else (256 if use_graphs else 1)
    if window < 1 or kv < 1:
        raise ConfigError("window_granularity and kv_granularity must be >= 1")
    return use_graphs, window, kv


def make_runner(model: Transformer, device: torch.device | str, enforce_eager: bool | None = None) -> Runner:
    """The runner ``LLM`` uses: eager when ``enforce_eager``; by default the fast path on CUDA, eager on CPU
    (on CPU the padded fast path measured no faster than eager, see docs/gpu.md)."""
    device = torch.device(device)
    if enforce_eager is None:
        enforce_eager = device.type != "cuda"
    return Runner(model, device) if enforce_eager else FastRunner(model, device)
