"""The per-step trace (TraceStep.fills, LLM.stream's trace steps) and its pictures (--trace-plot / --trace-gif).

Checked against the engine's own outputs on the tiny random checkpoint: the fills of a trace cover every decoded
position exactly once and spell the completion's tokens; the streamed steps equal the completion's trace; the
PNG and GIF files open with the expected size and one frame per forward; ``--trace`` without ``--json`` prints a
readable table.
"""

from __future__ import annotations

import json

import pytest
from PIL import Image

from lopa import LLM, DecodeConfig
from lopa.commands.main import main
from lopa.engine.output import TraceStep
from lopa.server.trace_plot import fill_order, save_trace_gif, save_trace_plot

SMALL = ["--block-size", "8", "--max-new-tokens", "16"]
PROMPTS = ["def add(a, b):", "x = 1", "hello there"]
SETTINGS = [
    DecodeConfig(decoder="vanilla", max_new_tokens=12),
    DecodeConfig(decoder="threshold", block_size=4, max_new_tokens=12),
    DecodeConfig(decoder="d2f", block_size=4, max_new_tokens=12, threshold=0.5),
    DecodeConfig(decoder="lopa", base="threshold", branches=3, block_size=8, max_new_tokens=16),
    DecodeConfig(decoder="lopa", base="d2f", branches=2, block_size=4, max_new_tokens=16, threshold=0.2),
]


@pytest.fixture(scope="module")
def llm(tiny_ckpt) -> LLM:
    return LLM(tiny_ckpt)


@pytest.mark.parametrize("cfg", SETTINGS, ids=lambda c: f"{c.decoder}-{c.base_decoder}")
def test_fills_cover_every_decoded_position_once_and_spell_the_answer(llm: LLM, cfg: DecodeConfig) -> None:
    for prompt in PROMPTS:
        c = llm.generate(prompt, cfg.replace(trace=True), raw=True)[0]
        assert c.trace is not None and len(c.trace) == c.stats.forwards
        assert [s.iteration for s in c.trace] == list(range(1, c.stats.forwards + 1))
        seconds = [s.seconds for s in c.trace]
        assert seconds == sorted(seconds) and seconds[0] > 0
        filled: dict[int, int] = {}
        for s in c.trace:
            assert len(s.tokens) == len(s.filled)
            for position, token, _ in s.fills():
                assert position not in filled, f"position {position} filled twice"
                filled[position] = token
        prompt_len = len(c.prompt_token_ids)
        assert min(filled) >= prompt_len
        if cfg.decoder == "vanilla":
            assert len(filled) == c.stats.forwards
        else:  # every position of every generated block was decoded exactly once
            assert sorted(filled) == list(range(prompt_len, prompt_len + c.stats.decoded_positions))
        answer = [filled[prompt_len + i] for i in range(len(c.token_ids))]
        assert answer == c.token_ids


def test_lookahead_fills_are_the_winners_extra_position(llm: LLM) -> None:
    cfg = SETTINGS[3].replace(trace=True)
    wins = 0
    for prompt in PROMPTS:
        c = llm.generate(prompt, cfg, raw=True)[0]
        for s in c.trace:
            won = s.candidates[s.winner]
            looked = [(p, t) for p, t, la in s.fills() if la]
            if won["kind"] == "lookahead":
                wins += 1
                assert looked == [(won["extra_position"], won["extra_token"])]
                assert won["extra_position"] not in s.filled
            else:
                assert looked == [] and won["extra_position"] == -1
            assert len(s.candidates) <= cfg.branches + 1 and s.candidates[-1]["kind"] == "anchor"
    assert wins > 0, "precondition: lookahead branches win on this checkpoint"


@pytest.mark.parametrize("cfg", SETTINGS[1::2], ids=lambda c: c.decoder)
def test_stream_yields_the_trace_step_by_step(llm: LLM, cfg: DecodeConfig) -> None:
    cfg = cfg.replace(trace=True)
    whole = llm.generate(PROMPTS[0], cfg, raw=True)[0]
    events = list(llm.stream(PROMPTS[0], cfg, raw=True))
    streamed = [s for e in events for s in e.trace]
    key = lambda s: (s.iteration, s.candidates, s.winner, s.filled, s.tokens, s.committed)  # noqa: E731
    assert [key(s) for s in streamed] == [key(s) for s in whole.trace]
    assert sum(1 for e in events if e.trace) >= whole.stats.forwards - 1  # steps arrive as they happen
    assert all(e.trace == [] for e in llm.stream(PROMPTS[0], cfg.replace(trace=False), raw=True))


def test_fill_order_of_a_hand_made_trace() -> None:
    anchor = {"kind": "anchor", "extra_position": -1, "extra_token": -1, "extra_conf": 0.0, "score": 0.5}
    look = {"kind": "lookahead", "extra_position": 13, "extra_token": 7, "extra_conf": 0.9, "score": 0.8}
    trace = [
        TraceStep(1, [anchor], 0, [10, 12], 10, [5, 6], 0.1),
        TraceStep(2, [look, anchor], 0, [11], 10, [0], 0.2),  # 0 is the end token
    ]
    order = fill_order(trace, prompt_len=10, positions=4, end_ids=frozenset({0}))
    assert order.step.tolist() == [1, 2, 1, 2]
    assert order.token.tolist() == [5, 0, 6, 7]
    assert order.lookahead.tolist() == [False, False, False, True]
    assert order.forwards == 2 and order.first_end == 1


def test_plot_and_gif_files(llm: LLM, tmp_path) -> None:
    cfg = SETTINGS[3].replace(trace=True)
    c = llm.generate(PROMPTS[0], cfg, raw=True)[0]
    png = save_trace_plot(c, cfg, tmp_path / "map.png", llm.end_ids, "lopa k=3", lambda t: llm.tokenizer.decode([t]))
    gif = save_trace_gif(c, cfg, tmp_path / "map.gif", llm.end_ids, "lopa k=3")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width >= 600 and im.height >= 300
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 10  # a drawn map, not a blank canvas
    with Image.open(gif) as im:
        assert im.format == "GIF" and im.width >= 400 and im.height >= 200
        assert im.n_frames == c.stats.forwards
        im.seek(0)
        first = im.convert("RGB").tobytes()
        im.seek(im.n_frames - 1)
        assert im.convert("RGB").tobytes() != first  # the map fills up frame by frame


def test_generate_cli_writes_numbered_pictures(tiny_ckpt, tmp_path, capsys) -> None:
    args = ["generate", "--model", str(tiny_ckpt), "--raw", "--decoder", "lopa", "--branches", "2"]
    args += ["--block-size", "4", "--max-new-tokens", "8", "--trace-plot", str(tmp_path / "m.png")]
    args += ["--trace-gif", str(tmp_path / "m.gif"), "--json", "x = 1", "def f():"]
    assert main(args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    forwards = [json.loads(line)["stats"]["forwards"] for line in lines]
    for i, n in enumerate(forwards, start=1):
        assert Image.open(tmp_path / f"m-{i}.png").format == "PNG"
        assert Image.open(tmp_path / f"m-{i}.gif").n_frames == n
    assert not (tmp_path / "m.png").exists()


def test_trace_without_json_is_printed_readably(tiny_ckpt, capsys) -> None:
    argv = ["generate", "--model", str(tiny_ckpt), *SMALL, "--decoder", "lopa", "--branches", "2", "--trace", "hi"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "trace (score per candidate, * = winner):" in err
    lines = [line for line in err.splitlines() if line.strip().startswith("iter")]
    assert lines and all("*" in line and "filled" in line for line in lines)
    assert "lookahead@" in err
