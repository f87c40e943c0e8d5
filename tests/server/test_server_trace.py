"""The trace stream ``POST /v1/trace`` and the static page, on a real uvicorn server with the tiny random checkpoint.

The stream is checked against the OpenAI routes of the same server and against a second engine: as many step
events as the completion's ``forwards``, each position filled once, the filled tokens spell the answer, the
pieces join to the completion's text; errors are 4xx JSON answers before the stream starts.
"""

from __future__ import annotations

import json

import httpx
import pytest

from lopa import LLM, DecodeConfig
from lopa.server import create_app
from lopa.server.background import serve_in_background

DEFAULTS = DecodeConfig(block_size=8, max_new_tokens=16)
PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def reference(tiny_ckpt) -> LLM:
    return LLM(tiny_ckpt)


@pytest.fixture(scope="module")
def base_url(tiny_ckpt):
    with serve_in_background(create_app(LLM(tiny_ckpt), default_config=DEFAULTS)) as url:
        yield url


def trace(base_url: str, body: dict) -> list[tuple[str, dict]]:
    """The named events of one trace stream, in order."""
    events = []
    with httpx.stream("POST", f"{base_url}/v1/trace", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    return events


@pytest.mark.parametrize(
    "lopa",
    [
        {"decoder": "lopa", "base": "threshold", "branches": 3},
        {"decoder": "lopa", "base": "d2f", "branches": 2, "block_size": 4, "threshold": 0.2},
        {"decoder": "d2f"},
        {"decoder": "vanilla", "max_new_tokens": 10},
    ],
    ids=lambda d: "-".join(str(v) for v in d.values()),
)
def test_trace_stream_agrees_with_the_completions_api(base_url: str, reference: LLM, lopa: dict) -> None:
    events = trace(base_url, {"prompt": PROMPT, "lopa": lopa})
    names = [n for n, _ in events]
    assert names[0] == "start" and names[-1] == "done" and set(names[1:-1]) == {"step"}
    start, steps, done = events[0][1], [d for n, d in events if n == "step"], events[-1][1]
    api = httpx.post(f"{base_url}/v1/completions", json={"prompt": PROMPT, "lopa": lopa}, timeout=120).json()
    cfg = DEFAULTS.replace(**lopa)
    want = reference.generate(PROMPT, cfg, raw=True)[0]

    assert start["prompt_tokens"] == api["usage"]["prompt_tokens"] == len(want.prompt_token_ids)
    assert start["positions"] == cfg.max_new_tokens and start["settings"]["decoder"] == cfg.decoder
    assert len(steps) == api["usage"]["forwards"] == want.stats.forwards
    assert [s["forward"] for s in steps] == list(range(1, len(steps) + 1))
    assert done["text"] == api["choices"][0]["text"] == want.text
    assert done["usage"] == api["usage"] and done["finish_reason"] == api["choices"][0]["finish_reason"]
    assert "".join(done["pieces"]) == want.text and len(done["pieces"]) == len(want.token_ids)

    tokens: dict[int, int] = {}
    for s in steps:
        assert 0 <= s["winner"] < len(s["candidates"])
        winner = s["candidates"][s["winner"]]
        looked = [f for f in s["filled"] if f["lookahead"]]
        assert looked == ([] if winner["kind"] == "anchor" else [looked[0]])
        if looked:
            assert (looked[0]["position"], looked[0]["token"]) == (winner["position"], winner["token"])
        for f in s["filled"]:
            assert f["position"] not in tokens and 0 <= f["position"] < start["positions"]
            tokens[f["position"]] = f["token"]
            assert f["end"] == (f["token"] in reference.end_ids)
    assert [tokens[p] for p in range(len(want.token_ids))] == want.token_ids
    # the same steps as the engine's own trace
    engine = reference.generate(PROMPT, cfg.replace(trace=True), raw=True)[0].trace
    assert [s["winner"] for s in steps] == [t.winner for t in engine]
    assert [[c["score"] for c in s["candidates"]] for s in steps] == [
        [round(c["score"], 6) for c in t.candidates] for t in engine
    ]


def test_lookahead_steps_appear_in_the_stream(base_url: str) -> None:
    events = trace(base_url, {"prompt": PROMPT, "lopa": {"decoder": "lopa", "base": "threshold", "branches": 3}})
    steps = [d for n, d in events if n == "step"]
    assert any(f["lookahead"] for s in steps for f in s["filled"]), "precondition: lookahead wins on this prompt"
    assert max(len(s["candidates"]) for s in steps) == 4


def test_chat_messages_use_the_template(base_url: str) -> None:
    messages = [{"role": "user", "content": "hello"}]
    events = trace(base_url, {"messages": messages, "max_tokens": 8})
    chat = httpx.post(f"{base_url}/v1/chat/completions", json={"messages": messages, "max_tokens": 8}, timeout=120)
    assert events[0][1]["chat"] is True
    assert events[-1][1]["text"] == chat.json()["choices"][0]["message"]["content"]
    assert sum(n == "step" for n, _ in events) == chat.json()["usage"]["forwards"]


@pytest.mark.parametrize(
    "body,status,words",
    [
        ({"prompt": PROMPT, "lopa": {"block_size": 5}}, 400, "multiple of block_size"),
        ({"prompt": PROMPT, "lopa": {"decoder": "fast"}}, 400, "decoder must be one of"),
        ({"prompt": PROMPT, "lopa": {"branches": "four"}}, 400, "branches"),
        ({"prompt": PROMPT, "messages": [{"role": "user", "content": "x"}]}, 400, "exactly one of"),
        ({"lopa": {}}, 400, "exactly one of"),
        ({"prompt": ""}, 400, "must not be empty"),
        ({"prompt": PROMPT, "stream": True}, 400, "unknown field"),
        ({"prompt": PROMPT, "model": "gpt-4"}, 404, "does not exist"),
        ({"prompt": "x " * 3000}, 400, "exceeds the model's context"),
    ],
)
def test_bad_requests_get_a_4xx_before_the_stream(base_url: str, body: dict, status: int, words: str) -> None:
    r = httpx.post(f"{base_url}/v1/trace", json=body, timeout=60)
    assert r.status_code == status
    assert r.headers["content-type"].startswith("application/json")
    assert words in r.json()["error"]["message"]


def test_completions_point_to_the_trace_route(base_url: str) -> None:
    r = httpx.post(f"{base_url}/v1/completions", json={"prompt": PROMPT, "lopa": {"trace": True}}, timeout=60)
    assert r.status_code == 400 and "/v1/trace" in r.json()["error"]["message"]


def test_page_and_static_files_are_served(base_url: str) -> None:
    page = httpx.get(f"{base_url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/app.js">' in page.text and "http" not in page.text.replace("http-equiv", "")
    for name, kind in (("app.js", "javascript"), ("stream.js", "javascript"), ("style.css", "text/css")):
        r = httpx.get(f"{base_url}/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"] and len(r.text) > 1000
        assert "http://" not in r.text and "https://" not in r.text  # nothing fetched from elsewhere
    assert httpx.get(f"{base_url}/static/nope.js").status_code == 404
    settings = httpx.get(f"{base_url}/v1/trace/settings").json()
    assert settings["defaults"]["block_size"] == DEFAULTS.block_size and settings["chat_template"] is True
    assert settings["choices"]["decoder"] == ["vanilla", "threshold", "d2f", "lopa"]
