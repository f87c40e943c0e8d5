"""Property tests over random settings: no mask in any output, length bounds, determinism, tpf identity."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lopa.config import DecodeConfig
from lopa.engine.loop import decode, run
from lopa.engine.runner import Runner
from tests.support.engine_utils import END, EOS, MASK, CountingModel, answer, peaky_model, run_decode


@pytest.fixture(scope="module")
def model():
    return peaky_model(seed=2, layers=1)


configs = st.builds(
    lambda decoder, base, k, block, nblocks, tau, tau_add, tau_act, conf, temp, seed, order: DecodeConfig(
        decoder=decoder,
        base=base,
        branches=k,
        block_size=block,
        max_new_tokens=block * nblocks,
        threshold=tau,
        tau_add=tau_add,
        tau_act=tau_act,
        confidence=conf,
        temperature=temp,
        seed=seed,
        order=order,
    ),
    decoder=st.sampled_from(["vanilla", "threshold", "d2f", "lopa"]),
    base=st.sampled_from(["threshold", "d2f"]),
    k=st.integers(0, 5),
    block=st.integers(1, 8),
    nblocks=st.integers(1, 4),
    tau=st.floats(0.05, 1.0),
    tau_add=st.floats(0.05, 1.0),
    tau_act=st.floats(0.05, 1.0),
    conf=st.sampled_from(["maxprob", "margin", "neg_entropy"]),
    temp=st.sampled_from([0.0, 0.0, 0.7]),
    seed=st.integers(0, 1000),
    order=st.sampled_from(["maskgit_plus", "topk_margin", "entropy"]),
)


def received(generated: list[int]) -> tuple[list[int], bool]:
    """(what the user receives, whether it ended with the end token), read off the raw generated positions: the
    tokens before the first end token or still-masked position (vanilla may stop with positions left masked)."""
    for i, t in enumerate(generated):
        if t in (EOS, MASK):
            return generated[:i], t == EOS
    return generated, False


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=configs, prompt=st.lists(st.integers(0, 61), min_size=1, max_size=10))
def test_decoding_properties(model, cfg, prompt):
    counting = CountingModel(model)
    first = run(decode(Runner(counting), prompt, cfg.validate(), MASK, END))
    out, ended = received(answer(first))
    assert MASK not in out and EOS not in out
    if cfg.decoder != "vanilla":
        assert MASK not in answer(first)  # block decoders end with every position of every block decoded
    assert len(out) + ended <= cfg.max_new_tokens
    again = run_decode(model, prompt, cfg)
    assert answer(again) == answer(first) and again.stats.forwards == first.stats.forwards  # fixed seed: same run
    s = first.stats
    assert s.tokens == len(out) + ended  # tokens the user receives, the end token counting 1
    assert s.forwards == counting.calls >= 1  # model calls counted outside the engine
    assert s.forwards <= cfg.max_new_tokens  # every forward decodes at least one position
