"""``lopa train`` on a micro configuration: the D2F layout and noise, loss decrease, resume, loadable output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lopa.checkpoint.loader import load_checkpoint
from lopa.commands.main import main
from lopa.tiny import task
from lopa.tiny.data import Layout, block_causal_mask, block_ratios, encode_rows, noise, open_fresh_blocks
from lopa.tiny.evaluate import greedy_decode
from lopa.tiny.train_loop import Ema
from lopa.tiny.vocab import build_tokenizer, special_ids

ROOT = Path(__file__).resolve().parents[2]
MICRO = ["--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--intermediate", "64"]
MICRO += ["--batch", "8", "--warmup", "5", "--lr", "3e-3", "--threads", "1", "--eval-every", "0", "--test-n", "0"]


def _layout() -> tuple[Layout, object]:
    tok = build_tokenizer()
    ids = special_ids(tok)
    return Layout(32, 16, 4, ids["eos_token_id"], ids["mask_token_id"]), tok


def test_block_causal_layout_and_monotone_block_noise() -> None:
    layout, tok = _layout()
    problems = task.fixed_set("validation", 6)
    clean, positions, valid = encode_rows(problems, lambda t: tok.encode(t).ids, layout)
    mask = block_causal_mask(valid, layout)  # (rows, L, L)
    p, b = layout.max_prompt, layout.block_size
    for r in range(len(problems)):
        first = int((~valid[r]).sum())  # first real prompt token
        assert positions[r, first] == 0 and positions[r, -1] == layout.length - 1 - first
        assert not mask[r, first:, :first].any()  # real tokens never see left padding
        assert mask[r, :first, :first].diagonal().all()  # every query sees some key (no NaN softmax rows)
        assert mask[r, first:p, first:p].all() and not mask[r, first:p, p:].any()  # prompt sees only itself
        assert mask[r, p : p + b, first : p + b].all() and not mask[r, p : p + b, p + b :].any()  # block 1
        assert mask[r, p + b : p + 2 * b, first : p + 2 * b].all()  # block 2 sees the prompt, block 1 and itself
        assert not mask[r, p + b : p + 2 * b, p + 2 * b :].any() and mask[r, p + 3 * b :, first:].all()
        answer = clean[r, p:].tolist()
        assert tok.decode(answer[: answer.index(layout.end_id)]) == problems[r].target
        assert set(answer[answer.index(layout.end_id) :]) == {layout.end_id}  # end, then pad (same id)
    ratios, fresh = block_ratios(4000, 3, torch.Generator().manual_seed(0))  # (rows, blocks), (rows,)
    assert (ratios[:, 1:] >= ratios[:, :-1]).all()
    assert (ratios[:, 0] == 0).any() and (ratios[:, -1] == 1).any()  # the threshold-like rows are there
    rows = torch.arange(4000)
    has_fresh = fresh >= 0
    assert 0 < has_fresh.sum() < 4000 and (ratios[rows[has_fresh], fresh[has_fresh]] == 1).all()
    noisy, loss_mask, _ = noise(clean, layout, torch.Generator().manual_seed(1))
    assert not loss_mask[:, :p].any() and noisy[:, :p].equal(clean[:, :p])
    assert (noisy[loss_mask] == layout.mask_id).all() and noisy[~loss_mask].equal(clean[~loss_mask])


def test_fresh_block_is_visible_only_to_the_block_before_it() -> None:
    layout, tok = _layout()
    clean, _, valid = encode_rows(task.fixed_set("validation", 3), lambda t: tok.encode(t).ids, layout)
    base = block_causal_mask(valid, layout)
    opened = open_fresh_blocks(base, valid, torch.tensor([-1, 0, 1]), layout)  # (rows, L, L)
    p, b = layout.max_prompt, layout.block_size
    assert opened[0].equal(base[0])
    first = int((~valid[1]).sum())
    assert opened[1, first:p, p : p + b].all()  # the prompt sees fresh block 1 (the engine's first forward)
    assert opened[2, p : p + b, p + b : p + 2 * b].all()  # block 1 sees fresh block 2
    extra = opened & ~base
    assert extra[1, :, :p].sum() == 0 and extra[1, :, p + b :].sum() == 0  # nothing else is opened
    assert not opened[1, first:, :first].any()  # padding stays invisible


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_train_decreases_loss_resumes_exactly_and_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["train", "--steps", "60", "--save-every", "10", "--on-policy-from", "10", *MICRO]
    assert main([*common, "--out", str(straight)]) == 0
    losses = [r["loss"] for r in _log(straight)]
    assert losses[-1] < losses[0] - 0.3, losses

    assert main([*common, "--out", str(resumed), "--until", "25"]) == 0  # between two collections of states
    state = json.loads((resumed / "train_state" / "state.json").read_text())
    assert state["step"] == 25
    assert main([*common, "--out", str(resumed)]) == 0  # the same command continues from step 25
    names = ("model.safetensors", "train_state/weights.safetensors", "train_state/ema.safetensors")
    for name in (*names, "train_state/visited.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")
    exported, ema = load_file(str(straight / names[0])), load_file(str(straight / names[2]))
    last = load_file(str(straight / names[1]))
    assert all(torch.equal(exported[k], ema[k]) for k in exported)  # the export is the EMA ...
    assert not torch.equal(exported["lm_head.weight"], last["lm_head.weight"])  # ... not the last step
    pool = load_file(str(straight / "train_state/visited.safetensors"))
    assert pool["row"].numel() > 32 and pool["masks"].any()  # the pool collected at step 50 (8 problems: --batch)

    ckpt = load_checkpoint(straight)
    layout, tok = _layout()
    assert ckpt.config.mask_token_id == layout.mask_id and ckpt.config.eos_token_id == layout.end_id
    assert ckpt.generation_config["block_size"] == 32  # the default of lopa train
    assert sum(p.numel() for p in ckpt.model.parameters()) > 0
    outs, forwards = greedy_decode(ckpt.model, task.fixed_set("test", 3), lambda t: tok.encode(t).ids, layout, 0.9)
    assert all(1 <= len(o) <= layout.answer_len and layout.mask_id not in o for o in outs)
    assert all(1 <= f <= layout.answer_len for f in forwards)


def test_worker_processes_build_the_same_batches(tmp_path: Path) -> None:
    """--workers builds the random rows in other processes: the run must be bit-identical to the in-process one."""
    common = ["train", "--steps", "30", "--save-every", "10", "--on-policy-from", "10", *MICRO]
    assert main([*common, "--out", str(tmp_path / "here")]) == 0
    assert main([*common, "--out", str(tmp_path / "workers"), "--workers", "2"]) == 0
    for name in ("train_state/weights.safetensors", "train_state/ema.safetensors", "train_state/visited.safetensors"):
        a, b = load_file(str(tmp_path / "here" / name)), load_file(str(tmp_path / "workers" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert main([*common, "--out", str(tmp_path / "bad"), "--workers", "-1"]) == 2
    assert main([*common, "--out", str(tmp_path / "bad"), "--family", "sdar", "--workers", "1"]) == 2
    assert not (tmp_path / "bad").exists()


def test_resume_refuses_a_different_architecture(tmp_path: Path) -> None:
    out = str(tmp_path / "run")
    assert main(["train", "--steps", "2", "--save-every", "1", "--out", out, *MICRO]) == 0
    changed = [*MICRO]
    changed[changed.index("--hidden") + 1] = "64"
    assert main(["train", "--steps", "4", "--out", out, *changed]) == 2  # ConfigError -> exit code 2


@pytest.mark.parametrize(
    "changed",
    [["--steps", "4"], ["--lr", "1e-3"], ["--on-policy-tokens", "model"], ["--visit-window"], ["--init-from", "OTHER"]],
)
def test_resume_refuses_a_different_schedule_or_state_kind(tmp_path: Path, changed: list[str]) -> None:
    """A resumed run continues exactly only with the same schedule and states: any other setting is refused, and a
    rerun of the same command (``--init-from`` spelt another way included) still resumes."""
    src = tmp_path / "src"
    assert main(["train", "--steps", "2", "--save-every", "2", "--test-n", "0", "--out", str(src), *MICRO]) == 0
    out = tmp_path / "run"
    first = ["train", "--steps", "3", "--save-every", "1", "--test-n", "0", "--init-from", str(src), *MICRO]
    assert main([*first, "--out", str(out), "--until", "1"]) == 0
    other = tmp_path / "other"
    shutil.copytree(src, other)
    args = [*first, *[str(other) if a == "OTHER" else a for a in changed]]
    assert main([*args, "--out", str(out)]) == 2  # ConfigError -> exit code 2, nothing changed
    assert json.loads((out / "train_state" / "state.json").read_text())["step"] == 1
    respelt = [str(tmp_path / "." / "src") if a == str(src) else a for a in first]
    assert main([*respelt, "--out", str(out)]) == 0
    assert json.loads((out / "train_state" / "state.json").read_text())["step"] == 3


def test_average_from_exports_the_mean_of_the_saves_and_resumes_exactly(tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["train", "--steps", "40", "--save-every", "10", "--average-from", "20", "--ema", "0", *MICRO]
    assert main([*common, "--out", str(straight)]) == 0
    saved = []
    for until in ("20", "25", "30"):  # stops at 20 and 30 are saves of the average; 25 is only a pause
        assert main([*common, "--out", str(resumed), "--until", until]) == 0
        if until != "25":
            saved.append(load_file(str(resumed / "train_state" / "weights.safetensors")))
    assert main([*common, "--out", str(resumed)]) == 0
    saved.append(load_file(str(resumed / "train_state" / "weights.safetensors")))  # step 40: the last step
    exported = load_file(str(straight / "model.safetensors"))
    again = load_file(str(resumed / "model.safetensors"))
    for k in exported:
        mean = sum(w[k].double() for w in saved) / 3
        torch.testing.assert_close(exported[k], mean.float(), rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(again[k], exported[k], rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.equal(exported["lm_head.weight"], saved[-1]["lm_head.weight"])  # not just the last step
    state = json.loads((straight / "train_state" / "state.json").read_text())
    assert state["averaged_saves"] == 3


def test_average_from_past_the_end_is_refused(tmp_path: Path, capsys) -> None:
    assert main(["train", "--steps", "10", "--average-from", "11", "--out", str(tmp_path / "x"), *MICRO]) == 2
    assert "--average-from" in capsys.readouterr().err


def test_average_from_needs_ema_off_and_bad_fractions_are_refused(tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "x")
    assert main(["train", "--steps", "10", "--average-from", "5", "--out", out, *MICRO]) == 2
    assert "--ema 0" in capsys.readouterr().err
    assert main(["train", "--steps", "10", "--on-policy", "1.0", "--out", out, *MICRO]) == 2
    assert "--on-policy" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing written


def test_ema_follows_its_formula_and_resumes_from_its_file(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 1, bias=False)
    path = tmp_path / "ema.safetensors"
    ema = Ema(model, path, 0.5)
    seen = []
    for step, w in enumerate([1.0, 2.0, 4.0, 8.0]):
        with torch.no_grad():
            model.weight.fill_(w)
        ema.update(model, step, warmup=2)  # steps 0 and 1: a copy; then 0.5 * ema + 0.5 * w
        seen.append(float(ema.weights["weight"][0, 0]))
    assert seen == [1.0, 2.0, 3.0, 5.5]
    ema.save()
    again = Ema(torch.nn.Linear(2, 1, bias=False), path, 0.5)
    assert torch.equal(again.load_into(torch.nn.Linear(2, 1, bias=False)).weight, torch.full((1, 2), 5.5))


def test_training_curves_reads_the_validations_and_the_late_drop(tmp_path: Path, capsys) -> None:
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("training_curves", ROOT / "scripts" / "training_curves.py")
    curves = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(curves)
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": 20, "loss": 1.0}]
    for step, acc in ((300, 0.5), (600, 0.9), (700, 0.85), (800, 0.95), (900, 0.91)):
        records.append({"step": step, "loss": 0.5, "validation": {"accuracy": acc, "wellformed": acc - 0.1}})
    (run / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    points = curves.validations(run)
    assert [p[0] for p in points] == [300, 600, 700, 800, 900] and points[1][1:] == (90.0, 80.0)
    assert curves.largest_late_drop(points) == pytest.approx(5.0)  # from step 600: 90 -> 85 (5), 95 -> 91 (4)
    sys.argv = ["training_curves.py", str(run)]
    assert curves.main() == 0
    assert "| run | 300 | 600 | 700 | 800 | 900 |" in capsys.readouterr().out
