"""The Dream forward equals transformers' Qwen2ForCausalLM run bidirectionally on the same random weights."""

from __future__ import annotations

import pytest
import torch

from lopa.model.config import ModelConfig
from lopa.model.families import family_named, predicting_index
from lopa.model.layers import rope_inv_freq
from lopa.testing import random_model, transformers_bidirectional_logits, transformers_twin

pytest.importorskip("transformers")

TOL = 1e-4


def _config(**kw) -> ModelConfig:
    base = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
    )
    return family_named("dream").make_config(**{**base, **kw})


CONFIGS = {
    "gqa-untied": _config(rope_theta=10000.0),
    "mha-tied": _config(num_key_value_heads=4, tie_word_embeddings=True, rope_theta=1_000_000.0),
    "gqa4-untied-wide-head": _config(
        hidden_size=48, num_attention_heads=4, num_key_value_heads=1, head_dim=24, rope_theta=500_000.0
    ),
    "mqa-tied-3layers": _config(num_hidden_layers=3, num_key_value_heads=1, tie_word_embeddings=True, rope_theta=1e4),
}
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
}


def _compare(cfg: ModelConfig, seed: int, length: int, start: int = 0) -> float:
    model = random_model(cfg, seed)
    hf = transformers_twin(model)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (1, length), generator=gen)  # (1, L)
    positions = torch.arange(start, start + length)[None]  # (1, L)
    with torch.no_grad():
        ours = model(ids, positions)  # (1, L, vocab)
    if start:
        with torch.no_grad():
            theirs = hf(input_ids=ids, position_ids=positions, attention_mask=torch.zeros(1, 1, length, length)).logits
    else:
        theirs = transformers_bidirectional_logits(hf, ids)
    assert ours.shape == theirs.shape == (1, length, cfg.vocab_size)
    assert ours.std() > 0.3  # the comparison is only meaningful when logits are far from constant
    return (ours - theirs).abs().max().item()  # raw outputs, index for index: the shift is the runner's business


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_matches_transformers_bidirectional(name: str) -> None:
    assert _compare(CONFIGS[name], seed=sorted(CONFIGS).index(name), length=37) <= TOL


def test_forward_matches_transformers_at_offset_positions() -> None:
    assert _compare(CONFIGS["gqa-untied"], seed=3, length=16, start=123) <= TOL


def test_causal_twin_differs_so_the_comparison_has_teeth() -> None:
    cfg = CONFIGS["gqa-untied"]
    model = random_model(cfg, 0)
    hf = transformers_twin(model)
    ids = torch.randint(0, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        causal = hf(input_ids=ids).logits  # transformers' default mask is causal
        ours = model(ids, torch.arange(20)[None])
    assert (ours - causal).abs().max() > 1e-2


@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_rope_scaling_matches_transformers(kind: str) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = _config(rope_theta=500_000.0, rope_scaling=SCALINGS[kind], max_position_embeddings=256)
    model = random_model(cfg, 5)
    hf = transformers_twin(model)
    theirs, their_scale = ROPE_INIT_FUNCTIONS[kind](hf.config, torch.device("cpu"))
    ours, our_scale = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
    default, _ = rope_inv_freq(cfg.head_dim, cfg.rope_theta, None, cfg.max_position_embeddings)
    assert not torch.allclose(ours, default)  # the scaling really changes the frequencies
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=1e-9)
    assert our_scale == pytest.approx(their_scale)
    # Positions past original_max_position_embeddings are where the scaling matters.
    assert _compare(cfg, seed=5, length=200) <= TOL


def test_predicting_index_applies_the_shift() -> None:
    assert predicting_index(5, 1) == 4 and predicting_index(5, 0) == 5
    assert torch.equal(predicting_index(torch.tensor([1, 7]), 1), torch.tensor([0, 6]))


def test_logits_idx_selects_positions() -> None:
    cfg = CONFIGS["gqa-untied"]
    model = random_model(cfg, 2)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(12).expand(2, -1)  # (2, 12)
    idx = torch.tensor([[0, 5, 11], [3, 3, 7]])  # (2, 3)
    with torch.no_grad():
        full = model(ids, pos)  # (2, 12, vocab)
        some = model(ids, pos, logits_idx=idx)  # (2, 3, vocab)
    expected = torch.stack([full[r, idx[r]] for r in range(2)])
    torch.testing.assert_close(some, expected, rtol=0, atol=1e-5)


def test_attn_mask_matches_transformers_with_the_same_mask() -> None:
    cfg = CONFIGS["mha-tied"]
    model = random_model(cfg, 4)
    hf = transformers_twin(model)
    length = 12
    ids = torch.randint(0, cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(4))
    block = torch.arange(length) // 4  # three blocks of four: block-causal, full inside a block
    mask = (block[:, None] >= block[None, :])[None]  # (1, L, L)
    with torch.no_grad():
        ours = model(ids, torch.arange(length)[None], attn_mask=mask)
        unmasked = model(ids, torch.arange(length)[None])
    theirs = transformers_bidirectional_logits(hf, ids, mask)
    assert (ours - theirs).abs().max() <= TOL
    assert (ours[:, :8] - unmasked[:, :8]).abs().max() > 1e-2  # the mask changed the early blocks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_is_close_to_fp32(dtype: torch.dtype) -> None:
    cfg = CONFIGS["gqa-untied"]
    model = random_model(cfg, 6)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(6))
    pos = torch.arange(24).expand(2, -1)
    with torch.no_grad():
        ref = model(ids, pos)  # (2, 24, vocab) fp32
        half = model.to(dtype)(ids, pos)
    assert half.dtype == dtype
    assert torch.isfinite(half).all()
    err = (half.float() - ref).abs()
    # Loose: half precision keeps ~3 significant digits; logits have std ~1.
    assert err.max() < 0.15 * ref.abs().max()
    assert err.mean() < 0.05
    assert (half.float().argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
