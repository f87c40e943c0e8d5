"""``lopa eval`` end to end on a tiny random checkpoint: files, counts, metric identities, repeatability.

The random model writes garbage, so these tests assert on consistency, never on the score. Also what the console
shows (prompts that were too long) and an ``--out`` that cannot be written, refused before the model loads.
"""

import json
from pathlib import Path

import pytest

from lopa import LLM, DecodeConfig
from lopa.commands.main import main
from lopa.eval.runner import TIMING_FIELDS, read_samples

pytest.importorskip("lopa.llm")


@pytest.fixture(scope="module")
def checkpoint(tiny_ckpt: Path) -> Path:
    """The shared random checkpoint of conftest.py (read only)."""
    return tiny_ckpt


def lopa_eval(checkpoint: Path, out: Path, *extra: str) -> tuple[list[dict], dict]:
    argv = ["eval", "--model", str(checkpoint), "--limit", "2", "--max-new-tokens", "8", "--block-size", "8"]
    assert main([*argv, "--out", str(out), "--no-progress", *extra]) == 0
    return read_samples(out / "samples.jsonl"), json.loads((out / "summary.json").read_text())


def test_tiny_task_end_to_end_twice(checkpoint: Path, tmp_path: Path) -> None:
    flags = ("--task", "tiny", "--decoder", "lopa", "--branches", "2")
    first, summary = lopa_eval(checkpoint, tmp_path / "a", *flags)
    second, _ = lopa_eval(checkpoint, tmp_path / "b", *flags)
    assert len(first) == summary["n"] == 2
    assert summary["model"] == checkpoint.name and summary["device"] == "cpu" and summary["dtype"]
    assert summary["settings"]["decode"]["branches"] == 2
    tokens, seconds = sum(r["tokens"] for r in first), sum(r["latency"] for r in first)
    assert summary["tokens"] == tokens and summary["forwards"] == sum(r["forwards"] for r in first)
    assert summary["tok_s"] == pytest.approx(tokens / seconds)
    # each record holds what the engine gives for its prompt and the recorded settings, decoded again here
    llm, config = LLM(checkpoint), DecodeConfig.from_dict(summary["settings"]["decode"])
    for r in first:
        assert 1 <= r["tokens"] <= 8 and r["forwards"] >= 1
        want = llm.generate([r["prompt"]], config, raw=True)[0]
        assert (r["completion"], r["finish_reason"]) == (want.text, want.finish_reason)
        assert (r["tokens"], r["forwards"], r["iterations"]) == (
            want.stats.tokens,
            want.stats.forwards,
            want.stats.forwards + 1,
        )
    assert [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in first] == [
        {k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in second
    ]


def test_humaneval_end_to_end_runs_the_sandbox(checkpoint: Path, tmp_path: Path) -> None:
    samples, summary = lopa_eval(checkpoint, tmp_path / "he", "--task", "humaneval", "--decoder", "threshold")
    assert summary["n"] == 2 and summary["settings"]["chat"] is False
    assert [s["id"] for s in samples] == ["HumanEval/0", "HumanEval/1"]
    assert "def has_close_elements" in samples[0]["prompt"]
    assert all(s["status"] in ("pass", "fail", "timeout", "error") for s in samples)
    assert summary["correct"] == sum(s["correct"] for s in samples)


def test_eval_out_that_cannot_be_written_fails_before_the_run(tiny_ckpt, tmp_path, capsys, monkeypatch) -> None:
    import lopa.commands.eval as eval_cli

    def no_model(_args):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(eval_cli, "load_llm", no_model)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    argv = ["eval", "--model", str(tiny_ckpt), "--task", "tiny", "--limit", "1", "--out", str(blocker / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "cannot be written" in err


def test_eval_console_shows_prompts_that_were_too_long(tiny_ckpt, tmp_path, capsys) -> None:
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(tiny_ckpt), "--task", "tiny", "--limit", "2", "--no-progress"]
    assert main([*argv, "--block-size", "8", "--max-new-tokens", "2048", "--out", str(out)]) == 0
    console = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompt_too_long"] == 2
    assert "prompt_too_long 2/2" in console
