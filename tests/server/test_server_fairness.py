"""One request cannot monopolise the engine: prompts per request are capped, the queue limit and the KV budget
are charged per prompt, admission takes turns between requests one prompt at a time, and one large request does
not leave the cache inflated for the next."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from lopa import LLM, DecodeConfig
from lopa.errors import LimitExceededError
from lopa.server import create_app
from lopa.server.jobs import Closed, Finished, Job, QueueFullError, Started
from lopa.server.limits import ServerLimits, check_request
from lopa.server.worker import EngineWorker

CFG = DecodeConfig(decoder="threshold", block_size=8, max_new_tokens=8)


@pytest.fixture(scope="module")
def llm(tiny_ckpt) -> LLM:
    return LLM(tiny_ckpt, max_num_seqs=1)  # one sequence at a time: every admission is a turn


class RecordingWorker(EngineWorker):
    """Records the order in which prompts enter the engine."""

    def _open_session(self):
        session = super()._open_session()
        self.admitted: list[str] = []
        add = session.add

        def recording_add(prompt, config=None, raw=False):
            self.admitted.append(prompt)
            return add(prompt, config, raw=raw)

        session.add = recording_add
        return session


async def _drain(job: Job, finished: list[str]) -> None:
    while not isinstance(item := await job.events.get(), Closed):
        if isinstance(item, Finished):
            finished.append(f"{job.prompts[item.index]}")


def test_a_one_prompt_request_behind_a_many_prompt_request_gets_the_next_turn(llm) -> None:
    worker = RecordingWorker(llm, queue_limit=64)

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        big = Job([f"big {i}" for i in range(8)], CFG, True, None, False, loop)
        small = Job(["small"], CFG, True, None, False, loop)
        worker.start()
        worker.submit(big)
        assert isinstance(await big.events.get(), Started)  # the big request's first prompt is decoding
        worker.submit(small)
        finished: list[str] = []
        await asyncio.gather(_drain(big, finished), _drain(small, finished))
        await asyncio.to_thread(worker.stop)
        return finished

    finished = asyncio.run(main())
    # FIFO by request admitted all 8 big prompts first (small was 9th); by turns it waits for at most one more
    assert worker.admitted.index("small") <= 2, worker.admitted
    assert finished.index("small") <= 2, finished
    assert sorted(finished) == sorted([f"big {i}" for i in range(8)] + ["small"])
    assert worker.waiting == 0 and worker.running == 0 and worker.completed == 2


def test_the_queue_limit_counts_prompts(llm) -> None:
    loop = asyncio.new_event_loop()
    try:
        worker = EngineWorker(llm, queue_limit=4)  # not started: everything submitted waits
        worker.submit(Job(["a", "b"], CFG, True, None, False, loop))
        assert worker.waiting == 2
        with pytest.raises(QueueFullError):
            worker.submit(Job(["c", "d", "e"], CFG, True, None, False, loop))  # 2 + 3 prompts > 4
        worker.submit(Job(["c", "d"], CFG, True, None, False, loop))
        assert worker.waiting == 4
        with pytest.raises(LimitExceededError, match="--queue-limit"):  # could never fit: a 400, not a 503
            EngineWorker(llm, queue_limit=4).submit(Job(list("abcde"), CFG, True, None, False, loop))
    finally:
        loop.close()


@pytest.fixture(scope="module")
def client(llm):
    limits = ServerLimits(max_branches=8, max_kv_cache_mb=1, max_prompts_per_request=32)
    with TestClient(create_app(llm, default_config=CFG, limits=limits)) as c:
        yield c


def test_prompts_per_request_are_capped_before_tokenizing(client) -> None:
    r = client.post("/v1/completions", json={"prompt": ["hi"] * 33, "max_tokens": 8})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "limit_exceeded" and "--max-prompts-per-request" in error["message"]
    many = client.post("/v1/completions", json={"prompt": [[5]] * 170_000, "max_tokens": 8})  # ~1 MiB of JSON
    assert many.status_code in (400, 413), many.text
    assert client.post("/v1/completions", json={"prompt": ["hi"] * 2, "max_tokens": 8}).status_code == 200


def test_the_kv_budget_is_charged_per_prompt(client, llm) -> None:
    lopa = {"decoder": "lopa", "branches": 8, "block_size": 8}
    prompt = [5, 6, 7, 8]
    one = llm.kv_cache_bytes(9, len(prompt) + 64)  # 9 rows: the anchor and 8 branches
    fits = (1 << 20) // one
    assert fits >= 2  # one prompt is well within the 1 MiB budget ...
    config = DecodeConfig(decoder="lopa", branches=8, block_size=8, max_new_tokens=64)
    limits = ServerLimits(max_branches=8, max_kv_cache_mb=1)
    check_request(config, [len(prompt)] * fits, llm, limits)
    with pytest.raises(LimitExceededError, match=f"{fits + 1} prompts"):  # ... fits + 1 of them are not
        check_request(config, [len(prompt)] * (fits + 1), llm, limits)
    body = {"max_tokens": 64, "lopa": lopa}
    assert client.post("/v1/completions", json={**body, "prompt": [prompt]}).status_code == 200
    r = client.post("/v1/completions", json={**body, "prompt": [prompt] * (fits + 1)})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "limit_exceeded" and "--max-kv-cache-mb" in r.json()["error"]["message"]


def test_a_too_long_prompt_anywhere_in_the_request_fails_it_before_any_prompt_runs(client, llm) -> None:
    long = [5] * (llm.max_context - 4)
    r = client.post("/v1/completions", json={"prompt": [[5, 6], [7, 8], long], "max_tokens": 8})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded" and "prompt 2 " in r.json()["error"]["message"]
    assert client.get("/health").json()["failed"] == 0  # refused before it was queued


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
