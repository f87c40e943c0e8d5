"""LoPA's decisions pinned: a scripted model with graded confidences and hand-computed traces, and trace invariants.

:class:`GradedMock` predicts answer position ``j`` (0-based after the prompt) as token ``j + 1`` with probability
``H[j]`` when position ``j - 1`` holds a decoded token in the row (or is committed, or is the prompt), ``L[j]``
when it is masked. All values are distinct, so no two positions tie unless a case makes them (the shared score).
With the mask excluded, the raw logit ``ln(14 p / (1 - p))`` on the target over 14 zero logits gives exactly p.

Every expected trace below was derived by hand from docs/algorithm.md §3 (threshold base, block 4, 8 new tokens,
maxprob confidence, prompt of 2 tokens, so answer position j is absolute position j + 2); the comments show the
arithmetic. Each step is (spawned lookahead positions, scores per candidate, winner, filled positions, committed).

The invariant test runs the engine on random graded checkpoints and checks, from the predictions the runner
returned, that every score is the mean confidence of the branch's scored positions (1.0 when none), the winner
is the first maximum (lookahead branches in creation order, the anchor last), and the lookahead positions of
each step are the top-k remaining positions of the previous winner's prediction, with its tokens.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lopa.config import DecodeConfig
from lopa.decoding.confidence import Prediction
from lopa.engine.loop import decode, run
from lopa.engine.runner import Runner
from tests.support.engine_utils import FAMILIES, ScriptedModel
from tests.support.reference_checks import graded_model, prompt_for

H = [0.95, 0.93, 0.96, 0.92, 0.85, 0.94, 0.97, 0.91]  # p when the previous position is decoded
L = [0.50, 0.30, 0.60, 0.40, 0.20, 0.45, 0.88, 0.86]  # p when it is masked
PROMPT = [12, 13]
MOCK_MASK, MOCK_EOS = 15, 14


@pytest.fixture(scope="module", autouse=True)
def _one_thread(single_thread):
    yield


class GradedMock(ScriptedModel):
    """The scripted model of the module docstring; the raw output at window index i speaks for i + shift."""

    def __init__(self, family: str) -> None:
        super().__init__(family, mask=MOCK_MASK, eos=MOCK_EOS)

    def logits(self, ids: Tensor, positions: Tensor, i: int, pos: int) -> Tensor:
        out = torch.zeros(16)
        j = pos - len(PROMPT)
        if 0 <= j < len(H):
            start = int(positions[0])
            decoded = pos - 1 < start or int(ids[pos - 1 - start]) != MOCK_MASK
            p = H[j] if decoded else L[j]
            out[j + 1] = math.log(14 * p / (1 - p))
        return out


def mock_trace(family: str, **cfg) -> tuple[list[tuple], int, list[int]]:
    """(per step: spawned, scores, winner, filled, committed), forwards and the answer of the engine on the mock."""
    config = DecodeConfig(block_size=4, max_new_tokens=8, confidence="maxprob", trace=True, **cfg).validate()
    step = run(decode(Runner(GradedMock(family)), PROMPT, config, MOCK_MASK, frozenset({MOCK_EOS})))
    steps = []
    for t in step.trace:
        spawned = [c["extra_position"] for c in t.candidates if c["kind"] == "lookahead"]
        steps.append((spawned, [c["score"] for c in t.candidates], t.winner, t.filled, t.committed))
    return steps, step.stats.forwards, step.state.tokens[len(PROMPT) :].tolist()


def assert_trace(got: list[tuple], want: list[tuple]) -> None:
    assert len(got) == len(want)
    for i, ((spawned, scores, winner, filled, committed), w) in enumerate(zip(got, want, strict=True)):
        assert (spawned, winner, filled, committed) == (w[0], w[2], w[3], w[4]), f"step {i + 1}"
        assert scores == pytest.approx(w[1], abs=1e-6), f"step {i + 1}"


ANSWER = list(range(1, 9))  # the mock's target tokens: every case decodes all of them

# k = 0 (threshold, tau 0.9): one block at a time, the anchor alone.
# F1 window prompt + [2..5]: conf j0 .95 (prev = prompt), j1 .30, j2 .60, j3 .40 -> mean 2.25/4 = .5625; fill j0.
# F2: j1 .93 (j0 decoded), j2 .60, j3 .40 -> 1.93/3; fill j1.   F3: j2 .96, j3 .40 -> .68; fill j2.
# F4: j3 .92 -> .92; fill j3, block 1 ready.   F5 (new block [6..9], commits [2..6)): j4 .85, j5 .45, j6 .88,
# j7 .86 -> 3.04/4 = .76; none > .9 -> fallback to the most confident, j6 (pos 8), not the leftmost j4.
# F6: j4 .85, j5 .45, j7 .91 (j6 decoded) -> 2.21/3; fill j7.   F7: j4 .85, j5 .45 -> .65; fallback j4.
# F8: j5 .94 -> .94; fill j5.   8 forwards.
THRESHOLD_K0 = [
    ([], [0.5625], 0, [2], 2),
    ([], [1.93 / 3], 0, [3], 2),
    ([], [0.68], 0, [4], 2),
    ([], [0.92], 0, [5], 2),
    ([], [0.76], 0, [8], 6),
    ([], [2.21 / 3], 0, [9], 6),
    ([], [0.65], 0, [6], 6),
    ([], [0.94], 0, [7], 6),
]

# k = 1, tau 0.9, mean score.
# F1 as above; remaining after filling j0: j2 .60 > j3 .40 > j1 .30 -> spawn pos 4 (the most confident, not j1).
# F2: L(4) masked j1 .93, j3 .92 (j2 decoded) -> .925; anchor j1 .93, j2 .60, j3 .40 -> 1.93/3 = .6433.
# L(4) wins; its fill: j1, j3 (> .9) -> block 1 complete, nothing left to spawn.
# F3 (new block, commits [2..6)): anchor only, .76 (as k = 0 F5); fallback j6; remaining j7 .86 > j4 .85 > j5 .45
# -> spawn pos 9.   F4: L(9) masked j4 .85, j5 .45 -> .65; anchor j4 .85, j5 .45, j7 .91 -> 2.21/3 = .7367:
# the anchor wins; fills j7; remaining j4 .85 > j5 .45 -> spawn pos 6.
# F5: L(6) masked j5 .94 -> .94; anchor j4 .85, j5 .45 -> .65; L(6) wins, fills j5.   5 forwards.
LOPA_K1 = [
    ([], [0.5625], 0, [2], 2),
    ([4], [0.925, 1.93 / 3], 0, [3, 5], 2),
    ([], [0.76], 0, [8], 6),
    ([9], [0.65, 2.21 / 3], 1, [9], 6),
    ([6], [0.94, 0.65], 0, [7], 6),
]

# k = 2, tau 0.9, mean score.
# F1: spawn pos 4 then pos 5 (j2 .60 > j3 .40).   F2: L(4) .925; L(5) masked j1 .93, j2 .60 (j1 masked) -> .765;
# anchor .6433 -> L(4) wins, fills j1, j3.   F3: .76, fallback j6, spawn pos 9 then pos 6 (j7 .86 > j4 .85).
# F4: L(9) masked j4 .85, j5 .45 -> .65; L(6) masked j5 .94, j7 .91 -> .925; anchor .7367 -> the SECOND lookahead
# wins (argmax, not the first), fills j5 and j7.   4 forwards.
LOPA_K2 = [
    ([], [0.5625], 0, [2], 2),
    ([4, 5], [0.925, 0.765, 1.93 / 3], 0, [3, 5], 2),
    ([], [0.76], 0, [8], 6),
    ([9, 6], [0.65, 0.925, 2.21 / 3], 1, [7, 9], 6),
]

# k = 1, tau 0.8, mean score: a branch with nothing left masked scores 1.0.
# F1: fill j0 (.95; j2 .60 is below .8); spawn pos 4.   F2: as k = 1 above, L(4) wins, fills j1, j3.
# F3: .76; fills j4 .85, j6 .88, j7 .86 (> .8); only j5 remains -> spawn pos 7.
# F4: L(7) has nothing masked -> 1.0; anchor j5 .94 (j4 decoded) -> .94; L(7) wins; its block is complete, so the
# anchor fill writes nothing.   4 forwards.
LOPA_K1_EMPTY = [
    ([], [0.5625], 0, [2], 2),
    ([4], [0.925, 1.93 / 3], 0, [3, 5], 2),
    ([], [0.76], 0, [6, 8, 9], 6),
    ([7], [1.0, 0.94], 0, [], 6),
]

# k = 2, tau 0.8, shared score: deliberate ties, decided for the first lookahead branch.
# F1: one candidate, .5625; fill j0; spawn pos 4, 5.
# F2: masked sets L(4) {3, 5}, L(5) {3, 4}, anchor {3, 4, 5}: shared {3}, where every candidate predicts j1 with
# j0 decoded -> .93, .93, .93: a three-way tie; the first lookahead L(4) wins and fills j1, j3.
# F3: .76, fills pos 6, 8, 9; spawn pos 7.   F4: L(7) {} and anchor {7}: nothing shared -> 1.0, 1.0: the
# lookahead wins the tie, the anchor loses it.   4 forwards.
LOPA_K2_SHARED_TIES = [
    ([], [0.5625], 0, [2], 2),
    ([4, 5], [0.93, 0.93, 0.93], 0, [3, 5], 2),
    ([], [0.76], 0, [6, 8, 9], 6),
    ([7], [1.0, 1.0], 0, [], 6),
]

CASES = {
    "threshold-k0": (dict(decoder="threshold", threshold=0.9), THRESHOLD_K0),
    "lopa-k1": (dict(decoder="lopa", base="threshold", branches=1, threshold=0.9), LOPA_K1),
    "lopa-k2": (dict(decoder="lopa", base="threshold", branches=2, threshold=0.9), LOPA_K2),
    "lopa-k1-empty": (dict(decoder="lopa", base="threshold", branches=1, threshold=0.8), LOPA_K1_EMPTY),
    "lopa-k2-shared-ties": (
        dict(decoder="lopa", base="threshold", branches=2, threshold=0.8, branch_score="shared"),
        LOPA_K2_SHARED_TIES,
    ),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_mock_trace_equals_hand_computed(case: str, family: str) -> None:
    cfg, want = CASES[case]
    steps, forwards, answer = mock_trace(family, **cfg)
    assert answer == ANSWER
    assert forwards == len(want)
    assert_trace(steps, want)


def test_d2f_base_equals_threshold_base_on_the_mock() -> None:
    """With tau_add = tau_act = 1, d2f is the threshold decoder (docs/algorithm.md §3.3): same hand-computed trace."""
    steps, forwards, _ = mock_trace(
        "dream", decoder="lopa", base="d2f", branches=2, threshold=0.9, tau_add=1.0, tau_act=1.0
    )
    assert forwards == len(LOPA_K2)
    assert_trace(steps, LOPA_K2)


class RecordingRunner(Runner):
    """A runner that also keeps every candidate's prediction of every verify."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.log: list[list[Prediction]] = []

    def verify(self, window_start, commit_len, cands, sampler, iteration) -> list[float]:
        scores = super().verify(window_start, commit_len, cands, sampler, iteration)
        self.log.append([self.prediction(i) for i in range(len(cands))])
        return scores


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize(
    ("base", "k", "score", "conf"),
    [("threshold", 2, "mean", "maxprob"), ("d2f", 4, "mean", "margin"), ("d2f", 3, "shared", "neg_entropy")],
)
def test_trace_invariants(family: str, base: str, k: int, score: str, conf: str) -> None:
    steps_checked = 0
    for seed in (70, 71, 72):
        model, prompt = graded_model(seed, family), prompt_for(seed)
        cfg = DecodeConfig(
            decoder="lopa",
            base=base,
            branches=k,
            block_size=4,
            max_new_tokens=16,
            threshold=0.8,
            tau_add=0.5,
            tau_act=0.75,
            confidence=conf,
            branch_score=score,
            trace=True,
        )
        runner = RecordingRunner(model)
        step = run(decode(runner, prompt, cfg.validate(), 63, frozenset({62})))
        assert len(runner.log) == len(step.trace) == step.stats.forwards
        previous = None  # (positions, tokens, conf) the previous winner left masked after its fill
        for t, preds in zip(step.trace, runner.log, strict=True):
            cands = t.candidates
            assert len(cands) == len(preds) and cands[-1]["kind"] == "anchor"
            # scores: mean confidence over the scored positions (shared: masked in every candidate), 1.0 if none
            scored = [set(p.positions.tolist()) for p in preds]
            if score == "shared":
                scored = [set.intersection(*scored)] * len(preds)
            for c, p, s in zip(cands, preds, scored, strict=True):
                confs = [float(x) for pos, x in zip(p.positions.tolist(), p.conf, strict=True) if pos in s]
                assert c["score"] == pytest.approx(sum(confs) / len(confs) if confs else 1.0, abs=1e-5)
            # winner: the first candidate with the highest score
            scores = [c["score"] for c in cands]
            assert t.winner == scores.index(max(scores))
            # lookahead positions: the previous winner's top-k remaining positions, highest confidence first
            spawned = [(c["extra_position"], c["extra_token"]) for c in cands[:-1]]
            if previous is None:
                assert spawned == []
            else:
                ranked = sorted(zip(*previous, strict=True), key=lambda x: (-x[2], x[0]))[:k]
                assert spawned == [(pos, tok) for pos, tok, _ in ranked]
            won = preds[t.winner]
            left = [i for i, pos in enumerate(won.positions.tolist()) if pos not in t.filled]
            previous = (
                [won.positions[i].item() for i in left],
                [won.tokens[i].item() for i in left],
                [won.conf[i].item() for i in left],
            )
            steps_checked += 1
    assert steps_checked >= 9
