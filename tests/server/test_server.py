"""`lopa serve` end to end: a real uvicorn server on 127.0.0.1 serving the tiny random checkpoint, driven by the
official ``openai`` client. Covers completions and chat, streamed and not, usage, the max_tokens cut, per-request
decoder settings, 16 concurrent requests, and cancellation of a streaming request."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI

from lopa import LLM, DecodeConfig
from lopa.server import create_app
from lopa.server.background import serve_in_background

DEFAULTS = DecodeConfig(block_size=8, max_new_tokens=16)
PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def reference(tiny_ckpt) -> LLM:
    """A second engine on the same checkpoint, for computing expected outputs outside the server."""
    return LLM(tiny_ckpt)


@pytest.fixture(scope="module")
def base_url(tiny_ckpt):
    with serve_in_background(create_app(LLM(tiny_ckpt), default_config=DEFAULTS)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url) -> OpenAI:
    return OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def _stream_text(stream) -> tuple[str, list, dict | None]:
    """(concatenated text, chunks that carried text, usage of the last chunk) of a completions/chat stream."""
    parts, texty, usage, finish = [], [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            piece = choice.text if hasattr(choice, "text") else (choice.delta.content or "")
            if piece:
                parts.append(piece)
                texty.append(chunk)
            finish = choice.finish_reason or finish
    return "".join(parts), texty, {"usage": usage, "finish_reason": finish}


def test_models_and_health(client: OpenAI, base_url: str, tiny_ckpt) -> None:
    assert [m.id for m in client.models.list().data] == [tiny_ckpt.name]
    assert client.models.retrieve(tiny_ckpt.name).id == tiny_ckpt.name
    health = httpx.get(f"{base_url}/health").json()
    assert health["status"] == "ok" and health["running"] == 0


def test_completion_matches_the_engine(client: OpenAI, reference: LLM, tiny_ckpt) -> None:
    r = client.completions.create(model=tiny_ckpt.name, prompt=PROMPT, max_tokens=16)
    want = reference.generate(PROMPT, DEFAULTS, raw=True)[0]
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == reference.count_prompt_tokens(PROMPT, raw=True)
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.forwards == want.stats.forwards
    assert r.usage.tokens_per_forward == pytest.approx(want.stats.tpf, abs=1e-4)


def test_chat_uses_the_template(client: OpenAI, reference: LLM, tiny_ckpt) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model=tiny_ckpt.name, messages=messages, max_tokens=16)
    want = reference.chat(messages, DEFAULTS)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    # 'developer' is 'system' and text parts are joined: the same prompt, so the same reply
    parts = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]},
    ]
    again = client.chat.completions.create(model=tiny_ckpt.name, messages=parts, max_tokens=16)
    assert again.choices[0].message.content == want.text


def test_raw_sse_framing(base_url: str, tiny_ckpt) -> None:
    body = {"model": tiny_ckpt.name, "prompt": PROMPT, "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"} and len({c["id"] for c in chunks}) == 1
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


@pytest.mark.parametrize("max_tokens", [16, 11])  # 11: the engine decodes 2 blocks and the output is cut
@pytest.mark.parametrize("decoder", ["lopa", "d2f", "vanilla"])
def test_streamed_text_equals_non_streamed(client: OpenAI, tiny_ckpt, decoder: str, max_tokens: int) -> None:
    body = {"lopa": {"decoder": decoder}}
    kw = {"model": tiny_ckpt.name, "max_tokens": max_tokens, "extra_body": body}
    full = client.completions.create(prompt=PROMPT, **kw)
    text, texty, last = _stream_text(
        client.completions.create(prompt=PROMPT, stream=True, stream_options={"include_usage": True}, **kw)
    )
    assert full.choices[0].text, "precondition: the tiny model produces some text for this prompt"
    assert text == full.choices[0].text
    assert last["finish_reason"] == full.choices[0].finish_reason
    assert last["usage"] == full.usage.model_dump()
    assert full.usage.completion_tokens <= max_tokens


def test_chat_stream_equals_non_streamed(client: OpenAI, tiny_ckpt) -> None:
    kw = {"model": tiny_ckpt.name, "messages": [{"role": "user", "content": "write a poem"}], "max_tokens": 16}
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert full.choices[0].message.content
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    # the text arrives block by block, not in one piece at the end
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2


def test_max_tokens_cuts_block_output(client: OpenAI, reference: LLM, tiny_ckpt) -> None:
    r = client.completions.create(model=tiny_ckpt.name, prompt=PROMPT, max_tokens=5)
    engine = reference.generate(PROMPT, DEFAULTS.replace(max_new_tokens=8), raw=True)[0]
    assert len(engine.token_ids) > 5, "precondition: the engine decodes a whole block of 8"
    assert r.choices[0].text == reference.tokenizer.decode(engine.token_ids[:5])
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5


def test_per_request_decoder_settings_change_decoding(client: OpenAI, tiny_ckpt) -> None:
    kw = {"model": tiny_ckpt.name, "prompt": PROMPT, "max_tokens": 16}
    vanilla = client.completions.create(**kw, extra_body={"lopa": {"decoder": "vanilla"}})
    lopa = client.completions.create(**kw, extra_body={"lopa": {"decoder": "lopa", "branches": 3}})
    assert vanilla.usage.forwards > lopa.usage.forwards  # vanilla fills one position per forward


def test_token_id_prompts_and_prompt_lists(client: OpenAI, reference: LLM, tiny_ckpt) -> None:
    ids = reference.tokenizer.encode(PROMPT)
    by_ids = client.completions.create(model=tiny_ckpt.name, prompt=ids, max_tokens=8)
    by_text = client.completions.create(model=tiny_ckpt.name, prompt=[PROMPT, "x = 1"], max_tokens=8)
    assert [c.index for c in by_text.choices] == [0, 1]
    assert by_ids.choices[0].text == by_text.choices[0].text
    single = client.completions.create(model=tiny_ckpt.name, prompt="x = 1", max_tokens=8)
    assert by_text.choices[1].text == single.choices[0].text
    assert by_text.usage.completion_tokens == by_ids.usage.completion_tokens + single.usage.completion_tokens


def test_16_concurrent_requests_equal_sequential(client: OpenAI, tiny_ckpt) -> None:
    def ask(i: int) -> tuple[str, int]:
        kw = {"model": tiny_ckpt.name, "max_tokens": 8, "extra_body": {"lopa": {"decoder": "d2f"}}}
        if i % 2:
            r = client.chat.completions.create(messages=[{"role": "user", "content": f"question {i}"}], **kw)
            return r.choices[0].message.content, r.usage.forwards
        r = client.completions.create(prompt=f"print({i})", **kw)
        return r.choices[0].text, r.usage.forwards

    one_by_one = [ask(i) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, range(16)))
    assert together == one_by_one
    assert len({text for text, _ in one_by_one}) > 1  # the prompts really differ


def test_cancelled_stream_frees_the_worker(client: OpenAI, base_url: str, tiny_ckpt) -> None:
    before = httpx.get(f"{base_url}/health").json()
    # vanilla with 1000 tokens would need ~1000 forwards; the client leaves after the first text
    stream = client.completions.create(
        model=tiny_ckpt.name, prompt=PROMPT, max_tokens=1000, stream=True, extra_body={"lopa": {"decoder": "vanilla"}}
    )
    for chunk in stream:
        if chunk.choices[0].text:
            break
    stream.close()
    t0 = time.perf_counter()
    r = client.completions.create(model=tiny_ckpt.name, prompt="x = 1", max_tokens=8)
    waited = time.perf_counter() - t0
    assert r.choices[0].finish_reason in ("stop", "length")
    after = httpx.get(f"{base_url}/health").json()
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["running"] == 0 and after["waiting"] == 0
    assert waited < 30, f"the next request waited {waited:.1f}s"
