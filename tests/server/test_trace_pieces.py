"""The trace's ``done`` event: its pieces cost work linear in the answer and are computed off the event loop.

The pieces used to come from decoding every answer prefix on the event loop (quadratic: 8,000 tokens stalled
``/health`` and every other stream for 7 s). The windowed rule must give the same pieces as the prefix rule.
"""

from __future__ import annotations

import json
import random
import threading

import httpx
import pytest

from lopa import LLM, DecodeConfig
from lopa.server import create_app
from lopa.server.background import serve_in_background
from lopa.server.trace import StepConverter, prefix_pieces, windowed_pieces

TEXTS = ["plain ascii words", "héllo wörld, naïve café", "日本語のテキスト", "emoji 😀🎉 and ∑ math ≠", "a\n\tb  c"]


@pytest.fixture(scope="module")
def llm(tiny_ckpt) -> LLM:
    return LLM(tiny_ckpt)


def test_windowed_pieces_equal_the_prefix_rule_on_text(llm) -> None:
    decode = llm.tokenizer.decode
    for text in TEXTS:
        ids = llm.tokenizer.encode(text)
        pieces = windowed_pieces(decode, ids)
        assert pieces == prefix_pieces(decode, ids), text
        assert "".join(pieces) == decode(ids) == text


def test_windowed_pieces_equal_the_prefix_rule_on_random_ids(llm) -> None:
    """Random ids split characters anywhere (byte-level tokens), the case the U+FFFD handling is for."""
    decode, rng = llm.tokenizer.decode, random.Random(0)
    special = set(llm.end_ids) | {llm.mask_id}
    vocab = [i for i in range(llm.tokenizer.vocab_size) if i not in special]
    for _ in range(200):
        ids = [rng.choice(vocab) for _ in range(rng.randint(1, 40))]
        pieces = windowed_pieces(decode, ids)
        assert pieces == prefix_pieces(decode, ids), ids
        assert "".join(pieces) == decode(ids)


def test_pieces_decode_a_number_of_tokens_linear_in_the_answer(llm) -> None:
    n = 4000
    ids = llm.tokenizer.encode(("héllo wörld 😀 " * n)[: 3 * n])[:n]
    decoded: list[int] = []

    def counting_decode(token_ids, skip_special_tokens=True):
        decoded.append(len(token_ids))
        return llm.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    convert = StepConverter(llm, prompt_len=0)
    convert._decode = counting_decode
    convert.tokens = dict(enumerate(ids))
    pieces = convert.pieces()
    assert "".join(pieces) == llm.tokenizer.decode(ids) and len(pieces) == len(ids)
    assert sum(decoded) < 10 * len(ids), f"{sum(decoded)} tokens decoded for {len(ids)} positions"  # was ~n²/2


def test_the_done_event_decodes_nothing_long_on_the_event_loop(tiny_ckpt) -> None:
    llm = LLM(tiny_ckpt)
    calls: list[tuple[str, int]] = []
    decode = llm.tokenizer.decode

    def recording_decode(token_ids, skip_special_tokens=True):
        calls.append((threading.current_thread().name, len(token_ids)))
        return decode(token_ids, skip_special_tokens=skip_special_tokens)

    llm.tokenizer.decode = recording_decode
    cfg = DecodeConfig(decoder="threshold", block_size=32, max_new_tokens=64, threshold=0.05)
    with serve_in_background(create_app(llm, default_config=cfg)) as url:  # its event loop runs in 'lopa-http'
        events = []
        with httpx.stream("POST", f"{url}/v1/trace", json={"prompt": "def add(a, b):"}, timeout=120) as r:
            assert r.status_code == 200
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    done = events[-1]
    assert "pieces" in done and "".join(done["pieces"]) == done["text"]
    long_on_loop = [n for thread, n in calls if thread == "lopa-http" and n > 1]
    assert long_on_loop == [], f"multi-token decodes on the event loop: {long_on_loop[:10]}"
    assert any(thread != "lopa-http" and n > 1 for thread, n in calls)  # the pieces were decoded elsewhere
