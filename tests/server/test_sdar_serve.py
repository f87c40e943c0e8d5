"""The server (completions, streaming, the trace route) and ``lopa generate`` run on a block-causal (SDAR) checkpoint
unchanged: the served defaults are the checkpoint's (its attention block), answers equal the engine's, and another
block size is a 400 that says why."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from lopa import LLM
from lopa.commands.main import main
from lopa.server import create_app
from lopa.server.background import serve_in_background
from tests.support.sdar_checks import sdar_checkpoint

PROMPT = "hello there"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sdar_checkpoint(tmp_path_factory.mktemp("sdar") / "sdar-tiny", 4)


@pytest.fixture(scope="module")
def llm(ckpt: Path) -> LLM:
    return LLM(ckpt)


@pytest.fixture(scope="module")
def base_url(ckpt: Path):
    with serve_in_background(create_app(LLM(ckpt))) as url:  # no default_config: the checkpoint's own
        yield url


def test_completions_stream_and_trace_equal_the_engine(base_url: str, llm: LLM) -> None:
    cfg = llm.decode_config(max_new_tokens=16)
    want = llm.generate(PROMPT, cfg, raw=True)[0]
    r = httpx.post(f"{base_url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 16}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == want.text
    assert body["usage"]["forwards"] == want.stats.forwards
    streamed = []
    with httpx.stream(
        "POST", f"{base_url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 16, "stream": True}, timeout=120
    ) as s:
        for line in s.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                streamed += [c["text"] for c in json.loads(line.removeprefix("data: "))["choices"]]
    assert "".join(streamed) == want.text
    events, data = [], []
    with httpx.stream("POST", f"{base_url}/v1/trace", json={"prompt": PROMPT, "lopa": {"max_new_tokens": 16}}) as t:
        assert t.status_code == 200
        for line in t.iter_lines():
            if line.startswith("event: "):
                events.append(line.removeprefix("event: "))
            elif line.startswith("data: "):
                data.append(json.loads(line.removeprefix("data: ")))
    assert events[0] == "start" and events[-1] == "done" and events.count("step") == want.stats.forwards
    tail = data[0]["prompt_tokens"] % 4  # the first block holds the prompt's tail: the live view draws it shorter
    assert (data[0]["block_size"], data[0]["first_block"], data[0]["positions"]) == (4, 4 - tail, 16 - tail)
    assert tail  # this prompt does end inside a block
    bad = httpx.post(f"{base_url}/v1/completions", json={"prompt": PROMPT, "lopa": {"block_size": 8}}, timeout=60)
    assert bad.status_code == 400 and "attention blocks of 4" in bad.text


def test_generate_cli_runs_on_the_checkpoint(ckpt: Path, llm: LLM, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", str(ckpt), "--raw", "--max-new-tokens", "16", "--json", PROMPT]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    want = llm.generate(PROMPT, llm.decode_config(max_new_tokens=16), raw=True)[0]
    assert out["text"] == want.text
