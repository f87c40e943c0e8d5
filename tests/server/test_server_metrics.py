"""``GET /metrics``: scraped with prometheus_client's own parser after known traffic, the counters equal what the
responses' usage objects report, requests are counted by finish reason and by HTTP status, and two apps in one
process keep separate registries."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lopa import LLM, DecodeConfig
from lopa.server import create_app
from lopa.server.background import serve_in_background

DEFAULTS = DecodeConfig(block_size=8, max_new_tokens=16)


def _scrape(base_url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape, parsed by prometheus_client."""
    r = httpx.get(f"{base_url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture(scope="module")
def llm(tiny_ckpt) -> LLM:
    return LLM(tiny_ckpt)


def test_metrics_match_the_traffic(llm: LLM) -> None:
    with serve_in_background(create_app(llm, default_config=DEFAULTS)) as url:
        before = _scrape(url)
        assert before[("lopa:prompt_tokens_total", ())] == 0
        assert before[("lopa:num_requests_running", ())] == 0
        assert before[("lopa:num_requests_waiting", ())] == 0
        usages, reasons = [], []
        bodies = [
            {"prompt": "def add(a, b):", "max_tokens": 16},
            {"prompt": ["x = 1", "y = 2"], "max_tokens": 5},  # two sequences, cut by max_tokens
            {"prompt": "hello", "max_tokens": 8, "lopa": {"decoder": "lopa", "branches": 2}},
        ]
        for body in bodies:
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            usages.append(r.json()["usage"])
            reasons += [c["finish_reason"] for c in r.json()["choices"]]
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
        r = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=120)
        assert r.status_code == 200, r.text
        usages.append(r.json()["usage"])
        reasons.append(r.json()["choices"][0]["finish_reason"])
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "x", "temperature": -1}).status_code == 400
        assert httpx.get(f"{url}/no/such/route").status_code == 404

        m = _scrape(url)
        assert m[("lopa:prompt_tokens_total", ())] == sum(u["prompt_tokens"] for u in usages)
        assert m[("lopa:generation_tokens_total", ())] == sum(u["completion_tokens"] for u in usages)
        assert m[("lopa:forwards_total", ())] == sum(u["forwards"] for u in usages)
        n_seqs = len(reasons)  # 5: one per prompt
        assert m[("lopa:tokens_per_forward_count", ())] == n_seqs
        for reason in ("stop", "length"):
            assert m.get(("lopa:request_success_total", (("finished_reason", reason),)), 0) == reasons.count(reason)
        assert reasons.count("length") >= 2  # the max_tokens=5 cut
        assert m[("lopa:time_to_first_token_seconds_count", ())] == n_seqs  # every output has a token
        assert m[("lopa:time_per_iteration_seconds_count", ())] >= max(u["forwards"] for u in usages)
        assert m[("lopa:time_per_iteration_seconds_sum", ())] > 0

        def http(handler: str, status: str, method: str = "POST") -> float:
            key = ("lopa:http_requests_total", (("handler", handler), ("method", method), ("status", status)))
            return m.get(key, 0)

        assert http("/v1/completions", "200") == 3
        assert http("/v1/chat/completions", "200") == 1
        assert http("/v1/completions", "400") == 1
        assert http("other", "404", "GET") == 1
        assert http("/metrics", "200", "GET") == 1  # the first scrape (this one counts after it is sent)
        assert m[("lopa:num_requests_running", ())] == 0
        assert m[("lopa:kv_cache_usage_perc", ())] == 0.0  # every slot released

        # a second app in the same process starts from zero: registries are per app
        with serve_in_background(create_app(llm, default_config=DEFAULTS)) as url2:
            assert _scrape(url2)[("lopa:prompt_tokens_total", ())] == 0
        assert _scrape(url)[("lopa:prompt_tokens_total", ())] == m[("lopa:prompt_tokens_total", ())]


def test_kv_cache_usage_counts_held_slots() -> None:
    from types import SimpleNamespace

    from lopa.server.metrics import kv_cache_usage

    entries = [SimpleNamespace(slot=0), SimpleNamespace(slot=3), SimpleNamespace(slot=-1)]
    session = SimpleNamespace(scheduler=SimpleNamespace(running=entries, max_num_seqs=4))
    assert kv_cache_usage(session) == 0.5
    assert kv_cache_usage(SimpleNamespace()) == 0.0  # a session without a pool
