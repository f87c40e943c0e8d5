"""The public API and `lopa generate`: prompts, chat template, stop strings, streaming, validation, CLI."""

from __future__ import annotations

import json
import time

import pytest

from lopa import LLM, DecodeConfig
from lopa.cli import main
from lopa.errors import ConfigError, PromptTooLongError

FAST = DecodeConfig(decoder="lopa", branches=2, block_size=8, max_new_tokens=16)


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
    from lopa.cli import checkpoint_decode_defaults

    rec = DecodeConfig.recommended({"block_size": 8, "max_new_tokens": 24, "threshold": 0.8, "temperature": 0.7})
    assert (rec.block_size, rec.max_new_tokens, rec.threshold) == (8, 24, 0.8)
    assert rec.temperature == 0.0  # sampling settings of a generation_config are not taken
    with pytest.warns(UserWarning, match="invalid"):  # invalid: ignored, with a warning
        assert DecodeConfig.recommended({"block_size": 8, "max_new_tokens": 20}) == DecodeConfig()
    bundled = checkpoint_decode_defaults(None)
    assert (bundled.decoder, bundled.block_size, bundled.max_new_tokens) == ("threshold", 32, 64)
    assert checkpoint_decode_defaults(str(tmp_path / "missing")) == DecodeConfig()
