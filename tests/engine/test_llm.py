"""The public API and `lopa generate`: prompts, chat template, stop strings, streaming, validation, CLI, the mask
token refused in prompts, and the same effective defaults (the checkpoint's recommendations) from API and CLI."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from lopa import LLM, DecodeConfig
from lopa.commands.flags import decode_config_from_args
from lopa.commands.main import build_parser, main
from lopa.config import DECODERS
from lopa.engine.loop import decode, run
from lopa.engine.output import answer_ids
from lopa.engine.prompt import prompt_list
from lopa.engine.runner import Runner
from lopa.errors import ConfigError, MaskTokenInPromptError, PromptTooLongError

FAST = DecodeConfig(decoder="lopa", branches=2, block_size=8, max_new_tokens=16)
SMALL = ["--block-size", "8", "--max-new-tokens", "16"]


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    return LLM(tiny_ckpt)


def test_completion_fields_and_metrics(llm):
    calls = []  # model calls, counted outside the engine
    hook = llm.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        for decoder in ("vanilla", "threshold", "d2f", "lopa"):
            calls.clear()
            t0 = time.perf_counter()
            c = llm.generate("hello", FAST.replace(decoder=decoder, trace=True))[0]
            wall = time.perf_counter() - t0
            s = c.stats
            assert c.finish_reason in ("stop", "length")
            assert llm.mask_id not in c.token_ids and len(c.token_ids) <= 16
            assert s.tokens == len(c.token_ids) + (c.finish_reason == "stop")
            assert s.forwards == len(calls) >= 1
            assert 0 < s.seconds <= wall  # the decode's own time, inside the call's
            assert c.text == llm.tokenizer.decode(c.token_ids)
            assert len(c.trace) == s.forwards
            d = c.to_dict()
            for key in ("forwards", "tokens", "tpf", "tpf_paper", "seconds", "tokens_per_second"):
                assert key in d["stats"]
    finally:
        hook.remove()


def test_chat_template_applied_unless_raw_and_ids_verbatim(llm):
    templated = llm.encode_prompt("hi")
    raw = llm.encode_prompt("hi", raw=True)
    assert raw == llm.tokenizer.encode("hi")
    assert templated == llm.tokenizer.encode(llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]))
    assert len(templated) > len(raw)
    ids = [5, 6, 7]
    assert llm.encode_prompt(ids) == ids
    a = llm.generate([ids], FAST)[0]
    assert a.prompt_token_ids == ids
    assert llm.generate(ids, FAST)[0].token_ids == a.token_ids  # a bare id list is one prompt


def test_batch_equals_one_by_one(llm):
    prompts = ["one", "two three", [9, 10, 11]]
    together = llm.generate(prompts, FAST)
    for p, c in zip(prompts, together, strict=True):
        assert llm.generate([p], FAST)[0].token_ids == c.token_ids


def test_stop_string_cuts_output(llm):
    full = llm.generate("hello", FAST.replace(max_new_tokens=32))[0]
    assert len(full.text) > 4
    stop = full.text[2:4]
    cut = llm.generate("hello", FAST.replace(max_new_tokens=32, stop=(stop,)))[0]
    assert stop not in cut.text and full.text.startswith(cut.text)
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.finish_reason == "stop"
    assert cut.stats.forwards <= full.stats.forwards


def test_stream_concatenates_to_generate(llm):
    for cfg in (FAST, FAST.replace(decoder="d2f"), FAST.replace(decoder="vanilla", max_new_tokens=12)):
        events = list(llm.stream("hello", cfg))
        final = events[-1].completion
        assert final is not None and all(e.completion is None for e in events[:-1])
        assert "".join(e.text for e in events) == final.text == llm.generate("hello", cfg)[0].text
        assert [t for e in events for t in e.token_ids] == final.token_ids


@pytest.mark.parametrize(
    "changes,fragment",
    [
        (dict(threshold=0.0), "threshold"),
        (dict(threshold=1.5), "threshold"),
        (dict(tau_add=-0.1), "tau_add"),
        (dict(branches=-1), "branches"),
        (dict(block_size=0), "block_size"),
        (dict(max_new_tokens=20, block_size=8), "multiple of block_size"),
        (dict(decoder="beam"), "decoder"),
        (dict(confidence="logit"), "confidence"),
        (dict(top_p=0.0), "top_p"),
        (dict(temperature=-1.0), "temperature"),
    ],
)
def test_bad_parameters_are_named(llm, changes, fragment):
    with pytest.raises(ConfigError, match=fragment):
        llm.generate("hi", FAST.replace(**changes))


def test_vanilla_needs_no_block_multiple(llm):
    """Vanilla ignores block_size: 5 positions (no multiple of 8) take 5 forwards, one position each, and the output
    is the same for any block size (this random model writes no end token in 5 positions)."""
    outs = [llm.generate("hi", DecodeConfig(decoder="vanilla", max_new_tokens=5, block_size=b))[0] for b in (8, 5, 1)]
    c = outs[0]
    assert (len(c.token_ids), c.finish_reason, c.stats.forwards, c.stats.tokens) == (5, "length", 5, 5)
    assert all(o.token_ids == c.token_ids and o.stats.forwards == 5 for o in outs[1:])


def test_prompt_too_long_and_empty(llm):
    with pytest.raises(PromptTooLongError, match="context"):
        llm.generate([1] * (llm.max_context - 8), FAST)
    with pytest.raises(ConfigError, match="empty"):
        llm.generate("", FAST, raw=True)
    with pytest.raises(ConfigError, match="token ids"):
        llm.generate([[10**9]], FAST)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown"):
        DecodeConfig.from_dict({"decoder": "lopa", "brances": 3})
    assert DecodeConfig.from_dict({"branches": 7}).branches == 7


def test_cli_generate_json(tiny_ckpt, capsys):
    rc = main(
        [
            "generate",
            "--model",
            str(tiny_ckpt),
            "--json",
            "--max-new-tokens",
            "16",
            "--block-size",
            "8",
            "--decoder",
            "lopa",
            "--branches",
            "2",
            "hello",
            "world",
        ]
    )
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 2
    for d in lines:
        assert set(d) >= {"text", "token_ids", "finish_reason", "stats"}
        assert d["settings"]["branches"] == 2 and d["stats"]["forwards"] >= 1


def test_cli_generate_text_and_errors(tiny_ckpt, tmp_path, capsys):
    assert main(["generate", "--model", str(tiny_ckpt), "--max-new-tokens", "8", "--block-size", "8", "hi"]) == 0
    captured = capsys.readouterr()
    assert "tpf=" in captured.err and "forwards=" in captured.err
    assert main(["generate", "--model", str(tiny_ckpt), "--threshold", "2", "hi"]) == 2
    assert "threshold must be in (0, 1]" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nope"), "hi"]) == 2
    assert "nope" in capsys.readouterr().err


def test_checkpoint_recommendations_replace_engine_defaults(tmp_path):
    from lopa.commands.flags import checkpoint_decode_defaults

    rec = DecodeConfig.recommended({"block_size": 8, "max_new_tokens": 24, "threshold": 0.8, "temperature": 0.7})
    assert (rec.block_size, rec.max_new_tokens, rec.threshold) == (8, 24, 0.8)
    assert rec.temperature == 0.0  # sampling settings of a generation_config are not taken
    with pytest.warns(UserWarning, match="invalid"):  # invalid: ignored, with a warning
        assert DecodeConfig.recommended({"block_size": 8, "max_new_tokens": 20}) == DecodeConfig()
    bundled = checkpoint_decode_defaults(None)
    assert (bundled.decoder, bundled.block_size, bundled.max_new_tokens) == ("threshold", 32, 64)
    assert checkpoint_decode_defaults(str(tmp_path / "missing")) == DecodeConfig()


def test_prompt_list_tells_one_prompt_from_many() -> None:
    """What LLM.generate and the branch-parallel facade treat as one prompt (text, token ids) or several."""
    assert prompt_list("a b") == ["a b"]
    assert prompt_list([5, 6]) == [[5, 6]] and prompt_list((5, 6)) == [(5, 6)]
    assert prompt_list(["a", "b"]) == ["a", "b"]
    assert prompt_list([[5], [6, 7]]) == [[5], [6, 7]]
    assert prompt_list(p for p in ["a", [5]]) == ["a", [5]]
    assert prompt_list([]) == []


def test_generate_checks_every_prompt_before_decoding(tiny_ckpt, capsys) -> None:
    assert main(["generate", "--model", str(tiny_ckpt), *SMALL, "--raw", "fine", "a <|mask|> b"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "mask token" in captured.err


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


def _cfg(decoder: str, **kw) -> DecodeConfig:
    return DecodeConfig(decoder=decoder, block_size=8, max_new_tokens=16, branches=2, **kw)


@pytest.mark.parametrize("decoder", DECODERS)
def test_every_decoder_refuses_a_mask_token_in_the_prompt(llm: LLM, decoder: str) -> None:
    m = llm.mask_id
    for prompt in ([m, 5, 6], [5, m, 6], [5, 6, m]):
        with pytest.raises(MaskTokenInPromptError, match="mask token") as e:
            llm.generate([prompt], _cfg(decoder))
        assert isinstance(e.value, ConfigError)  # the server answers 400
    with pytest.raises(MaskTokenInPromptError):
        llm.generate("<|mask|>Q: 1 + 1? A:", _cfg(decoder), raw=True)
    with pytest.raises(MaskTokenInPromptError):
        llm.chat([{"role": "user", "content": "a <|mask|> b"}], _cfg(decoder))
    with pytest.raises(MaskTokenInPromptError):
        next(iter(llm.stream([m, 1], _cfg(decoder))))


def test_a_prompt_without_the_mask_token_still_decodes(llm: LLM) -> None:
    """The ids either side of the mask id are ordinary prompt tokens: the output is the engine's own decode of them,
    run below the facade that refuses the mask token."""
    m = llm.mask_id
    ids = [t for t in (m - 1, 5, m + 1) if 0 <= t < llm.config.vocab_size]
    cfg = _cfg("lopa")
    out = llm.generate([ids], cfg)[0]
    want = run(decode(Runner(llm.model), ids, cfg.validate(), m, llm.end_ids))
    assert out.prompt_token_ids == ids
    assert out.token_ids == answer_ids(want.state, llm.end_ids)[0] and out.stats.forwards == want.stats.forwards


RECOMMENDS = {"decoder": "threshold", "block_size": 8, "max_new_tokens": 24, "threshold": 0.8}


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with recommended decoding settings that differ from the engine defaults."""
    path = Path(shutil.copytree(tiny_ckpt, tmp_path_factory.mktemp("recommends") / "ckpt"))
    gen = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**gen, **RECOMMENDS}))
    return path


def test_api_and_cli_build_the_same_config(ckpt: Path) -> None:
    llm = LLM(ckpt)
    argv = ["generate", "--model", str(ckpt), "--decoder", "lopa", "--branches", "2", "x"]
    from_cli = decode_config_from_args(build_parser(argv).parse_args(argv))
    from_api = llm.decode_config(decoder="lopa", branches=2)
    assert from_cli == from_api
    assert (from_api.block_size, from_api.max_new_tokens, from_api.threshold) == (8, 24, 0.8)
    assert llm.default_config == decode_config_from_args(build_parser(argv[:3]).parse_args(argv[:3] + ["x"]))


def test_api_and_cli_answer_alike(ckpt: Path, capsys) -> None:
    prompt = "Q: 1 + 1? A:"
    assert (
        main(["generate", "--model", str(ckpt), "--raw", "--json", "--decoder", "lopa", "--branches", "2", prompt]) == 0
    )
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    llm = LLM(ckpt)
    api = llm.generate([prompt], llm.decode_config(decoder="lopa", branches=2), raw=True)[0]
    assert cli["settings"] == llm.decode_config(decoder="lopa", branches=2).to_dict()
    assert cli["token_ids"] == api.token_ids and cli["text"] == api.text


def test_help_says_defaults_come_from_the_checkpoint(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "checkpoint's generation_config.json, else 16" in text  # --block-size
    assert "checkpoint's generation_config.json, else 128" in text  # --max-new-tokens


def test_invalid_generation_config_warns(ckpt: Path, tmp_path: Path) -> None:
    bad = Path(shutil.copytree(ckpt, tmp_path / "bad"))
    (bad / "generation_config.json").write_text(json.dumps({"block_size": 8, "max_new_tokens": 20}))
    with pytest.warns(UserWarning, match=r"generation_config.json recommends invalid.*multiple of block_size"):
        llm = LLM(bad)
    assert llm.default_config == DecodeConfig()
