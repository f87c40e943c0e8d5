"""Batched decoding (engine/batch.py, engine/scheduler.py): every sequence decoded in a batch gets exactly the
tokens AND the forward count it gets decoded alone, for every decoder, mixed settings in one batch, different
prompt lengths, sequences finishing at different iterations and joining mid-run; seeded sampling does not
depend on the batch; a full pool makes new work wait; aborting frees a slot."""

from __future__ import annotations

import random

import pytest
import torch

from lopa.config import DecodeConfig
from lopa.engine.batch import BatchRunner
from lopa.engine.scheduler import Scheduler
from lopa.errors import ConfigError, PromptTooLongError
from lopa.model.cache import KVPool
from tests.support.engine_utils import END, EOS, FAMILIES, MASK, peaky_model, run_decode

MIXED = [
    DecodeConfig(decoder="threshold", threshold=0.6, block_size=8, max_new_tokens=32),
    DecodeConfig(decoder="d2f", threshold=0.8, tau_add=0.3, tau_act=0.9, block_size=8, max_new_tokens=48),
    DecodeConfig(decoder="lopa", base="threshold", branches=2, threshold=0.9, block_size=4, max_new_tokens=16),
    DecodeConfig(decoder="lopa", base="d2f", branches=4, threshold=0.7, block_size=8, max_new_tokens=32),
    DecodeConfig(decoder="vanilla", max_new_tokens=12, order="topk_margin"),
    DecodeConfig(decoder="lopa", base="d2f", branches=3, block_size=8, max_new_tokens=24, confidence="margin"),
    DecodeConfig(decoder="lopa", branches=3, block_size=8, max_new_tokens=32, temperature=0.8, seed=3),
    DecodeConfig(decoder="threshold", block_size=4, max_new_tokens=8, temperature=1.0, top_k=5, seed=7),
]


def _long_running(family: str):
    """Peaky random model of ``family`` that never prefers the end token, so sequences run many iterations."""
    m = peaky_model(seed=1, family=family)
    with torch.no_grad():
        m.lm_head.weight[EOS].zero_()
    return m


@pytest.fixture(scope="module")
def model():
    return _long_running("dream")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request):
    """Each family: Dream (logit shift 1, a frozen last logit) and LLaDA (shift 0, none)."""
    return _long_running(request.param)


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 60) for _ in range(rng.randrange(3, 14))] for _ in range(n)]


def _run_batched(model, jobs, max_num_seqs: int, log: list | None = None):
    """Final Step per job index, decoding all jobs through one scheduler."""
    sched = Scheduler(BatchRunner(model, max_num_seqs, 128), MASK, END)
    for i, (prompt, cfg) in enumerate(jobs):
        sched.add(i, prompt, cfg.validate())
    final, iteration = {}, 0
    while sched.has_work:
        for rid, step in sched.step():
            if log is not None:
                log.append((iteration, rid))
            if step.done:
                final[rid] = step
        assert len(sched.running) <= max_num_seqs
        iteration += 1
    return final


def _assert_same(model, jobs, final) -> None:
    for i, (prompt, cfg) in enumerate(jobs):
        alone = run_decode(model, prompt, cfg)
        got = final[i]
        assert got.state.tokens.tolist() == alone.state.tokens.tolist(), (i, cfg)
        assert got.stats.forwards == alone.stats.forwards, (i, cfg)
        assert got.stats.tokens == alone.stats.tokens


@pytest.mark.parametrize(
    "cfg",
    [MIXED[0], MIXED[1], MIXED[2], MIXED[3], MIXED[4]],
    ids=["threshold", "d2f", "lopa-threshold-k2", "lopa-d2f-k4", "vanilla"],
)
def test_each_decoder_batched_equals_alone(family_model, cfg) -> None:
    jobs = [(p, cfg) for p in _prompts(6, seed=len(cfg.decoder) + cfg.num_branches)]
    final = _run_batched(family_model, jobs, max_num_seqs=4)
    _assert_same(family_model, jobs, final)
    assert max(s.stats.batch_size for s in final.values()) > 1


def test_mixed_settings_join_and_leave_mid_run(family_model) -> None:
    prompts = _prompts(12, seed=5)
    jobs = [(p, MIXED[i % len(MIXED)]) for i, p in enumerate(prompts)]
    log: list[tuple[int, int]] = []
    final = _run_batched(family_model, jobs, max_num_seqs=5, log=log)
    _assert_same(family_model, jobs, final)
    first_seen = {rid: it for it, rid in reversed(log)}
    assert max(first_seen.values()) > 0  # some sequences joined after the first iteration
    assert len({s.stats.forwards for s in final.values()}) > 3  # they finished at different iterations
    assert len({len(p) for p in prompts}) > 3


def test_seeded_sampling_does_not_depend_on_the_batch(model) -> None:
    sampled = DecodeConfig(decoder="lopa", base="d2f", branches=2, block_size=8, max_new_tokens=24, temperature=0.9)
    target = (_prompts(1, seed=11)[0], sampled.replace(seed=5))
    runs = []
    for companions in (0, 3, 6):
        others = [(p, MIXED[(i + companions) % len(MIXED)]) for i, p in enumerate(_prompts(companions, seed=12))]
        final = _run_batched(model, [target, *others], max_num_seqs=4)
        runs.append((final[0].state.tokens.tolist(), final[0].stats.forwards))
    assert runs[0] == runs[1] == runs[2]
    alone = run_decode(model, *target)
    assert runs[0] == (alone.state.tokens.tolist(), alone.stats.forwards)


def test_full_pool_makes_work_wait_and_abort_frees_the_slot(model) -> None:
    runner = BatchRunner(model, 2, 128)
    sched = Scheduler(runner, MASK, END)
    cfg = DecodeConfig(decoder="threshold", threshold=0.99, block_size=8, max_new_tokens=32)
    for i, p in enumerate(_prompts(5, seed=3)):
        sched.add(i, p, cfg)
    sched.step()
    assert [e.rid for e in sched.running] == [0, 1] and len(sched.waiting) == 3
    assert runner.pool.free_slots == 0
    assert sched.abort(0)
    assert runner.pool.free_slots == 1
    sched.step()  # the next waiting sequence takes the freed slot, in order of arrival
    assert [e.rid for e in sched.running] == [1, 2]
    assert sched.abort(4) and [e.rid for e in sched.waiting] == [3]
    assert not sched.abort(99)


def test_too_long_prompt_is_rejected_alone(model) -> None:
    sched = Scheduler(BatchRunner(model, 2, 40), MASK, END)
    ok = DecodeConfig(decoder="threshold", block_size=8, max_new_tokens=16)
    sched.add(0, [1, 2, 3], ok)
    with pytest.raises(PromptTooLongError, match="max_model_len"):
        sched.add(1, list(range(30)), ok)
    sched.add(2, [4, 5], ok)
    done = set()
    while sched.has_work:
        done |= {rid for rid, step in sched.step() if step.done}
    assert done == {0, 2}


def test_kv_pool_slots() -> None:
    pool = KVPool(2, 3, 16, 2, 4)
    assert pool.memory_bytes() == KVPool.bytes_needed(2, 3, 16, 2, 4, torch.float32) == 2 * 2 * 3 * 16 * 2 * 4 * 4
    assert [pool.alloc(), pool.alloc(), pool.alloc(), pool.alloc()] == [0, 1, 2, None]
    k = torch.randn(2, 2, 5, 4)
    pool.commit(1, k, -k)
    assert pool.committed[1] == 5 and torch.equal(pool.span(1, 0, 5)[1], -k)
    with pytest.raises(ConfigError, match="overflow"):
        pool.commit(1, torch.zeros(2, 2, 12, 4), torch.zeros(2, 2, 12, 4))
    pool.release(1)
    with pytest.raises(ConfigError):
        pool.release(1)
    assert pool.alloc() == 1 and pool.committed[1] == 0
