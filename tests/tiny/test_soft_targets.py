"""``lopa train --soft-targets``: the task's exact posterior per position (``Phrasings.marginals``) against
enumerating every wording, the loss against it against the expectation of the one-hot draw, and the targets as they
reach the training rows (random rows and visited states)."""

from __future__ import annotations

import argparse
import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lopa.commands.train import add_arguments
from lopa.errors import ConfigError
from lopa.model.transformer import Transformer
from lopa.tiny import task
from lopa.tiny.data import Layout, encode_rows, masked_loss, training_batch
from lopa.tiny.posterior import FREE, Phrasings, soft_targets
from lopa.tiny.train import check_args, model_config
from lopa.tiny.train_loop import text_codec
from lopa.tiny.trajectory import Visited, visit, visited_batch
from lopa.tiny.vocab import build_tokenizer, special_ids
from tests.support.wordings import agrees, all_answers

ROOM = 64


@pytest.fixture(scope="module")
def codec():  # noqa: ANN201 - (encode, end id, vocab size)
    tok = build_tokenizer()
    return text_codec(tok)[0], special_ids(tok)["eos_token_id"], tok.get_vocab_size()


def _enumerated(answers: list[list[int]], fixed: list[int]) -> list[Counter] | None:
    """Per position, how many of the agreeing phrasings hold each token there (None when none agrees)."""
    agreeing = [a for a in answers if agrees(a, fixed)]
    if not agreeing:
        return None
    return [Counter(a[j] for a in agreeing) for j in range(ROOM)]


@pytest.mark.parametrize("num_ops", [2, 3])
def test_marginals_equal_the_share_of_agreeing_phrasings(codec, num_ops: int) -> None:  # noqa: ANN001
    encode, end, _ = codec
    rng = random.Random(10 + num_ops)
    p = task.sample(rng, "train", num_ops=num_ops)
    answers = all_answers(p, encode, end, ROOM)
    phr = Phrasings(p, encode, end, ROOM)
    states = [[FREE] * ROOM, [end] + [FREE] * (ROOM - 1)]  # all free; an end token first (no phrasing agrees)
    for i in range(24 if num_ops == 2 else 6):
        a = rng.choice(answers)
        fixed = [t if rng.random() < rng.choice((0.1, 0.3, 0.5)) else FREE for t in a]
        if i % 4 == 3:  # a token of another phrasing swapped in: often no phrasing agrees
            j = rng.randrange(ROOM)
            fixed[j] = rng.choice(answers)[j]
        states.append(fixed)
    none = some = 0
    for fixed in states:
        expected, got = _enumerated(answers, fixed), phr.marginals(fixed)
        if expected is None:
            none += 1
            assert got is None
            continue
        some += 1
        total = sum(expected[0].values())
        for j in range(ROOM):
            assert set(got[j]) == set(expected[j])
            for t, c in expected[j].items():
                assert got[j][t] == pytest.approx(c / total, rel=1e-12)
    assert none and some


def test_marginals_are_the_mean_of_the_draws(codec) -> None:  # noqa: ANN001
    """The draw's empirical frequencies converge on the marginals (the soft target is the draw's expectation)."""
    encode, end, _ = codec
    rng = random.Random(5)
    p = task.sample(rng, "train", num_ops=2)
    phr = Phrasings(p, encode, end, ROOM)
    fixed = [FREE] * ROOM
    fixed[30] = end  # an early end tail: shorter wordings only
    marg = phr.marginals(fixed)
    n = 4000
    seen = [Counter() for _ in range(ROOM)]
    for _ in range(n):
        for j, t in enumerate(phr.sample(fixed, rng)):
            seen[j][t] += 1
    worst = max(abs(seen[j][t] / n - q) for j in range(ROOM) for t, q in marg[j].items())
    assert worst < 0.04  # 4000 draws: a standard error of at most 0.008
    assert all(set(seen[j]) <= set(marg[j]) for j in range(ROOM))


def test_soft_targets_fill_only_the_free_positions(codec) -> None:  # noqa: ANN001
    encode, end, vocab = codec
    rng = random.Random(2)
    problems = [task.sample(rng, "train") for _ in range(3)]
    phrs = [Phrasings(p, encode, end, ROOM) for p in problems]
    ref = [phr.sample([FREE] * ROOM, rng) for phr in phrs]
    fixed = [[t if j % 3 == 0 else FREE for j, t in enumerate(a)] for a in ref]
    fixed[2] = list(fixed[1])  # another problem's tokens: no phrasing of problem 2 agrees
    soft = soft_targets(phrs, fixed, vocab)  # (3, ROOM, vocab)
    assert soft.shape == (3, ROOM, vocab)
    free = torch.tensor([[f == FREE for f in row] for row in fixed])  # (3, ROOM)
    sums = soft.sum(-1)
    assert torch.allclose(sums[:2][free[:2]], torch.ones(int(free[:2].sum())), atol=1e-5)
    assert not sums[:2][~free[:2]].any() and not soft[2].any()
    for i in range(2):  # the phrasing the state came from is one the target allows
        assert all(soft[i, j, ref[i][j]] > 0 for j in range(ROOM) if free[i, j])


def test_soft_loss_is_the_expected_loss_of_the_draw() -> None:
    layout = Layout(4, 4, 2, 0, 1)
    torch.manual_seed(0)
    rows, vocab = 3, 7
    logits = torch.randn(rows, layout.answer_len, vocab)
    targets = torch.randint(2, vocab, (rows, layout.length))
    loss_mask = torch.zeros(rows, layout.length, dtype=torch.bool)
    loss_mask[:, layout.max_prompt :] = torch.rand(rows, layout.answer_len) < 0.6
    soft = torch.rand(rows, layout.answer_len, vocab)
    soft = soft / soft.sum(-1, keepdim=True)
    soft[1] = 0.0  # a row without soft targets keeps its hard ones
    got = masked_loss(logits, targets, loss_mask, layout, soft=soft)
    sel = loss_mask[:, layout.max_prompt :]
    terms = []
    for r in range(rows):
        for j in range(layout.answer_len):
            if not sel[r, j]:
                continue
            logp = logits[r, j].log_softmax(-1)
            if r == 1:
                terms.append(-logp[targets[r, layout.max_prompt + j]])
            else:  # the expectation over a draw t ~ soft of -log p(t)
                terms.append(sum(-soft[r, j, t] * logp[t] for t in range(vocab)))
    assert got.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    one_hot = torch.nn.functional.one_hot(targets[:, layout.max_prompt :], vocab).float()
    hard = masked_loss(logits, targets, loss_mask, layout)
    assert masked_loss(logits, targets, loss_mask, layout, soft=one_hot).item() == pytest.approx(hard.item(), rel=1e-6)


def test_random_rows_carry_the_posterior_given_their_unmasked_positions(codec) -> None:  # noqa: ANN001
    encode, end, vocab = codec
    ids = special_ids(build_tokenizer())
    layout = Layout(32, 32, 2, end, ids["mask_token_id"])
    sampler = lambda r: task.sample(r, "train")  # noqa: E731
    plain = training_batch(random.Random(0), torch.Generator().manual_seed(0), sampler, encode, layout, 8)
    batch = training_batch(random.Random(0), torch.Generator().manual_seed(0), sampler, encode, layout, 8, vocab)
    assert "soft" not in plain and all(torch.equal(plain[k], batch[k]) for k in plain)  # the same rows, plus targets
    p = layout.max_prompt
    masked = batch["loss_mask"][:, p:]  # (8, answer_len)
    sums = batch["soft"].sum(-1)
    assert torch.allclose(sums[masked], torch.ones(int(masked.sum())), atol=1e-5) and not sums[~masked].any()
    reference = batch["targets"][:, p:]
    assert (batch["soft"].gather(-1, reference[..., None])[..., 0][masked] > 0).all()
    assert (batch["soft"][masked].max(-1).values < 1.0 - 1e-6).any()  # some positions are a real choice


def test_visited_states_carry_the_posterior_given_their_filled_positions(tmp_path: Path, codec) -> None:  # noqa: ANN001
    encode, end, vocab = codec
    tok = build_tokenizer()
    ids = special_ids(tok)
    layout = Layout(32, 32, 2, end, ids["mask_token_id"])
    torch.manual_seed(0)
    args = SimpleNamespace(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
    model = Transformer(model_config(args, vocab, ids))
    problems = [p for p in task.fixed_set("validation", 8) if p.num_ops == 2][:3]
    phrasings = [Phrasings(p, encode, end, layout.answer_len) for p in problems]
    rows = encode_rows(problems, encode, layout)
    own = {"phrasings": phrasings, "rng": random.Random(0), "window_attention": True, "lookahead": 8}
    pool = visit(model, *rows, layout, "d2f", 0.9, soft_vocab=vocab, **own)
    assert pool.soft.shape == (len(pool), layout.answer_len, vocab) and pool.soft.dtype == torch.float16
    p = layout.max_prompt
    prompts = [rows[0][i, :p] for i in range(len(problems))]
    checked = 0
    for s in range(0, len(pool), 5):
        if pool.flat[s]:
            assert not pool.soft[s].any()
            continue
        i = next(i for i, q in enumerate(prompts) if torch.equal(pool.clean[s, :p], q))
        answers = all_answers(problems[i], encode, end, layout.answer_len)
        fixed = [FREE if m else t for m, t in zip(pool.masks[s].tolist(), pool.clean[s, p:].tolist(), strict=True)]
        expected = _enumerated(answers, fixed)
        total = sum(expected[0].values())
        for j in range(layout.answer_len):
            want = torch.zeros(vocab)
            if fixed[j] == FREE:
                for t, c in expected[j].items():
                    want[t] = c / total
            assert torch.allclose(pool.soft[s, j].float(), want, atol=1e-3)
        checked += 1
    assert checked >= 5
    pool.save(tmp_path / "pool.safetensors")
    again = Visited.load(tmp_path / "pool.safetensors")
    assert torch.equal(again.soft, pool.soft)
    batch = visited_batch(again, layout, torch.Generator().manual_seed(0), 16)
    assert batch["soft"].shape == (16, layout.answer_len, vocab)
    masked = batch["loss_mask"][:, p:]
    live = ~batch["flat"][:, None] & masked
    assert torch.allclose(batch["soft"].sum(-1)[live], torch.ones(int(live.sum())), atol=2e-2)


def test_soft_targets_need_the_models_own_tokens() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", "x", "--soft-targets", "--on-policy-tokens", "reference"])
    with pytest.raises(ConfigError, match="--soft-targets needs --on-policy-tokens model"):
        check_args(args)
    check_args(parser.parse_args(["--out", "x", "--soft-targets", "--on-policy-tokens", "model"]))
    with pytest.raises(ConfigError, match="--dead-weight must be > 0 and needs --soft-targets"):
        check_args(parser.parse_args(["--out", "x", "--dead-weight", "5"]))
    check_args(parser.parse_args(["--out", "x", "--soft-targets", "--on-policy-tokens", "model", "--dead-weight", "5"]))


def test_dead_weight_scales_the_positions_whose_best_guess_no_answer_allows() -> None:
    layout = Layout(2, 2, 2, 0, 1)
    vocab = 6
    logits = torch.full((1, layout.answer_len, vocab), -2.0)
    best = [3, 4, 5, 3]  # each position's most likely token
    for j, t in enumerate(best):
        logits[0, j, t] = 2.0
    logits[0, 0, layout.mask_id] = 5.0  # the mask token is never a guess
    soft = torch.zeros(1, layout.answer_len, vocab)
    soft[0, 0, 3], soft[0, 1, 2], soft[0, 2, 4], soft[0, 3, 3] = 1.0, 1.0, 1.0, 1.0  # positions 1 and 2: dead guesses
    targets = torch.zeros(1, layout.length, dtype=torch.long)
    loss_mask = torch.ones(1, layout.length, dtype=torch.bool)
    loss_mask[:, : layout.max_prompt] = False
    logp = logits[0].log_softmax(-1)
    ce = [-logp[j, int(soft[0, j].argmax())] for j in range(layout.answer_len)]
    want = (ce[0] + 7.0 * ce[1] + 7.0 * ce[2] + ce[3]) / 4
    got = masked_loss(logits, targets, loss_mask, layout, soft=soft, dead_weight=7.0)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    plain = masked_loss(logits, targets, loss_mask, layout, soft=soft)
    assert plain.item() == pytest.approx(sum(ce).item() / 4, rel=1e-6)
