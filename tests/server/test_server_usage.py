"""Usage accounting of every generating route, on a model that stops: the bundled checkpoint ends each answer of
its task with the end token, so ``finish_reason == "stop"`` and the end token's place in the counts is tested.

Expected numbers come from a second engine on the same checkpoint and from the tokenizer, never from the server:
``completion_tokens`` is the number of answer tokens the client receives (the end token excluded, as OpenAI
counts), ``prompt_tokens`` sums over a prompt list, and ``tokens_per_forward`` of a multi-prompt request is
Σ tokens / Σ forwards (each prompt weighted by its forwards, the end token counting 1 as in docs/algorithm.md §5).
"""

from __future__ import annotations

import json

import httpx
import pytest

from lopa import LLM
from lopa.engine.output import Completion
from lopa.server import create_app
from lopa.server.background import serve_in_background
from lopa.tiny.task import fixed_set

# four test-split problems: their prompts differ in length (27, 32, 27, 32 tokens) and their answers in
# tokens per forward, so a sum over the first prompt only or a plain mean of the tpfs gives another number
PROMPTS = [p.prompt for p in fixed_set("test", 4)]


@pytest.fixture(scope="module")
def reference() -> LLM:
    """A second engine on the bundled checkpoint, for the expected outputs."""
    return LLM()


@pytest.fixture(scope="module")
def base_url(reference: LLM):
    llm = LLM()
    with serve_in_background(create_app(llm, default_config=llm.default_config)) as url:
        yield url


def _stopped(reference: LLM, prompt: str) -> Completion:
    """The engine's completion of ``prompt``, checked to end with the end token (the case under test)."""
    want = reference.generate(prompt, raw=True)[0]
    assert want.finish_reason == "stop"
    assert want.stats.tokens == len(want.token_ids) + 1  # the end token was produced and counts 1 in tpf
    return want


def _count(reference: LLM, text: str) -> int:
    """Tokens of ``text`` by the tokenizer alone (WordLevel: one token per word, mark or number)."""
    return len(reference.tokenizer.encode(text))


def _post(base_url: str, route: str, body: dict) -> dict:
    r = httpx.post(f"{base_url}{route}", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _sse(base_url: str, route: str, body: dict) -> list[dict]:
    """The JSON chunks of one OpenAI event stream, ``[DONE]`` checked and dropped."""
    with httpx.stream("POST", f"{base_url}{route}", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        data = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_multi_prompt_usage_sums_prompts_and_weights_tpf_by_forwards(base_url: str, reference: LLM) -> None:
    wants = [_stopped(reference, p) for p in PROMPTS]
    body = _post(base_url, "/v1/completions", {"prompt": PROMPTS})
    choices = sorted(body["choices"], key=lambda c: c["index"])
    assert [c["text"] for c in choices] == [w.text for w in wants]
    assert [c["finish_reason"] for c in choices] == ["stop"] * len(PROMPTS)

    prompt_lengths = [_count(reference, p) for p in PROMPTS]
    assert prompt_lengths == [len(w.prompt_token_ids) for w in wants]
    tokens = [w.stats.tokens for w in wants]  # answer tokens + the end token
    forwards = [w.stats.forwards for w in wants]
    weighted = sum(tokens) / sum(forwards)
    plain_mean = sum(t / f for t, f in zip(tokens, forwards, strict=True)) / len(wants)
    # the test has teeth: another first prompt length, another mean
    assert prompt_lengths[0] != sum(prompt_lengths) and abs(weighted - plain_mean) > 1e-3

    usage = body["usage"]
    assert usage["prompt_tokens"] == sum(prompt_lengths)
    assert usage["completion_tokens"] == sum(_count(reference, w.text) for w in wants) == sum(tokens) - len(wants)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["forwards"] == sum(forwards)
    assert usage["tokens_per_forward"] == pytest.approx(weighted, abs=1e-4)


def test_completion_tokens_on_stop_excludes_the_end_token_on_every_route(base_url: str, reference: LLM) -> None:
    prompt = PROMPTS[1]
    want = _stopped(reference, prompt)
    n = len(want.token_ids)
    assert _count(reference, want.text) == n
    expected = {
        "prompt_tokens": _count(reference, prompt),
        "completion_tokens": n,
        "total_tokens": _count(reference, prompt) + n,
        "forwards": want.stats.forwards,
        "tokens_per_forward": round((n + 1) / want.stats.forwards, 4),
    }
    chat = [{"role": "user", "content": prompt}]  # no chat template: the message content is the prompt
    stream = {"stream": True, "stream_options": {"include_usage": True}}
    results: dict[str, tuple[str, str, dict]] = {}  # route -> (text, finish_reason, usage)

    body = _post(base_url, "/v1/completions", {"prompt": prompt})
    results["completions"] = (body["choices"][0]["text"], body["choices"][0]["finish_reason"], body["usage"])

    body = _post(base_url, "/v1/chat/completions", {"messages": chat})
    message = body["choices"][0]
    results["chat"] = (message["message"]["content"], message["finish_reason"], body["usage"])

    chunks = _sse(base_url, "/v1/completions", {"prompt": prompt, **stream})
    text = "".join(c["text"] for ch in chunks for c in ch["choices"])
    finish = [c["finish_reason"] for ch in chunks for c in ch["choices"] if c["finish_reason"]]
    assert chunks[-1]["choices"] == [] and len(finish) == 1
    results["completions stream"] = (text, finish[0], chunks[-1]["usage"])

    chunks = _sse(base_url, "/v1/chat/completions", {"messages": chat, **stream})
    text = "".join(c["delta"].get("content") or "" for ch in chunks for c in ch["choices"])
    finish = [c["finish_reason"] for ch in chunks for c in ch["choices"] if c["finish_reason"]]
    assert chunks[-1]["choices"] == [] and len(finish) == 1
    results["chat stream"] = (text, finish[0], chunks[-1]["usage"])

    with httpx.stream("POST", f"{base_url}/v1/trace", json={"prompt": prompt}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        lines = list(r.iter_lines())
    done = json.loads(lines[lines.index("event: done") + 1].removeprefix("data: "))
    results["trace"] = (done["text"], done["finish_reason"], done["usage"])

    for route, (text, finish_reason, usage) in results.items():
        assert (text, finish_reason) == (want.text, "stop"), route
        assert usage == expected, route
