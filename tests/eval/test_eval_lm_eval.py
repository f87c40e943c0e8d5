"""The lm-eval adapter (skipped when lm-eval is not installed): registration, generate_until, refusals."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("lm_eval")

from lopa.errors import ConfigError  # noqa: E402
from lopa.eval.lm_eval_adapter import LopaLM  # noqa: E402
from lopa.testing import FakeLLM  # noqa: E402


def request(context: str, **gen_kwargs: object) -> SimpleNamespace:
    return SimpleNamespace(args=(context, gen_kwargs))


def test_registered_under_the_name_lopa() -> None:
    from lm_eval.api.registry import get_model

    assert get_model("lopa") is LopaLM


def test_generate_until_passes_stops_and_config() -> None:
    llm = FakeLLM(lambda prompt: " 42\nQuestion: next one")
    lm = LopaLM(llm=llm, decoder="threshold", max_new_tokens=32, batch_size=1)
    out = lm.generate_until([request("Question: q\nAnswer:", until=["Question:"], do_sample=False)])
    assert out == [" 42\n"]
    prompt, config = llm.calls[0]
    assert prompt == "Question: q\nAnswer:" and config.decoder == "threshold" and "Question:" in config.stop
    escaped = LopaLM(llm=FakeLLM(lambda p: "a\ndef b"), escape_until=True, max_new_tokens=32)
    assert escaped.generate_until([request("x", until=["\ndef"])]) == ["a\ndef b"]


def test_bad_decode_args_and_loglikelihood_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown decoding parameter"):
        LopaLM(llm=FakeLLM(str), not_a_field=1)
    lm = LopaLM(llm=FakeLLM(str))
    with pytest.raises(NotImplementedError, match="generate_until"):
        lm.loglikelihood([request("a")])
    with pytest.raises(NotImplementedError):
        lm.loglikelihood_rolling([request("a")])


def test_chat_template_goes_through_the_tokenizer() -> None:
    lm = LopaLM(llm=FakeLLM(str, chat_template=True))
    text = lm.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|user|>hi\n<|assistant|>" and lm.chat_template() == "lopa"


def test_simple_evaluate_on_an_offline_local_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The docs' example: a local JSONL file and a task YAML, no network; the three requests in one generate."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")  # read when datasets is first imported, which is below
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(3)))
    yaml = (Path(__file__).resolve().parents[2] / "docs" / "eval.md").read_text().split("```yaml\n")[1].split("```")[0]
    (tmp_path / "gsm8k_local.yaml").write_text(yaml.replace("/data/gsm8k/test.jsonl", str(data)))
    llm = FakeLLM(lambda p: f" so #### {int(p.rsplit('Question: ', 1)[1].split('+')[0]) + 1}")
    lm = LopaLM(llm=llm)
    res = lm_eval.simple_evaluate(model=lm, tasks=["gsm8k_local"], task_manager=TaskManager(include_path=str(tmp_path)))
    assert res["results"]["gsm8k_local"]["exact_match,strict-match"] == pytest.approx(1.0)
    assert llm.generate_calls == 1 and len(llm.calls) == 3
