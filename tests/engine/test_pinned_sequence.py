"""The sequence state machine (lopa/engine/sequence.py) driven by a scripted runner, no model: every plan,
commit, winner, fill, spawn and the final stats of small decodes, worked out by hand in the comments.

The scripted model predicts token 20 + p at position p. Its confidence at p is ``BASE[p]``, plus 0.3 when
position p - 1 is decoded in that candidate: graded, so ranking, spawn order and winners are all decided by the
numbers below and never by a tie.
"""

import time

import pytest
import torch

from lopa.config import DecodeConfig
from lopa.decoding.blocks import GenState
from lopa.decoding.confidence import Prediction
from lopa.decoding.d2f import D2FDecoder
from lopa.decoding.lookahead import Branch, branch_score
from lopa.decoding.threshold import ThresholdDecoder
from lopa.engine.sequence import (
    BlockSequence,
    Plan,
    VanillaSequence,
    answer_ids,
    final_ids,
    iteration_cap,
    make_decoder,
    new_sequence,
    sampler_for,
    trace_step,
)

MASK, END_ID = 9, 8
END = frozenset({END_ID})
PROMPT = [1, 2]  # positions 0, 1


class Scripted:
    """A RunnerView: predictions from the rule in the module docstring; records commits."""

    def __init__(self, base: dict[int, float], tokens: dict[int, int] | None = None) -> None:
        self.base, self.tokens = base, tokens or {}
        self.timing = {"forward": 0.25}
        self.commits: list[tuple[int, int]] = []
        self.preds: list[Prediction] = []
        self.windows: list[list[list[int]]] = []  # each forward's candidate windows, as they were

    def load(self, plan: Plan) -> list[float]:
        """Predict every candidate of ``plan``; returns the mean-confidence scores over each score mask."""
        self.preds = []
        self.windows.append([c.tokens.tolist() for c in plan.cands])
        for cand in plan.cands:
            window = cand.tokens  # absolute position p is window[p - plan.window_start]
            conf = []
            for p in cand.predict.tolist():
                prev = p - 1 - plan.window_start
                decoded = p - 1 < plan.window_start or int(window[prev]) != MASK
                conf.append(self.base[p] + (0.3 if decoded else 0.0))
            c = torch.tensor(conf, dtype=torch.float32)
            toks = torch.tensor([self.tokens.get(p, 20 + p) for p in cand.predict.tolist()], dtype=torch.long)
            self.preds.append(Prediction(cand.predict.clone(), toks, c.clone(), c))
        return [branch_score(p.conf, c.score_mask) for p, c in zip(self.preds, plan.cands, strict=True)]

    def prediction(self, index: int) -> Prediction:
        return self.preds[index]

    def commit(self, index: int, n: int) -> None:
        self.commits.append((index, n))


def drive(seq, runner: Scripted):
    plans, steps = [], []
    while (plan := seq.plan()) is not None:
        plans.append(plan)
        steps.append(seq.advance(plan, runner.load(plan), runner))
    return plans, steps


def cfg(**kw) -> DecodeConfig:
    base = dict(decoder="threshold", block_size=2, max_new_tokens=4, threshold=0.5)
    return DecodeConfig(**{**base, **kw}).validate()


# ---- threshold (lopa with k = 0) -----------------------------------------------------------------------------
def test_threshold_plans_commits_and_stats_by_hand() -> None:
    # 2 blocks of 2; static confidences (0.3 bonus included): p2 0.6 + 0.3 = 0.9, p3 0.3, p4 0.2, p5 0.6
    runner = Scripted({2: 0.6, 3: 0.0, 4: -0.1, 5: 0.6})
    seq = new_sequence(PROMPT, cfg(), MASK, END)
    assert isinstance(seq, BlockSequence) and seq.uses_cache and seq.rows == 1 and seq.max_len == 6
    plans, steps = drive(seq, runner)
    # 1: block [2, 4) added; window from 0, the prompt's 2 positions committed; p2 (0.9 > 0.5) filled
    # 2: window from 2, nothing to commit; p3 0.3 + 0.3 = 0.6 > 0.5 filled; block 1 READY
    # 3: block [4, 6) added; window from 2, block 1 committed; p4 0.2, p5 0.6: p5 filled
    # 4: window from 4; p4 0.2 + 0, p4's predecessor p3 is decoded: 0.2 + 0.3 = 0.5, not > 0.5: fallback fills it
    assert [(p.window_start, p.commit_len, p.iteration) for p in plans] == [(0, 2, 0), (2, 0, 1), (2, 2, 2), (4, 0, 3)]
    assert [len(p.cands) for p in plans] == [1, 1, 1, 1]
    assert [p.cands[0].predict.tolist() for p in plans] == [[2, 3], [3], [4, 5], [4]]
    assert runner.commits == [(0, 2), (0, 0), (0, 2), (0, 0)]
    final = seq.final
    assert final is not None and final.done and not final.stopped and final is not steps[-1]
    assert final.state.tokens.tolist() == [1, 2, 22, 23, 24, 25]
    st = final.stats
    assert (st.forwards, st.tokens, st.iterations, st.decoded_positions, st.prompt_tokens) == (4, 4, 5, 4, 2)
    assert st.timing == {"forward": 0.25} and st.timing is not runner.timing
    assert [s.done for s in steps] == [False] * 4
    assert seq.plan() is None and runner.commits == [(0, 2), (0, 0), (0, 2), (0, 0)]  # finished stays finished


def test_threshold_trace_has_one_anchor_candidate_per_forward() -> None:
    seq = new_sequence(PROMPT, cfg(trace=True), MASK, END)
    _, steps = drive(seq, Scripted({2: 0.6, 3: 0.0, 4: -0.1, 5: 0.6}))
    trace = seq.final.trace
    assert [[c["kind"] for c in t.candidates] for t in trace] == [["anchor"]] * 4
    assert [(t.filled, t.tokens, t.committed) for t in trace] == [
        ([2], [22], 2),
        ([3], [23], 2),
        ([5], [25], 4),
        ([4], [24], 4),
    ]
    assert all(s.trace is trace for s in steps)
    # each step's state is the anchor its advance left, with the sequence's stats
    seq2, runner = new_sequence(PROMPT, cfg(), MASK, END), Scripted({2: 0.6, 3: 0.0, 4: -0.1, 5: 0.6})
    while (plan := seq2.plan()) is not None:
        step = seq2.advance(plan, runner.load(plan), runner)
        assert step.state is seq2.anchor and step.stats is seq2.stats and step.trace is None


def test_stop_check_ends_early_with_what_is_final() -> None:
    runner = Scripted({2: 0.6, 3: 0.0, 4: -0.1, 5: 0.6})
    seen: list[list[int]] = []

    def stop(ids: list[int]) -> bool:
        seen.append(ids)
        return 22 in ids

    seq = new_sequence(PROMPT, cfg(trace=True), MASK, END, stop)
    plans, steps = drive(seq, runner)
    assert len(plans) == 1 and seen == [[22]]
    assert [t.filled for t in seq.final.trace] == [[2]]
    assert steps[-1] is seq.final and steps[-1].done and steps[-1].stopped
    st = steps[-1].stats
    assert (st.forwards, st.tokens, st.iterations, st.decoded_positions) == (1, 1, 2, 2)


def test_an_end_token_counts_one_and_cuts_the_answer() -> None:
    # p3 holds the end token: the answer is [22], the end token counts 1 in stats.tokens, no second block
    runner = Scripted({2: 0.6, 3: 0.0, 4: -0.1, 5: 0.6}, tokens={3: END_ID})
    seq = new_sequence(PROMPT, cfg(), MASK, END)
    plans, _ = drive(seq, runner)
    assert len(plans) == 2 and seq.final is not None
    assert answer_ids(seq.final.state, END) == ([22], True)
    assert final_ids(seq.final.state) == [22, END_ID]
    st = seq.final.stats
    assert (st.forwards, st.tokens, st.iterations, st.decoded_positions) == (2, 2, 3, 2)


def test_the_iteration_cap_ends_decoding() -> None:
    assert iteration_cap(cfg()) == 4 + 4 // 2 + 8
    assert iteration_cap(cfg(max_iterations=3)) == 3
    assert iteration_cap(DecodeConfig(decoder="vanilla", max_new_tokens=5, block_size=0)) == 5 + 5 + 8
    assert iteration_cap(DecodeConfig(decoder="vanilla", max_new_tokens=20, block_size=16)) == 20 + 1 + 8
    runner = Scripted({2: 0.6, 3: 0.0, 4: -0.1, 5: 0.6})
    seq = new_sequence(PROMPT, cfg(max_iterations=2), MASK, END)
    plans, _ = drive(seq, runner)
    assert len(plans) == 2 and seq.final is not None and seq.final.done and not seq.final.stopped
    assert (seq.final.stats.forwards, seq.final.stats.tokens, seq.final.stats.iterations) == (2, 2, 3)


# ---- lopa ----------------------------------------------------------------------------------------------------
LOPA_BASE = {2: 0.6, 3: 0.4, 4: 0.3, 5: 0.2}


def lopa_cfg(**kw) -> DecodeConfig:
    return cfg(decoder="lopa", base="threshold", branches=2, block_size=4, max_new_tokens=4, threshold=0.8, **kw)


def test_lopa_branches_winners_and_commits_by_hand() -> None:
    # One block [2, 6). Forward 1 (anchor only): conf p2 0.9, p3 0.4, p4 0.3, p5 0.2; p2 > 0.8 is filled.
    #   Spawn from the rest by confidence: L1 fills p3 (0.4), L2 fills p4 (0.3); the anchor last.
    # Forward 2: L1 predicts p4 0.6, p5 0.2 -> 0.4; L2 p3 0.7, p5 0.5 -> 0.6; anchor p3 0.7, p4 0.3, p5 0.2 -> 0.4.
    #   L2 wins; its fill: nothing > 0.8, fallback p3 (0.7). One position left (p5 0.5): one lookahead fills it.
    # Forward 3: that lookahead has nothing masked (score 1.0) and beats the anchor (p5 0.5); block done.
    runner = Scripted(LOPA_BASE)
    seq = new_sequence(PROMPT, lopa_cfg(trace=True), MASK, END)
    assert seq.rows == 3 and seq.k == 2
    plans, steps = drive(seq, runner)
    assert [[c.predict.tolist() for c in p.cands] for p in plans] == [
        [[2, 3, 4, 5]],
        [[4, 5], [3, 5], [3, 4, 5]],
        [[], [5]],
    ]
    assert [[c.stream for c in p.cands] for p in plans] == [[0], [1, 2, 0], [1, 0]]
    assert [(p.window_start, p.commit_len) for p in plans] == [(0, 2), (2, 0), (2, 0)]
    assert runner.commits == [(0, 2), (1, 0), (0, 0)]
    trace = seq.final.trace
    assert [t.winner for t in trace] == [0, 1, 0]
    scores = [[c["score"] for c in t.candidates] for t in trace]
    assert [len(x) for x in scores] == [1, 3, 2]
    assert sum(scores, []) == pytest.approx([0.45, 0.4, 0.6, 0.4, 1.0, 0.5])  # 0.45 = (0.9 + 0.4 + 0.3 + 0.2) / 4
    assert [[(c["kind"], c["extra_position"], c["extra_token"]) for c in t.candidates] for t in trace] == [
        [("anchor", -1, -1)],
        [("lookahead", 3, 23), ("lookahead", 4, 24), ("anchor", -1, -1)],
        [("lookahead", 5, 25), ("anchor", -1, -1)],
    ]
    assert sum([[c["extra_conf"] for c in t.candidates] for t in trace], []) == pytest.approx([0, 0.4, 0.3, 0, 0.5, 0])
    assert [(t.iteration, t.filled, t.tokens, t.committed) for t in trace] == [
        (1, [2], [22], 2),
        (2, [3], [23], 2),
        (3, [], [], 2),
    ]
    st = seq.final.stats
    assert seq.final.state.tokens.tolist() == [1, 2, 22, 23, 24, 25]
    assert (st.forwards, st.tokens, st.iterations, st.decoded_positions) == (3, 4, 4, 4)


def test_trace_seconds_count_from_the_first_plan() -> None:
    before = time.perf_counter()
    seq = new_sequence(PROMPT, lopa_cfg(trace=True), MASK, END)
    drive(seq, Scripted(LOPA_BASE))
    elapsed = time.perf_counter() - before
    seconds = [t.seconds for t in seq.final.trace]
    assert all(0 < s <= elapsed for s in seconds) and seconds == sorted(seconds)


def test_no_trace_unless_asked() -> None:
    seq = new_sequence(PROMPT, lopa_cfg(), MASK, END)
    _, steps = drive(seq, Scripted(LOPA_BASE))
    assert seq.final.trace is None and all(s.trace is None for s in steps)


def test_force_anchor_always_takes_the_anchor() -> None:
    # as above, but the anchor wins forward 2: its fill: fallback p3 (0.7); then L1 fills p4 (0.3, its only
    # lookahead rival is p5 0.2 -> L2); forward 3 candidates L1 [5], L2 [4], anchor [4, 5]; the anchor wins again
    runner = Scripted(LOPA_BASE)
    seq = new_sequence(PROMPT, lopa_cfg(force_anchor=True), MASK, END)
    plans, _ = drive(seq, runner)
    assert [i for i, _ in runner.commits] == [len(p.cands) - 1 for p in plans]
    assert [[c.predict.tolist() for c in p.cands] for p in plans][:3] == [
        [[2, 3, 4, 5]],
        [[4, 5], [3, 5], [3, 4, 5]],
        [[5], [4], [4, 5]],
    ]


def test_shared_score_masks_reach_the_candidates() -> None:
    seq = new_sequence(PROMPT, lopa_cfg(branch_score="shared"), MASK, END)
    runner = Scripted(LOPA_BASE)
    plan = seq.plan()
    seq.advance(plan, runner.load(plan), runner)
    plan = seq.plan()  # predicted [4, 5], [3, 5], [3, 4, 5]: only p5 is masked in all three
    assert [c.score_mask.tolist() for c in plan.cands] == [[False, True], [False, True], [False, False, True]]


def test_sequence_parts_follow_the_config() -> None:
    c = lopa_cfg(confidence="margin", temperature=0.5, top_p=0.9, top_k=3, seed=7)
    seq = new_sequence(PROMPT, c, MASK, END)
    s = seq.sampler
    assert (s.mask_id, s.confidence, s.temperature, s.top_p, s.top_k, s.seed) == (MASK, "margin", 0.5, 0.9, 3, 7)
    assert sampler_for(c, MASK, "neg_entropy").confidence == "neg_entropy"
    assert make_decoder(c) == ThresholdDecoder(4, 1, 0.8, 0)
    assert make_decoder(c.replace(extra_fill=2)) == ThresholdDecoder(4, 1, 0.8, 2)
    d = DecodeConfig(block_size=8, max_new_tokens=32, threshold=0.7, tau_add=0.2, tau_act=0.6, extra_fill=1)
    assert make_decoder(d) == D2FDecoder(8, 4, 0.7, 0.2, 0.6, 1)
    assert seq.anchor is seq.branches[-1].state and seq.stats.prompt_tokens == 2


# ---- vanilla -------------------------------------------------------------------------------------------------
def vanilla_cfg(**kw) -> DecodeConfig:
    return DecodeConfig(decoder="vanilla", max_new_tokens=3, **kw).validate()


def test_vanilla_fills_one_most_confident_position_per_forward() -> None:
    # answer positions 2, 3, 4; confidences p2 0.5 (+0.3 after the prompt = 0.8), p3 0.9, p4 0.7 (+0.3 once p3 is)
    runner = Scripted({2: 0.5, 3: 0.9, 4: 0.7})
    seq = new_sequence(PROMPT, vanilla_cfg(trace=True), MASK, END)
    assert isinstance(seq, VanillaSequence) and not seq.uses_cache and seq.rows == 1 and seq.max_len == 5
    assert seq.sampler.confidence == "maxprob" and seq.anchor is seq.state
    assert seq.sampler.mask_id == MASK
    before = time.perf_counter()
    plans, steps = drive(seq, runner)
    elapsed = time.perf_counter() - before
    # 1: p3 0.9 > p2 0.8 > p4 0.7; 2: p4 1.0; 3: p2
    assert [(p.window_start, p.commit_len, p.iteration) for p in plans] == [(0, 0, 0), (0, 0, 1), (0, 0, 2)]
    assert [p.cands[0].predict.tolist() for p in plans] == [[2, 3, 4], [2, 4], [2]]
    assert runner.windows[1] == [[1, 2, MASK, 23, MASK]]  # the whole sequence, no cache
    trace = seq.final.trace
    assert [(t.iteration, t.filled, t.tokens, t.winner, t.committed) for t in trace] == [
        (1, [3], [23], 0, 0),
        (2, [4], [24], 0, 0),
        (3, [2], [22], 0, 0),
    ]
    assert [[(c["kind"], c["extra_position"], c["extra_token"]) for c in t.candidates] for t in trace] == [
        [("anchor", -1, -1)]
    ] * 3
    assert all(0 < t.seconds <= elapsed for t in trace)
    assert [(s.state, s.stats, s.trace) for s in steps[:2]] == [(seq.state, seq.stats, trace)] * 2
    assert seq.stats.prompt_tokens == 2
    assert sum([[c["score"] for c in t.candidates] for t in seq.final.trace], []) == pytest.approx([0.9, 1.0, 0.8])
    st = seq.final.stats
    assert (st.forwards, st.tokens, st.iterations, st.decoded_positions) == (3, 3, 4, 3)
    assert st.timing == {"forward": 0.25}
    assert [s.done for s in steps] == [False, False, False]


def test_vanilla_order_picks_the_confidence() -> None:
    seq = new_sequence(PROMPT, vanilla_cfg(order="topk_margin", confidence="neg_entropy"), MASK, END)
    assert seq.sampler.confidence == "margin"


def test_vanilla_stops_at_an_end_token_once_the_prefix_is_decoded() -> None:
    # p2 0.8, p3 (end token) 0.7 + 0.3 after p2, p4 0.1: forward 1 fills p2, forward 2 the end token -> done
    runner = Scripted({2: 0.5, 3: 0.7, 4: 0.1}, tokens={3: END_ID})
    seq = new_sequence(PROMPT, vanilla_cfg(trace=True), MASK, END)
    plans, steps = drive(seq, runner)
    assert len(plans) == 2 and steps[-1] is seq.final and seq.final.done and not seq.final.stopped
    assert [t.filled for t in seq.final.trace] == [[2], [3]]
    st = seq.final.stats
    assert (st.forwards, st.tokens, st.iterations, st.decoded_positions) == (2, 2, 3, 2)


def test_vanilla_end_token_after_a_gap_does_not_stop() -> None:
    # the end token at p4 is filled first, but p2 and p3 are still masked: decoding goes on
    runner = Scripted({2: 0.1, 3: 0.2, 4: 0.9}, tokens={4: END_ID})
    seq = new_sequence(PROMPT, vanilla_cfg(), MASK, END)
    plans, _ = drive(seq, runner)
    assert len(plans) == 3 and seq.final.stats.tokens == 3  # 22, 23 and the end token


def test_vanilla_stop_check_and_cap() -> None:
    runner = Scripted({2: 0.5, 3: 0.9, 4: 0.7})
    seq = new_sequence(PROMPT, vanilla_cfg(trace=True), MASK, END, lambda ids: len(ids) >= 1)
    plans, steps = drive(seq, runner)
    # forward 1 fills p3: the final prefix is still empty; forward 2 fills p4; forward 3 p2: [22, 23, 24]
    assert len(plans) == 3 and steps[-1].stopped and steps[-1] is seq.final
    assert [t.filled for t in seq.final.trace] == [[3], [4], [2]]
    capped = new_sequence(PROMPT, vanilla_cfg(max_iterations=1), MASK, END)
    plans, _ = drive(capped, Scripted({2: 0.5, 3: 0.9, 4: 0.7}))
    assert len(plans) == 1 and capped.final.stats.tokens == 0 and capped.final.stats.decoded_positions == 1


def test_final_and_answer_ids() -> None:
    s = GenState.from_prompt(PROMPT, MASK)
    s.add_block(4)
    s.tokens[2:6] = torch.tensor([5, END_ID, MASK, 7])
    assert final_ids(s) == [5, END_ID] and answer_ids(s, END) == ([5], True)
    s.tokens[4] = 6
    assert final_ids(s) == [5, END_ID, 6, 7]
    assert answer_ids(s, frozenset()) == ([5, END_ID, 6, 7], False)


def test_vanilla_records_no_trace_unless_asked() -> None:
    seq = new_sequence(PROMPT, vanilla_cfg(), MASK, END)
    _, steps = drive(seq, Scripted({2: 0.5, 3: 0.9, 4: 0.7}))
    assert seq.final.trace is None and all(s.trace is None for s in steps)


def test_trace_step_records_a_lookahead_at_position_zero() -> None:
    s = GenState.from_prompt([], MASK)
    s.add_block(2)
    s.tokens[0] = 7
    b = Branch(s, "lookahead", extra_position=0, extra_conf=0.25, stream=1)
    step = trace_step(4, [b], [0.5], 0, (torch.tensor([1]), torch.tensor([6])), 3, time.perf_counter())
    assert step.candidates == [
        {"kind": "lookahead", "extra_position": 0, "extra_token": 7, "extra_conf": 0.25, "score": 0.5}
    ]
    assert (step.iteration, step.winner, step.filled, step.tokens, step.committed) == (4, 0, [1], [6], 3)
