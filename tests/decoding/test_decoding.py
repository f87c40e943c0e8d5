"""Decoder invariants (docs/algorithm.md §3): LoPA k=0 / forced anchor equal the base decoder, batched
verification equals separate forwards, exact forward counting, d2f(1, 1) equals threshold, and a mock model
where LoPA's search provably saves forwards: each runs for both model families (Dream and LLaDA). Tiny temperatures are
numerically safe and make every decoder greedy (on the tiny checkpoint, through the Python API)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lopa import LLM
from lopa.config import DECODERS, DecodeConfig
from lopa.decoding.confidence import Sampler, filtered_probs, predict
from lopa.engine.loop import decode, run
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


@pytest.fixture(scope="module")
def llm(tiny_ckpt) -> LLM:
    return LLM(tiny_ckpt)


def _cfg(decoder: str, **kw) -> DecodeConfig:
    return DecodeConfig(decoder=decoder, block_size=8, max_new_tokens=16, branches=2, **kw)


@pytest.mark.parametrize("temperature", [1e-7, 1e-40, 1e-300, 5e-324])
def test_tiny_temperatures_are_numerically_safe(temperature: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 10  # (m, vocab)
    s = Sampler(mask_id=3, temperature=temperature, top_p=0.9, top_k=5)
    probs = filtered_probs(logits, s)  # (m, vocab)
    assert torch.isfinite(probs).all()
    assert torch.allclose(probs.sum(-1), torch.ones(6))
    masked = logits.clone()
    masked[:, 3] = -math.inf
    assert torch.equal(probs.argmax(-1), masked.argmax(-1))  # the limit T -> 0 is greedy
    pred = predict(logits, torch.arange(6), s, torch.Generator().manual_seed(1))
    assert torch.equal(pred.tokens, masked.argmax(-1)) and torch.isfinite(pred.conf).all()


def _greedy(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Argmax token per position of ``ids`` from one plain full forward (Dream's shift: output i−1 predicts i),
    the mask token excluded; entry i is the prediction for position i (entry 0 is unused)."""
    with torch.no_grad():
        logits = llm.model(torch.tensor([ids]), torch.arange(len(ids))[None])[0]  # (L, vocab)
    logits[:, llm.mask_id] = -math.inf
    return torch.cat([torch.tensor([-1]), logits[:-1].argmax(-1)])


@pytest.mark.parametrize("decoder", DECODERS)
def test_every_decoder_runs_at_a_tiny_temperature(llm: LLM, decoder: str) -> None:
    """At T → 0 sampling is greedy and every chosen token has p = 1. So the seed does not matter; a block decoder
    fills a whole block per forward (p = 1 > τ everywhere): 2 forwards for 16 positions in blocks of 8, the first block
    being the argmax of one plain forward over prompt + 8 masks; vanilla's ties (all p = 1) go to the lower position,
    so it fills left to right, each token the argmax of a plain forward over what is decoded so far."""
    runs = [
        llm.generate("hello", _cfg(decoder, temperature=1e-40, confidence="neg_entropy", seed=s))[0] for s in (0, 9)
    ]
    out = runs[0]
    assert out.token_ids == runs[1].token_ids and out.token_ids
    prompt, m = out.prompt_token_ids, llm.mask_id
    p = len(prompt)
    if decoder == "vanilla":
        ids, want = prompt + [m] * 16, []
        for i in range(len(out.token_ids)):
            ids[p + i] = int(_greedy(llm, ids)[p + i])
            want.append(ids[p + i])
        assert out.token_ids == want and out.stats.forwards == len(want)
    else:
        assert out.stats.forwards == 2
        assert out.token_ids[:8] == _greedy(llm, prompt + [m] * 8)[p:].tolist()
