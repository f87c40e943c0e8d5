"""Branch parallelism x tensor parallelism (a 2 x 2 mesh of gloo CPU ranks, each its own process) on a block-causal
(SDAR) checkpoint equals the single process: logits, tokens, forwards, winners, and every rank's committed K/V
shard (the helpers of tests/parallel/test_tp.py). The block rule travels with the model config, so the mesh needs
nothing of its own."""

from __future__ import annotations

import torch

from lopa import LLM, DecodeConfig
from lopa.parallel.launch import BranchParallelGroup
from lopa.parallel.replay import plain_forward
from tests.parallel.test_tp import IDS, TIMEOUT_S, check_equivalent
from tests.support.sdar_checks import sdar_checkpoint

BASE = dict(block_size=4, max_new_tokens=16, threshold=0.7, trace=True)
CONFIGS = [
    DecodeConfig(decoder="lopa", base="threshold", branches=3, min_fill=2, **BASE),
    DecodeConfig(decoder="lopa", base="d2f", branches=1, tau_add=0.3, tau_act=0.8, **BASE),
    DecodeConfig(decoder="vanilla", block_size=4, max_new_tokens=8, trace=True),
]


def test_mesh_2x2_equals_single_process_on_a_block_causal_model(tmp_path, single_thread):
    ckpt = sdar_checkpoint(tmp_path / "sdar", 4, seed=3, hidden_size=96, num_heads=4, num_kv_heads=2)
    ref = LLM(ckpt)
    with BranchParallelGroup(2, ckpt, tp=2, timeout_s=TIMEOUT_S, kv_dump_dir=tmp_path, startup_timeout_s=240) as group:
        torch.testing.assert_close(group.forward(IDS), plain_forward(ref, IDS), atol=1e-4, rtol=0)
        winners = check_equivalent(group, ref, CONFIGS)
        assert {w % 2 for w in winners} == {0, 1}  # both branch groups won: both K/V broadcasts ran
