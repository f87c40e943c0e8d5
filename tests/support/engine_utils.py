"""Models and runners for decoder tests: a peaky random model of either family and a chain-rule mock model.

``FAMILIES`` maps a family name to the ModelConfig fields that select it; equivalence tests run over both, since
the families differ in the engine only by the prediction offset (Dream 1, LLaDA 0)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lopa.config import DecodeConfig
from lopa.engine.loop import decode, run
from lopa.engine.runner import Runner
from lopa.model.cache import StaticKVCache
from lopa.model.config import ModelConfig
from lopa.model.families import family_named
from lopa.testing import random_model

VOCAB, MASK, EOS = 64, 63, 62
END = frozenset({EOS})
FAMILIES = {"dream": dict(attention_bias=True), "llada": dict(attention_bias=False)}


def scripted_config(family: str, mask: int, eos: int) -> ModelConfig:
    """The config of a scripted model (16-token vocabulary, one tiny layer nobody runs) of ``family``."""
    return family_named(family).make_config(
        vocab_size=16,
        hidden_size=4,
        intermediate_size=4,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=4,
        mask_token_id=mask,
        eos_token_id=eos,
        pad_token_id=eos,
        **FAMILIES[family],
    )


def peaky_model(seed: int = 0, sharpness: float = 8.0, layers: int = 2, family: str = "dream") -> nn.Module:
    """A random model of ``family`` whose head is scaled up, so confidences spread over (0, 1) and thresholds bite."""
    cfg = family_named(family).make_config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        mask_token_id=MASK,
        eos_token_id=EOS,
        pad_token_id=EOS,
        **FAMILIES[family],
    )
    model = random_model(cfg, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)
    return model


def run_decode(model: nn.Module, prompt: list[int], cfg: DecodeConfig):
    """Final Step of decoding ``prompt`` with a fresh runner."""
    return run(decode(Runner(model), prompt, cfg.validate(), MASK, END))


def answer(step) -> list[int]:
    s = step.state
    return s.tokens[s.prompt_len :].tolist()


class CountingModel(nn.Module):
    """Wraps a model and counts forward calls."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.config, self.calls = inner, inner.config, 0

    def forward(self, *args, **kwargs) -> Tensor:
        self.calls += 1
        return self.inner(*args, **kwargs)


class ScriptedModel(nn.Module):
    """A model whose raw outputs a subclass writes by hand (:meth:`logits`), one 16-token row per output position.

    It writes zero K/V, so it pins the engine's decisions, not attention. The raw output at window index i speaks
    for position ``positions[i] + shift``, as the family's ``logit_shift`` says.
    """

    def __init__(self, family: str, mask: int, eos: int) -> None:
        super().__init__()
        self.config = scripted_config(family, mask=mask, eos=eos)
        self.shift = self.config.logit_shift
        self.dummy = nn.Parameter(torch.zeros(1))

    def logits(self, ids: Tensor, positions: Tensor, i: int, pos: int) -> Tensor:
        """(16,) raw output at window index ``i`` of one row (``ids``, ``positions``: (L,)), predicting ``pos``."""
        raise NotImplementedError

    def forward(
        self,
        ids: Tensor,
        positions: Tensor,
        cache: StaticKVCache | None = None,
        valid: Tensor | None = None,
        logits_idx: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        rows, length = ids.shape
        if cache is not None:
            cache.write(0, torch.zeros(rows, 1, length, 4), torch.zeros(rows, 1, length, 4))
        idx = logits_idx if logits_idx is not None else torch.arange(length).expand(rows, length)
        out = torch.zeros(rows, idx.shape[1], 16)
        for r in range(rows):
            for j, i in enumerate(idx[r].tolist()):
                out[r, j] = self.logits(ids[r], positions[r], i, int(positions[r, i]) + self.shift)
        return out


class ChainMock(ScriptedModel):
    """The token at position p is known (``target``); the model is sure of it only when p - 1 is decoded.

    The raw output at window index j speaks for position j + shift, as the family's ``logit_shift`` says.

    So the best order is strictly left to right, and a branch that filled one more token makes the next
    position confident: the case LoPA's lookahead search exists for. p(sure) = 0.9994, p(unsure) = 0.163.
    """

    def __init__(self, target: list[int], prompt_len: int, family: str = "dream") -> None:
        super().__init__(family, mask=15, eos=14)
        self.target, self.prompt_len = target, prompt_len

    def logits(self, ids: Tensor, positions: Tensor, i: int, pos: int) -> Tensor:
        k = pos - self.prompt_len
        token = self.target[k] if 0 <= k < len(self.target) else 14
        before = ids[i] if self.shift else (ids[i - 1] if i else torch.tensor(0))  # the token at pos - 1
        out = torch.zeros(16)
        out[token] = 10.0 if int(before) != 15 else 1.0
        return out


class FakeGraphPools:
    """A CPU model of the CUDA caching allocator's bookkeeping of CUDA-graph memory pools, with stand-in graphs.

    As in PyTorch: ``graph_pool_handle()`` is only an id; the first capture into an id creates the pool (use count
    1), each further capture into it adds a use, destroying a graph removes its use. A pool whose last graph is
    gone keeps its entry, with use count 0, while anything allocated during a capture still lives (the allocator
    erases it only in ``empty_cache`` once every block is free); capturing into it then fails the allocator's
    ``use_count > 0`` internal assert. This model never erases an entry: the case where something does outlive
    the graphs.

    Two ways in: :meth:`stand_in` replaces a runner's capture (``GraphBuckets.capture``) with a graph whose replay
    reruns the captured function on the static buffers; :meth:`install` replaces ``torch.cuda``'s graph, stream
    and pool-handle API, so the runners' real capture code runs on CPU (its graphs' replay does nothing: the
    output holds the capture step's values; use it for bookkeeping, not for replayed values); the engine tests get
    it installed as the ``fake_cuda_graphs`` fixture (tests/engine/conftest.py).
    """

    def __init__(self) -> None:
        self.uses: dict[tuple[int, int], int] = {}  # pool id -> live graphs captured into it
        self.captures: list[tuple[int, int]] = []  # the pool of every capture, in order
        self._ids = 0

    def handle(self) -> tuple[int, int]:
        self._ids += 1
        return (0, self._ids)

    def begin(self, pool: tuple[int, int] | None) -> tuple[int, int]:
        if pool is None:  # no pool given: the capture gets a private one
            self._ids += 1
            pool = (self._ids, 0)
        if pool in self.uses:
            if self.uses[pool] <= 0:
                raise RuntimeError("it->second->use_count > 0 INTERNAL ASSERT FAILED (pool whose graphs are all gone)")
            self.uses[pool] += 1
        else:
            self.uses[pool] = 1
        self.captures.append(pool)
        return pool

    def stand_in(self, graphs) -> FakeGraphPools:
        """Turn a GraphBuckets' capture into the stand-in (and graphs on, on CPU)."""

        def capture(fn, pool):
            graph = _FakeGraph(self, fn)
            graph.capture_begin(pool)
            fn()
            return graph

        graphs.enabled, graphs.capture = True, capture
        return self

    def install(self, monkeypatch) -> FakeGraphPools:
        """Replace torch.cuda's graph, stream and pool-handle API with this model for one test."""
        pools = self

        class GraphContext:
            def __init__(self, graph: _FakeGraph, pool=None, stream=None) -> None:
                self.graph, self.pool = graph, pool

            def __enter__(self) -> None:
                self.graph.capture_begin(self.pool)

            def __exit__(self, *exc) -> None:
                pass

        class Stream:
            def __init__(self, *args, **kwargs) -> None:
                pass

            def wait_stream(self, other) -> None:
                pass

        monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: _FakeGraph(pools))
        monkeypatch.setattr(torch.cuda, "graph", GraphContext)
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", self.handle)
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: Stream())
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        return self


class _FakeGraph:
    """Stand-in for torch.cuda.CUDAGraph: holds one use of its pool while it lives; replay reruns ``fn``."""

    def __init__(self, pools: FakeGraphPools, fn=None) -> None:
        self.pools, self.fn, self.id = pools, fn, None

    def capture_begin(self, pool=None) -> None:
        self.id = self.pools.begin(pool)

    def replay(self) -> None:
        if self.fn is not None:
            self.fn()

    def pool(self) -> tuple[int, int]:
        assert self.id is not None, "pool() before a capture"
        return self.id

    def __del__(self) -> None:
        if self.id is not None:
            self.pools.uses[self.id] -= 1


def strided_attention(monkeypatch) -> list[int]:
    """Make SDPA return its output laid out the way CUDA's attention kernels do: same values, the query axis
    outermost in memory (a transposed, non-contiguous tensor). Returns a list that grows by one per call."""
    real, calls = F.scaled_dot_product_attention, []

    def strided(*args, **kwargs):
        out = real(*args, **kwargs)  # (B, heads, L, D)
        calls.append(1)
        return out.transpose(1, 2).contiguous().transpose(1, 2)  # same shape and values, (B, L, heads, D) in memory

    monkeypatch.setattr(F, "scaled_dot_product_attention", strided)
    return calls
