"""GraphBuckets: the CUDA-graph machinery both fast runners share (one sequence, many sequences).

A runner pads each forward up to a shape *bucket* ``(rows, window, kv)`` and packs all its inputs into one long
tensor; :class:`GraphBuckets` then either replays that bucket's graph (captured on first use) or runs the same
padded forward eagerly (graphs off, a shape over ``max_rows`` / ``max_window``, or ``max_graphs`` reached):

- static buffers: each graph owns its input tensor (the host copy lands there, pinned, asynchronously) and
  writes its outputs into flat buffers shared by every graph (a 7B graph's own logits would be up to 0.3 GB
  each); safe because a forward's outputs are consumed before the next replay. Growing a buffer drops every
  graph captured on the old one.
- capture: warm-up on a side stream (lazy initialisation, workspaces), then ``torch.cuda.graph``.
- memory pool: graphs never run concurrently, so all share one pool, taken from a LIVE graph
  (:func:`shared_pool`); when every graph has been dropped the next capture starts a fresh pool.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Key = tuple[int, int, int]  # (rows, window, kv length or prefix), every value padded
Outputs = tuple[Tensor, ...]


def round_up(n: int, multiple: int) -> int:
    """``n`` padded up to a multiple of ``multiple``: how a bucket's window and K/V lengths are chosen."""
    return -(-n // multiple) * multiple


@dataclass
class Graph:
    graph: Any  # torch.cuda.CUDAGraph (a CPU stand-in in tests)
    inputs: Tensor  # static input read by every replay
    outputs: Outputs  # static outputs written by every replay: views of the shared buffers


def shared_pool(graphs: Iterable[Graph]) -> Any:
    """The memory pool a new capture shares: a LIVE graph's ``graph.pool()``, or None (a fresh pool) if none lives.

    A pool's handle is only valid while a graph captured into it exists: when its last graph is destroyed, the
    CUDA caching allocator keeps the pool's entry with use count 0 until every block in it is freed (anything
    allocated during a capture that outlives the graph keeps it), and a capture into that entry fails its
    ``use_count > 0`` assert. So no handle is kept across dropped graphs.
    """
    for g in graphs:
        return g.graph.pool()
    return None


class GraphBuckets:
    """Per-bucket CUDA graphs of one padded forward ``run(inputs, kv, out) -> outputs`` (see the module docstring).

    ``shapes(key)`` gives the output shapes of a bucket; ``reserve(key)`` the bucket the shared buffers are first
    sized for (room to grow into without dropping graphs).
    """

    def __init__(
        self,
        device: torch.device,
        run: Callable[[Tensor, int, Outputs | None], Outputs],
        shapes: Callable[[Key], list[tuple[int, ...]]],
        dtype: torch.dtype,
        enabled: bool,
        max_rows: int,
        max_window: int,
        max_graphs: int,
        reserve: Callable[[Key], Key] | None = None,
    ) -> None:
        self.device, self.run, self.shapes, self.dtype = device, run, shapes, dtype
        self.enabled, self.max_rows, self.max_window, self.max_graphs = enabled, max_rows, max_window, max_graphs
        self.reserve = reserve or (lambda key: key)
        self.captured: dict[Key, Graph] = {}
        self.replays = 0  # forwards served by a graph replay
        self.eager_forwards = 0  # padded forwards run eagerly (CPU, or a shape not captured)
        self._buffers: list[Tensor] = []  # flat buffers behind every graph's outputs

    def __call__(self, key: Key, packed: Tensor) -> Outputs:
        """The padded forward of bucket ``key`` on host inputs ``packed``: a replay, or an eager run."""
        graph = self._graph(key, packed)
        if graph is None:
            self.eager_forwards += 1
            return self.run(packed.to(self.device), key[2], None)
        host = packed.pin_memory() if self.device.type == "cuda" else packed  # pinned: truly async copy
        graph.inputs.copy_(host, non_blocking=True)
        graph.graph.replay()
        self.replays += 1
        return graph.outputs

    def clear(self) -> None:
        """Drop every graph (their static buffers or caches are going away)."""
        self.captured.clear()

    def _graph(self, key: Key, packed: Tensor) -> Graph | None:
        """The graph of ``key``, captured now if allowed; None means run eagerly."""
        if key in self.captured:
            return self.captured[key]
        rows, width, kv = key
        if not self.enabled or rows > self.max_rows or width > self.max_window or len(self.captured) >= self.max_graphs:
            return None
        outputs = self.outputs(key)  # first: growing the buffers drops every graph, and with them their pool
        inputs = packed.to(self.device)  # the current step's inputs double as warm-up inputs
        graph = self.capture(lambda: self.run(inputs, kv, outputs), shared_pool(self.captured.values()))
        self.captured[key] = Graph(graph, inputs, outputs)
        return self.captured[key]

    def outputs(self, key: Key) -> Outputs:
        """The static outputs of bucket ``key``: views of the shared flat buffers, grown (dropping every graph)
        when one is too small."""
        shapes = self.shapes(key)
        sizes = [math.prod(s) for s in shapes]
        if len(self._buffers) != len(sizes) or any(b.numel() < n for b, n in zip(self._buffers, sizes, strict=True)):
            self.clear()
            room = [math.prod(s) for s in self.shapes(self.reserve(key))]
            old = [b.numel() for b in self._buffers] or [0] * len(sizes)
            self._buffers = [
                torch.empty(max(n, r, o), dtype=self.dtype, device=self.device)
                for n, r, o in zip(sizes, room, old, strict=True)
            ]
        return tuple(b[:n].view(s) for b, n, s in zip(self._buffers, sizes, shapes, strict=True))

    def capture(self, fn: Callable[[], object], pool: Any) -> Any:
        """Warm ``fn`` up on a side stream, then capture it into a new CUDA graph sharing ``pool`` (None: fresh)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # off the capture stream: lazy inits, workspace allocation
            for _ in range(2):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            fn()
        return graph


class GraphCounters:
    """The graph bookkeeping a fast runner shows (tests and benchmarks read it), from its ``graphs`` helper."""

    graphs: GraphBuckets

    @property
    def captured(self) -> dict[Key, Graph]:
        return self.graphs.captured

    @property
    def replays(self) -> int:
        return self.graphs.replays

    @property
    def eager_forwards(self) -> int:
        return self.graphs.eager_forwards
