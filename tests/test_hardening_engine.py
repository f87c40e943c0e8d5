"""Regression tests for inputs that used to crash the engine: mask tokens in prompts, tiny temperatures."""

from __future__ import annotations

import math

import pytest
import torch

from lopa import LLM, DecodeConfig
from lopa.config import DECODERS
from lopa.decoding.confidence import Sampler, filtered_probs, predict
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
    out = llm.generate([[5, 6, 7]], _cfg("lopa"))[0]
    assert out.stats.forwards > 0 and llm.mask_id not in out.token_ids


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


@pytest.mark.parametrize("decoder", DECODERS)
def test_every_decoder_runs_at_a_tiny_temperature(llm: LLM, decoder: str) -> None:
    out = llm.generate("hello", _cfg(decoder, temperature=1e-40, confidence="neg_entropy"))[0]
    assert out.stats.tokens > 0
