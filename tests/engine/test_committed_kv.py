"""After a LoPA decode the committed K/V is what the winners' windows produce, recomputed independently.

The reference decoder (tests/support/reference_decoder.py) records, for every forward that committed something, the
winner's whole window; :func:`reference_decoder.replay` recomputes the committed prefix from those windows with its
own hand-written transformer. Each path must hold exactly that prefix (and, Dream, the frozen last logit):

- the dense path: :class:`lopa.engine.runner.Runner` and its :class:`lopa.model.cache.StaticKVCache`;
- the batched pool: :class:`lopa.engine.scheduler.Scheduler` over a :class:`lopa.engine.batch.BatchRunner`
  (``model/pooled.py``), several sequences with different k sharing one forward, each in its own slot;
- branch parallelism: :class:`lopa.parallel.runner.BranchParallelRunner` at world sizes 2 and 3, every rank a thread
  with its own runner and cache, the collectives done by an in-process exchange (the gloo transport itself is
  covered by tests/parallel/test_dist.py, which compares the ranks' caches with the single-process one); every
  rank must end with the replayed prefix, so the winner's owner must have broadcast the winner's span.

Every case checks that some committing forward was won by a lookahead branch, so committing another row (the
anchor's) would show.
"""

from __future__ import annotations

import threading

import pytest
import torch

from lopa.config import DecodeConfig
from lopa.engine.batch import BatchRunner
from lopa.engine.loop import decode, run
from lopa.engine.runner import Runner
from lopa.engine.scheduler import Scheduler
from lopa.parallel.runner import BranchParallelRunner
from tests.support.engine_utils import END, FAMILIES, MASK
from tests.support.reference_checks import (
    KV_TOL,
    assert_same_decode,
    engine_decode,
    graded_model,
    lookahead_commits,
    prompt_for,
    replayed_kv,
)
from tests.support.reference_decoder import ReferenceTransformer, RefResult, reference_decode, replay

CONFIGS = [  # d2f with a low tau_add keeps several blocks in flight, so lookahead winners also commit blocks
    DecodeConfig(decoder="lopa", base="threshold", branches=2, block_size=4, max_new_tokens=16, threshold=0.8),
    DecodeConfig(
        decoder="lopa",
        base="d2f",
        branches=2,
        block_size=4,
        max_new_tokens=16,
        threshold=0.9,
        tau_add=0.25,
        tau_act=0.5,
    ),
    DecodeConfig(
        decoder="lopa",
        base="d2f",
        branches=3,
        block_size=4,
        max_new_tokens=16,
        threshold=0.8,
        tau_add=0.25,
        tau_act=0.25,
    ),
    DecodeConfig(decoder="lopa", base="d2f", branches=1, block_size=8, max_new_tokens=16, threshold=0.6, tau_add=0.3),
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(single_thread):
    yield


def reference(model: torch.nn.Module, family: str, prompt: list[int], cfg: DecodeConfig) -> RefResult:
    return reference_decode(ReferenceTransformer(model, family), prompt, cfg.replace(trace=True), END)


def assert_kv(k: torch.Tensor, v: torch.Tensor, model: torch.nn.Module, family: str, ref: RefResult) -> None:
    want_k, want_v = replayed_kv(ReferenceTransformer(model, family), ref.commits)
    assert k.shape == want_k.shape and k.shape[2] == ref.steps[-1].committed
    torch.testing.assert_close(k, want_k, atol=KV_TOL, rtol=0)
    torch.testing.assert_close(v, want_v, atol=KV_TOL, rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dense_cache_holds_the_winners_windows(family: str) -> None:
    won = 0
    for i, cfg in enumerate(CONFIGS):
        model, prompt = graded_model(40 + i, family), prompt_for(40 + i)
        ref = reference(model, family, prompt, cfg)
        step, runner = engine_decode(model, prompt, cfg)
        assert_same_decode(step, ref, (family, cfg))
        assert_kv(*runner.committed_kv(), model, family, ref)
        _, last = replay(ReferenceTransformer(model, family), ref.commits)
        if last is None:  # LLaDA: no shift, nothing frozen
            assert runner.last_logit is None or runner.last_logit.numel() == 0
        else:
            torch.testing.assert_close(runner.last_logit, last, atol=1e-4, rtol=0)
        won += lookahead_commits(ref)
    assert won > 0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pool_slots_hold_the_winners_windows(family: str) -> None:
    model = graded_model(50, family)
    jobs = [(prompt_for(50 + i), cfg.replace(trace=True).validate()) for i, cfg in enumerate(CONFIGS + CONFIGS[1:3])]
    runner = BatchRunner(model, max_num_seqs=len(jobs), max_model_len=64)
    sched = Scheduler(runner, MASK, END)
    for rid, (prompt, cfg) in enumerate(jobs):
        sched.add(rid, prompt, cfg)
    final, slots = {}, {}
    while sched.has_work:
        steps = sched.step()
        slots.update({e.rid: e.slot for e in sched.running})
        final.update({rid: step for rid, step in steps if step.done})
    assert sorted(slots.values()) == list(range(len(jobs)))  # every sequence ran in a slot of its own
    won = 0
    for rid, (prompt, cfg) in enumerate(jobs):
        ref = reference(model, family, prompt, cfg)
        assert_same_decode(final[rid], ref, (family, rid))
        slot = slots[rid]
        assert_kv(*runner.pool.span(slot, 0, runner.pool.committed[slot]), model, family, ref)
        won += lookahead_commits(ref)
    assert won > 0


class _Exchange:
    """What a collective moves, between ranks that are threads: every rank puts its tensor, then reads all."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world, timeout=60)
        self.put: list[torch.Tensor | None] = [None] * world

    def all(self, rank: int, t: torch.Tensor) -> list[torch.Tensor]:
        self.put[rank] = t.clone()
        self.barrier.wait()
        out = [x.clone() for x in self.put]
        self.barrier.wait()  # nobody overwrites a slot before every rank has read it
        return out


class _ThreadComm:
    """The collectives :class:`BranchParallelRunner` calls, for one rank of a world of threads."""

    def __init__(self, rank: int, world: int, exchange: _Exchange) -> None:
        self.rank, self.size, self.exchange, self.monitor = rank, world, exchange, None

    def all_gather(self, t: torch.Tensor, stage: str) -> list[torch.Tensor]:
        return self.exchange.all(self.rank, t)

    def broadcast(self, t: torch.Tensor, src: int, stage: str) -> torch.Tensor:
        return self.exchange.all(self.rank, t)[src]


def _branch_parallel(model: torch.nn.Module, prompt: list[int], cfg: DecodeConfig, world: int) -> list[tuple]:
    """Per rank: (final Step, committed K, committed V), every rank a thread driving the same decode."""
    exchange, out, errors = _Exchange(world), [None] * world, []

    def rank_main(rank: int) -> None:
        try:
            bp = BranchParallelRunner(Runner(model), _ThreadComm(rank, world, exchange))
            step = run(decode(bp, prompt, cfg.replace(trace=True).validate(), MASK, END))
            out[rank] = (step, *bp.committed_kv())
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)
            exchange.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


@pytest.mark.parametrize(("world", "family"), [(2, "dream"), (3, "llada"), (3, "dream")])
def test_branch_parallel_ranks_hold_the_winners_windows(world: int, family: str) -> None:
    owners, won = set(), 0
    for i, cfg in enumerate(CONFIGS[1:3]):
        model, prompt = graded_model(60 + i, family), prompt_for(60 + i)
        ref = reference(model, family, prompt, cfg)
        for step, k, v in _branch_parallel(model, prompt, cfg, world):
            assert_same_decode(step, ref, (family, world, cfg))
            assert_kv(k, v, model, family, ref)
        owners |= {s.winner % world for s in ref.steps}
        won += lookahead_commits(ref)
    assert won > 0
    assert owners == set(range(world))  # every rank owned a winner: each one's broadcast was exercised
