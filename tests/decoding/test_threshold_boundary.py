"""The threshold test is strict (docs/algorithm.md §3: p(chosen) > τ): a position whose probability is exactly τ is
not filled by the threshold, only by the fallback. Checked on a scripted model whose probabilities are exact in
float32 (1/2 from two equal logits), with the fills and forward count worked out by hand."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lopa.config import DecodeConfig
from lopa.decoding.base import fill_block
from lopa.decoding.blocks import GenState
from lopa.decoding.confidence import Prediction
from lopa.engine.loop import decode, run
from lopa.engine.runner import Runner
from tests.support.engine_utils import FAMILIES, ScriptedModel, answer

MASK, EOS = 15, 14
PROMPT = [8, 9, 10]


class HalfTieModel(ScriptedModel):
    """Its prediction for absolute position p depends on p alone: positions P and P+1 (P = prompt length) are token 3
    at p ≈ 1; P+2 and P+3 are a tie of tokens 5 and 6, p = 1/2 each exactly (every other logit is −10⁴, whose
    exponential is 0 in float32). The raw output at window index j speaks for position j + the family's shift."""

    def __init__(self, family: str) -> None:
        super().__init__(family, mask=MASK, eos=EOS)

    def logits(self, ids: Tensor, positions: Tensor, i: int, pos: int) -> Tensor:
        logits = torch.full((16,), -1e4)
        k = pos - len(PROMPT)
        if k in (0, 1):
            logits[3] = 20.0
        elif k in (2, 3):
            logits[5] = logits[6] = 0.0
        else:
            logits[EOS] = 20.0
        return logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("decoder", ["threshold", "d2f"])
def test_a_position_exactly_at_tau_is_not_filled(family: str, decoder: str) -> None:
    """τ = 1/2, one block of 4. Forward 1: P and P+1 are above τ and filled; P+2 and P+3 sit exactly at τ and are
    not. Forward 2: nothing left is above τ, so the fallback fills the most confident position, the tie going to the
    lower one: P+2 (token 5, the lower id of the tied pair). Forward 3: P+3. Three forwards; with `>=` it is one."""
    cfg = DecodeConfig(decoder=decoder, block_size=4, max_new_tokens=4, threshold=0.5, trace=True)
    step = run(decode(Runner(HalfTieModel(family)), PROMPT, cfg, MASK, frozenset({EOS})))
    p = len(PROMPT)
    assert [t.filled for t in step.trace] == [[p, p + 1], [p + 2], [p + 3]]
    assert answer(step) == [3, 3, 5, 5]
    assert step.stats.forwards == 3


def test_fill_block_compares_the_probability_strictly() -> None:
    """Three masked positions of one block with p(chosen) = 3/4, 1/2, 1/4 (exact in float32) and τ = 1/2: only the
    first passes. Ranking confidence is set against probability, so the check reads p, not the confidence."""
    state = GenState.from_prompt([1, 2], MASK)
    state.add_block(3, fully_activated=True)
    block = state.blocks[-1]
    pred = Prediction(
        positions=torch.tensor([2, 3, 4]),
        tokens=torch.tensor([7, 7, 7]),
        prob=torch.tensor([0.75, 0.5, 0.25]),
        conf=torch.tensor([0.1, 0.9, 0.9]),
    )
    assert fill_block(pred, block, 0.5, fallback=True).tolist() == [True, False, False]
    # nothing above τ = 3/4: the fallback fills the most confident position (ties: the lower one), not the likeliest
    assert fill_block(pred, block, 0.75, fallback=True).tolist() == [False, True, False]
    assert fill_block(pred, block, 0.75, fallback=False).tolist() == [False, False, False]
