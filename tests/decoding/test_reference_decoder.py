"""The engine equals the independent reference decoder (tests/support/reference_decoder.py) token for token and step for
step.

Every decision the engine makes is compared with a re-implementation that shares no code with it: per iteration
the lookahead positions it spawned (in creation order), every candidate's score, the winner, the positions the
winner's fill wrote and the committed length; at the end the tokens and the forward count. Checkpoints are random
models of both families whose confidences are graded (a scaled head spreads them over (0, 1) with no ties, and the
end token's logit is damped so answers run for several blocks). The grid covers k in {1, 2, 4, 8}, blocks of 4, 8
and 32, several thresholds, every confidence kind, both bases and both branch scores; k = 0 (plain threshold and
d2f) and vanilla (every order) are compared too. Each test also checks that what it compared was not trivial:
lookahead branches won, and (shared score) tied candidates were decided by the tie rule.
"""

from __future__ import annotations

import pytest
import torch

from lopa.config import DecodeConfig
from lopa.testing import transformers_bidirectional_logits, transformers_twin
from tests.support.engine_utils import END, FAMILIES, MASK
from tests.support.reference_checks import assert_same_decode, engine_decode, graded_model, prompt_for
from tests.support.reference_decoder import ReferenceTransformer, guess, reference_decode

# (k, block_size, threshold, confidence): every k, block size and confidence kind, spread over thresholds
GRID = [
    (1, 4, 0.9, "maxprob"),
    (2, 8, 0.7, "margin"),
    (4, 4, 0.5, "neg_entropy"),
    (8, 8, 0.8, "maxprob"),
    (1, 32, 0.6, "margin"),
    (4, 32, 0.95, "neg_entropy"),
    (8, 4, 0.7, "margin"),
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(single_thread):
    yield


def test_reference_forward_equals_transformers() -> None:
    """The reference's hand-written transformer is the Qwen2 forward (bidirectional), checked against transformers."""
    pytest.importorskip("transformers")
    model = graded_model(0, "dream")
    ids = torch.tensor([prompt_for(1) + prompt_for(2)])  # (1, L)
    ours, _ = ReferenceTransformer(model, "dream").forward(ids[0].tolist(), 0)
    theirs = transformers_bidirectional_logits(transformers_twin(model), ids)[0]
    assert ours.std() > 1.0
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_graded_checkpoints_have_no_tied_confidences(family: str) -> None:
    """Over a masked answer, every confidence kind is spread out and no two positions are within 1e-5 of each other,
    so the comparisons below are decided by the decoders, not by fp32 rounding or the tie rule."""
    model = ReferenceTransformer(graded_model(0, family), family)
    logits, _ = model.forward(prompt_for(0) + [MASK] * 16, 0)  # (L, vocab)
    for kind in ("maxprob", "margin", "neg_entropy"):
        conf = sorted(guess(row, MASK, kind).conf for row in logits)
        assert min(b - a for a, b in zip(conf, conf[1:], strict=False)) > 1e-5, kind
        assert conf[-1] - conf[0] > 0.5, kind


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("score", ["mean", "shared"])
@pytest.mark.parametrize("base", ["threshold", "d2f"])
def test_lopa_equals_reference(family: str, base: str, score: str) -> None:
    lookahead_wins = ties = 0
    for i, (k, block, tau, conf) in enumerate(GRID):
        seed = 10 * i + len(base) + len(score)
        model = graded_model(seed, family)
        cfg = DecodeConfig(
            decoder="lopa",
            base=base,
            branches=k,
            block_size=block,
            max_new_tokens=max(16, block),
            threshold=tau,
            tau_add=0.5,
            tau_act=0.75,
            confidence=conf,
            branch_score=score,
        )
        prompt = prompt_for(seed)
        ref = reference_decode(ReferenceTransformer(model, family), prompt, cfg, END)
        step, _ = engine_decode(model, prompt, cfg)
        assert_same_decode(step, ref, (family, cfg))
        lookahead_wins += sum(s.winner < len(s.spawned) for s in ref.steps)
        ties += sum(len(s.scores) > 1 and s.scores.count(max(s.scores)) > 1 for s in ref.steps)
    assert lookahead_wins >= len(GRID)  # the grid exercises the search, not just the anchor
    if score == "shared":
        assert ties > 0  # all-equal shared scores happened and the tie rule decided them


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("decoder", ["threshold", "d2f"])
def test_base_decoders_equal_reference(family: str, decoder: str) -> None:
    forwards = 0
    for i, (block, tau, conf) in enumerate([(4, 0.9, "maxprob"), (8, 0.6, "margin"), (32, 0.8, "neg_entropy")]):
        seed = 100 + i + len(decoder)
        model = graded_model(seed, family)
        cfg = DecodeConfig(
            decoder=decoder,
            block_size=block,
            max_new_tokens=max(16, block),
            threshold=tau,
            tau_add=0.3,
            tau_act=0.8,
            confidence=conf,
        )
        prompt = prompt_for(seed)
        ref = reference_decode(ReferenceTransformer(model, family), prompt, cfg, END)
        step, _ = engine_decode(model, prompt, cfg)
        assert_same_decode(step, ref, (family, cfg))
        forwards += ref.forwards
    assert forwards >= 9  # several iterations per decode on average: fallbacks and thresholds both decided


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("order", ["maskgit_plus", "topk_margin", "entropy"])
def test_vanilla_equals_reference(family: str, order: str) -> None:
    seed = 200 + len(order)
    model = graded_model(seed, family)
    cfg = DecodeConfig(decoder="vanilla", max_new_tokens=10, order=order)
    prompt = prompt_for(seed)
    ref = reference_decode(ReferenceTransformer(model, family), prompt, cfg, END)
    step, _ = engine_decode(model, prompt, cfg)
    assert step.state.tokens.tolist() == ref.tokens
    assert step.stats.forwards == ref.forwards > 2
    assert [t.filled for t in step.trace] == [s.filled for s in ref.steps]
    assert [t.candidates[0]["score"] for t in step.trace] == pytest.approx([s.scores[0] for s in ref.steps], abs=1e-4)
