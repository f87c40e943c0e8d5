"""The lm-eval adapter hands its requests to LLM.generate as one batch, and follows lopa's device default."""

from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("lm_eval")

import torch  # noqa: E402

from lopa.errors import DeviceUnavailableError  # noqa: E402
from lopa.eval.lm_eval_adapter import LopaLM, choose_device, harness_default_device  # noqa: E402
from lopa.llm import LLM  # noqa: E402
from lopa.testing import FakeLLM  # noqa: E402


def request(context: str, **gen_kwargs: object) -> SimpleNamespace:
    return SimpleNamespace(args=(context, gen_kwargs))


def test_requests_with_one_set_of_kwargs_go_to_generate_in_one_call() -> None:
    llm = FakeLLM(lambda p: f"<{p}> END more")
    lm = LopaLM(llm=llm, max_new_tokens=64)
    reqs = [request(f"q{i}", until=[" END"], do_sample=False) for i in range(5)]
    out = lm.generate_until(reqs)
    assert llm.generate_calls == 1
    assert [p for p, _ in llm.calls] == [f"q{i}" for i in range(5)]  # every prompt, in lm-eval's order
    assert out == [f"<q{i}>" for i in range(5)]  # each answer matched to its own request
    assert all(c.stop == (" END",) for _, c in llm.calls)


def test_requests_with_different_kwargs_still_go_in_one_call_each_with_its_config() -> None:
    llm = FakeLLM(lambda p: "a;b|c")
    lm = LopaLM(llm=llm, max_new_tokens=64)
    reqs = [
        request("x", until=[";"]),
        request("y", until=["|"], do_sample=True, temperature=0.5),
        request("z", until=";"),
    ]
    assert lm.generate_until(reqs) == ["a", "a;b", "a"]
    assert llm.generate_calls == 1
    stops = [c.stop for _, c in llm.calls]
    temps = [c.temperature for _, c in llm.calls]
    assert stops == [(";",), ("|",), (";",)] and temps == [0.0, 0.5, 0.0]


def test_no_requests_no_generate_call() -> None:
    llm = FakeLLM(str)
    assert LopaLM(llm=llm).generate_until([]) == [] and llm.generate_calls == 0


def test_real_llm_decodes_the_requests_together_as_it_would_one_by_one() -> None:
    """A counting wrapper around the bundled model's generate: one call, the batched path, same texts as alone."""
    llm = LLM(max_num_seqs=4)
    assert llm.can_batch
    calls: list[int] = []
    generate = llm.generate

    def counting(prompts, config=None, raw=False, progress=False):  # type: ignore[no-untyped-def]
        calls.append(len(prompts))
        return generate(prompts, config, raw=raw, progress=progress)

    llm.generate = counting  # type: ignore[method-assign]
    lm = LopaLM(llm=llm, decoder="threshold", max_new_tokens=16, block_size=8)
    contexts = ["12+3=", "7+8=", "40+2=", "5+5="]
    out = lm.generate_until([request(c, until=["\n"]) for c in contexts], disable_tqdm=True)
    assert calls == [4]
    alone = [generate(c, lm.config.replace(stop=("\n",)), raw=True)[0].text for c in contexts]
    assert out == [t.split("\n")[0] for t in alone]


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_lm_evals_default_device_follows_lopas_default_without_cuda(no_cuda: None) -> None:
    assert harness_default_device() == "cuda:0"  # what lm-eval 0.4's command line passes without --device
    assert choose_device(None, "cuda:0") == "cpu"
    assert choose_device(None, None) == "cpu"
    lm = LopaLM.create_from_arg_string("decoder=threshold", {"device": "cuda:0", "batch_size": 1})
    assert lm.llm.device == torch.device("cpu") and lm.device == torch.device("cpu")


def test_lm_evals_default_device_is_kept_when_cuda_is_there(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_device(None, "cuda:0") == "cuda:0"
    assert choose_device("cpu", "cuda:0") == "cpu"  # the user's model arg wins over lm-eval's


def test_a_device_the_user_asked_for_that_is_missing_is_a_named_error(no_cuda: None) -> None:
    with pytest.raises(DeviceUnavailableError, match="cuda"):
        LopaLM.create_from_arg_string("device=cuda:0", {"device": "cuda:0", "batch_size": 1})
    with pytest.raises(DeviceUnavailableError, match="cuda"):
        LopaLM(device="cuda")
    with pytest.raises(DeviceUnavailableError, match="cuda"):  # --device cuda:1 is not lm-eval's default
        LopaLM.create_from_arg_obj({}, {"device": "cuda:1"})


def test_the_docs_example_model_args_build_on_cpu(no_cuda: None, tmp_path: Path) -> None:
    lm = LopaLM.create_from_arg_obj({"decoder": "lopa", "branches": 2}, {"device": "cuda:0", "max_batch_size": None})
    assert lm.config.decoder == "lopa" and lm.config.num_branches == 2 and lm.llm.device.type == "cpu"
