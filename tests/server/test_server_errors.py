"""Malformed requests against a real server on the tiny checkpoint: each one gets a 4xx with an OpenAI-style
error body and a message, never a 5xx, and the server keeps answering afterwards. Prompts and settings that used to
give a 500 or exhaust memory (a mask token in the prompt, a tiny temperature, branches or K/V over the operator's
limits) are refused or served; a 500 from an engine bug is counted apart and leaves the keep-alive connection usable."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlparse

import httpx
import pytest

from lopa import LLM, DecodeConfig
from lopa.engine.output import TextOutput
from lopa.server import create_app
from lopa.server.background import serve_in_background
from lopa.server.limits import ServerLimits

MAX_BODY = 64 * 1024
C, CC = "/v1/completions", "/v1/chat/completions"
OK = {"model": "tiny-dream", "prompt": "hi", "max_tokens": 8}
CHAT = {"model": "tiny-dream", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def _with(base: dict, **changes) -> dict:
    return {**base, **changes}


def _without(base: dict, key: str) -> dict:
    return {k: v for k, v in base.items() if k != key}


# (id, method, path, body: dict | str | bytes | None, expected status)
CASES = [
    ("invalid-json", "POST", C, b'{"prompt": "hi",', 400),
    ("json-array", "POST", C, b"[1, 2]", 400),
    ("empty-body", "POST", C, b"", 400),
    ("not-utf8", "POST", C, b"\xff\xfe{}", 400),
    ("missing-prompt", "POST", C, _without(OK, "prompt"), 400),
    ("prompt-number", "POST", C, _with(OK, prompt=5), 400),
    ("prompt-empty-text", "POST", C, _with(OK, prompt=""), 400),
    ("prompt-empty-list", "POST", C, _with(OK, prompt=[]), 400),
    ("prompt-negative-id", "POST", C, _with(OK, prompt=[1, -1]), 400),
    ("prompt-id-outside-vocab", "POST", C, _with(OK, prompt=[10**9]), 400),
    ("max-tokens-string", "POST", C, _with(OK, max_tokens="ten"), 400),
    ("max-tokens-bool", "POST", C, _with(OK, max_tokens=True), 400),
    ("max-tokens-zero", "POST", C, _with(OK, max_tokens=0), 400),
    ("max-tokens-over-context", "POST", C, _with(OK, max_tokens=10**6), 400),
    ("prompt-too-long", "POST", C, _with(OK, prompt=[65] * 2040, max_tokens=16), 400),
    ("temperature-too-high", "POST", C, _with(OK, temperature=5.0), 400),
    ("temperature-string", "POST", C, _with(OK, temperature="hot"), 400),
    ("top-p-zero", "POST", C, _with(OK, top_p=0), 400),
    ("seed-negative", "POST", C, _with(OK, seed=-1), 400),
    ("stop-number", "POST", C, _with(OK, stop=7), 400),
    ("stop-empty-string", "POST", C, _with(OK, stop=[""]), 400),
    ("stream-string", "POST", C, _with(OK, stream="yes"), 400),
    ("n-two", "POST", C, _with(OK, n=2), 400),
    ("logprobs", "POST", C, _with(OK, logprobs=5), 400),
    ("echo", "POST", C, _with(OK, echo=True), 400),
    ("presence-penalty", "POST", C, _with(OK, presence_penalty=0.5), 400),
    ("unknown-field", "POST", C, _with(OK, max_token=5), 400),
    (
        "stream-options-without-stream",
        "POST",
        "/v1/completions",
        _with(OK, stream_options={"include_usage": True}),
        400,
    ),
    ("stream-two-prompts", "POST", C, _with(OK, prompt=["a", "b"], stream=True), 400),
    ("lopa-not-object", "POST", C, _with(OK, lopa="fast"), 400),
    ("lopa-unknown-decoder", "POST", C, _with(OK, lopa={"decoder": "beam"}), 400),
    ("lopa-negative-branches", "POST", C, _with(OK, lopa={"branches": -1}), 400),
    ("lopa-block-size-zero", "POST", C, _with(OK, lopa={"block_size": 0}), 400),
    ("lopa-unknown-key", "POST", C, _with(OK, lopa={"nonsense": 1}), 400),
    ("lopa-stop-number", "POST", C, _with(OK, lopa={"stop": 5}), 400),
    ("lopa-trace", "POST", C, _with(OK, lopa={"trace": True}), 400),
    ("lopa-max-new-tokens-and-max-tokens", "POST", C, _with(OK, lopa={"max_new_tokens": 8}), 400),
    ("lopa-max-new-tokens-not-block", "POST", C, {"prompt": "hi", "lopa": {"max_new_tokens": 5}}, 400),
    ("stream-bad-top-p", "POST", C, _with(OK, stream=True, top_p=1.5), 400),
    ("stream-prompt-too-long", "POST", C, _with(OK, stream=True, prompt=[65] * 2045), 400),
    ("chat-no-messages", "POST", CC, _with(CHAT, messages=[]), 400),
    ("chat-bad-role", "POST", CC, _with(CHAT, messages=[{"role": "tool", "content": "x"}]), 400),
    (
        "chat-content-number",
        "POST",
        "/v1/chat/completions",
        _with(CHAT, messages=[{"role": "user", "content": 3}]),
        400,
    ),
    (
        "chat-image-part",
        "POST",
        "/v1/chat/completions",
        _with(CHAT, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        400,
    ),
    ("chat-tools", "POST", CC, _with(CHAT, tools=[{"type": "function"}]), 400),
    ("chat-two-token-limits", "POST", CC, _with(CHAT, max_completion_tokens=4), 400),
    ("unknown-model", "POST", C, _with(OK, model="gpt-4"), 404),
    ("unknown-model-chat", "POST", CC, _with(CHAT, model="gpt-4"), 404),
    ("unknown-model-get", "GET", "/v1/models/gpt-4", None, 404),
    ("unknown-route", "POST", "/v1/embeddings", OK, 404),
    ("wrong-method", "GET", "/v1/completions", None, 405),
    ("body-too-large", "POST", C, _with(OK, prompt="x" * (MAX_BODY + 1)), 413),
]


@pytest.fixture(scope="module")
def base_url(tiny_ckpt):
    app = create_app(
        LLM(tiny_ckpt), default_config=DecodeConfig(block_size=8, max_new_tokens=8), max_body_bytes=MAX_BODY
    )
    with serve_in_background(app) as url:
        yield url


def _send(base_url: str, method: str, path: str, body: dict | bytes | None) -> httpx.Response:
    content = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": "application/json"}
    return httpx.request(method, base_url + path, content=content, headers=headers, timeout=60)


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 20 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("method", "path", "body", "status"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_request_gets_a_4xx_with_a_message(base_url: str, method, path, body, status) -> None:
    r = _send(base_url, method, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert isinstance(error["message"], str) and len(error["message"]) > 10
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}
    assert r.headers["content-type"].startswith("application/json")  # errors before a stream are not SSE


def test_server_still_answers_after_bad_requests(base_url: str) -> None:
    for _, method, path, body, _ in CASES[:10]:
        _send(base_url, method, path, body)
    r = _send(base_url, "POST", C, OK)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    health = httpx.get(base_url + "/health").json()
    assert health["status"] == "ok" and health["running"] == 0 and health["waiting"] == 0


def test_messages_name_the_problem(base_url: str) -> None:
    cases = {
        "n": _with(OK, n=2),
        "max_token": _with(OK, max_token=5),
        "decoder": _with(OK, lopa={"decoder": "beam"}),
        "context": _with(OK, prompt=[65] * 2045),
        "gpt-4": _with(OK, model="gpt-4"),
    }
    for word, body in cases.items():
        message = _send(base_url, "POST", C, body).json()["error"]["message"]
        assert word in message, message


def test_chunked_body_over_the_limit_is_refused(base_url: str) -> None:
    def chunks():
        piece = b'{"prompt": "' + b"x" * 4096
        yield piece
        for _ in range(MAX_BODY // 4096 + 1):
            yield b"x" * 4096
        yield b'"}'

    r = httpx.post(base_url + "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


class BoomOutput(TextOutput):
    """Text assembly that hits an engine bug (a plain exception: a 500) for the prompt 'boom'."""

    def answer(self, step, cfg):
        state = step.state
        if "boom" in self.tokenizer.decode(state.tokens[: state.prompt_len].tolist()):
            raise RuntimeError("a simulated engine bug")
        return super().answer(step, cfg)


class BoomLLM(LLM):
    """The tiny model, except that the prompt 'boom' hits an engine bug (a plain exception: a 500) when its
    first tokens are turned into text, whether it decodes alone or in a batch."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.output = BoomOutput(self.tokenizer, self.end_ids)


@pytest.fixture(scope="module")
def boom_llm(tiny_ckpt) -> BoomLLM:
    return BoomLLM(tiny_ckpt)


@pytest.fixture(scope="module")
def boom_url(boom_llm):
    app = create_app(
        boom_llm,
        default_config=DecodeConfig(block_size=8, max_new_tokens=8),
        limits=ServerLimits(max_branches=8, max_kv_cache_mb=1),
    )
    with serve_in_background(app) as url:
        yield url


def _post(base_url: str, body: dict) -> httpx.Response:
    return httpx.post(base_url + C, json=body, timeout=60)


@pytest.mark.parametrize("decoder", ["vanilla", "threshold", "d2f", "lopa"])
@pytest.mark.parametrize("prompt", ["<|mask|>hi", "mask-first-id", "mask-later-id"])
def test_mask_token_in_the_prompt_is_a_400_for_every_decoder(boom_url, boom_llm, decoder: str, prompt) -> None:
    prompt = {"mask-first-id": [boom_llm.mask_id, 5], "mask-later-id": [5, boom_llm.mask_id, 6]}.get(prompt, prompt)
    r = _post(boom_url, {"prompt": prompt, "max_tokens": 8, "lopa": {"decoder": decoder}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "mask_token_in_prompt"
    chat = {"messages": [{"role": "user", "content": "a <|mask|> b"}], "max_tokens": 8}
    r = httpx.post(boom_url + "/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 400 and "mask token" in r.json()["error"]["message"]


@pytest.mark.parametrize("temperature", [1e-40, 5e-324])
def test_tiny_temperature_is_served(boom_url, temperature: float) -> None:
    for stream in (False, True):
        r = _post(boom_url, {"prompt": "hi", "max_tokens": 8, "temperature": temperature, "stream": stream})
        assert r.status_code == 200, r.text
        assert '"error"' not in r.text


@pytest.mark.parametrize("branches", [9, 20000, 10**12])
def test_branches_over_the_operator_limit_are_a_400_naming_it(boom_url, branches: int) -> None:
    r = _post(boom_url, {"prompt": "hi", "max_tokens": 8, "lopa": {"decoder": "lopa", "branches": branches}})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "limit_exceeded" and "--max-branches" in error["message"] and "8" in error["message"]


def test_the_trace_route_enforces_the_same_limits(boom_url) -> None:
    body = {"prompt": "hi", "max_tokens": 8, "lopa": {"decoder": "lopa", "branches": 20000}}
    r = httpx.post(f"{boom_url}/v1/trace", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "limit_exceeded" and "--max-branches" in r.json()["error"]["message"]


def test_kv_cache_budget_is_a_400_naming_it(boom_url, boom_llm) -> None:
    # tiny model: 2 layers x 2 kv heads x 16 head dims x fp32 x (K, V) = 512 bytes per row-position
    per_position = (
        2 * boom_llm.config.num_hidden_layers * boom_llm.config.num_key_value_heads * boom_llm.config.head_dim * 4
    )
    fits = (1 << 20) // (per_position * 9) - 8  # 9 rows (8 branches + anchor) within the 1 MiB budget
    body = {"prompt": [5] * fits, "max_tokens": 8, "lopa": {"decoder": "lopa", "branches": 8}}
    assert _post(boom_url, body).status_code == 200
    body["prompt"] = [5] * (fits + 64)
    r = _post(boom_url, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "limit_exceeded" and "--max-kv-cache-mb" in r.json()["error"]["message"]


def test_health_counts_failures_apart_from_completions(boom_url) -> None:
    before = httpx.get(boom_url + "/health").json()
    assert _post(boom_url, {"prompt": "boom", "max_tokens": 8}).status_code == 500
    assert _post(boom_url, {"prompt": "fine", "max_tokens": 8}).status_code == 200
    after = httpx.get(boom_url + "/health").json()
    assert after["failed"] == before["failed"] + 1
    assert after["completed"] == before["completed"] + 1


def test_a_500_does_not_poison_the_keep_alive_connection(boom_url) -> None:
    url = urlparse(boom_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    headers = {"Content-Type": "application/json"}
    try:
        for _ in range(5):
            for prompt, status in (("boom", 500), ("fine", 200)):
                conn.request("POST", C, body=json.dumps({"prompt": prompt, "max_tokens": 8}), headers=headers)
                sock = conn.sock
                r = conn.getresponse()
                body = json.loads(r.read())
                assert r.status == status, body
                assert r.getheader("connection", "").lower() != "close"
                assert conn.sock is sock  # the same TCP connection carries the next request
        assert body["choices"][0]["text"] is not None
    finally:
        conn.close()
