"""Continuous batching in the server's engine worker, with a real engine on the tiny random checkpoint: a pool of
2 slots serves 8 requests correctly and in order of admission, a too-long prompt fails alone (400) while the
others finish, and a cancelled stream frees its KV slot."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI

from lopa import LLM, DecodeConfig
from lopa.server import create_app
from lopa.server.background import serve_in_background
from lopa.server.jobs import Closed, Finished, Job, Started
from lopa.server.worker import EngineWorker

CFG = DecodeConfig(decoder="lopa", base="d2f", branches=2, block_size=8, max_new_tokens=16)


@pytest.fixture(scope="module")
def reference(tiny_ckpt) -> LLM:
    return LLM(tiny_ckpt, max_num_seqs=1)


def test_tiny_pool_serves_every_request_in_admission_order(tiny_ckpt, reference) -> None:
    llm = LLM(tiny_ckpt, max_num_seqs=2)
    prompts = [f"request number {i}" + " pad" * (i % 3) for i in range(8)]
    configs = [CFG if i % 2 else CFG.replace(decoder="threshold", max_new_tokens=24) for i in range(8)]

    async def serve() -> tuple[list[list[object]], list[str], int]:
        loop = asyncio.get_running_loop()
        worker = EngineWorker(llm, queue_limit=16)
        worker.start()
        session, admitted, widest = worker._session, [], [0]
        add, step = session.add, session.step

        def recording_add(prompt, config=None, raw=False):
            admitted.append(prompt)
            return add(prompt, config, raw)

        def recording_step():
            out = step()
            widest[0] = max(widest[0], len(out))
            return out

        session.add, session.step = recording_add, recording_step
        jobs = [Job([p], c, False, None, False, loop) for p, c in zip(prompts, configs, strict=True)]
        for job in jobs:
            worker.submit(job)
        items = []
        for job in jobs:
            got = []
            while not isinstance(item := await job.events.get(), Closed):
                got.append(item)
            items.append(got)
        await asyncio.to_thread(worker.stop)
        return items, admitted, widest[0]

    items, admitted, widest = asyncio.run(serve())
    assert admitted == prompts  # admitted in order of arrival
    assert widest == 2  # never more sequences in one iteration than slots
    for prompt, cfg, got in zip(prompts, configs, items, strict=True):
        assert isinstance(got[0], Started) and isinstance(got[-1], Finished)
        ref = reference.generate(prompt, cfg)[0]
        assert got[-1].text == ref.text and got[-1].usage["forwards"] == ref.stats.forwards
    assert llm.scheduler.runner.pool.free_slots == 2


@pytest.fixture(scope="module")
def small_server(tiny_ckpt):
    llm = LLM(tiny_ckpt, max_num_seqs=2, max_model_len=96)
    with serve_in_background(create_app(llm, default_config=CFG)) as url:
        yield llm, url


def test_too_long_prompt_fails_alone(small_server, tiny_ckpt, reference) -> None:
    _, url = small_server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)

    def ask(prompt: str) -> tuple[int, str]:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 16}, timeout=60)
        return r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text

    prompts = ["short one", "x" * 200, "short two", "short three"]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(ask, prompts))
    assert results[1][0] == 400 and "max_new_tokens" in results[1][1]
    for i in (0, 2, 3):
        assert results[i] == (200, reference.generate(prompts[i], CFG, raw=True)[0].text)
    assert client.models.list().data[0].max_model_len == 96


def test_cancelled_stream_frees_its_slot(small_server, tiny_ckpt) -> None:
    llm, url = small_server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    lopa = {"decoder": "vanilla"}
    stream = client.completions.create(
        model=tiny_ckpt.name, prompt="go", max_tokens=80, stream=True, extra_body={"lopa": lopa}
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            break
    stream.close()
    r = client.completions.create(model=tiny_ckpt.name, prompt="x = 1", max_tokens=8)
    assert r.choices[0].finish_reason in ("stop", "length")
    health = httpx.get(f"{url}/health").json()
    assert health["running"] == 0 and health["cancelled"] >= 1
    scheduler = llm.scheduler
    assert not scheduler.running and not scheduler.waiting
    assert scheduler.runner.pool.free_slots == 2
