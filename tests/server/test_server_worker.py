"""Queueing and cancellation of the server's engine worker, with a scripted engine whose timing the test controls:
an endless stream (only cancellation can end it) and a stream that waits on a gate (fills the queue). Also the
max_tokens cut applied to streamed and finished output, and the `lopa serve` command line."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lopa import DecodeConfig
from lopa.commands.main import main
from lopa.config import EngineConfig
from lopa.engine.output import Completion, Stats, StreamEvent
from lopa.engine.session import IteratorSession
from lopa.server import create_app
from lopa.server.background import serve_in_background
from lopa.server.output_cut import OutputCutter


class CharTokenizer:
    """One token per character."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


class ScriptedLLM:
    """Streams 'abc...' one character per event. Prompt 'forever' never ends; 'wait' blocks on ``gate``."""

    model_name = "scripted"
    max_context = 4096
    can_batch = False  # one sequence at a time, round-robin (the Engine protocol's open_session below)
    engine_config = EngineConfig()

    def __init__(self) -> None:
        self.tokenizer = CharTokenizer()
        self.gate = threading.Event()
        self.closed = 0  # streams whose generator was closed (finished or cancelled)
        self.events = 0

    def count_prompt_tokens(self, prompt, raw: bool = False) -> int:
        return len(prompt)

    def kv_cache_bytes(self, rows: int, positions: int) -> int:
        return 0

    def open_session(self) -> IteratorSession:
        return IteratorSession(self.stream, max_active=1)

    def stream(self, prompt, config: DecodeConfig | None = None, raw: bool = False):
        cfg = (config or DecodeConfig()).validate()
        n = None if prompt == "forever" else cfg.max_new_tokens
        ids: list[int] = []
        try:
            while n is None or len(ids) < n:
                if prompt == "boom" and len(ids) == 2:
                    raise RuntimeError("engine bug")
                if prompt == "wait":
                    self.gate.wait()
                time.sleep(0.002)
                self.events += 1
                ids.append(ord("a") + len(ids) % 26)
                yield StreamEvent(chr(ids[-1]), ids[-1:], None)
            text = self.tokenizer.decode(ids)
            stats = Stats(forwards=len(ids), tokens=len(ids), iterations=len(ids), prompt_tokens=len(prompt))
            yield StreamEvent("", [], Completion(text, ids, "length", stats, self.tokenizer.encode(prompt)))
        finally:
            self.closed += 1


@pytest.fixture
def served():
    llm = ScriptedLLM()
    app = create_app(llm, default_config=DecodeConfig(decoder="vanilla", max_new_tokens=8), queue_limit=2)
    with serve_in_background(app) as url:
        yield llm, url
    llm.gate.set()


def _health(url: str) -> dict:
    return httpx.get(f"{url}/health").json()


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_closing_an_endless_stream_frees_the_worker(served) -> None:
    llm, url = served
    body = {"prompt": "forever", "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: ")).startswith('data: {"id"')
    _wait_for(lambda: llm.closed == 1)  # the engine's iterator was closed, so generation stopped
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "short"}, timeout=10)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "abcdefgh"
    assert _health(url)["cancelled"] == 1


def test_a_client_that_gives_up_cancels_a_non_streaming_request(served) -> None:
    llm, url = served
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json={"prompt": "forever"}, timeout=0.5)
    _wait_for(lambda: llm.closed == 1)
    events = llm.events
    time.sleep(0.1)
    assert llm.events == events  # nothing runs any more
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "short"}, timeout=10).status_code == 200


class ScriptedTraceLLM(ScriptedLLM):
    """The scripted engine with what ``POST /v1/trace`` asks of an LLM; records the prompts it starts."""

    end_ids = frozenset()

    def __init__(self) -> None:
        super().__init__()
        self.tokenizer.has_chat_template = False
        self.started: list[str] = []

    def encode_prompt(self, prompt, raw: bool = False) -> list[int]:
        return self.tokenizer.encode(prompt)

    def check_fits(self, ids: list[int], config: DecodeConfig) -> None:
        pass

    def stream(self, prompt, config: DecodeConfig | None = None, raw: bool = False):
        self.started.append(prompt)
        return super().stream(prompt, config, raw)


def test_a_trace_client_that_gives_up_while_queued_cancels_its_job() -> None:
    llm = ScriptedTraceLLM()
    app = create_app(llm, default_config=DecodeConfig(decoder="vanilla", max_new_tokens=8), queue_limit=2)
    with serve_in_background(app) as url, ThreadPoolExecutor(1) as pool:
        busy = pool.submit(httpx.post, f"{url}/v1/completions", json={"prompt": "wait"}, timeout=10)
        _wait_for(lambda: _health(url)["running"] == 1)  # the engine is held by 'wait'; the trace job queues
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/trace", json={"prompt": "forever"}, timeout=0.5)
        llm.gate.set()
        assert busy.result().status_code == 200
        _wait_for(lambda: _health(url)["cancelled"] == 1)
        assert llm.started == ["wait"]  # the trace job was dropped before the engine started it
    llm.gate.set()


def test_an_engine_failure_mid_stream_ends_the_stream_with_an_error_event(served) -> None:
    _, url = served
    with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "boom", "stream": True}, timeout=10) as r:
        assert r.status_code == 200  # the failure came after the stream started
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and "RuntimeError" in error["message"]
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "boom"}, timeout=10)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "short"}, timeout=10).status_code == 200


def test_full_queue_answers_503_with_retry_after(served) -> None:
    llm, url = served

    def ask(_: int) -> httpx.Response:
        return httpx.post(f"{url}/v1/completions", json={"prompt": "wait"}, timeout=30)

    with ThreadPoolExecutor(3) as pool:
        # one runs (blocked on the gate), then two wait: sent together, the third could find the first still queued
        futures = [pool.submit(ask, 0)]
        _wait_for(lambda: _health(url)["running"] == 1)
        futures += [pool.submit(ask, i) for i in (1, 2)]
        _wait_for(lambda: _health(url)["running"] == 1 and _health(url)["waiting"] == 2)
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "short"}, timeout=10)
        assert refused.status_code == 503
        assert int(refused.headers["retry-after"]) >= 1
        assert "retry" in refused.json()["error"]["message"]
        llm.gate.set()
        assert [f.result().status_code for f in futures] == [200, 200, 200]
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "short"}, timeout=10).status_code == 200


def test_event_loop_stays_responsive_during_generation(served) -> None:
    llm, url = served
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, f"{url}/v1/completions", json={"prompt": "wait"}, timeout=30)
        _wait_for(lambda: _health(url)["running"] == 1)
        # the generation stays blocked on the gate until set below: a loop busy with it could answer nothing
        # before then, so the timeout is only a hang guard
        assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 200
        assert _health(url)["running"] == 1 and not pending.done() and not llm.gate.is_set()
        llm.gate.set()
        assert pending.result().status_code == 200


@pytest.mark.parametrize("max_tokens", [None, 3, 5, 8])
def test_cut_stream_and_finished_text_agree(max_tokens: int | None) -> None:
    tok = CharTokenizer()
    events = [("ab", [97, 98]), ("", [99]), ("cde", [100, 101]), ("", [])]  # text can lag behind ids
    cutter = OutputCutter(tok, max_tokens)
    streamed = "".join(cutter.feed(text, ids) for text, ids in events)
    completion = Completion("abcde", [97, 98, 99, 100, 101], "stop", Stats())
    text, reason, n = cutter.finish(completion)
    expected = "abcde"[:max_tokens] if max_tokens else "abcde"
    assert streamed == text == expected
    assert reason == ("length" if max_tokens and max_tokens < 5 else "stop")
    assert n == min(5, max_tokens or 5)


def test_serve_command_line(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--port", "--queue-limit", "--max-body-bytes", "--decoder", "--branches"):
        assert flag in out
    assert main(["serve", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
