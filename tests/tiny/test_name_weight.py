"""``lopa train --name-weight``: the loss factor on the position that copies the person's name into the closing.

Checked against things the trainer does not compute itself: the weighted loss against a per-position cross-entropy
written out by hand, the weighted positions against where the rendered answer text says the name is.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lopa.commands.main import main
from lopa.tiny import task
from lopa.tiny.data import Layout, encode_rows, masked_loss
from lopa.tiny.train import name_weights
from lopa.tiny.train_loop import text_codec
from lopa.tiny.vocab import build_tokenizer, special_ids

MICRO = ["--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--intermediate", "64", "--batch", "4"]
MICRO += ["--threads", "1", "--eval-every", "0", "--test-n", "0", "--warmup", "1"]


def test_weighted_loss_is_the_weighted_sum_over_the_masked_positions_by_hand() -> None:
    layout = Layout(max_prompt=2, block_size=2, num_blocks=2, end_id=0, mask_id=1)
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, layout.answer_len, 7, generator=gen)  # (rows, answer_len, vocab)
    targets = torch.randint(2, 7, (3, layout.length), generator=gen)
    loss_mask = torch.zeros(3, layout.length, dtype=torch.bool)
    loss_mask[:, 2:] = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    weight = torch.ones(3, layout.length)
    weight[0, 4], weight[2, 3], weight[1, 2] = 20.0, 5.0, 7.0  # (1, 2) is not masked: its factor must not count
    flat = torch.tensor([False, False, True])
    terms, flat_terms = [], []
    for r in range(3):
        for j in range(layout.answer_len):
            if not loss_mask[r, 2 + j]:
                continue
            z = [float(v) for v in logits[r, j]]
            if flat[r]:  # mean over every token but the mask of -log p (p without the mask); no factor
                others = [v for v in range(7) if v != layout.mask_id]
                norm = math.log(sum(math.exp(z[v]) for v in others))
                flat_terms.append(sum(norm - z[v] for v in others) / len(others))
            ce = math.log(sum(math.exp(v) for v in z)) - z[int(targets[r, 2 + j])]
            terms.append((float(weight[r, 2 + j]), ce, bool(flat[r])))
    n = len(terms)
    by_hand = sum(w * ce for w, ce, _ in terms) / n
    got = masked_loss(logits, targets, loss_mask, layout, weight=weight)
    assert float(got) == pytest.approx(by_hand, rel=1e-5)
    assert float(got) != pytest.approx(float(masked_loss(logits, targets, loss_mask, layout)), rel=1e-3)
    with_flat = (sum(w * ce for w, ce, f in terms if not f) + sum(flat_terms)) / n
    assert float(masked_loss(logits, targets, loss_mask, layout, flat, weight)) == pytest.approx(with_flat, rel=1e-5)
    ones = torch.ones(3, layout.length)
    assert float(masked_loss(logits, targets, loss_mask, layout, weight=ones)) == pytest.approx(
        float(masked_loss(logits, targets, loss_mask, layout)), rel=1e-6
    )


def test_name_weights_mark_the_closings_name_and_nothing_else() -> None:
    tok = build_tokenizer()
    encode, _ = text_codec(tok)
    ids = special_ids(tok)
    layout = Layout(32, 32, 2, ids["eos_token_id"], ids["mask_token_id"])
    problems = task.fixed_set("test", 60)
    ids_rows, _, _ = encode_rows(problems, encode, layout)  # (rows, L): prompt + reference answer
    names = torch.tensor([tok.token_to_id(n) for n in task.NAMES])
    w = name_weights(ids_rows, names, 20.0)
    assert name_weights(ids_rows, names, 1.0) is None
    with_name = 0
    for r, p in enumerate(problems):
        words = (" " + p.target).split()  # the answer as the tokenizer splits it: one token per word
        words = " ".join(words).replace(".", " .").replace(":", " :").replace(",", " ,").split()
        want = {layout.max_prompt + i for i, word in enumerate(words) if word == p.name}
        prompt = encode(p.prompt)
        pad = layout.max_prompt - len(prompt)
        want |= {pad + i for i, t in enumerate(prompt) if tok.id_to_token(t) in task.NAMES}  # the question's names
        got = {int(i) for i in (w[r] == 20.0).nonzero().flatten()}
        assert got == want, p.target
        assert bool((w[r][w[r] != 20.0] == 1.0).all())
        with_name += task.CLOSINGS[p.wording[-1]].startswith("{name}")
        assert len(want) - 2 == int(task.CLOSINGS[p.wording[-1]].startswith("{name}"))  # twice in every question
    assert with_name > 0


def test_name_weight_is_checked_and_kept_on_resume(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "run"
    assert main(["train", "--steps", "1", "--out", str(out), "--name-weight", "0", *MICRO]) == 2
    assert "--name-weight must be > 0" in capsys.readouterr().err
    assert not out.exists()
    block = ["train", "--family", "sdar", "--steps", "1", "--out", str(out), "--name-weight", "5", *MICRO]
    assert main(block) == 2
    assert "--name-weight is for the Dream model" in capsys.readouterr().err
    first = ["train", "--steps", "3", "--save-every", "1", "--out", str(out), "--name-weight", "20", *MICRO]
    assert main([*first, "--until", "1"]) == 0
    assert main([*first[: -len(MICRO) - 2], "--name-weight", "10", *MICRO]) == 2  # another weight: refused
    assert json.loads((out / "train_state" / "state.json").read_text())["step"] == 1
    assert main(first) == 0
    assert json.loads((out / "train_state" / "state.json").read_text())["step"] == 3


def test_the_trainer_weights_the_name_in_its_loss(tmp_path: Path) -> None:
    """The same 20 steps (same seed, batches and initialisation) log a larger loss with the name weighted: the factor
    reaches the loss the optimizer steps on."""
    losses = {}
    for w in ("1", "20"):
        out = tmp_path / f"w{w}"
        batch32 = [*MICRO, "--batch", "32"]  # the later --batch wins
        assert main(["train", "--steps", "20", "--out", str(out), "--name-weight", w, *batch32]) == 0
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        losses[w] = log[-1]["loss"]
    assert math.isfinite(losses["1"]) and losses["20"] > losses["1"] * 1.01, losses
