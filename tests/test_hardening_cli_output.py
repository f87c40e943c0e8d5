"""What the commands print and write: results as they finish, a readable trace, threads, eval notes, file modes."""

from __future__ import annotations

import json

import torch

from lopa import LLM
from lopa.cli import build_parser, main

SMALL = ["--block-size", "8", "--max-new-tokens", "16"]


def test_generate_prints_each_prompt_as_it_finishes(tiny_ckpt, monkeypatch, capsys) -> None:
    """The prompts decode together; each result is printed, in input order, as soon as it and every result
    before it are ready (never held back until the whole batch is done)."""
    import lopa.generate_cli as generate_cli

    log: list[tuple[str, int]] = []
    real_each, real_emit = LLM.generate_each, generate_cli.emit

    def generate_each(self, prompts, *a, **kw):
        for index, completion in real_each(self, prompts, *a, **kw):
            log.append(("done", index))
            yield index, completion

    def emit(completion, *a, **kw):
        log.append(("print", len(completion.prompt_token_ids)))
        return real_emit(completion, *a, **kw)

    monkeypatch.setattr(LLM, "generate_each", generate_each)
    monkeypatch.setattr(generate_cli, "emit", emit)
    prompts = ["one", "two two", "three three three"]
    args = ["generate", "--model", str(tiny_ckpt), "--raw", "--max-num-seqs", "3", *SMALL, "--json", *prompts]
    assert main(args) == 0
    lengths = [len(LLM(tiny_ckpt).encode_prompt(p, raw=True)) for p in prompts]
    assert [n for kind, n in log if kind == "print"] == lengths  # input order
    replay, ready, shown = [], set(), 0
    for kind, index in log:  # after each finished prompt, everything printable is printed before the next finishes
        if kind == "done":
            replay.append((kind, index))
            ready.add(index)
            while shown in ready:
                replay.append(("print", lengths[shown]))
                shown += 1
    assert log == replay
    out = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(out) == 3 and max(o["stats"]["batch_size"] for o in out) > 1


def test_generate_checks_every_prompt_before_decoding(tiny_ckpt, capsys) -> None:
    assert main(["generate", "--model", str(tiny_ckpt), *SMALL, "--raw", "fine", "a <|mask|> b"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "mask token" in captured.err


def test_trace_without_json_is_printed_readably(tiny_ckpt, capsys) -> None:
    argv = ["generate", "--model", str(tiny_ckpt), *SMALL, "--decoder", "lopa", "--branches", "2", "--trace", "hi"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "trace (score per candidate, * = winner):" in err
    lines = [line for line in err.splitlines() if line.strip().startswith("iter")]
    assert lines and all("*" in line and "filled" in line for line in lines)
    assert "lookahead@" in err


def test_threads_flag_sets_torch_threads(tiny_ckpt) -> None:
    before = torch.get_num_threads()
    try:
        assert main(["generate", "--model", str(tiny_ckpt), *SMALL, "--threads", "1", "hi"]) == 0
        assert torch.get_num_threads() == 1
        assert main(["generate", "--model", str(tiny_ckpt), "--threads", "0", "hi"]) == 2
    finally:
        torch.set_num_threads(before)
    args = build_parser(["serve"]).parse_args(["serve", "--threads", "3"])
    assert args.threads == 3


def test_eval_console_shows_prompts_that_were_too_long(tiny_ckpt, tmp_path, capsys) -> None:
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(tiny_ckpt), "--task", "tiny", "--limit", "2", "--no-progress"]
    assert main([*argv, "--block-size", "8", "--max-new-tokens", "2048", "--out", str(out)]) == 0
    console = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompt_too_long"] == 2
    assert "prompt_too_long 2/2" in console
