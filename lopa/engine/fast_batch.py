"""FastBatchRunner: the batched runner's fast path (fused weights, shape buckets, CUDA graphs).

Same calls as :class:`~lopa.engine.batch.BatchRunner`; only the forward differs. A batched verification of
``R`` rows (all candidates of all running sequences) of width ``W`` over committed prefixes of at most ``P``
positions is padded up to the bucket ``(R rounded up to a power of two, W rounded up to window_granularity,
P rounded up to kv_granularity)``: padded rows attend only to their own pad window (no slot prefix), padded
window positions are masked as keys and padded prefix positions per row, so padding changes no logit of a real
position beyond rounding. Every input (ids, valid, positions, logits indices, each row's slot and prefix length)
travels in one ``(6, rows, W)`` device tensor, and the forward has no host sync or data-dependent shape, so on
CUDA each bucket is captured as a CUDA graph on first use and replayed after; logits and the window's K/V land
in static buffers that the scheduler reads (and commits from) before the next replay. On CPU, or for shapes
over ``max_graph_rows`` / ``max_graph_window``, the same padded forward runs eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from lopa.engine.batch import BatchRunner
from lopa.engine.fast import round_up, shared_pool
from lopa.errors import ConfigError
from lopa.model.dream import DreamModel
from lopa.model.fused import fuse


@dataclass
class _BatchGraph:
    graph: torch.cuda.CUDAGraph
    inputs: Tensor  # (6, rows, W) long, static input read by the graph
    outputs: tuple[Tensor, Tensor, Tensor]  # logits (rows, W, vocab), window K and V (layers, rows, Hkv, W, D)


@dataclass
class FastBatchRunner(BatchRunner):
    """BatchRunner with fused weights, bucketed padding and per-bucket CUDA graphs (see the module docstring)."""

    use_graphs: bool | None = None  # None: on when the device is CUDA
    window_granularity: int | None = None  # None: 16 with graphs, 1 without
    kv_granularity: int | None = None  # None: 256 with graphs, 1 without
    max_graph_rows: int = 256
    max_graph_window: int = 128
    max_graphs: int = 64
    captured: dict[tuple[int, int, int], _BatchGraph] = field(default_factory=dict, repr=False)
    replays: int = 0
    eager_forwards: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.model, DreamModel):
            raise ConfigError(f"the fast path needs a DreamModel, got {type(self.model).__name__}; use BatchRunner")
        super().__post_init__()
        self.device = torch.device(self.device)
        if self.use_graphs is None:
            self.use_graphs = self.device.type == "cuda"
        if self.use_graphs and self.device.type != "cuda":
            raise ConfigError(f"CUDA graphs need a CUDA device, the model is on {self.device}; pass use_graphs=False")
        self.window_granularity = self.window_granularity or (16 if self.use_graphs else 1)
        self.kv_granularity = self.kv_granularity or (256 if self.use_graphs else 1)
        fuse(self.model)
        self._shared: tuple[Tensor, Tensor, Tensor] | None = None  # flat buffers behind every graph's outputs

    def bucket(self, rows: int, width: int, prefix: int) -> tuple[int, int, int]:
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
        graph = self._graph(key, packed)
        if graph is not None:
            host = packed.pin_memory() if self.device.type == "cuda" else packed
            graph.inputs.copy_(host, non_blocking=True)
            graph.graph.replay()
            logits, win_k, win_v = graph.outputs
            self.replays += 1
        else:
            logits, win_k, win_v = self._run(packed.to(self.device), key[2])
            self.eager_forwards += 1
        n = idx.shape[1]
        return logits[:rows, :n], win_k[:, :rows, :, :width], win_v[:, :rows, :, :width]

    def _run(self, packed: Tensor, prefix: int, out: tuple[Tensor, Tensor, Tensor] | None = None):
        return static_pooled_forward(self.model, packed, prefix, self.pool.k, self.pool.v, out)

    def _graph(self, key: tuple[int, int, int], packed: Tensor) -> _BatchGraph | None:
        if key in self.captured:
            return self.captured[key]
        rows, width, _ = key
        if not self.use_graphs or rows > self.max_graph_rows or width > self.max_graph_window:
            return None
        if len(self.captured) >= self.max_graphs:
            return None
        self.captured[key] = self._capture(key, packed)
        return self.captured[key]

    def _outputs(self, key: tuple[int, int, int]) -> tuple[Tensor, Tensor, Tensor]:
        """Static logits (rows, W, vocab) and window K / V (layers, rows, Hkv, W, D) of bucket ``key``: views
        of buffers shared by every graph (each output is consumed before the next replay). Growing a buffer
        orphans the graphs captured on the old one."""
        rows, width, _ = key
        cfg, dtype = self.model.config, self.pool.k.dtype
        sizes = (
            rows * width * cfg.vocab_size,
            cfg.num_hidden_layers * rows * cfg.num_key_value_heads * width * cfg.head_dim,
        )
        if self._shared is None or self._shared[0].numel() < sizes[0] or self._shared[1].numel() < sizes[1]:
            self.captured.clear()
            grown = [max(n, 0 if self._shared is None else self._shared[i].numel()) for i, n in enumerate(sizes)]
            self._shared = tuple(
                torch.empty(n, dtype=dtype, device=self.device) for n in (grown[0], grown[1], grown[1])
            )
        kv_shape = (cfg.num_hidden_layers, rows, cfg.num_key_value_heads, width, cfg.head_dim)
        logits = self._shared[0][: sizes[0]].view(rows, width, cfg.vocab_size)
        return logits, self._shared[1][: sizes[1]].view(kv_shape), self._shared[2][: sizes[1]].view(kv_shape)

    def _capture(self, key: tuple[int, int, int], packed: Tensor) -> _BatchGraph:
        inputs = packed.to(self.device)
        outputs = self._outputs(key)
        self._run(inputs, key[2], outputs)  # warm-up: lazy inits outside the capture
        pool = shared_pool(self.captured.values())  # after _outputs: growing them may have dropped every graph
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._run(inputs, key[2], outputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self._run(inputs, key[2], outputs)
        return _BatchGraph(graph, inputs, outputs)


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


def static_pooled_forward(
    model: DreamModel,
    packed: Tensor,
    prefix: int,
    pool_k: Tensor,
    pool_v: Tensor,
    out: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The padded batched forward (see ``model/pooled.py`` for the contract) with static shapes only.

    packed: (6, rows, W) as built by ``_pack``; prefix: padded prefix length read from the pool.
    Returns (or writes into ``out``) logits (rows, W, vocab) and window K / V (layers, rows, Hkv, W, D).
    """
    ids, valid, positions, idx = packed[0], packed[1].bool(), packed[2], packed[3]
    row_slot, prefix_len = packed[4, :, 0], packed[5, :, 0]  # (rows,)
    rows, width = ids.shape
    in_prefix = torch.arange(prefix, device=ids.device)[None, :] < prefix_len[:, None]  # (rows, P)
    mask = torch.cat([in_prefix, valid], dim=1)[:, None, None, :]  # (rows, 1, 1, P + W)
    x = model.model.embed_tokens(ids)  # (rows, W, hidden)
    cos, sin = model.rotary(positions, x.dtype)
    layers = model.model.layers
    attn0 = layers[0].self_attn
    if out is None:
        vocab = model.lm_head.weight.shape[0]
        kv_shape = (len(layers), rows, attn0.kv_heads, width, attn0.head_dim)
        out = (x.new_empty(rows, width, vocab), x.new_empty(kv_shape), x.new_empty(kv_shape))
    logits, win_k, win_v = out
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        q, k, v = attn._qkv(layer.input_layernorm(x), cos, sin)  # (rows, H, W, D), (rows, Hkv, W, D)
        win_k[i].copy_(k)
        win_v[i].copy_(v)
        if prefix:
            k = torch.cat([pool_k[i, :, :, :prefix].index_select(0, row_slot), k], dim=2)  # (rows, Hkv, P + W, D)
            v = torch.cat([pool_v[i, :, :, :prefix].index_select(0, row_slot), v], dim=2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=attn.kv_heads != attn.heads)
        x = x + attn.o_proj(o.transpose(1, 2).reshape(rows, width, attn.heads * attn.head_dim))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    x = torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))  # (rows, W, hidden)
    h = model.model.norm(x).reshape(rows * width, -1)  # (rows * W, hidden)
    torch.mm(h, model.lm_head.weight.t(), out=logits.view(rows * width, -1))  # the head has no bias
    return logits, win_k, win_v
