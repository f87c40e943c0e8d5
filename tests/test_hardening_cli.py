"""Regression tests for what a newcomer hit on the command line: devices, empty benches, unwritable outputs."""

from __future__ import annotations

from lopa.cli import main


def test_bench_with_zero_problems_is_a_usage_error(tiny_ckpt, capsys) -> None:
    assert main(["bench", "--model", str(tiny_ckpt), "--n", "0"]) == 2
    assert "--n must be >= 1" in capsys.readouterr().err


def test_eval_out_that_cannot_be_written_fails_before_the_run(tiny_ckpt, tmp_path, capsys, monkeypatch) -> None:
    import lopa.eval.cli as eval_cli

    def no_model(_args):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(eval_cli, "load_llm", no_model)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    argv = ["eval", "--model", str(tiny_ckpt), "--task", "tiny", "--limit", "1", "--out", str(blocker / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "cannot be written" in err
