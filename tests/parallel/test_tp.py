"""Tensor parallelism and the BP x TP mesh on CPU ranks with gloo (fp32), each rank its own process.

- Sharding: every rank's slices put back together are the full weights, read slice by slice from safetensors;
  kv heads are replicated when there are fewer than ranks; shapes that do not divide get a named error.
- TP = 2 and 3, GQA and MHA (and replicated kv heads), Dream and LLaDA: logits equal the single process
  within 1e-4, decoding gives the same tokens, forwards and winners, and each rank's committed K/V is its
  slice of the single-process cache.
- BP 2 x TP 2 (4 processes): the same (Dream and LLaDA), with k + 1 below, equal to and above the 2 branch
  groups; a rank killed mid-generation (or stuck) is named within the timeout and no process is left.
- Memory: tensor bytes (weights + cache) of a TP = 2 rank against the single process.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from lopa import LLM, DecodeConfig
from lopa.checkpoint.loader import load_checkpoint
from lopa.errors import ConfigError, DistributedError
from lopa.model.tp import TPShard
from lopa.parallel.launch import BranchParallelGroup
from lopa.parallel.mesh import layout
from lopa.parallel.replay import plain_forward
from lopa.testing import make_random_lora, make_tiny_checkpoint

TIMEOUT_S = 8.0
PROMPT = [5, 17, 3, 99, 42, 7]
IDS = [5, 17, 3, 99, 42, 7, 260, 11, 12, 4, 4, 8]
BASE = dict(block_size=4, max_new_tokens=16, threshold=0.5, trace=True)
# name -> (heads, kv heads, tp, family)
MODELS = {
    "dream-gqa-tp2": (4, 2, 2, "dream"),
    "dream-mha-tp2": (4, 4, 2, "dream"),
    "dream-gqa-tp3": (6, 3, 3, "dream"),
    "dream-mha-tp3": (6, 6, 3, "dream"),
    "dream-kv1-tp2": (4, 1, 2, "dream"),
    "llada-mha-tp2": (4, 4, 2, "llada"),
    "llada-mha-tp3": (6, 6, 3, "llada"),
    "llada-gqa-tp2": (4, 2, 2, "llada"),
}


def configs(k_lo: int, k_eq: int, k_hi: int) -> list[DecodeConfig]:
    return [
        DecodeConfig(decoder="lopa", base="threshold", branches=k_lo, **BASE),
        DecodeConfig(decoder="lopa", base="d2f", branches=k_eq, tau_add=0.3, tau_act=0.8, **BASE),
        DecodeConfig(decoder="lopa", base="threshold", branches=k_hi, temperature=0.9, seed=4, **BASE),
        DecodeConfig(decoder="vanilla", max_new_tokens=6, trace=True),  # no cache
    ]


def checkpoint(root: Path, heads: int, kv: int, family: str = "dream") -> Path:
    return make_tiny_checkpoint(
        root / f"tp-{family}-{heads}-{kv}", hidden_size=96, num_heads=heads, num_kv_heads=kv, intermediate_size=192,
        seed=3, family=family,
    )  # fmt: skip


def dumped_kv(group: BranchParallelGroup) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every rank's committed K/V shard after the group's latest request, in global rank order."""
    out_dir = Path(group.spec["kv_dump_dir"])
    last = max(int(re.search(r"request(\d+)", p.name).group(1)) for p in out_dir.glob("rank0-*"))
    paths = [out_dir / f"rank{r}-request{last}.safetensors" for r in range(group.world_size)]
    deadline = time.monotonic() + TIMEOUT_S  # workers finish the request a moment after rank 0 answers
    while not all(p.exists() for p in paths) and time.monotonic() < deadline:
        time.sleep(0.01)
    return [(f["k"], f["v"]) for f in (load_file(p) for p in paths)]


def check_equivalent(group: BranchParallelGroup, ref: LLM, cfgs: list[DecodeConfig]) -> set[int]:
    """Tokens, forwards, winners and every rank's K/V shard equal the single process; returns the winners."""
    winners: set[int] = set()
    for cfg in cfgs:
        want, got = ref.generate(PROMPT, cfg)[0], group.generate(PROMPT, cfg)[0]
        assert got.token_ids == want.token_ids
        assert got.stats.forwards == want.stats.forwards
        assert [t.winner for t in got.trace] == [t.winner for t in want.trace]
        if cfg.decoder == "vanilla":
            continue
        assert got.stats.timing["all_reduce"] > 0 and got.stats.timing["forward"] > 0
        winners |= {t.winner for t in got.trace}
        ref_k, ref_v = ref.runner.committed_kv()  # (layers, kv_heads, committed, head_dim)
        for rank, (k, v) in enumerate(dumped_kv(group)):
            t = layout(rank, group.world_size, group.tp).tp_rank
            _, _, k0, hkv = TPShard(t, group.tp).heads(ref.config)
            assert k.shape == ref_k[:, k0 : k0 + hkv].shape
            torch.testing.assert_close(k, ref_k[:, k0 : k0 + hkv], atol=1e-5, rtol=0)
            torch.testing.assert_close(v, ref_v[:, k0 : k0 + hkv], atol=1e-5, rtol=0)
    return winners


# ---- sharding, in this process ------------------------------------------------------------------------
@pytest.mark.parametrize("heads,kv,tp,family", MODELS.values(), ids=MODELS.keys())
def test_shards_put_together_are_the_full_weights(tmp_path, heads, kv, tp, family):
    ckpt = checkpoint(tmp_path, heads, kv, family)
    full = load_checkpoint(ckpt).model.state_dict()
    parts = [load_checkpoint(ckpt, shard=TPShard(r, tp)).model.state_dict() for r in range(tp)]
    for key, want in full.items():
        got = [p[key] for p in parts]
        if key.endswith(("q_proj.weight", "q_proj.bias", "gate_proj.weight", "up_proj.weight")):
            assert torch.equal(torch.cat(got), want), key
        elif key.endswith(("o_proj.weight", "down_proj.weight")):
            assert torch.equal(torch.cat(got, 1), want), key
        elif key.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
            d = want.shape[0] // kv
            heads_of = [TPShard(r, tp).heads(load_checkpoint(ckpt).config)[2] for r in range(tp)] if kv < tp else None
            if heads_of is None:
                assert torch.equal(torch.cat(got), want), key
            else:  # replicated: rank r holds kv head heads_of[r]
                for r, g in enumerate(got):
                    assert torch.equal(g, want[heads_of[r] * d : (heads_of[r] + 1) * d]), key
        else:
            assert all(torch.equal(g, want) for g in got), key  # replicated


def test_shapes_that_do_not_divide_are_refused(tmp_path):
    ckpt = checkpoint(tmp_path, 4, 2)
    with pytest.raises(ConfigError, match="--tp 3 does not divide"):
        load_checkpoint(ckpt, shard=TPShard(0, 3))
    lora = make_random_lora(ckpt, tmp_path / "lora", seed=1)
    with pytest.raises(ConfigError, match="LoRA"):
        load_checkpoint(ckpt, lora=lora, shard=TPShard(0, 2))
    with pytest.raises(ConfigError, match="must divide"):
        layout(0, 5, 2)


def test_tp2_rank_holds_at_most_six_tenths_of_the_tensor_bytes(tmp_path):
    """Weights + a cache of 4 rows x 1024 positions: a TP = 2 rank against one process (replicated head)."""
    ckpt = make_tiny_checkpoint(
        tmp_path / "mem", hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=1024, num_layers=4
    )

    def tensor_bytes(shard: TPShard | None) -> int:
        llm = LLM(ckpt, shard=shard)
        llm.runner.begin(1024, rows=4)
        weights = sum(p.numel() * p.element_size() for p in llm.model.parameters())
        return weights + llm.runner.cache.memory_bytes()

    full, rank = tensor_bytes(None), tensor_bytes(TPShard(0, 2))
    assert rank <= 0.6 * full, (rank, full)


# ---- TP groups ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("heads,kv,tp,family", MODELS.values(), ids=MODELS.keys())
def test_tensor_parallel_equals_single_process(tmp_path, single_thread, heads, kv, tp, family):
    ckpt = checkpoint(tmp_path, heads, kv, family)
    ref = LLM(ckpt)
    with BranchParallelGroup(
        1, ckpt, tp=tp, timeout_s=TIMEOUT_S, kv_dump_dir=tmp_path, startup_timeout_s=240
    ) as group:  # fmt: skip
        logits = group.forward(IDS)
        torch.testing.assert_close(logits, plain_forward(ref, IDS), atol=1e-4, rtol=0)
        check_equivalent(group, ref, configs(0, 1, 3))


# ---- the 2 x 2 mesh ----------------------------------------------------------------------------------------
def test_mesh_2x2_llada_equals_single_process(tmp_path, single_thread):
    ckpt = checkpoint(tmp_path, 4, 4, "llada")
    ref = LLM(ckpt)
    with BranchParallelGroup(2, ckpt, tp=2, timeout_s=TIMEOUT_S, kv_dump_dir=tmp_path, startup_timeout_s=240) as group:
        torch.testing.assert_close(group.forward(IDS), plain_forward(ref, IDS), atol=1e-4, rtol=0)
        winners = check_equivalent(group, ref, configs(0, 1, 3))
        assert {w % 2 for w in winners} == {0, 1}


def test_mesh_2x2_equals_single_process_and_names_a_killed_rank(tmp_path, single_thread):
    ckpt = checkpoint(tmp_path, 4, 2)
    ref = LLM(ckpt)
    group = BranchParallelGroup(2, ckpt, tp=2, timeout_s=TIMEOUT_S, kv_dump_dir=tmp_path, startup_timeout_s=240)
    with group:
        torch.testing.assert_close(group.forward(IDS), plain_forward(ref, IDS), atol=1e-4, rtol=0)
        winners = check_equivalent(group, ref, configs(0, 1, 3))  # k + 1 = 1, 2, 4 against 2 branch groups
        assert {w % 2 for w in winners} == {0, 1}  # both branch groups won: both K/V broadcasts ran
        assert_killed_rank_is_named(group, victim=3)  # TP rank 1 of branch group 1


def test_mesh_2x2_names_a_killed_tp_peer_of_rank0(tmp_path, single_thread):
    ckpt = checkpoint(tmp_path, 4, 2)
    with BranchParallelGroup(2, ckpt, tp=2, timeout_s=TIMEOUT_S, startup_timeout_s=240) as group:
        assert_killed_rank_is_named(group, victim=1)  # rank 0 waits for it inside an all-reduce


def assert_killed_rank_is_named(group: BranchParallelGroup, victim: int) -> None:
    group.inject_fault(victim, "kill", iteration=2)
    cfg = DecodeConfig(decoder="lopa", branches=3, block_size=4, max_new_tokens=32, threshold=0.5)
    t0 = time.monotonic()
    with pytest.raises(DistributedError, match=rf"rank {victim} \(pid {group.pids[victim]}\) exited"):
        group.generate(PROMPT, cfg)
    assert time.monotonic() - t0 < group.timeout_s
    assert all(p.poll() is not None for p in group.procs)
    assert not any(psutil.pid_exists(pid) for pid in group.pids)


# ---- NCCL (one GPU per rank) ---------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("bp,tp", [(1, 2), (2, 2)])
def test_nccl_mesh_equals_one_gpu(tmp_path, bp, tp):
    if torch.cuda.device_count() < bp * tp:
        pytest.skip(f"needs {bp * tp} GPUs")
    ckpt = checkpoint(tmp_path, 4, 2)
    ref = LLM(ckpt, device="cuda", dtype="float32", enforce_eager=True)
    with BranchParallelGroup(
        bp, ckpt, tp=tp, device="cuda", dtype="float32", timeout_s=30, kv_dump_dir=tmp_path, startup_timeout_s=240
    ) as group:  # fmt: skip
        torch.testing.assert_close(group.forward(IDS), plain_forward(ref, IDS), atol=1e-4, rtol=0)
        check_equivalent(group, ref, configs(0, 1, 3))


@pytest.mark.gpu
def test_nccl_mesh_names_a_killed_rank(tmp_path):
    if torch.cuda.device_count() < 4:
        pytest.skip("needs 4 GPUs")
    ckpt = checkpoint(tmp_path, 4, 2)
    with BranchParallelGroup(2, ckpt, tp=2, device="cuda", timeout_s=30, startup_timeout_s=240) as group:
        assert_killed_rank_is_named(group, victim=3)


def test_mesh_2x2_names_a_stuck_rank_at_the_timeout(tmp_path, single_thread):
    ckpt = checkpoint(tmp_path, 4, 2)
    with BranchParallelGroup(2, ckpt, tp=2, timeout_s=TIMEOUT_S, startup_timeout_s=240) as group:
        group.inject_fault(3, "hang", iteration=2)  # alive, heartbeat going, never joins its TP peer's all-reduce
        cfg = DecodeConfig(decoder="lopa", branches=3, block_size=4, max_new_tokens=32, threshold=0.5)
        t0 = time.monotonic()
        with pytest.raises(DistributedError, match=r"rank 3 is stuck") as err:
            group.generate(PROMPT, cfg)
        assert "rank 2 is stuck" not in str(err.value)
        assert time.monotonic() - t0 < TIMEOUT_S + 3.0
        assert all(p.poll() is not None for p in group.procs)


@pytest.mark.gpu
def test_bench_bp_measures_every_term_on_nccl():
    if torch.cuda.device_count() < 4:
        pytest.skip("needs 4 GPUs")
    bench = Path(__file__).resolve().parents[2] / "bench" / "bp.py"
    cmd = [sys.executable, str(bench), "--device", "cuda", "--mesh", "1x1,1x2,2x1,2x2", "--max-new-tokens", "32"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900).stdout
    rows = json.loads(out.strip().splitlines()[-1])["rows"]
    assert rows["1x2"]["all_reduce"] > 0 and rows["2x2"]["all_reduce"] > 0
    assert rows["2x1"]["all_gather"] > 0 and rows["2x2"]["kv_broadcast"] > 0
