"""Request settings that used to be dropped or misread, the trace schema, headers and the API docs pages."""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient

from lopa import LLM, DecodeConfig
from lopa.errors import ConfigError
from lopa.server import create_app
from lopa.server.limits import ServerLimits

CFG = DecodeConfig(block_size=8, max_new_tokens=8)


@pytest.fixture(scope="module")
def llm(tiny_ckpt) -> LLM:
    return LLM(tiny_ckpt)


@pytest.fixture(scope="module")
def client(llm):
    with TestClient(create_app(llm, default_config=CFG, limits=ServerLimits(max_branches=8))) as c:
        yield c


def _complete(client: TestClient, **body: object) -> httpx.Response:
    return client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 8, **body})


@pytest.mark.parametrize(
    ("name", "bad", "good"),
    [("temperature", -1.0, 0.0), ("temperature", "hot", 0.0), ("top_p", 5.0, 1.0), ("seed", -3, 1), ("seed", 1.5, 1)],
)
def test_an_invalid_lopa_value_is_refused_even_when_the_openai_field_overrides_it(client, name, bad, good) -> None:
    r = _complete(client, **{name: good, "lopa": {name: bad}})
    assert r.status_code == 400, r.text
    assert f"lopa.{name}" in r.json()["error"]["message"]
    assert _complete(client, **{name: good, "lopa": {name: good}}).status_code == 200  # a valid pair still works


@pytest.mark.parametrize("name", ["temperature", "top_p", "threshold"])
def test_a_bool_is_not_a_number(client, name: str) -> None:
    r = _complete(client, lopa={name: True})
    assert r.status_code == 400, r.text
    assert name in r.json()["error"]["message"]
    with pytest.raises(ConfigError, match=name):
        DecodeConfig(**{name: True}).validate()


@pytest.mark.parametrize("decoder", ["vanilla", "threshold", "d2f", "lopa"])
def test_branches_over_the_limit_are_refused_for_every_decoder(client, decoder: str) -> None:
    for route, body in (("/v1/completions", {"prompt": "hi"}), ("/v1/trace", {"prompt": "hi"})):
        r = client.post(route, json={**body, "max_tokens": 8, "lopa": {"decoder": decoder, "branches": 9}})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "limit_exceeded" and "--max-branches" in r.json()["error"]["message"]
    assert _complete(client, lopa={"decoder": decoder, "branches": 8}).status_code == 200


def test_the_trace_schema_refuses_empty_messages_and_prompts(client) -> None:
    schema = client.get("/openapi.json").json()["components"]["schemas"]["TraceRequest"]["properties"]
    messages = next(s for s in schema["messages"]["anyOf"] if s.get("type") == "array")
    assert messages["minItems"] == 1
    prompt = [s for s in schema["prompt"]["anyOf"] if s.get("type") in ("string", "array")]
    assert {s["type"]: s.get("minLength", s.get("minItems")) for s in prompt} == {"string": 1, "array": 1}
    for body in ({"messages": []}, {"prompt": ""}, {"prompt": []}):
        assert client.post("/v1/trace", json=body).status_code == 400


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "hi"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/trace", {"prompt": "hi"}),
    ],
)
def test_every_route_takes_at_most_16_stop_strings(client, path: str, body: dict) -> None:
    r = client.post(path, json={**body, "max_tokens": 8, "stop": [f"s{i}" for i in range(17)]})
    assert r.status_code == 400 and "at most 16" in r.json()["error"]["message"], r.text
    with client.stream("POST", path, json={**body, "max_tokens": 8, "stop": [f"s{i}" for i in range(16)]}) as ok:
        assert ok.status_code == 200


def test_the_live_page_sends_csp_and_frame_options(client) -> None:
    for path in ("/", "/static/app.js", "/health", "/v1/models"):
        r = client.get(path)
        assert r.status_code == 200
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["x-content-type-options"] == "nosniff"
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp


def test_the_live_page_loads_nothing_from_elsewhere(client) -> None:
    page = client.get("/").text
    assert "http://" not in page and "https://" not in page and "<style" not in page and " style=" not in page
    assert "<script>" not in page  # scripts only by src, which the policy limits to 'self'


def test_api_docs_pages_are_off_by_default_and_can_be_turned_on(client, llm) -> None:
    for path in ("/docs", "/redoc"):
        assert client.get(path).status_code == 404
    assert client.get("/openapi.json").status_code == 200
    with TestClient(create_app(llm, default_config=CFG, api_docs=True)) as on:
        r = on.get("/docs")
        assert r.status_code == 200 and "cdn" in r.text
        assert "content-security-policy" not in r.headers  # their CDN scripts would be blocked
        assert on.get("/redoc").status_code == 200
