"""Decoder invariants (docs/algorithm.md §3): LoPA k=0 / forced anchor equal the base decoder, batched
verification equals separate forwards, exact forward counting, d2f(1, 1) equals threshold, and a mock model
where LoPA's search provably saves forwards. Every test runs for both model families (Dream and LLaDA)."""

from __future__ import annotations

import random

import pytest
import torch

from lopa.config import DecodeConfig
from lopa.decoding.confidence import Sampler
from lopa.engine.engine import decode, run
from lopa.engine.runner import Candidate, Runner
from tests.support.engine_utils import END, FAMILIES, MASK, ChainMock, CountingModel, answer, peaky_model, run_decode
from tests.support.plain_block_loop import plain_block_decode


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 60) for _ in range(rng.randrange(3, 12))] for _ in range(n)]


SETTINGS = [
    dict(base="threshold", threshold=0.9, block_size=4, max_new_tokens=16),
    dict(base="threshold", threshold=0.5, block_size=8, max_new_tokens=24, confidence="margin"),
    dict(base="d2f", threshold=0.9, tau_add=0.1, tau_act=0.95, block_size=4, max_new_tokens=16),
    dict(
        base="d2f", threshold=0.7, tau_add=0.5, tau_act=0.5, block_size=8, max_new_tokens=32, confidence="neg_entropy"
    ),
    dict(base="d2f", threshold=0.8, tau_add=0.3, tau_act=0.9, block_size=4, max_new_tokens=16, temperature=0.8, seed=3),
]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def model(request):
    return peaky_model(seed=1, family=request.param)


@pytest.mark.parametrize("setting", SETTINGS)
def test_lopa_k0_and_forced_anchor_equal_base(model, setting):
    """The base run is built apart from the engine's sequence machine (k = 0 IS the engine's base decoder, so
    comparing the two would compare one object with itself): a plain loop written from docs/algorithm.md."""
    base = DecodeConfig(decoder=setting["base"], **setting)
    for prompt in _prompts(4, seed=len(str(setting))):
        ref, ref_forwards = plain_block_decode(model, prompt, base, MASK, END)
        k0 = base.replace(decoder="lopa", branches=0)
        forced = base.replace(decoder="lopa", branches=3, force_anchor=True)
        for cfg in (base, k0, forced):
            other = run_decode(model, prompt, cfg)
            assert answer(other) == ref
            assert other.stats.forwards == ref_forwards


def test_lopa_actually_branches_on_this_model(model):
    """Guard for the test above: with search on, LoPA picks lookahead winners and ends in fewer forwards."""
    cfg = DecodeConfig(decoder="lopa", base="threshold", branches=3, block_size=8, max_new_tokens=32, trace=True)
    base_forwards = lopa_forwards = lookahead_wins = 0
    for prompt in _prompts(4, seed=9):
        base_forwards += run_decode(model, prompt, cfg.replace(decoder="threshold")).stats.forwards
        step = run_decode(model, prompt, cfg)
        lopa_forwards += step.stats.forwards
        lookahead_wins += sum(t.candidates[t.winner]["kind"] == "lookahead" for t in step.trace)
    assert lookahead_wins > 0
    assert lopa_forwards < base_forwards


@pytest.mark.parametrize("threshold,block", [(0.9, 4), (0.6, 8), (0.3, 2)])
def test_d2f_with_unit_taus_equals_threshold(model, threshold, block):
    for prompt in _prompts(4, seed=block):
        common = dict(threshold=threshold, block_size=block, max_new_tokens=4 * block)
        a = run_decode(model, prompt, DecodeConfig(decoder="threshold", **common))
        b = run_decode(model, prompt, DecodeConfig(decoder="d2f", tau_add=1.0, tau_act=1.0, **common))
        assert answer(a) == answer(b) and a.stats.forwards == b.stats.forwards


@pytest.mark.parametrize("decoder", ["vanilla", "threshold", "d2f", "lopa"])
def test_forward_count_matches_a_counting_wrapper(model, decoder):
    counting = CountingModel(model)
    cfg = DecodeConfig(decoder=decoder, branches=3, block_size=4, max_new_tokens=16)
    total = 0
    for prompt in _prompts(3, seed=5):
        total += run(decode(Runner(counting), prompt, cfg, MASK, frozenset({62}))).stats.forwards
    assert total == counting.calls and total > 0


def test_batched_verification_equals_separate_forwards(model):
    """k+1 candidates in one forward (lengths differing by a block) give each row's logits of its own forward."""
    torch.manual_seed(0)
    prompt = torch.randint(0, 60, (7,))
    runner = Runner(model)
    runner.begin(64, rows=4)
    first = Candidate(torch.cat([prompt, torch.full((4,), MASK)]), torch.arange(7, 11), torch.ones(4, dtype=torch.bool))
    runner.verify(0, 7, [first], Sampler(MASK), 0)
    runner.commit(0, 7)  # prompt committed, as after the first iteration
    windows = [
        torch.tensor([5, MASK, MASK, 9]),
        torch.tensor([5, 6, MASK, 9, MASK, MASK, MASK, MASK]),  # one block longer
        torch.tensor([MASK, MASK, MASK, 9]),
        torch.tensor([5, 6, 7, 9, MASK, 3, MASK, MASK]),
    ]
    cands = []
    for w in windows:
        masked = (w == MASK).nonzero().flatten() + 7
        cands.append(Candidate(w, masked, torch.ones(masked.numel(), dtype=torch.bool)))
    batched, _ = runner.raw_logits(7, 0, cands)
    runner.commit(0, 0)  # roll back the pre-writes
    for r, c in enumerate(cands):
        alone, _ = runner.raw_logits(7, 0, [c])
        runner.commit(0, 0)
        m = c.predict.numel()
        torch.testing.assert_close(batched[r, :m], alone[0, :m], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mock_lopa_saves_forwards_exactly(family):
    """Left-to-right chain, 8 answer tokens in one block of 8, τ = 0.9.

    threshold fills 1 per forward → 8 forwards. lopa k=1: forward 1 fills 1, then every forward keeps the
    lookahead token plus the now-confident next one (+2), and the last forward verifies the completed
    branch: 1+2+2+2 tokens after 4 forwards, 5 forwards in all. k=2: the winner filled 2 ahead, which makes
    two positions confident: 1, then +3 (P+1, P+2, P+3), +3 (P+4..P+6), then the completing lookahead: 4.
    """
    target = [1, 2, 3, 4, 5, 6, 7, 14]
    prompt = [8, 9, 10]
    mock = ChainMock(target, len(prompt), family)
    cfg = DecodeConfig(decoder="threshold", block_size=8, max_new_tokens=8, threshold=0.9)
    results = {
        "threshold": run(decode(Runner(mock), prompt, cfg, 15, frozenset({14}))),
        "k1": run(
            decode(Runner(mock), prompt, cfg.replace(decoder="lopa", base="threshold", branches=1), 15, frozenset({14}))
        ),
        "k2": run(
            decode(Runner(mock), prompt, cfg.replace(decoder="lopa", base="threshold", branches=2), 15, frozenset({14}))
        ),
    }
    for step in results.values():
        assert answer(step) == target
    assert [results[k].stats.forwards for k in ("threshold", "k1", "k2")] == [8, 5, 4]
