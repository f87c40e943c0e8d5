"""Greedy ``threshold`` with ``min_fill`` on a block-causal (SDAR) checkpoint equals an independent implementation of
SDAR's official ``block_diffusion_generate`` (tests/support/sdar_reference.py: transformers' Qwen3ForCausalLM with a 4-D
block-causal mask, ``low_confidence_dynamic``) token for token, and spends exactly one forward less per decoded
block (lopa commits a finished block's exact K/V in the next block's first forward) and no prefill forward (the
prompt's whole blocks are committed by the first forward).

Covered: prompts shorter than one block, exactly one block, whole blocks plus a partial one (the first generated
block then holds the prompt's tail, fixed); blocks of 4 and 8; two thresholds; min_fill 1 and 2 (SDAR's
``denoising_steps = block // min_fill``); the end-of-block stop on a frequent token. Guards against a vacuous
pass: no confidence within 1e-5 of τ or of the next ranked one, several blocks decoded in every run, min_fill's
top-k fallback filling two positions in some run, and some run stopping before its last block.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lopa.config import DecodeConfig
from tests.support.sdar_checks import load_model, lopa_decode, prompts_for, sdar_checkpoint, special_ids
from tests.support.sdar_reference import block_diffusion_generate, load_qwen3

pytest.importorskip("transformers")

GEN = {4: 16, 8: 24}  # max_new_tokens per block size: 4 and 3 blocks
STOP_EXTRA = 45  # a token this checkpoint generates often: a second stop token makes some runs stop early


@pytest.mark.parametrize("block", [4, 8])
@pytest.mark.parametrize("min_fill", [1, 2])
def test_threshold_equals_sdar_block_diffusion_generate(tmp_path: Path, block: int, min_fill: int) -> None:
    ckpt = sdar_checkpoint(tmp_path / "sdar", block)
    mask, eos = special_ids(ckpt)
    ours, theirs = load_model(ckpt), load_qwen3(ckpt)
    fallback_fills, early_stops = 0, 0
    for prompt in prompts_for(block):
        for tau in (0.5, 0.8):
            for ends in ({eos}, {eos, STOP_EXTRA}):
                what = (prompt, tau, sorted(ends))
                gen = GEN[block]
                cfg = DecodeConfig(
                    decoder="threshold", block_size=block, max_new_tokens=gen, threshold=tau, min_fill=min_fill
                )
                step = lopa_decode(ours, prompt, cfg, mask, ends)
                tail = len(prompt) % block
                ref = block_diffusion_generate(
                    theirs, prompt, mask, gen - tail, block, block // min_fill, tau, ends
                )  # gen - tail: the same last block as lopa's layout (max_new_tokens after the prompt's whole blocks)
                assert ref.min_gap > 1e-5, what  # no near-tie that rounding (~1e-7) could flip
                got = step.state.tokens.tolist()
                assert got == ref.tokens[: len(got)], what
                assert set(ref.tokens[len(got) :]) <= {mask}, what  # the reference decoded nothing beyond lopa
                assert mask not in got, what
                assert len(got) == len(prompt) - tail + ref.blocks * block, what
                prefill = int(len(prompt) >= block)
                assert step.stats.forwards == ref.forwards - ref.blocks - prefill, what
                assert ref.blocks >= 2 or ends != {eos}, what  # several blocks decoded
                fallback_fills += ref.fallback_fills
                early_stops += int(ref.blocks < (len(prompt) - tail + gen) // block - len(prompt) // block)
    if min_fill > 1:
        assert fallback_fills > 0  # min_fill's top-k fallback filled two positions somewhere
    assert early_stops > 0  # the end-of-block stop was exercised


def test_vanilla_equals_one_fill_per_step(tmp_path: Path) -> None:
    """vanilla on a block-causal model = block by block, one position per forward: the reference with a threshold
    nothing passes and ``denoising_steps = block`` (one top-confidence fill per step)."""
    block = 4
    ckpt = sdar_checkpoint(tmp_path / "sdar", block)
    mask, eos = special_ids(ckpt)
    ours, theirs = load_model(ckpt), load_qwen3(ckpt)
    for prompt in prompts_for(block):
        for ends in ({eos}, {eos, STOP_EXTRA}):
            cfg = DecodeConfig(decoder="vanilla", block_size=block, max_new_tokens=16)
            step = lopa_decode(ours, prompt, cfg, mask, ends)
            tail = len(prompt) % block
            ref = block_diffusion_generate(theirs, prompt, mask, 16 - tail, block, block, 1.0, ends)
            assert ref.min_gap > 1e-5, prompt
            got = step.state.tokens.tolist()
            assert got == ref.tokens[: len(got)] and set(ref.tokens[len(got) :]) <= {mask}, (prompt, ends)
            assert all(len(s) == 1 for s in ref.steps)
            assert step.stats.forwards == len(ref.steps) == ref.forwards - ref.blocks - int(len(prompt) >= block)
