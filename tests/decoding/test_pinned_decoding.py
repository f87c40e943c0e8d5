"""lopa/decoding pinned by hand: token choice and confidences, the block fill rules, D2F's activation and LoPA's
spawn order, score masks, scores and tie rule (docs/algorithm.md §3), each on inputs small enough to work out in
the comments, with graded confidences (no accidental ties) and p(chosen) != confidence where it matters."""

import math

import pytest
import torch

from lopa.decoding.base import add_extra, fill_block, in_block
from lopa.decoding.blocks import Block, BlockState, GenState
from lopa.decoding.confidence import Prediction, Sampler, confidence_of, filtered_probs, predict, rank
from lopa.decoding.d2f import D2FDecoder
from lopa.decoding.lookahead import Branch, branch_score, pick_winner, score_masks, spawn
from lopa.decoding.threshold import ThresholdDecoder
from lopa.decoding.vanilla import select_one

MASK = 9
END = frozenset({8})


def pred(positions, tokens, prob, conf=None) -> Prediction:
    conf = prob if conf is None else conf
    return Prediction(
        torch.tensor(positions), torch.tensor(tokens), torch.tensor(prob, dtype=torch.float32), torch.tensor(conf)
    )


def state_with_block(prompt_len: int = 2, size: int = 4, fully: bool = True) -> GenState:
    s = GenState.from_prompt(list(range(prompt_len)), MASK)
    s.add_block(size, fully_activated=fully)
    return s


# ---- confidence.py ------------------------------------------------------------------------------------------
def test_generator_seed_is_seed_iteration_and_stream() -> None:
    assert Sampler(MASK).generator(3, 4) is None  # greedy: no generator
    g = Sampler(MASK, temperature=1.0, seed=2).generator(3, 4)
    assert g is not None and g.initial_seed() == 2 * 1_000_003 + 3 * 7919 + 4
    big = Sampler(MASK, temperature=0.5, seed=2**62).generator(1, 0)
    assert big.initial_seed() == (2**62 * 1_000_003 + 7919) % 2**63


def test_sampler_defaults() -> None:
    s = Sampler(5)
    assert (s.mask_id, s.confidence, s.temperature, s.top_p, s.top_k, s.seed) == (5, "maxprob", 0.0, 1.0, 0, 0)


def softmax(xs: list[float]) -> list[float]:
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def test_filtered_probs_removes_the_mask_token() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 10.0]])  # the mask (id 3) has the best logit
    probs = filtered_probs(logits, Sampler(3))
    assert probs[0, 3] == 0.0
    assert probs[0, :3].tolist() == pytest.approx(softmax([0.0, 1.0, 2.0]))
    assert logits[0, 3] == 10.0  # the caller's logits are not modified


def test_filtered_probs_temperature_scales_logits() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    probs = filtered_probs(logits, Sampler(3, temperature=0.5))
    assert probs[0, :3].tolist() == pytest.approx(softmax([0.0, 2.0, 4.0]))  # logits / 0.5
    assert filtered_probs(logits, Sampler(3, temperature=2.0))[0, :3].tolist() == pytest.approx(
        softmax([0.0, 0.5, 1.0])
    )


def test_a_tiny_temperature_is_greedy_not_nan() -> None:
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0, -1.0]])  # 1 / 1e-40 overflows fp32: capped where fp32 ends
    probs = filtered_probs(logits, Sampler(4, temperature=1e-40))
    assert probs[0].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]


def test_top_k_keeps_the_k_best() -> None:
    logits = torch.tensor([[3.0, 0.0, 2.0, 1.0, -5.0]])  # mask id 4
    probs = filtered_probs(logits, Sampler(4, temperature=1.0, top_k=2))
    assert probs[0].tolist() == pytest.approx([softmax([3.0, 2.0])[0], 0.0, softmax([3.0, 2.0])[1], 0.0, 0.0])
    one = filtered_probs(logits, Sampler(4, temperature=1.0, top_k=1))
    assert one[0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_top_p_keeps_the_first_token_that_crosses_it() -> None:
    # unsorted on purpose; probabilities 0.2 (id 0), 0.5 (id 1), 0.3 (id 2); mask id 3
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3, 1e-30]]))
    s = Sampler(3, temperature=1.0, top_p=0.5)  # cumulative 0.5, 0.8, 1.0: 0.5 does not cross 0.5, 0.8 does
    assert filtered_probs(logits, s)[0].tolist() == pytest.approx([0.0, 0.5 / 0.8, 0.3 / 0.8, 0.0])
    s = Sampler(3, temperature=1.0, top_p=0.9)  # 1.0 crosses: all three
    assert filtered_probs(logits, s)[0].tolist() == pytest.approx([0.2, 0.5, 0.3, 0.0], abs=1e-6)
    s = Sampler(3, temperature=1.0, top_p=0.1)  # even the first crosses: it alone is kept
    assert filtered_probs(logits, s)[0].tolist() == [0.0, 1.0, 0.0, 0.0]


def test_confidence_kinds_by_hand() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.6, 0.0, 0.3]])
    chosen = torch.tensor([0, 3])  # the second row's chosen token is not its best
    assert confidence_of(probs, chosen, "maxprob").tolist() == pytest.approx([0.5, 0.3])
    assert confidence_of(probs, chosen, "margin").tolist() == pytest.approx([0.2, 0.3])  # top1 - top2
    ent = [0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2), 0.1 * math.log(0.1) + 0.6 * math.log(0.6)]
    ent[1] += 0.3 * math.log(0.3)
    assert confidence_of(probs, chosen, "neg_entropy").tolist() == pytest.approx(ent)  # zeros add 0, not nan
    two = torch.tensor([[0.7, 0.3]])  # a two-token vocabulary still has a margin
    assert confidence_of(two, torch.tensor([0]), "margin").tolist() == pytest.approx([0.4])
    with pytest.raises(ValueError, match=r"^unknown confidence kind 'top1'$"):
        confidence_of(probs, chosen, "top1")


def test_predict_greedy_prob_and_each_confidence() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 1e-30], [0.25, 0.25, 0.5, 1e-30]]))
    positions = torch.tensor([7, 9])
    p = predict(logits, positions, Sampler(3))
    assert p.positions.tolist() == [7, 9] and p.tokens.tolist() == [0, 2]
    assert p.prob.tolist() == pytest.approx([0.5, 0.5]) and p.conf.tolist() == pytest.approx([0.5, 0.5])
    m = predict(logits, positions, Sampler(3, confidence="margin"))
    assert m.prob.tolist() == pytest.approx([0.5, 0.5]) and m.conf.tolist() == pytest.approx([0.2, 0.25])
    e = predict(logits, positions, Sampler(3, confidence="neg_entropy"))
    h0 = 0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2)
    assert e.conf.tolist() == pytest.approx([h0, 0.5 * math.log(0.25) + 0.5 * math.log(0.5)])
    ties = predict(torch.tensor([[1.0, 1.0, 0.0, 5.0]]), torch.tensor([6]), Sampler(3))
    assert ties.positions.tolist() == [6] and ties.tokens.tolist() == [0]  # one row; a tie goes to the lower id
    assert ties.prob.tolist() == pytest.approx([math.e / (2 * math.e + 1)])


def test_predict_samples_with_the_generator_and_greedy_without() -> None:
    logits = torch.tensor([[0.0, 0.1, -9.0]]).repeat(400, 1)  # nearly 50/50 between ids 0 and 1; mask id 2
    positions = torch.arange(400)
    # (whole-tensor checks reduced to one bool each: a failure message stays short)
    greedy = predict(logits, positions, Sampler(2))
    all_one = bool((greedy.tokens == 1).all())
    assert all_one
    s = Sampler(2, temperature=1.0, seed=5)
    sampled = predict(logits, positions, s, s.generator(0, 0))
    zeros = int((sampled.tokens == 0).sum())
    assert 100 < zeros < 300  # both tokens drawn
    again = predict(logits, positions, s, s.generator(0, 0))
    same = torch.equal(sampled.tokens, again.tokens)
    assert same  # the same seed draws the same tokens
    # the draw is torch.multinomial's single draw with the Sampler's generator
    expected = torch.multinomial(filtered_probs(logits, s), 1, generator=s.generator(0, 0))[:, 0]
    same_draw = torch.equal(sampled.tokens, expected)
    assert same_draw
    # sampling from a single allowed token (top_k = 1) draws it every time
    one = Sampler(2, temperature=1.0, top_k=1, seed=3)
    only_best = bool((predict(logits, positions, one, one.generator(0, 0)).tokens == 1).all())
    assert only_best
    p = torch.softmax(torch.tensor([0.0, 0.1]), 0)
    prob_of_chosen = torch.allclose(sampled.prob, p[sampled.tokens])
    assert prob_of_chosen and sampled.positions.tolist()[:3] == [0, 1, 2]


def test_predict_of_no_positions() -> None:
    p = predict(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), Sampler(4))
    assert p.positions.numel() == p.tokens.numel() == p.prob.numel() == p.conf.numel() == 0


def test_rank_is_descending_and_stable() -> None:
    assert rank(torch.tensor([0.2, 0.5, 0.5, 0.1, 0.5])).tolist() == [1, 2, 4, 0, 3]
    # many ties (an unstable sort reorders them from about 100 elements on): higher first, then lower index
    conf = torch.tensor([float((i * 7) % 3) for i in range(300)])
    stable = rank(conf).tolist() == sorted(range(300), key=lambda i: (-float(conf[i]), i))
    assert stable


def test_prediction_subset() -> None:
    p = pred([4, 5, 6], [1, 2, 3], [0.1, 0.2, 0.3], [0.7, 0.8, 0.9]).subset(torch.tensor([True, False, True]))
    assert (p.positions.tolist(), p.tokens.tolist()) == ([4, 6], [1, 3])
    assert p.prob.tolist() == pytest.approx([0.1, 0.3]) and p.conf.tolist() == pytest.approx([0.7, 0.9])


# ---- base.py, vanilla.py ------------------------------------------------------------------------------------
def test_in_block_boundaries() -> None:
    p = pred(list(range(2, 10)), [0] * 8, [0.5] * 8)
    assert in_block(p, Block(4, 7)).tolist() == [False, False, True, True, True, False, False, False]


def test_fill_block_compares_prob_strictly_not_conf() -> None:
    # positions 2..5 in the block, 6 outside; prob and conf disagree on purpose
    p = pred([2, 3, 4, 5, 6], [1, 1, 1, 1, 1], [0.9, 0.95, 0.5, 0.91, 0.99], [0.1, 0.2, 0.99, 0.3, 0.9])
    keep = fill_block(p, Block(2, 6), 0.9, fallback=True)
    assert keep.tolist() == [False, True, False, True, False]  # 0.9 is not > 0.9; 6 is outside


def test_fill_block_fallback_takes_the_most_confident_inside() -> None:
    # nothing passes 0.95; by conf the best inside is position 4 (0.8), not 6 (0.99, outside)
    p = pred([2, 3, 4, 6], [1, 1, 1, 1], [0.5, 0.6, 0.4, 0.3], [0.2, 0.3, 0.8, 0.99])
    assert fill_block(p, Block(2, 6), 0.95, fallback=True).tolist() == [False, False, True, False]
    assert fill_block(p, Block(2, 6), 0.95, fallback=False).tolist() == [False] * 4
    tie = pred([2, 3, 4], [1, 1, 1], [0.1, 0.1, 0.1], [0.3, 0.5, 0.5])
    assert fill_block(tie, Block(2, 6), 0.95, fallback=True).tolist() == [False, True, False]  # lower position
    outside = pred([7, 8], [1, 1], [0.1, 0.2])
    assert fill_block(outside, Block(2, 6), 0.95, fallback=True).tolist() == [False, False]


def test_fill_block_fallback_not_needed_when_one_passes() -> None:
    p = pred([2, 3, 4], [1, 1, 1], [0.96, 0.5, 0.5], [0.1, 0.9, 0.8])
    assert fill_block(p, Block(2, 6), 0.95, fallback=True).tolist() == [True, False, False]


def test_add_extra_fills_the_n_most_confident_eligible() -> None:
    p = pred([1, 2, 3, 4, 5], [0] * 5, [0.0] * 5, [0.5, 0.9, 0.7, 0.8, 0.95])
    keep = torch.tensor([False, True, False, False, False])
    eligible = torch.tensor([True, True, True, True, False])
    assert add_extra(keep, p, eligible, 0) is keep
    assert add_extra(keep, p, eligible, -1) is keep
    assert add_extra(keep, p, eligible, 1).tolist() == [False, True, False, True, False]  # 0.8, not kept 0.9
    assert add_extra(keep, p, eligible, 2).tolist() == [False, True, True, True, False]
    assert add_extra(keep, p, eligible, 9).tolist() == [True, True, True, True, False]  # only 3 eligible left
    assert keep.tolist() == [False, True, False, False, False]  # not modified in place


def test_vanilla_fills_the_most_confident_lowest_on_ties() -> None:
    assert int(select_one(pred([3, 4, 5, 6], [0] * 4, [0.0] * 4, [0.2, 0.7, 0.7, 0.1]))) == 1


# ---- threshold.py, d2f.py -----------------------------------------------------------------------------------
def test_threshold_prepare_adds_one_fully_activated_block_at_a_time() -> None:
    dec = ThresholdDecoder(block_size=4, max_blocks=2, threshold=0.9)
    s = GenState.from_prompt([1, 2], MASK)
    dec.prepare(s)
    assert [(b.start, b.end, b.fully_activated) for b in s.blocks[1:]] == [(2, 6, True)]
    dec.prepare(s)  # the block is still active: nothing added
    assert len(s.blocks) == 2
    s.blocks[1].state = BlockState.READY
    dec.prepare(s)  # second block (max_blocks = 2)
    assert [(b.start, b.end) for b in s.blocks[1:]] == [(2, 6), (6, 10)]
    s.blocks[2].state = BlockState.READY
    dec.prepare(s)  # limit reached
    assert len(s.blocks) == 3
    ended = GenState.from_prompt([1, 2], MASK)
    ended.end_seen = True
    dec.prepare(ended)
    assert len(ended.blocks) == 1


def test_threshold_select_fills_only_the_first_active_block() -> None:
    dec = ThresholdDecoder(block_size=2, max_blocks=4, threshold=0.5, extra_fill=1)
    s = GenState.from_prompt([1], MASK)
    s.add_block(2, True)
    s.add_block(2, True)
    # block 1 = [1, 3), block 2 = [3, 5); position 3 passes the threshold but is in the second block
    p = pred([1, 2, 3, 4], [0] * 4, [0.6, 0.2, 0.9, 0.1], [0.6, 0.3, 0.95, 0.94])
    assert dec.select(s, p).tolist() == [True, True, False, False]  # 1 passes, 2 is the extra fill
    no_extra = ThresholdDecoder(block_size=2, max_blocks=4, threshold=0.5)
    assert no_extra.select(s, p).tolist() == [True, False, False, False]
    # nothing passes in block 1: the fallback fills its most confident position (2), not block 2's 3
    low = pred([1, 2, 3, 4], [0] * 4, [0.4, 0.2, 0.9, 0.1], [0.3, 0.6, 0.95, 0.94])
    assert no_extra.select(s, low).tolist() == [False, True, False, False]
    # the extra fill may take the block's first position: 2 passes, 1 is the most confident left in block 1
    first = pred([1, 2, 3, 4], [0] * 4, [0.1, 0.6, 0.9, 0.1], [0.5, 0.6, 0.95, 0.94])
    assert dec.select(s, first).tolist() == [True, True, False, False]
    for b in s.blocks[1:]:
        b.state = BlockState.CACHED
    none = no_extra.select(s, p)
    assert none.dtype == torch.bool and none.tolist() == [False] * 4  # no active block: nothing


def d2f_state() -> GenState:
    return GenState.from_prompt([1, 2], MASK)


def test_d2f_adds_blocks_by_tau_add_and_activates_by_tau_act() -> None:
    dec = D2FDecoder(block_size=4, max_blocks=3, threshold=0.9, tau_add=0.5, tau_act=0.75)
    s = d2f_state()
    dec.prepare(s)  # the prompt is decoded (ratio 1 >= 0.5): block 1 = [2, 6), its predecessor 1 >= 0.75
    assert [(b.start, b.end, b.fully_activated) for b in s.blocks[1:]] == [(2, 6, True)]
    s.tokens[2] = 0  # block 1 ratio 0.25 < 0.5
    dec.prepare(s)
    assert len(s.blocks) == 2
    s.tokens[3] = 0  # ratio 0.5 >= 0.5: block 2 = [6, 10), semi-active (0.5 < 0.75)
    dec.prepare(s)
    assert [(b.start, b.end, b.fully_activated) for b in s.blocks[1:]] == [(2, 6, True), (6, 10, False)]
    s.tokens[4] = 0  # block 1 ratio 0.75 >= 0.75: block 2 fully activated; block 2's ratio 0 adds nothing
    dec.prepare(s)
    assert [b.fully_activated for b in s.blocks[1:]] == [True, True]
    s.tokens[6:8] = 0  # block 2 ratio 0.5: block 3 = [10, 14), then max_blocks reached
    dec.prepare(s)
    s.tokens[10:14] = 0
    dec.prepare(s)
    assert [(b.start, b.end) for b in s.blocks[1:]] == [(2, 6), (6, 10), (10, 14)]


def test_d2f_adds_no_block_after_an_end_token() -> None:
    dec = D2FDecoder(block_size=4, max_blocks=3, threshold=0.9, tau_add=0.0, tau_act=1.0)
    s = d2f_state()
    s.end_seen = True
    dec.prepare(s)
    assert len(s.blocks) == 1


def test_d2f_activation_is_by_the_predecessors_ratio_not_the_blocks_own() -> None:
    dec = D2FDecoder(block_size=2, max_blocks=5, threshold=0.9, tau_add=1.0, tau_act=1.0)
    s = GenState.from_prompt([1], MASK)
    s.add_block(2)  # [1, 3): predecessor (prompt) ratio 1
    s.add_block(2)  # [3, 5): predecessor ratio 0
    s.tokens[3:5] = 0  # the block itself is decoded, its predecessor is not
    dec.prepare(s)  # the last block is decoded (1 >= tau_add): block 3 = [5, 7), fully active after block 2
    assert [b.fully_activated for b in s.blocks[1:]] == [True, False, True]


def test_d2f_select_fallback_only_in_fully_activated_blocks() -> None:
    dec = D2FDecoder(block_size=2, max_blocks=5, threshold=0.8, tau_add=0.5, tau_act=0.9)
    s = GenState.from_prompt([1], MASK)
    s.add_block(2, fully_activated=True)  # [1, 3)
    s.add_block(2, fully_activated=False)  # [3, 5)
    p = pred([1, 2, 3, 4], [0] * 4, [0.1, 0.2, 0.3, 0.85], [0.9, 0.1, 0.95, 0.2])
    # block 1: nothing passes, fallback = its most confident, 1; block 2: 4 passes (0.85 > 0.8), no fallback
    assert dec.select(s, p).tolist() == [True, False, False, True]
    p2 = pred([1, 2, 3, 4], [0] * 4, [0.1, 0.2, 0.3, 0.4], [0.9, 0.1, 0.95, 0.2])
    assert dec.select(s, p2).tolist() == [True, False, False, False]  # semi-active block 2 fills nothing
    extra = D2FDecoder(block_size=2, max_blocks=5, threshold=0.8, tau_add=0.5, tau_act=0.9, extra_fill=1)
    assert extra.select(s, p2).tolist() == [True, False, True, False]  # + the most confident left, anywhere


# ---- lookahead.py ---------------------------------------------------------------------------------------
def test_spawn_fills_the_jth_most_confident_remaining_position() -> None:
    anchor = state_with_block(prompt_len=2, size=4)  # masked 2..5
    remaining = pred([2, 3, 4, 5], [5, 6, 7, 8], [0.1, 0.2, 0.3, 0.4], [0.2, 0.9, 0.5, 0.9])
    branches = spawn(anchor, remaining, 3, END)
    # conf ranking: 3 (0.9), 5 (0.9, tie: later index), 4 (0.5), 2
    assert [(b.kind, b.extra_position, b.stream) for b in branches] == [
        ("lookahead", 3, 1),
        ("lookahead", 5, 2),
        ("lookahead", 4, 3),
        ("anchor", -1, 0),
    ]
    assert [b.extra_conf for b in branches] == pytest.approx([0.9, 0.9, 0.5, 0.0])
    assert branches[0].state.tokens.tolist() == [0, 1, MASK, 6, MASK, MASK]
    assert branches[1].state.tokens.tolist() == [0, 1, MASK, MASK, MASK, 8]
    assert branches[3].state is anchor and anchor.tokens.tolist() == [0, 1, MASK, MASK, MASK, MASK]


def test_spawn_k_zero_and_k_beyond_the_remaining() -> None:
    anchor = state_with_block()
    remaining = pred([3, 4], [5, 8], [0.1, 0.2], [0.3, 0.6])
    assert [b.kind for b in spawn(anchor, remaining, 0, END)] == ["anchor"]
    branches = spawn(anchor, remaining, 5, END)
    assert [b.extra_position for b in branches] == [4, 3, -1]
    assert branches[0].state.end_seen and not branches[1].state.end_seen and not anchor.end_seen  # token 8 = END


def branch(positions: list[int]) -> Branch:
    return Branch(state_with_block(), "lookahead")


def test_score_masks_mean_and_shared() -> None:
    predicted = [torch.tensor([3, 4, 5]), torch.tensor([4, 5]), torch.tensor([3, 5])]
    bs = [branch([]) for _ in predicted]
    assert [m.tolist() for m in score_masks(bs, predicted, "mean")] == [[True] * 3, [True] * 2, [True] * 2]
    shared = score_masks(bs, predicted, "shared")  # masked in every candidate: only 5
    assert [m.tolist() for m in shared] == [[False, False, True], [False, True], [False, True]]
    one = score_masks(bs[:1], predicted[:1], "shared")
    assert [m.tolist() for m in one] == [[True, True, True]]
    two = score_masks(bs[:2], predicted[:2], "shared")  # two candidates: 4 and 5 are masked in both
    assert [m.tolist() for m in two] == [[False, True, True], [True, True]]
    # the first candidate counts too: 4 is masked in the second and third, not the first
    later = score_masks(bs, [torch.tensor([5]), torch.tensor([4, 5]), torch.tensor([4, 5])], "shared")
    assert [m.tolist() for m in later] == [[True], [False, True], [False, True]]
    assert all(m.dtype == torch.bool for m in [*shared, *score_masks(bs, predicted, "mean")])


def test_branch_score_is_the_mean_and_one_when_nothing_is_left() -> None:
    conf = torch.tensor([0.2, 0.4, 0.9])
    assert branch_score(conf, torch.tensor([True, True, False])) == pytest.approx(0.3)  # mean, not max 0.4
    assert branch_score(conf, torch.tensor([True, True, True])) == pytest.approx(0.5)
    assert branch_score(conf, torch.tensor([False, False, False])) == 1.0
    assert branch_score(torch.zeros(0), torch.zeros(0, dtype=torch.bool)) == 1.0


def test_pick_winner_highest_score_ties_to_the_first_lookahead_anchor_last() -> None:
    assert pick_winner([0.5, 0.7, 0.6], force_anchor=False) == 1
    assert pick_winner([0.5, 0.7, 0.7, 0.7], force_anchor=False) == 1  # creation order
    assert pick_winner([0.6, 0.6], force_anchor=False) == 0  # the anchor (last) loses the tie
    assert pick_winner([0.5, 0.7, 0.9], force_anchor=False) == 2  # the anchor wins when strictly best
    assert pick_winner([0.9, 0.7, 0.5], force_anchor=True) == 2
    assert pick_winner([0.3, 0.3 + 1e-12], force_anchor=False) == 1  # compared in float64
