"""The batched fast path equals the eager batched runner: bucketed padding (rows, window, prefix), the static
forward, and graph bookkeeping (a CPU stand-in replays the captured function on static buffers). The ``gpu``
test checks real CUDA-graph replays of batches against eager and skips without CUDA."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from lopa.config import DecodeConfig
from lopa.engine.batch import BatchRunner
from lopa.engine.fast_batch import FastBatchRunner
from lopa.engine.scheduler import Scheduler
from tests.support.engine_utils import END, EOS, MASK, FakeGraphPools, peaky_model, strided_attention

CONFIGS = [
    DecodeConfig(decoder="threshold", threshold=0.6, block_size=8, max_new_tokens=24),
    DecodeConfig(decoder="lopa", base="d2f", branches=3, threshold=0.7, block_size=4, max_new_tokens=16),
    DecodeConfig(decoder="lopa", base="threshold", branches=2, block_size=8, max_new_tokens=16, temperature=0.7),
    DecodeConfig(decoder="d2f", threshold=0.8, tau_add=0.3, tau_act=0.9, block_size=4, max_new_tokens=20),
]


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one torch thread for the module


@pytest.fixture(scope="module")
def model():
    m = peaky_model(seed=3)
    with torch.no_grad():
        m.lm_head.weight[EOS].zero_()
    return m


def _decode_all(runner, jobs) -> dict:
    sched = Scheduler(runner, MASK, END)
    for i, (prompt, cfg) in enumerate(jobs):
        sched.add(i, prompt, cfg.validate())
    final = {}
    while sched.has_work:
        final.update({rid: step for rid, step in sched.step() if step.done})
    return {rid: (s.state.tokens.tolist(), s.stats.forwards) for rid, s in final.items()}


def _jobs(n: int, seed: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(0, 60) for _ in range(rng.randrange(3, 20))] for _ in range(n)]
    return [(p, CONFIGS[i % len(CONFIGS)]) for i, p in enumerate(prompts)]


def test_bucket_rounds_rows_window_and_prefix(model) -> None:
    fast = FastBatchRunner(copy.deepcopy(model), 4, 128, window_granularity=16, kv_granularity=32)
    assert fast.bucket(5, 9, 0) == (8, 16, 0)
    assert fast.bucket(16, 33, 40) == (16, 48, 64)
    assert fast.bucket(1, 1, 127) == (1, 16, 128)  # never past the pool


def test_fast_batched_decode_equals_eager(model) -> None:
    jobs = _jobs(7, seed=1)
    ref = _decode_all(BatchRunner(model, 3, 128), jobs)
    fast = FastBatchRunner(copy.deepcopy(model), 3, 128, window_granularity=16, kv_granularity=32)
    assert _decode_all(fast, jobs) == ref
    assert fast.eager_forwards > 0 and fast.replays == 0


def test_graph_buckets_are_reused_and_match_eager(model) -> None:
    jobs = _jobs(6, seed=2)
    ref = _decode_all(BatchRunner(model, 4, 128), jobs)
    fast = FastBatchRunner(copy.deepcopy(model), 4, 128, window_granularity=16, kv_granularity=32)
    pools = FakeGraphPools().stand_in(fast.graphs)  # replay reruns the captured forward on the static buffers
    assert _decode_all(fast, jobs) == ref
    assert fast.replays > len(fast.captured) > 0
    assert all(pools.uses[p] > 0 for p in set(pools.captures[-len(fast.captured) :]))  # live graphs, live pools


def test_fast_batched_decode_survives_strided_attention_output(model, monkeypatch) -> None:
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    jobs = _jobs(5, seed=4)
    ref = _decode_all(BatchRunner(model, 3, 128), jobs)  # before the patch
    calls = strided_attention(monkeypatch)
    fast = FastBatchRunner(copy.deepcopy(model), 3, 128, window_granularity=16, kv_granularity=32)
    assert _decode_all(fast, jobs) == ref
    assert calls and fast.eager_forwards > 0


def test_batch_graph_captures_never_reuse_a_pool_whose_graphs_are_gone(model, fake_cuda_graphs) -> None:
    """Growing the shared output buffers drops every graph; the next capture starts a fresh pool (see
    tests/support/engine_utils.py: FakeGraphPools), while graphs that live together share one."""
    pools = fake_cuda_graphs
    fast = FastBatchRunner(copy.deepcopy(model), 4, 128, window_granularity=16, kv_granularity=32)
    fast.graphs.enabled = True  # torch.cuda's graph API is the model above
    slots = [fast.alloc() for _ in range(4)]

    def forward(rows: int, width: int) -> None:
        ids = torch.randint(0, 60, (rows, width), generator=torch.Generator().manual_seed(rows))
        positions = torch.arange(width).expand(rows, width)
        idx = torch.zeros(rows, 1, dtype=torch.long)
        row_slot, prefix = torch.tensor(slots[:rows]), torch.zeros(rows, dtype=torch.long)
        fast._forward(ids, positions, None, idx, row_slot, prefix)

    forward(1, 8)
    forward(1, 4)  # the same bucket: replayed, not captured
    forward(2, 8)  # more rows: the shared buffers grow, every graph is dropped
    forward(1, 8)  # captured again, beside the live graph: shares its pool
    assert len(pools.captures) == 3 and fast.replays == 4
    assert pools.captures[0] != pools.captures[1] == pools.captures[2]
    assert [pools.uses[p] for p in dict.fromkeys(pools.captures)] == [0, 2]


@pytest.mark.gpu
def test_cuda_graph_batched_decode_equals_eager() -> None:
    model = peaky_model(seed=3)
    with torch.no_grad():
        model.lm_head.weight[EOS].zero_()
    jobs = _jobs(8, seed=3)
    ref = _decode_all(BatchRunner(copy.deepcopy(model).cuda(), 4, 128, device=torch.device("cuda")), jobs)
    fast = FastBatchRunner(copy.deepcopy(model).cuda(), 4, 128, device=torch.device("cuda"))
    assert _decode_all(fast, jobs) == ref
    assert fast.replays > 0


@pytest.mark.gpu
def test_cuda_batch_graphs_recapture_after_the_buffers_grew() -> None:
    """Batches of growing size grow the shared output buffers and drop every graph; the captures after that must
    not reuse the dead pool (it failed the allocator's use_count assert)."""
    model = peaky_model(seed=3)
    dev = torch.device("cuda")
    fast = FastBatchRunner(copy.deepcopy(model).to(dev), 8, 128, device=dev)
    ref = BatchRunner(copy.deepcopy(model).to(dev), 8, 128, device=dev)
    for n in (1, 3, 8):
        jobs = _jobs(n, seed=n)
        assert _decode_all(fast, jobs) == _decode_all(ref, jobs)
    assert fast.replays > 0 and len(fast.captured) > 0
