"""FastRunner: the runner's fast path (fused weights, shape buckets, CUDA graphs, on-device token choice).

Same three methods as :class:`~lopa.engine.runner.Runner` (``verify``, ``prediction``, ``commit``), so the
engine cannot tell them apart; :func:`make_runner` picks one (``LLM(enforce_eager=...)``, ``--enforce-eager``).

- Weights: q/k/v and gate/up are fused in place at construction (:func:`lopa.model.fused.fuse`).
- Buckets: a verification forward of ``rows x L`` window tokens over ``committed`` cached ones is padded up to
  ``(row bucket, L rounded up to window_granularity)`` and attends over the first ``kv_len`` cache slots
  (``committed + padded L`` rounded up to ``kv_granularity``). Padded window positions are masked as keys
  (``valid``), padded rows are never read; so padding changes no logit of a real position beyond rounding.
- CUDA graphs: each bucket ``(rows, L, kv_len)`` is captured on first use with a static input buffer over the
  static cache and a logits buffer shared by all graphs, then replayed. Shapes over ``max_graph_rows`` /
  ``max_graph_window`` (the prompt's prefill) and every shape on CPU run the same padded forward eagerly.
  Without graphs the granularities default to 1 (no window or kv padding: it would only cost compute).
- Token choice: greedy decoding picks tokens and confidences for all rows on the device and brings them to
  the host in one copy per step (the engine's state lives on the host). Sampling keeps the eager per-row
  path, whose seeded CPU generators make runs reproducible across runners.

``torch.compile`` is not used: on torch 2.13 CPU it took 166 s to compile the 2-layer test model's forward.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lopa.decoding.confidence import Prediction, Sampler, confidence_of, filtered_probs
from lopa.decoding.lopa import branch_score
from lopa.engine.runner import Batch, Candidate, Runner, build_batch
from lopa.errors import ConfigError
from lopa.model.dream import DreamModel
from lopa.model.fused import fuse, static_forward


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def shared_pool(graphs: Iterable[Any]) -> Any:
    """The memory pool a new capture shares: a LIVE graph's ``graph.pool()``, or None (a fresh pool) if none lives.

    Graphs never run concurrently, so they can share one pool. But a pool's handle is only valid while a graph
    captured into it exists: when its last graph is destroyed, the CUDA caching allocator keeps the pool's entry
    with use count 0 until every block in it is freed (anything allocated during a capture that outlives the
    graph keeps it), and a capture into that entry fails its ``use_count > 0`` assert. So the handle is never
    kept across dropped graphs; it is taken from a graph that is alive now.
    """
    for g in graphs:
        return g.graph.pool()
    return None


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
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: Tensor  # (4, rows, L) long, static input read by the graph
    logits: Tensor  # (rows, L, vocab), static output written by every replay


@dataclass
class FastRunner(Runner):
    """Runner with fused weights, bucketed padding and per-bucket CUDA graphs (see the module docstring)."""

    use_graphs: bool | None = None  # None: on when the device is CUDA
    window_granularity: int | None = None  # None: 16 with graphs, 1 without (padding only buys graph reuse)
    kv_granularity: int | None = None  # None: 256 with graphs, 1 without
    max_graph_rows: int = 32
    max_graph_window: int = 256
    max_graphs: int = 64
    captured: dict[tuple[int, int, int], _Graph] = field(default_factory=dict, repr=False)
    replays: int = 0  # forwards served by a graph replay
    eager_forwards: int = 0  # padded forwards run eagerly (CPU, or a shape not captured)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.model, DreamModel):
            raise ConfigError(f"the fast path needs a DreamModel, got {type(self.model).__name__}; use Runner")
        self.device = torch.device(self.device)
        if self.use_graphs is None:
            self.use_graphs = self.device.type == "cuda"
        if self.use_graphs and self.device.type != "cuda":
            raise ConfigError(f"CUDA graphs need a CUDA device, the model is on {self.device}; pass use_graphs=False")
        if self.window_granularity is None:
            self.window_granularity = 16 if self.use_graphs else 1
        if self.kv_granularity is None:
            self.kv_granularity = 256 if self.use_graphs else 1
        if self.window_granularity < 1 or self.kv_granularity < 1:
            raise ConfigError("window_granularity and kv_granularity must be >= 1")
        fuse(self.model)
        self._kept = None  # the static cache survives cache-less (vanilla) requests, and with it the graphs
        self._logits: Tensor | None = None  # flat buffer every graph writes its logits into (see _capture)

    def begin(self, max_len: int, rows: int, use_cache: bool = True) -> None:
        """As Runner.begin; the cache gets slack so any padded window and kv bucket fits inside it."""
        self.cache = self._kept
        super().begin(round_up(max_len + self.window_granularity, self.kv_granularity), rows, use_cache)
        if self.cache is not None and self.cache is not self._kept:
            self.captured.clear()  # graphs hold the old cache's addresses
            self._kept = self.cache

    def release(self) -> None:
        """As Runner.release; the captured graphs point into the dropped cache, so they go too."""
        self._kept = None
        self.captured.clear()
        super().release()

    # ---- the forward -----------------------------------------------------------------------------------
    def _run(self, packed: Tensor, kv_len: int, out: Tensor | None = None) -> Tensor:
        """The padded forward on device inputs (4, rows, L): logits (rows, L, vocab). Captured as is."""
        ids, valid, idx, positions = packed[0], packed[1].bool(), packed[2], packed[3]
        return static_forward(self.model, ids, positions, valid, idx, self.cache, kv_len, out)

    def bucket(self, rows: int, length: int, start: int) -> tuple[int, int, int]:
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
        packed = pack_inputs(b, key[0], key[1], self.pad_id)  # (4, rows, L) on the host
        graph = self._graph(key, packed)
        if graph is not None:
            host = packed.pin_memory() if self.device.type == "cuda" else packed  # pinned: truly async copy
            graph.inputs.copy_(host, non_blocking=True)
            graph.graph.replay()
            logits, self.replays = graph.logits, self.replays + 1
        else:
            logits = self._run(packed.to(self.device), key[2])
            self.eager_forwards += 1
        self.cache.written = window_start + length  # what cache.write would have recorded
        self.forwards += 1
        # A view of the static output: it is read (and the winner's last logit cloned) before the next replay.
        return logits[:rows, : b.logits_idx.shape[1]], b

    def _graph(self, key: tuple[int, int, int], packed: Tensor) -> _Graph | None:
        """The graph of ``key``, captured now if allowed; None means run eagerly."""
        if key in self.captured:
            return self.captured[key]
        rows, width, _ = key
        if (
            not self.use_graphs
            or rows > self.max_graph_rows
            or width > self.max_graph_window
            or len(self.captured) >= self.max_graphs
        ):
            return None
        self.captured[key] = self._capture(key, packed)
        return self.captured[key]

    def _output(self, key: tuple[int, int, int]) -> Tensor:
        """The static logits buffer (rows, L, vocab) of bucket ``key``: a view of the shared flat buffer."""
        rows, width, _ = key
        vocab = self.model.config.vocab_size
        if self._logits is None or self._logits.numel() < rows * width * vocab:
            # Graphs write logits into ONE shared buffer (a 7B graph's own output would be up to 0.3 GB each);
            # safe because every output is consumed before the next replay. Growing it orphans older graphs.
            self.captured.clear()
            size = self.cache.rows * round_up(width, 64) * vocab
            self._logits = torch.empty(size, dtype=self.cache.k.dtype, device=self.device)
        return self._logits[: rows * width * vocab].view(rows, width, vocab)

    def _capture(self, key: tuple[int, int, int], packed: Tensor) -> _Graph:
        kv_len = key[2]
        out = self._output(key)
        inputs = packed.to(self.device)  # the current step's inputs double as warm-up inputs
        pool = shared_pool(self.captured.values())  # after _output: growing it may have dropped every graph
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm up off the capture stream (lazy inits, workspace allocation)
            for _ in range(2):
                self._run(inputs, kv_len, out)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self._run(inputs, kv_len, out)
        return _Graph(graph, inputs, out)

    # ---- scoring -------------------------------------------------------------------------------------
    def verify(
        self, window_start: int, commit_len: int, cands: list[Candidate], sampler: Sampler, iteration: int
    ) -> list[float]:
        """Runner.verify with every row's token choice made on the device and one host copy per step."""
        if sampler.temperature > 0:  # seeded CPU generators per (iteration, stream): keep the per-row path
            return super().verify(window_start, commit_len, cands, sampler, iteration)
        t0 = time.perf_counter()
        logits, batch = self.raw_logits(window_start, commit_len, cands)  # (rows, n, vocab)
        t0 = self._tick("forward", t0)
        counts = [int(c.predict.numel()) for c in cands]
        rows, n = len(cands), max(1, max(counts))
        wanted = logits[:, :n]  # (rows, n, vocab), predictions already shifted
        first = [r for r in range(rows) if batch.uses_last[r]]
        if first:
            wanted = wanted.clone()
            wanted[first, 0] = self.last_logit.to(wanted)  # shift 1: the frozen logit predicts position 0
        tokens, prob, conf = choose(wanted.reshape(rows * n, -1), sampler)
        self._preds, self._last, scores = [], [], []
        for r, c in enumerate(cands):
            sl = slice(r * n, r * n + counts[r])
            pred = Prediction(c.predict.cpu(), tokens[sl], prob[sl], conf[sl])
            self._preds.append(pred)
            self._last.append(self.frozen_logit(logits, r, counts[r], commit_len))
            scores.append(branch_score(pred.conf, c.score_mask))
        self._tick("scoring", t0)
        return scores


def choose(logits: Tensor, s: Sampler) -> tuple[Tensor, Tensor, Tensor]:
    """Greedy token, its probability and confidence for each row of (m, vocab) logits, computed where the
    logits are; returns host tensors (m,) long, float32, float32 after ONE device-to-host copy."""
    probs = filtered_probs(logits, s)  # (m, vocab) fp32
    chosen = probs.argmax(-1)
    prob = probs.gather(-1, chosen[:, None])[:, 0]
    conf = prob if s.confidence == "maxprob" else confidence_of(probs, chosen, s.confidence)
    host = torch.stack([chosen.double(), prob.double(), conf.double()]).cpu()  # (3, m): exact for ids and fp32
    return host[0].long(), host[1].float(), host[2].float()


def make_runner(model: DreamModel, device: torch.device | str, enforce_eager: bool | None = None) -> Runner:
    """The runner ``LLM`` uses: eager when ``enforce_eager``; by default the fast path on CUDA, eager on CPU
    (on CPU the padded fast path measured no faster than eager, see docs/gpu.md)."""
    device = torch.device(device)
    if enforce_eager is None:
        enforce_eager = device.type != "cuda"
    return Runner(model, device) if enforce_eager else FastRunner(model, device)
