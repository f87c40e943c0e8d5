"""``lopa train --family sdar``: SDAR's two-copy layout and mask, noise, loss, the exact block-causal evaluator,
resume, and the checkpoint it writes."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch
from safetensors.torch import load_file

from lopa.checkpoint.loader import load_checkpoint
from lopa.commands.main import main
from lopa.model.families import family_named
from lopa.model.transformer import Transformer
from lopa.tiny import task
from lopa.tiny.block_data import (
    BlockLayout,
    block_causal_mask,
    encode_rows,
    noise,
    training_batch,
    training_mask,
    weighted_loss,
)
from lopa.tiny.block_evaluate import greedy_decode
from lopa.tiny.vocab import build_tokenizer, special_ids

MICRO = ["--family", "sdar", "--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1"]
MICRO += ["--intermediate", "64", "--batch", "8", "--warmup", "5", "--lr", "3e-3", "--threads", "1"]
MICRO += ["--block-size", "16", "--num-blocks", "4", "--ema", "0.9", "--eval-every", "0", "--test-n", "0"]


def _layout(block_size: int = 16) -> tuple[BlockLayout, object]:
    tok = build_tokenizer()
    ids = special_ids(tok)
    return BlockLayout(32, 64, block_size, ids["eos_token_id"], ids["mask_token_id"]), tok


def test_training_mask_by_hand() -> None:
    # L = 8, blocks of 4: [noisy 0-3 | noisy 4-7 | clean 0-3]; the clean copy's last block (4-7) is left out
    expected = torch.tensor(
        [
            [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # noisy block 0: itself only
            [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1],  # noisy block 1: itself and clean block 0
            [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1],
            [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1],
            [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1],
            [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1],  # clean block 0: itself (block-causal), never the noisy copy
            [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1],
            [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1],
            [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(training_mask(8, 4), expected)
    causal = block_causal_mask(6, 2).int().tolist()
    assert causal == [[1, 1, 0, 0, 0, 0]] * 2 + [[1, 1, 1, 1, 0, 0]] * 2 + [[1] * 6] * 2


def test_rows_put_the_prompt_at_its_real_positions_and_noise_spares_it() -> None:
    layout, tok = _layout()
    assert layout.length == 96 and layout.num_blocks == 6  # 32 + 64, whole blocks of 16
    problems = task.fixed_set("validation", 8)
    enc = lambda t: tok.encode(t).ids  # noqa: E731
    clean, prompt = encode_rows(problems, enc, layout)
    for r, p in enumerate(problems):
        n = len(enc(p.prompt))
        answer = enc(" " + p.target) + [layout.end_id]
        assert prompt[r, :n].all() and not prompt[r, n:].any()
        assert clean[r, :n].tolist() == enc(p.prompt)  # no padding before the prompt: blocks align to position 0
        assert clean[r, n : n + len(answer)].tolist() == answer
        assert (clean[r, n + len(answer) :] == layout.end_id).all()
    noisy, masked, ratio = noise(clean, prompt, layout, torch.Generator().manual_seed(0))
    assert not masked[prompt].any() and masked.any(1).all()  # the prompt is never masked; every row has a mask
    assert torch.equal(noisy == layout.mask_id, masked) and torch.equal(noisy[~masked], clean[~masked])
    assert ((ratio >= 1e-3) & (ratio <= 1)).all()
    again = noise(clean, prompt, layout, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], noisy) and torch.equal(again[2], ratio)  # a pure function of the generator


def test_weighted_loss_on_a_scripted_case() -> None:
    # uniform logits: every masked position costs log(vocab); row 0 has p = 0.5 and 2 masks, row 1 p = 0.25 and 1
    vocab = 5
    logits = torch.zeros(2, 4, vocab)
    targets = torch.tensor([[0, 1, 2, 3], [4, 3, 2, 1]])
    loss_mask = torch.tensor([[False, True, True, False], [False, False, False, True]])
    prompt = torch.tensor([[True, False, False, False], [True, True, False, False]])  # 5 non-prompt positions
    ratio = torch.tensor([0.5, 0.25])
    expected = (2 * math.log(vocab) / 0.5 + math.log(vocab) / 0.25) / 5
    assert math.isclose(weighted_loss(logits, targets, loss_mask, ratio, prompt).item(), expected, rel_tol=1e-6)
    # a confident correct prediction costs ~0 wherever it is
    sure = torch.full((2, 4, vocab), -30.0).scatter(2, targets[..., None], 30.0)
    assert weighted_loss(sure, targets, loss_mask, ratio, prompt).item() < 1e-6


def _model(block_size: int) -> Transformer:
    torch.manual_seed(0)
    cfg = family_named("sdar").make_config(
        vocab_size=281,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        attention_bias=False,
        model_type="sdar",
        attention="block_causal",
        block_size=block_size,
        qk_norm=True,
        mask_token_id=1,
        eos_token_id=0,
        pad_token_id=0,
    )
    return Transformer(cfg).eval()


def test_two_copy_training_forward_equals_block_causal_decoding() -> None:
    """The noisy copy of block b, under the training mask, gets the logits a block-causal decoder computes for
    block b over the clean earlier blocks: the objective trains exactly the decoding step."""
    layout, tok = _layout(block_size=16)
    model = _model(16)
    batch = training_batch(
        random.Random(3),
        torch.Generator().manual_seed(3),
        lambda r: task.sample(r, "train"),
        lambda t: tok.encode(t).ids,
        layout,
        2,
    )
    length, bs = layout.length, layout.block_size
    with torch.no_grad():
        two = model(
            batch["ids"],
            batch["positions"],
            attn_mask=training_mask(length, bs)[None].expand(2, -1, -1),
            logits_idx=torch.arange(length)[None].expand(2, -1),
        )  # (2, L, vocab)
        noisy, clean = batch["ids"][:, :length], batch["targets"]
        for b in range(layout.num_blocks):
            end = (b + 1) * bs
            row = torch.cat([clean[:, : b * bs], noisy[:, b * bs : end]], 1)  # decoding state of block b
            one = model(
                row,
                torch.arange(end)[None].expand(2, -1),
                attn_mask=block_causal_mask(end, bs)[None].expand(2, -1, -1),
                logits_idx=torch.arange(b * bs, end)[None].expand(2, -1),
            )
            torch.testing.assert_close(two[:, b * bs : end], one, rtol=1e-5, atol=1e-5)


class _Scripted(torch.nn.Module):
    """Predicts token ``10 + position`` everywhere; probability high at positions in ``sure``, else ~0.5 with
    lower positions slightly surer. Records what each forward was given."""

    def __init__(self, sure: set[int], vocab: int = 281) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.sure, self.vocab, self.calls = sure, vocab, []

    def forward(self, ids, positions, attn_mask=None, logits_idx=None):  # noqa: ANN001
        self.calls.append((ids.clone(), attn_mask.clone(), logits_idx.clone()))
        pos = positions.gather(1, logits_idx)  # (n, k)
        logits = torch.zeros(*pos.shape, self.vocab)
        high = torch.tensor([[p in self.sure for p in row] for row in pos.tolist()])
        logits.scatter_(2, (10 + pos)[..., None], torch.where(high, 20.0, 5.0 - pos * 1e-3)[..., None])
        return logits


def test_evaluator_fills_by_threshold_block_by_block_on_cut_rows() -> None:
    tok = build_tokenizer()
    ids = special_ids(tok)
    layout = BlockLayout(8, 8, 4, ids["eos_token_id"], ids["mask_token_id"])  # L = 16: blocks 0-3 .. 12-15
    problem = task.fixed_set("validation", 1)[0]
    n = 6
    model = _Scripted(sure={7, 8, 9, 12, 13, 14, 15})
    outs, forwards = greedy_decode(model, [problem], lambda t: tok.encode(t).ids[:n], layout, 0.9)
    assert outs[0] == [10 + p for p in range(n, 16)]  # no end token: every block is decoded
    # block 1 (4-7): 6 and 7 masked; 7 is sure, then 6 -> 2 forwards. block 2 (8-11): 8, 9 sure, then 10, then 11
    # (min_fill 1, lower position first among equals) -> 3. block 3: all sure -> 1.
    assert forwards == [6]
    starts = [int(c[2][0, 0]) for c in model.calls]
    assert starts == [4, 4, 8, 8, 8, 12]
    for row, attn, idx in model.calls:  # each forward is cut at the end of its block and block-causal
        end = int(idx[0, -1]) + 1
        assert row.shape[1] == end and torch.equal(attn[0], block_causal_mask(end, 4))
        assert (row[0, : idx[0, 0]] != layout.mask_id).all()  # earlier blocks are final
    # min_fill 2: a step fills at least two. block 1: 7 and 6 at once; block 2: 8, 9, then 10, 11; block 3: 1
    model = _Scripted(sure={7, 8, 9, 12, 13, 14, 15})
    _, forwards = greedy_decode(model, [problem], lambda t: tok.encode(t).ids[:n], layout, 0.9, min_fill=2)
    assert forwards == [4]


def test_evaluator_stops_after_the_block_that_holds_the_end_token() -> None:
    tok = build_tokenizer()
    ids = special_ids(tok)
    layout = BlockLayout(8, 8, 4, ids["eos_token_id"], ids["mask_token_id"])
    problem = task.fixed_set("validation", 1)[0]

    class EndAt9(_Scripted):
        def forward(self, ids, positions, attn_mask=None, logits_idx=None):  # noqa: ANN001
            logits = super().forward(ids, positions, attn_mask, logits_idx)
            pos = positions.gather(1, logits_idx)
            logits[..., layout.end_id] = torch.where(pos == 9, 50.0, -50.0)
            return logits

    model = EndAt9(sure=set(range(16)))
    outs, forwards = greedy_decode(model, [problem], lambda t: tok.encode(t).ids[:6], layout, 0.9)
    assert outs[0] == [16, 17, 18, layout.end_id]  # up to and including the end token at position 9
    assert forwards == [2] and all(int(c[2][0, 0]) < 12 for c in model.calls)  # block 3 never decoded


class _Chain(torch.nn.Module):
    """Predicts token ``10 + position``; sure (logit 20) where the position before is not masked, else unsure
    (logit ~5 among 281 tokens: p ~ 0.35, lower positions slightly surer): a left-to-right dependency."""

    def __init__(self, mask_id: int, vocab: int = 281) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.mask_id, self.vocab, self.rows = mask_id, vocab, 0

    def forward(self, ids, positions, attn_mask=None, logits_idx=None):  # noqa: ANN001
        self.rows += ids.shape[0]
        pos = positions.gather(1, logits_idx)  # (n, k)
        sure = ids.gather(1, logits_idx - 1) != self.mask_id
        logits = torch.zeros(*pos.shape, self.vocab)
        return logits.scatter_(2, (10 + pos)[..., None], torch.where(sure, 20.0, 5.0 - pos * 1e-3)[..., None])


def test_threshold_plus_one_and_lopa_on_a_chain_model_by_hand() -> None:
    tok = build_tokenizer()
    ids = special_ids(tok)
    layout = BlockLayout(8, 8, 4, ids["eos_token_id"], ids["mask_token_id"])  # blocks 4-7 (6, 7 open), 8-11, 12-15
    problem = task.fixed_set("validation", 1)[0]
    enc = lambda t: tok.encode(t).ids[:6]  # noqa: E731
    right = [10 + p for p in range(6, 16)]

    def run(**kw: int) -> tuple[list[int], int, int]:
        model = _Chain(layout.mask_id)
        outs, forwards = greedy_decode(model, [problem], enc, layout, 0.9, **kw)
        return outs[0], forwards[0], model.rows

    # threshold: one sure position per forward (each fill makes the next one sure): 10 forwards
    assert run() == (right, 10, 10)
    assert run(branches=0) == (right, 10, 10)
    # threshold+1: the sure one plus the next most confident (the lower position): 6+7, 8+9, 10+11, 12+13, 14+15
    assert run(extra_fill=1) == (right, 5, 5)
    # LoPA k = 2. block 1: fill 6; then anchor {7 open} scores 1 - 6e-7, branch +7 has nothing open (1.0) and
    # wins: 2 forwards. block 2: fill 8, branches +9 and +10; then anchor (9 sure, 10, 11 unsure) 0.57, +9 (10
    # sure, 11 unsure) 0.67, +10 (9 and 11 sure) 1.0 wins and fills both: 2 forwards. block 3 likewise: 2.
    # Verification rows: 1 + 2 (block 1), 1 + 3, 1 + 3 = 11 rows in 6 forwards.
    assert run(branches=2) == (right, 6, 11)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_sdar_train_learns_resumes_exactly_and_writes_an_sdar_checkpoint(tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["train", "--steps", "40", "--save-every", "10", *MICRO]
    assert main([*common, "--out", str(straight)]) == 0
    losses = [r["loss"] for r in _log(straight)]
    assert losses[-1] < losses[0] - 0.5, losses

    assert main([*common, "--out", str(resumed), "--until", "25"]) == 0
    assert json.loads((resumed / "train_state" / "state.json").read_text())["step"] == 25
    assert main([*common, "--out", str(resumed)]) == 0  # the same command continues from step 25
    for name in ("model.safetensors", "train_state/weights.safetensors", "train_state/ema.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")
    exported = load_file(str(straight / "model.safetensors"))
    last = load_file(str(straight / "train_state" / "weights.safetensors"))
    assert not torch.equal(exported["lm_head.weight"], last["lm_head.weight"])  # the export is the EMA

    ckpt = load_checkpoint(straight)
    cfg = ckpt.config
    assert cfg.model_type == "sdar" and cfg.attention == "block_causal" and cfg.block_size == 16
    assert cfg.qk_norm and not cfg.attention_bias
    assert ckpt.generation_config["block_size"] == 16 and ckpt.generation_config["max_new_tokens"] == 64
    layout, tok = _layout(16)
    outs, forwards = greedy_decode(ckpt.model, task.fixed_set("test", 3), lambda t: tok.encode(t).ids, layout, 0.9)
    assert all(1 <= len(o) <= layout.length and layout.mask_id not in o for o in outs)
    assert all(1 <= f <= layout.length for f in forwards)


def test_sdar_resume_refuses_the_other_family(tmp_path: Path) -> None:
    out = str(tmp_path / "run")
    assert main(["train", "--steps", "2", "--save-every", "1", "--out", out, *MICRO]) == 0
    dream = [a for a in MICRO if a not in ("--family", "sdar", "--ema", "0.9")]
    assert main(["train", "--steps", "4", "--out", out, *dream]) == 2  # ConfigError -> exit code 2


def test_bundled_names_resolve_to_the_shipped_directories() -> None:
    from lopa.checkpoint.bundled import bundled_checkpoint_dir, default_checkpoint_dir
    from lopa.checkpoint.hub import model_name_for, resolve_model

    assert resolve_model("lopa-tiny") == default_checkpoint_dir()
    block = resolve_model("lopa-tiny-block")
    assert block == bundled_checkpoint_dir("lopa-tiny-block") and block.name == "checkpoint-block"
    assert model_name_for("lopa-tiny-block", block) == "lopa-tiny-block"
    assert bundled_checkpoint_dir("lopa-tiny-blocks") is None


def test_shipped_block_checkpoint_loads_by_name_and_decodes() -> None:
    from lopa import LLM
    from lopa.checkpoint.bundled import bundled_checkpoint_dir

    path = bundled_checkpoint_dir("lopa-tiny-block")
    assert (path / "model.safetensors").is_file() and (path / "MODEL_CARD.md").is_file()
    assert sum(f.stat().st_size for f in path.iterdir()) <= 8 * 2**20  # a few MB
    llm = LLM("lopa-tiny-block")
    cfg, gen = llm.config, llm.checkpoint.generation_config
    assert llm.model_name == "lopa-tiny-block" and cfg.model_type == "sdar"
    assert (cfg.attention, cfg.block_size, cfg.qk_norm, cfg.attention_bias) == ("block_causal", 32, True, False)
    assert (gen["decoder"], gen["threshold"], gen["block_size"], gen["max_new_tokens"]) == ("threshold", 0.9, 32, 64)
    layout = BlockLayout(32, 64, 32, cfg.eos_token_id, cfg.mask_token_id)
    outs, forwards = greedy_decode(llm.model, task.fixed_set("test", 8), llm.tokenizer.encode, layout, 0.9)
    assert all(o and layout.mask_id not in o for o in outs)
    assert all(0 < f <= layout.length for f in forwards)
