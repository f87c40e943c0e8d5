"""Server hardening: prompts and settings that used to give a 500 or exhaust memory, limits, keep-alive after 500."""

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

C = "/v1/completions"


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
def llm(tiny_ckpt) -> BoomLLM:
    return BoomLLM(tiny_ckpt)


@pytest.fixture(scope="module")
def base_url(llm):
    app = create_app(
        llm,
        default_config=DecodeConfig(block_size=8, max_new_tokens=8),
        limits=ServerLimits(max_branches=8, max_kv_cache_mb=1),
    )
    with serve_in_background(app) as url:
        yield url


def _post(base_url: str, body: dict) -> httpx.Response:
    return httpx.post(base_url + C, json=body, timeout=60)


@pytest.mark.parametrize("decoder", ["vanilla", "threshold", "d2f", "lopa"])
@pytest.mark.parametrize("prompt", ["<|mask|>hi", "mask-first-id", "mask-later-id"])
def test_mask_token_in_the_prompt_is_a_400_for_every_decoder(base_url, llm, decoder: str, prompt) -> None:
    prompt = {"mask-first-id": [llm.mask_id, 5], "mask-later-id": [5, llm.mask_id, 6]}.get(prompt, prompt)
    r = _post(base_url, {"prompt": prompt, "max_tokens": 8, "lopa": {"decoder": decoder}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "mask_token_in_prompt"
    chat = {"messages": [{"role": "user", "content": "a <|mask|> b"}], "max_tokens": 8}
    r = httpx.post(base_url + "/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 400 and "mask token" in r.json()["error"]["message"]


@pytest.mark.parametrize("temperature", [1e-40, 5e-324])
def test_tiny_temperature_is_served(base_url, temperature: float) -> None:
    for stream in (False, True):
        r = _post(base_url, {"prompt": "hi", "max_tokens": 8, "temperature": temperature, "stream": stream})
        assert r.status_code == 200, r.text
        assert '"error"' not in r.text


@pytest.mark.parametrize("branches", [9, 20000, 10**12])
def test_branches_over_the_operator_limit_are_a_400_naming_it(base_url, branches: int) -> None:
    r = _post(base_url, {"prompt": "hi", "max_tokens": 8, "lopa": {"decoder": "lopa", "branches": branches}})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "limit_exceeded" and "--max-branches" in error["message"] and "8" in error["message"]


def test_the_trace_route_enforces_the_same_limits(base_url) -> None:
    body = {"prompt": "hi", "max_tokens": 8, "lopa": {"decoder": "lopa", "branches": 20000}}
    r = httpx.post(f"{base_url}/v1/trace", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "limit_exceeded" and "--max-branches" in r.json()["error"]["message"]


def test_kv_cache_budget_is_a_400_naming_it(base_url, llm) -> None:
    # tiny model: 2 layers x 2 kv heads x 16 head dims x fp32 x (K, V) = 512 bytes per row-position
    per_position = 2 * llm.config.num_hidden_layers * llm.config.num_key_value_heads * llm.config.head_dim * 4
    fits = (1 << 20) // (per_position * 9) - 8  # 9 rows (8 branches + anchor) within the 1 MiB budget
    body = {"prompt": [5] * fits, "max_tokens": 8, "lopa": {"decoder": "lopa", "branches": 8}}
    assert _post(base_url, body).status_code == 200
    body["prompt"] = [5] * (fits + 64)
    r = _post(base_url, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "limit_exceeded" and "--max-kv-cache-mb" in r.json()["error"]["message"]


def test_health_counts_failures_apart_from_completions(base_url) -> None:
    before = httpx.get(base_url + "/health").json()
    assert _post(base_url, {"prompt": "boom", "max_tokens": 8}).status_code == 500
    assert _post(base_url, {"prompt": "fine", "max_tokens": 8}).status_code == 200
    after = httpx.get(base_url + "/health").json()
    assert after["failed"] == before["failed"] + 1
    assert after["completed"] == before["completed"] + 1


def test_a_500_does_not_poison_the_keep_alive_connection(base_url) -> None:
    url = urlparse(base_url)
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


def test_one_large_request_does_not_leave_the_cache_inflated(tmp_path) -> None:
    import psutil

    from lopa.testing import make_tiny_checkpoint

    # 4 layers x 8 kv heads x 32 dims x fp32 x (K, V) = 8 KiB per row-position: 65 rows x 316 positions = 160 MiB
    path = make_tiny_checkpoint(tmp_path / "wide", hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=8)
    llm = LLM(path)
    small = DecodeConfig(decoder="threshold", block_size=8, max_new_tokens=16)
    large = DecodeConfig(decoder="lopa", branches=64, block_size=8, max_new_tokens=16, max_iterations=2)
    prompt = list(range(5, 305))
    create_app(llm, default_config=small)  # the server's setting: keep no cache larger than its defaults need
    assert llm.max_idle_cache_bytes is not None
    llm.generate([prompt], small)
    process = psutil.Process()
    before = process.memory_info().rss
    llm.generate([prompt], large)
    grown = process.memory_info().rss - before
    cache_bytes = 2 * 4 * 65 * 8 * 316 * 32 * 4
    assert llm.runner.cache is None  # freed, not kept for the next request
    assert grown < cache_bytes / 4, f"RSS grew by {grown / 2**20:.0f} MiB after the request"
    llm.generate([prompt], small)  # the next request allocates what it needs
    assert llm.runner.cache is not None and llm.runner.cache.rows == 1

    llm.max_idle_cache_bytes = None  # the library default keeps the cache for reuse
    llm.generate([prompt], large)
    assert llm.runner.cache.rows == 65
