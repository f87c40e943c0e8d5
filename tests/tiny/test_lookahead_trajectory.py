"""LoPA's own training trajectories (``lopa.tiny.lookahead_trajectory``): every recorded candidate replayed against a
plain re-statement of LoPA over threshold (docs/algorithm.md §3.4) with one full-row forward per candidate, the
task's answers enumerated with ``task.render`` (not the posterior module) to judge which candidates have an answer;
and ``lopa train --lopa-trajectories``'s checks and a short run."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lopa.tiny
from lopa.checkpoint.loader import load_checkpoint
from lopa.commands.main import main
from lopa.model.transformer import Transformer
from lopa.tiny import task
from lopa.tiny.data import Layout, block_causal_mask, encode_rows
from lopa.tiny.lookahead_trajectory import visit_lookahead
from lopa.tiny.posterior import Phrasings
from lopa.tiny.train import model_config
from lopa.tiny.vocab import build_tokenizer, special_ids
from tests.support.wordings import all_answers

BUNDLED = Path(lopa.tiny.__file__).parent / "checkpoint"
K = 3


def _codec() -> tuple[Layout, object]:
    tok = build_tokenizer()
    ids = special_ids(tok)
    layout = Layout(32, 32, 2, ids["eos_token_id"], ids["mask_token_id"])
    return layout, lambda t: tok.encode(t, add_special_tokens=False).ids


def _model(weights: str) -> Transformer:
    if weights == "bundled":
        return load_checkpoint(BUNDLED).model.train()  # in training mode, as the trainer calls it
    tok = build_tokenizer()
    torch.manual_seed(0)
    args = SimpleNamespace(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
    model = Transformer(model_config(args, tok.get_vocab_size(), special_ids(tok)))
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # confidences spread over (0, 1), so that τ 0.9 sometimes passes
    return model


def _answers(p: task.Problem, encode, layout: Layout) -> torch.Tensor:  # noqa: ANN001
    """(phrasings, answer_len) every phrasing of ``p`` as answer ids, enumerated (``tests.support.wordings``)."""
    return torch.tensor(all_answers(p, encode, layout.end_id, layout.answer_len))


def _agrees(answers: torch.Tensor, answer: torch.Tensor, mask_id: int) -> torch.Tensor:
    """(phrasings,) bool: the phrasings equal to ``answer`` (answer_len,) at its unmasked positions."""
    return ((answers == answer) | (answer == mask_id)).all(1)


def _forward(model: Transformer, prompt: torch.Tensor, answer: torch.Tensor, positions, valid, layout: Layout):  # noqa: ANN001
    """(conf, token) per answer position from one full-row forward of a single candidate (Dream's shift)."""
    attn = block_causal_mask(valid[None], layout)
    with torch.no_grad():
        logits = model(torch.cat([prompt, answer])[None], positions[None], attn_mask=attn).float()[0]
    logits = logits[layout.max_prompt - 1 : -1]
    logits[:, layout.mask_id] = float("-inf")
    return logits.softmax(-1).max(-1)


def _first_block(answer: torch.Tensor, layout: Layout) -> list[int]:
    """Positions of the first block that still holds a mask ([] when none does)."""
    bs = layout.block_size
    for b in range(layout.num_blocks):
        block = list(range(b * bs, (b + 1) * bs))
        if any(int(answer[j]) == layout.mask_id for j in block):
            return block
    return []


def _finished(answer: torch.Tensor, layout: Layout) -> bool:
    bs, done = layout.block_size, []
    for b in range(layout.num_blocks):
        block = answer[b * bs : (b + 1) * bs].tolist()
        if layout.mask_id not in block:
            done.append(layout.end_id in block)
        else:
            return any(done)
    return True


@pytest.mark.parametrize("weights", ["bundled", "random"])
def test_every_verified_candidate_is_recorded_and_the_winner_follows_lopas_rule(weights: str) -> None:
    layout, encode = _codec()
    model = _model(weights)
    problems = [p for p in task.fixed_set("validation", 16) if p.num_ops == 2][:3]  # 2,160 phrasings each
    phrasings = [Phrasings(p, encode, layout.end_id, layout.answer_len) for p in problems]
    clean, positions, valid = encode_rows(problems, encode, layout)
    pool = visit_lookahead(model, clean, positions, valid, layout, K, phrasings, random.Random(0))
    assert model.training  # restored
    p, tau = layout.max_prompt, 0.9
    seen = {"branch wins": 0, "dead winners": 0, "flat": 0, "repaired": 0, "multi": 0}
    for r, prob in enumerate(problems):
        answers = _answers(prob, encode, layout)
        states = [s for s in range(len(pool)) if torch.equal(pool.clean[s, :p], clean[r, :p])]
        assert not pool.flat[states[0]] and all(pool.masks[states[0]])  # starts all-mask, with a drawn answer

        def candidate(s: int) -> torch.Tensor:
            return torch.where(pool.masks[s], layout.mask_id, pool.clean[s, p:])  # the state's own tokens

        win, target, i = candidate(states[0]), pool.clean[states[0], p:], 1
        while True:
            conf, best = _forward(model, clean[r, :p], win, positions[r], valid[r], layout)
            open_ = [j for j in _first_block(win, layout) if int(win[j]) == layout.mask_id]
            fill = [j for j in open_ if conf[j] > tau] or [max(open_, key=lambda j: (float(conf[j]), -j))]
            seen["multi"] += len(fill) > 1
            anchor = win.clone()
            anchor[fill] = best[fill]
            if not _agrees(answers, anchor, layout.mask_id).any():  # no answer: the fills take the target's tokens
                anchor[fill] = target[fill]
                seen["repaired"] += 1
            if _finished(anchor, layout):
                assert i == len(states)  # a finished anchor is not verified
                break
            rest = sorted((j for j in open_ if j not in fill), key=lambda j: (-float(conf[j]), j))
            cands = []
            for j in rest[:K]:
                branch = anchor.clone()
                branch[j] = best[j]
                cands.append(branch)
            cands.append(anchor)
            recorded = states[i : i + len(cands)]
            assert len(recorded) == len(cands)
            scores = []
            for c, s in zip(cands, recorded, strict=True):
                assert torch.equal(candidate(s), c)
                fits = _agrees(answers, c, layout.mask_id)
                assert bool(pool.flat[s]) == (not fits.any())
                if fits.any():
                    assert (answers == pool.clean[s, p:]).all(1).any()  # its target: an answer agreeing with it
                seen["flat"] += bool(pool.flat[s])
                c_conf, _ = _forward(model, clean[r, :p], c, positions[r], valid[r], layout)
                left = [j for j in _first_block(c, layout) if int(c[j]) == layout.mask_id]
                done = _finished(c, layout) or not left
                scores.append(1.0 if done else sum(float(c_conf[j]) for j in left) / len(left))
            w = max(range(len(cands)), key=lambda x: (round(scores[x], 5), -x))  # ties to the earlier candidate
            if pool.flat[recorded[w]]:
                seen["dead winners"] += 1
                w = len(cands) - 1  # the line goes on from the anchor
            seen["branch wins"] += w < len(cands) - 1
            win, target, i = cands[w], pool.clean[recorded[w], p:], i + len(cands)
            if _finished(win, layout):
                assert i == len(states)
                break
    if weights == "bundled":
        assert seen["branch wins"] > 0 and seen["multi"] > 0
    else:
        assert seen["flat"] > 0 and seen["dead winners"] > 0 and seen["repaired"] > 0


def test_k_and_phrasings_are_checked() -> None:
    layout, encode = _codec()
    problems = task.fixed_set("validation", 2)
    phrasings = [Phrasings(p, encode, layout.end_id, layout.answer_len) for p in problems]
    rows = encode_rows(problems, encode, layout)
    with pytest.raises(ValueError, match="k must be >= 1"):
        visit_lookahead(_model("random"), *rows, layout, 0, phrasings, random.Random(0))
    with pytest.raises(ValueError, match="one entry per row"):
        visit_lookahead(_model("random"), *rows, layout, 2, phrasings[:1], random.Random(0))


MICRO = ["--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--intermediate", "64", "--batch", "6"]
MICRO += ["--threads", "1", "--eval-every", "0", "--test-n", "0", "--on-policy-from", "0", "--warmup", "1"]


def test_train_refuses_lopa_trajectories_without_branches_and_for_the_block_model(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    out = str(tmp_path / "run")
    own = ["--on-policy-tokens", "model", "--lopa-trajectories"]
    assert main(["train", "--steps", "1", "--out", out, *own, *MICRO]) == 2
    assert "--lopa-trajectories needs --lookahead K" in capsys.readouterr().err
    sdar = ["train", "--family", "sdar", "--steps", "1", "--out", out, "--lopa-trajectories", *MICRO[:-4]]
    assert main(sdar) == 2
    assert "--lopa-trajectories" in capsys.readouterr().err
    assert not Path(out).exists()  # nothing written


def test_train_with_lopa_trajectories_runs_and_resumes_to_the_same_weights(tmp_path: Path) -> None:
    """A third of the visited problems follow LoPA: a two-step run, and the same run stopped after one step and
    resumed (the pool saved with the state) end with the same weights."""
    opts = ["--on-policy-tokens", "model", "--lookahead", "2", "--lopa-trajectories", "--save-every", "1", *MICRO]
    assert main(["train", "--steps", "2", "--out", str(tmp_path / "a"), *opts]) == 0
    assert main(["train", "--steps", "2", "--until", "1", "--out", str(tmp_path / "b"), *opts]) == 0
    assert main(["train", "--steps", "2", "--out", str(tmp_path / "b"), *opts]) == 0
    a = load_checkpoint(tmp_path / "a").model.state_dict()
    b = load_checkpoint(tmp_path / "b").model.state_dict()
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    state = (tmp_path / "a" / "train_state" / "state.json").read_text(encoding="utf-8")
    assert '"lopa_trajectories": true' in state
