"""The engine-like options of ``lopa.tiny.trajectory``: D2F states under the engine's window attention, and LoPA
branch states with their flat targets, replayed against plain re-statements of the rules; the window attention and
the flat loss against direct formulas; and ``lopa train``'s checks of the options."""

from __future__ import annotations

import json
import math
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
from lopa.tiny.data import Layout, block_causal_mask, block_ids, encode_rows, masked_loss, open_window
from lopa.tiny.posterior import Phrasings
from lopa.tiny.train import init_weights, model_config
from lopa.tiny.trajectory import Visited, visit, visited_batch
from lopa.tiny.vocab import build_tokenizer, special_ids

BUNDLED = Path(lopa.tiny.__file__).parent / "checkpoint"


def _codec() -> tuple[Layout, object]:
    tok = build_tokenizer()
    ids = special_ids(tok)
    layout = Layout(32, 32, 2, ids["eos_token_id"], ids["mask_token_id"])
    return layout, lambda t: tok.encode(t, add_special_tokens=False).ids


def _random_model(scale: float = 20.0) -> Transformer:
    tok = build_tokenizer()
    torch.manual_seed(0)
    args = SimpleNamespace(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
    model = Transformer(model_config(args, tok.get_vocab_size(), special_ids(tok)))
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def _replay(model: Transformer, row: torch.Tensor, positions, valid, layout: Layout, window: list[int]):  # noqa: ANN001
    """(conf, token) per answer position from a full-row forward, the ``window`` blocks (0-based) seeing each other."""
    blocks = block_ids(layout).tolist()
    attn = block_causal_mask(valid[None], layout)[0].clone()
    for q in range(layout.length):
        for k in range(layout.length):
            if blocks[q] - 1 in window and blocks[k] - 1 in window and bool(valid[k]):
                attn[q, k] = True
    with torch.no_grad():
        logits = model(row[None], positions[None], attn_mask=attn[None]).float()[0, layout.max_prompt - 1 : -1]
    logits[:, layout.mask_id] = float("-inf")
    return logits.softmax(-1).max(-1)  # Dream's shift: output i - 1 predicts token i


def test_open_window_lets_the_window_blocks_see_each_other() -> None:
    layout = Layout(4, 3, 3, 0, 1)
    valid = torch.ones(2, layout.length, dtype=torch.bool)
    valid[1, :2] = False  # left padding
    window = torch.tensor([[True, True, False], [False, True, True]])
    base = block_causal_mask(valid, layout)
    got = open_window(base, window, layout)
    blocks = block_ids(layout).tolist()
    for r in range(2):
        for q in range(layout.length):
            for k in range(layout.length):
                both = blocks[q] > 0 and blocks[k] > 0 and bool(window[r, blocks[q] - 1] and window[r, blocks[k] - 1])
                assert bool(got[r, q, k]) == (bool(base[r, q, k]) or both), (r, q, k)
    assert got[0, 4, 7] and not got[0, 7, 10] and got[1, 7, 10] and not base[1, 7, 10]  # block 1 sees block 2


def test_flat_rows_are_trained_toward_the_uniform_distribution_over_the_candidates() -> None:
    layout = Layout(2, 2, 2, 0, 3)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, layout.answer_len, 7, generator=gen)  # (rows, answer_len, vocab)
    targets = torch.randint(4, 7, (3, layout.length), generator=gen)
    loss_mask = torch.zeros(3, layout.length, dtype=torch.bool)
    loss_mask[:, 2:] = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    flat = torch.tensor([False, True, False])
    expected = []
    for r in range(3):
        for j in range(layout.answer_len):
            if not loss_mask[r, 2 + j]:
                continue
            z = logits[r, j]
            if flat[r]:  # mean over the 6 candidates (every token but the mask) of -log p, p without the mask
                others = [v for v in range(7) if v != layout.mask_id]
                norm = math.log(sum(math.exp(float(z[v])) for v in others))
                expected.append(sum(norm - float(z[v]) for v in others) / len(others))
            else:
                expected.append(math.log(sum(math.exp(float(v)) for v in z)) - float(z[targets[r, 2 + j]]))
    got = masked_loss(logits, targets, loss_mask, layout, flat)
    assert float(got) == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    plain = masked_loss(logits, targets, loss_mask, layout)
    assert torch.equal(masked_loss(logits, targets, loss_mask, layout, torch.zeros(3, dtype=torch.bool)), plain)
    assert float(got) != pytest.approx(float(plain), rel=1e-3)


def test_windowed_d2f_states_train_with_their_window() -> None:
    """The D2F order under the engine's window attention (its states are replayed in ``test_trajectory``): a training
    row drawn from a state with blocks 1 and 2 in flight lets them see each other."""
    layout, encode = _codec()
    layout = Layout(32, 16, 4, layout.end_id, layout.mask_id)
    clean, positions, valid = encode_rows(task.fixed_set("validation", 6), encode, layout)
    pool = visit(_random_model(), clean, positions, valid, layout, "d2f", 0.82, window_attention=True)
    two = (pool.window[:, :2].all(1) & ~pool.window[:, 2:].any(1)).nonzero().flatten()  # blocks 1 and 2 in flight
    picked = (pool.row[two], pool.masks[two], pool.window[two], pool.flat[two], pool.soft[two])
    sub = Visited(pool.clean, pool.positions, pool.valid, *picked)
    batch = visited_batch(sub, layout, torch.Generator().manual_seed(0), 32)
    for i in range(32):  # every training row lets blocks 1 and 2 see each other, on top of the block-causal layout
        valid_row = batch["attn_mask"][i, -1]  # the last answer query sees every real key and no pad
        base = block_causal_mask(valid_row[None], layout)
        expected = open_window(base, torch.tensor([[True, True, False, False]]), layout)[0]
        assert (batch["attn_mask"][i] >= expected).all() and not torch.equal(expected, base[0])


@pytest.mark.parametrize("weights", ["bundled", "random"])
def test_branch_states_add_one_ranked_fill_and_are_flat_exactly_when_no_phrasing_agrees(weights: str) -> None:
    """Threshold order, the model's own tokens, lookahead K = 4: after each anchor state comes one branch: the next
    anchor's fixed positions plus one position of the window, ranked 1..K among the positions left by the replayed
    forward's confidence and holding that forward's token. Every state, anchor or branch, is flat exactly when no
    enumerated phrasing agrees with its fixed positions; any other state's target is a phrasing agreeing with it."""
    layout, encode = _codec()
    model = load_checkpoint(BUNDLED).model if weights == "bundled" else _random_model(5.0)
    problems = [p for p in task.fixed_set("validation", 12) if p.num_ops == 2][:3]
    phrasings = [Phrasings(p, encode, layout.end_id, layout.answer_len) for p in problems]
    rows = encode_rows(problems, encode, layout)
    k, p, bs = 4, layout.max_prompt, layout.block_size
    pool = visit(model, *rows, layout, "threshold", 0.9, phrasings=phrasings, rng=random.Random(0), lookahead=k)
    flats = branches = 0
    for n, prob in enumerate(problems):
        answers = []
        for w in task.all_wordings(prob.num_ops):
            ids = encode(" " + task.render(prob, w)) + [layout.end_id]
            answers.append(ids + [layout.end_id] * (layout.answer_len - len(ids)))
        answers = torch.tensor(answers)  # (phrasings, answer_len)
        states = [s for s in range(len(pool)) if torch.equal(pool.clean[s, :p], rows[0][n, :p])]
        for s in states:
            fixed, target = ~pool.masks[s], pool.clean[s, p:]
            agree = bool(((answers == target) | ~fixed).all(1).any())
            assert bool(pool.flat[s]) == (not agree)
            assert pool.flat[s] or (answers == target).all(1).any()
            flats += bool(pool.flat[s])
        i = 0
        while i + 2 < len(states):  # a branch state b sits between its anchor a and the next anchor nxt
            a, b, nxt = states[i], states[i + 1], states[i + 2]
            masked_a, masked_b, masked_n = pool.masks[a], pool.masks[b], pool.masks[nxt]
            if not (masked_b & ~masked_n).any() and int(masked_n.sum()) == int(masked_b.sum()) + 1:
                j = int((masked_n & ~masked_b).nonzero()[0])  # the branch's extra position
                row = pool.clean[a].clone()
                row[p:][masked_a] = layout.mask_id
                window = int(masked_a.nonzero()[0]) // bs
                conf, tok = _replay(model, row, pool.positions[a], pool.valid[a], layout, [])
                left = [x for x in range(window * bs, (window + 1) * bs) if masked_n[x]]
                assert j in sorted(left, key=lambda x: (-float(conf[x]), x))[:k], (n, i)
                assert int(pool.clean[b, p + j]) == int(tok[j])  # the model's token (a target agrees with it)
                branches += 1
                i += 2
            else:  # no branch after a: its forward left nothing masked in its window
                window = int(masked_a.nonzero()[0]) // bs
                assert not masked_b[window * bs : (window + 1) * bs].any(), (n, i)
                i += 1
    assert branches >= 3 * 5
    if weights == "random":
        assert flats > 0  # a random model's branches often fit no phrasing


MICRO = ["--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--intermediate", "64", "--batch", "4"]
MICRO += ["--threads", "1", "--eval-every", "0", "--test-n", "0", "--on-policy-from", "0", "--warmup", "1"]


def test_train_refuses_branch_states_without_the_models_tokens_and_a_missing_or_foreign_init(
    tmp_path: Path, capsys
) -> None:  # noqa: ANN001
    out = str(tmp_path / "run")
    assert main(["train", "--steps", "1", "--out", out, "--lookahead", "4", *MICRO]) == 2
    assert "--lookahead needs --on-policy-tokens model" in capsys.readouterr().err
    assert main(["train", "--steps", "1", "--out", out, "--init-from", str(tmp_path / "none"), *MICRO]) == 2
    assert "no checkpoint there" in capsys.readouterr().err
    assert main(["train", "--steps", "1", "--out", out, "--init-from", str(BUNDLED), *MICRO]) == 2
    assert "pass the checkpoint's architecture" in capsys.readouterr().err
    sdar = ["train", "--family", "sdar", "--steps", "1", "--out", out, "--visit-window", *MICRO[:-4]]
    assert main(sdar) == 2
    assert "for the Dream model" in capsys.readouterr().err
    assert not Path(out).exists()  # nothing written


def test_init_from_starts_from_the_checkpoints_weights_and_trains_with_branch_states(tmp_path: Path) -> None:
    bundled = load_checkpoint(BUNDLED).model
    c = bundled.config
    model = Transformer(c)
    init_weights(model, BUNDLED)
    assert all(torch.equal(v, bundled.state_dict()[k]) for k, v in model.state_dict().items())
    arch = ["--hidden", str(c.hidden_size), "--layers", str(c.num_hidden_layers), "--heads", str(c.num_attention_heads)]
    arch += ["--kv-heads", str(c.num_key_value_heads), "--intermediate", str(c.intermediate_size)]
    run = ["train", "--steps", "2", "--out", str(tmp_path / "ft"), "--init-from", str(BUNDLED), *arch, *MICRO[10:]]
    run += ["--on-policy-tokens", "model", "--visit-window", "--lookahead", "4", "--lr", "1e-9", "--ema", "0"]
    assert main(run) == 0
    tuned = load_checkpoint(tmp_path / "ft").model.state_dict()
    drift = max(float((v - bundled.state_dict()[k]).abs().max()) for k, v in tuned.items())
    assert 0 < drift < 1e-3  # two tiny steps away from the bundled weights, not from a random start


def test_ema_from_init_averages_from_the_start_weights(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from safetensors.torch import load_file

    bundled = load_checkpoint(BUNDLED).model
    c, start = bundled.config, bundled.state_dict()
    arch = ["--hidden", str(c.hidden_size), "--layers", str(c.num_hidden_layers), "--heads", str(c.num_attention_heads)]
    arch += ["--kv-heads", str(c.num_key_value_heads), "--intermediate", str(c.intermediate_size)]
    base = ["train", "--steps", "1", "--init-from", str(BUNDLED), *arch, *MICRO[10:], "--lr", "1e-3", "--warmup", "5"]
    for flag, out in (([], tmp_path / "copy"), (["--ema-from-init", "--ema", "0.5"], tmp_path / "avg")):
        assert main([*base, "--out", str(out), *flag]) == 0
    for name, start_share in (("copy", 0.0), ("avg", 0.5)):
        raw = load_file(str(tmp_path / name / "train_state" / "weights.safetensors"))  # after the one step
        exported = load_checkpoint(tmp_path / name).model.state_dict()
        assert max(float((raw[k] - start[k]).abs().max()) for k in raw) > 1e-4  # the step moved the weights
        for k, v in exported.items():  # in the warm-up: a copy by default; 0.5 * start + 0.5 * raw from the start
            torch.testing.assert_close(v, start_share * start[k] + (1 - start_share) * raw[k], rtol=0, atol=1e-6)
    for bad in (["--ema-from-init"], ["--ema-from-init", "--init-from", str(BUNDLED), *arch, "--ema", "0"]):
        assert main(["train", "--steps", "1", "--out", str(tmp_path / "bad"), *bad, *MICRO[10:]]) == 2
        assert "--ema-from-init needs --init-from DIR and an EMA" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # nothing written


def test_flat_share_draws_that_share_of_rows_from_the_flat_states() -> None:
    layout, encode = _codec()
    problems = task.fixed_set("validation", 4)
    phrasings = [Phrasings(p, encode, layout.end_id, layout.answer_len) for p in problems]
    rows = encode_rows(problems, encode, layout)
    pool = visit(_random_model(5.0), *rows, layout, "threshold", 0.9, phrasings, random.Random(0), lookahead=4)
    share = float(pool.flat.float().mean())
    assert 0 < share < 0.5
    plain = visited_batch(pool, layout, torch.Generator().manual_seed(0), 2000)
    assert torch.equal(plain["ids"], visited_batch(pool, layout, torch.Generator().manual_seed(0), 2000, 0.0)["ids"])
    tilted = visited_batch(pool, layout, torch.Generator().manual_seed(0), 2000, 0.6)
    expected = 0.6 + 0.4 * share  # drawn from the flat states, or drawn from all and flat anyway
    assert abs(float(tilted["flat"].float().mean()) - expected) < 4 * math.sqrt(expected * (1 - expected) / 2000)
    assert abs(float(plain["flat"].float().mean()) - share) < 4 * math.sqrt(share * (1 - share) / 2000)


def test_flat_share_needs_branch_states(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    out = str(tmp_path / "run")
    assert main(["train", "--steps", "1", "--out", out, "--flat-share", "0.3", *MICRO]) == 2
    assert "--flat-share must be in [0, 1) and needs --lookahead" in capsys.readouterr().err
    assert not Path(out).exists()


def test_branch_verification_script_counts_contested_steps(capsys) -> None:  # noqa: ANN001
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "scripts" / "branch_verification.py"
    spec = importlib.util.spec_from_file_location("branch_verification", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(BUNDLED), "--n", "3", "--k", "3"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["models"][str(BUNDLED)]
    assert r["states"] > 0 and r["states"] < r["candidates"] <= 4 * r["states"]
    assert 0 < r["contested"] <= r["states"] and 0 <= r["dead_winner"] <= 1
