"""Regression tests for inputs that used to crash the engine: mask tokens in prompts, tiny temperatures."""

from __future__ import annotations

import math

import pytest
import torch

from lopa import LLM, DecodeConfig
from lopa.config import DECODERS
from lopa.decoding.confidence import Sampler, filtered_probs, predict
from lopa.engine.loop import decode, run
from lopa.engine.runner import Runner
from lopa.engine.sequence import answer_ids
from lopa.errors import ConfigError, MaskTokenInPromptError


@pytest.fixture(scope="module")
def llm(tiny_ckpt) -> LLM:
    return LLM(tiny_ckpt)


def _cfg(decoder: str, **kw) -> DecodeConfig:
    return DecodeConfig(decoder=decoder, block_size=8, max_new_tokens=16, branches=2, **kw)


@pytest.mark.parametrize("decoder", DECODERS)
def test_every_decoder_refuses_a_mask_token_in_the_prompt(llm: LLM, decoder: str) -> None:
    m = llm.mask_id
    for prompt in ([m, 5, 6], [5, m, 6], [5, 6, m]):
        with pytest.raises(MaskTokenInPromptError, match="mask token") as e:
            llm.generate([prompt], _cfg(decoder))
        assert isinstance(e.value, ConfigError)  # the server answers 400
    with pytest.raises(MaskTokenInPromptError):
        llm.generate("<|mask|>Q: 1 + 1? A:", _cfg(decoder), raw=True)
    with pytest.raises(MaskTokenInPromptError):
        llm.chat([{"role": "user", "content": "a <|mask|> b"}], _cfg(decoder))
    with pytest.raises(MaskTokenInPromptError):
        next(iter(llm.stream([m, 1], _cfg(decoder))))


def test_a_prompt_without_the_mask_token_still_decodes(llm: LLM) -> None:
    """The ids either side of the mask id are ordinary prompt tokens: the output is the engine's own decode of them,
    run below the facade that refuses the mask token."""
    m = llm.mask_id
    ids = [t for t in (m - 1, 5, m + 1) if 0 <= t < llm.config.vocab_size]
    cfg = _cfg("lopa")
    out = llm.generate([ids], cfg)[0]
    want = run(decode(Runner(llm.model), ids, cfg.validate(), m, llm.end_ids))
    assert out.prompt_token_ids == ids
    assert out.token_ids == answer_ids(want.state, llm.end_ids)[0] and out.stats.forwards == want.stats.forwards


@pytest.mark.parametrize("temperature", [1e-7, 1e-40, 1e-300, 5e-324])
def test_tiny_temperatures_are_numerically_safe(temperature: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 10  # (m, vocab)
    s = Sampler(mask_id=3, temperature=temperature, top_p=0.9, top_k=5)
    probs = filtered_probs(logits, s)  # (m, vocab)
    assert torch.isfinite(probs).all()
    assert torch.allclose(probs.sum(-1), torch.ones(6))
    masked = logits.clone()
    masked[:, 3] = -math.inf
    assert torch.equal(probs.argmax(-1), masked.argmax(-1))  # the limit T -> 0 is greedy
    pred = predict(logits, torch.arange(6), s, torch.Generator().manual_seed(1))
    assert torch.equal(pred.tokens, masked.argmax(-1)) and torch.isfinite(pred.conf).all()


def _greedy(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Argmax token per position of ``ids`` from one plain full forward (Dream's shift: output i−1 predicts i),
    the mask token excluded; entry i is the prediction for position i (entry 0 is unused)."""
    with torch.no_grad():
        logits = llm.model(torch.tensor([ids]), torch.arange(len(ids))[None])[0]  # (L, vocab)
    logits[:, llm.mask_id] = -math.inf
    return torch.cat([torch.tensor([-1]), logits[:-1].argmax(-1)])


@pytest.mark.parametrize("decoder", DECODERS)
def test_every_decoder_runs_at_a_tiny_temperature(llm: LLM, decoder: str) -> None:
    """At T → 0 sampling is greedy and every chosen token has p = 1. So the seed does not matter; a block decoder
    fills a whole block per forward (p = 1 > τ everywhere): 2 forwards for 16 positions in blocks of 8, the first block
    being the argmax of one plain forward over prompt + 8 masks; vanilla's ties (all p = 1) go to the lower position,
    so it fills left to right, each token the argmax of a plain forward over what is decoded so far."""
    runs = [
        llm.generate("hello", _cfg(decoder, temperature=1e-40, confidence="neg_entropy", seed=s))[0] for s in (0, 9)
    ]
    out = runs[0]
    assert out.token_ids == runs[1].token_ids and out.token_ids
    prompt, m = out.prompt_token_ids, llm.mask_id
    p = len(prompt)
    if decoder == "vanilla":
        ids, want = prompt + [m] * 16, []
        for i in range(len(out.token_ids)):
            ids[p + i] = int(_greedy(llm, ids)[p + i])
            want.append(ids[p + i])
        assert out.token_ids == want and out.stats.forwards == len(want)
    else:
        assert out.stats.forwards == 2
        assert out.token_ids[:8] == _greedy(llm, prompt + [m] * 8)[p:].tolist()
