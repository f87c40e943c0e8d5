"""LLM.generate decodes prompts together: on the bundled model and a random checkpoint every prompt's tokens and
forward count equal decoding it alone; per-prompt configs; sessions stream like ``LLM.stream``; knobs and the
branch-parallel refusal are named errors; ``lopa generate`` prints each result as soon as it and those before it
are ready."""

from __future__ import annotations

import json

import pytest

from lopa import LLM, DecodeConfig
from lopa.commands.main import main
from lopa.engine.session import BatchSession
from lopa.errors import BatchingError, ConfigError, PromptTooLongError

FAST = DecodeConfig(decoder="lopa", branches=2, block_size=8, max_new_tokens=16)
SMALL = ["--block-size", "8", "--max-new-tokens", "16"]


@pytest.fixture(scope="module")
def bundled() -> tuple[LLM, LLM]:
    return LLM(max_num_seqs=16), LLM(max_num_seqs=1)


@pytest.mark.parametrize(
    "cfg",
    [
        DecodeConfig(decoder="threshold", block_size=8, max_new_tokens=24),
        DecodeConfig(decoder="lopa", base="threshold", branches=4, block_size=8, max_new_tokens=24),
        DecodeConfig(decoder="lopa", base="d2f", branches=4, block_size=8, max_new_tokens=24, threshold=0.7),
    ],
    ids=["threshold", "lopa-threshold-k4", "lopa-d2f-k4"],
)
def test_bundled_model_batched_equals_alone(bundled, cfg) -> None:
    from lopa.tiny.task import fixed_set

    batched, alone = bundled
    prompts = [p.prompt for p in fixed_set("test", 20)]
    together = batched.generate(prompts, cfg, raw=True)
    for prompt, got in zip(prompts, together, strict=True):
        ref = alone.generate(prompt, cfg, raw=True)[0]
        assert got.token_ids == ref.token_ids and got.text == ref.text
        assert got.stats.forwards == ref.stats.forwards
        assert ref.stats.batch_size == 1.0
    assert max(c.stats.batch_size for c in together) > 4


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_random_checkpoint_of_each_family_batched_equals_alone(tmp_path, family) -> None:
    from lopa.testing import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / f"tiny-{family}", family=family, seed=2)
    batched, alone = LLM(path, max_num_seqs=4), LLM(path, max_num_seqs=1)
    assert batched.config.logit_shift == (1 if family == "dream" else 0) and batched.can_batch
    prompts = ["one", "two three", "four five six", "seven", "eight nine", "ten"]
    configs = [FAST, FAST.replace(decoder="threshold"), FAST.replace(base="d2f", branches=3, threshold=0.7)]
    configs = [configs[i % len(configs)] for i in range(len(prompts))]
    together = batched.generate(prompts, configs, raw=True)
    for p, c, got in zip(prompts, configs, together, strict=True):
        ref = alone.generate(p, c, raw=True)[0]
        assert (got.token_ids, got.finish_reason, got.stats.forwards) == (
            ref.token_ids,
            ref.finish_reason,
            ref.stats.forwards,
        )
    assert max(c.stats.batch_size for c in together) > 1


@pytest.fixture(scope="module")
def llm(tiny_ckpt) -> LLM:
    return LLM(tiny_ckpt, max_num_seqs=3)


def test_one_config_per_prompt(llm) -> None:
    prompts = ["one", "two three", [9, 10, 11], "four", "five six seven"]
    configs = [
        FAST,
        FAST.replace(decoder="threshold"),
        FAST.replace(decoder="vanilla", max_new_tokens=6),
        FAST.replace(decoder="d2f", temperature=0.7, seed=4),
        FAST.replace(branches=4, base="threshold", stop=("e",)),
    ]
    together = llm.generate(prompts, configs)
    for p, c, got in zip(prompts, configs, together, strict=True):
        ref = llm.generate([p], c)[0]
        assert (got.token_ids, got.text, got.finish_reason) == (ref.token_ids, ref.text, ref.finish_reason)
        assert got.stats.forwards == ref.stats.forwards
    with pytest.raises(ConfigError, match="one per prompt"):
        llm.generate(prompts, configs[:2])


def test_session_streams_like_stream(llm) -> None:
    prompts = ["alpha", "beta gamma", "delta"]
    configs = [FAST, FAST.replace(stop=("a",)), FAST.replace(decoder="vanilla", max_new_tokens=5)]
    session = llm.open_session()
    assert isinstance(session, BatchSession)
    rids = [session.add(p, c) for p, c in zip(prompts, configs, strict=True)]
    texts = dict.fromkeys(rids, "")
    completions = {}
    while session.has_work:
        for rid, event in session.step():
            texts[rid] += event.text
            if event.completion is not None:
                completions[rid] = event.completion
    for rid, p, c in zip(rids, prompts, configs, strict=True):
        streamed = "".join(e.text for e in llm.stream(p, c))
        assert texts[rid] == streamed == completions[rid].text


def test_too_long_prompt_fails_before_any_decoding(tiny_ckpt) -> None:
    small = LLM(tiny_ckpt, max_num_seqs=2, max_model_len=40)
    assert small.max_context == 40
    with pytest.raises(PromptTooLongError, match="40"):
        small.generate(["ok", "x" * 60], FAST)
    session = small.open_session()
    with pytest.raises(PromptTooLongError):
        session.add("x" * 60, FAST)
    assert not session.has_work


def test_engine_knobs_are_checked(tiny_ckpt) -> None:
    with pytest.raises(ConfigError, match="max_num_seqs"):
        LLM(tiny_ckpt, max_num_seqs=0)
    with pytest.raises(ConfigError, match="max_model_len"):
        LLM(tiny_ckpt, max_model_len=10**7)
    one = LLM(tiny_ckpt, max_num_seqs=1)
    assert not one.can_batch


def test_tensor_parallel_shard_does_not_batch(tiny_ckpt) -> None:
    from lopa.model.tp import TPShard

    assert LLM(tiny_ckpt, max_num_seqs=4, shard=TPShard(0, 1)).can_batch
    sharded = LLM(tiny_ckpt, max_num_seqs=4, shard=TPShard(0, 2))  # heads split: the pooled forward cannot run it
    assert not sharded.can_batch
    assert not isinstance(sharded.open_session(), BatchSession)


@pytest.mark.parametrize("flag", ["--bp", "--tp"])
def test_branch_and_tensor_parallel_refuse_a_batch(capsys, flag) -> None:
    assert main(["generate", flag, "2", "--max-num-seqs", "4", "hi"]) == 2
    err = capsys.readouterr().err
    assert "one sequence at a time" in err and "--max-num-seqs" in err
    assert issubclass(BatchingError, ConfigError)


def test_session_events_carry_each_iterations_trace(llm) -> None:
    cfg = FAST.replace(trace=True)
    session = llm.open_session()
    rids = [session.add(p, cfg) for p in ("one", "two")]
    traces: dict[int, list] = {rid: [] for rid in rids}
    final = {}
    while session.has_work:
        for rid, event in session.step():
            traces[rid].extend(event.trace)
            if event.completion is not None:
                final[rid] = event.completion
    for rid in rids:
        assert traces[rid] == final[rid].trace and len(traces[rid]) == final[rid].stats.forwards


def test_generate_prints_each_prompt_as_it_finishes(tiny_ckpt, monkeypatch, capsys) -> None:
    """The prompts decode together; each result is printed, in input order, as soon as it and every result
    before it are ready (never held back until the whole batch is done)."""
    import lopa.commands.generate as generate_cli

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
