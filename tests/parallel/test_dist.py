"""LoPA-Dist (docs/algorithm.md §4) on CPU ranks with gloo, each rank its own process.

For 1, 2 and 3 ranks and k + 1 candidates below, equal to and above the number of ranks, branch-parallel
decoding gives the single-process tokens, forward count and winners, and every rank ends with the same
committed K/V as the single-process cache; for both model families (Dream freezes a last logit and sends it
with the committed K/V, LLaDA has no shift and sends none).
Over 2 ranks the committed K/V also equals what the winners' windows produce, recomputed by the independent
reference decoder (tests/support/reference_decoder.py).
A killed rank, and a live rank that never joins a collective, make
rank 0 raise DistributedError naming that rank within the timeout, and no rank process is left behind.
Ranks are started once per world size and shared by the tests of this module (starting torch dominates).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from lopa import LLM, DecodeConfig
from lopa.commands.main import main
from lopa.errors import DistributedError, PromptTooLongError
from lopa.parallel.launch import BranchParallelGroup
from lopa.parallel.monitor import process_state
from lopa.testing import make_tiny_checkpoint
from tests.support.reference_checks import lookahead_commits, replayed_kv
from tests.support.reference_decoder import ReferenceTransformer, reference_decode

TIMEOUT_S = 6.0
PROMPTS = [[5, 17, 3, 99, 42, 7], [260, 11, 12]]
BASE = dict(block_size=4, max_new_tokens=16, threshold=0.5, trace=True)
# world -> k values with k + 1 below, equal to and above the world size (1 rank: k + 1 >= 1 is never below)
BRANCHES = {1: (0, 1, 2), 2: (0, 1, 3), 3: (1, 2, 4)}
PHASES = {"forward", "scoring", "all_gather", "broadcast", "kv_broadcast"}


def configs(world: int) -> list[DecodeConfig]:
    k_lo, k_eq, k_hi = BRANCHES[world]
    return [
        DecodeConfig(decoder="lopa", base="threshold", branches=k_lo, **BASE),
        DecodeConfig(decoder="lopa", base="d2f", branches=k_eq, tau_add=0.3, tau_act=0.8, **BASE),
        DecodeConfig(decoder="lopa", base="threshold", branches=k_hi, temperature=0.9, seed=4, stop=("e",), **BASE),
        DecodeConfig(decoder="lopa", base="d2f", branches=k_hi, tau_add=0.5, tau_act=0.5, confidence="margin", **BASE),
        DecodeConfig(decoder="vanilla", max_new_tokens=6, trace=True),  # no cache: one candidate, on rank 0
    ]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("bp")
    return {fam: make_tiny_checkpoint(base / f"bp-{fam}", seed=3, family=fam) for fam in ("dream", "llada")}


@pytest.fixture(scope="module")
def ckpt(ckpts: dict[str, Path]) -> Path:
    return ckpts["dream"]


@pytest.fixture(scope="module")
def references(ckpts: dict[str, Path]):
    """The single-process LLMs; one thread, like each rank (several threads crawl on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {fam: LLM(path) for fam, path in ckpts.items()}
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(references):
    return references["dream"]


@pytest.fixture(scope="module")
def groups(ckpts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """groups(world, family) -> a running group of that size (started on first use, stopped at module end)."""
    running: dict[tuple[int, str], BranchParallelGroup] = {}

    def get(world: int, family: str = "dream") -> BranchParallelGroup:
        g = running.get((world, family))
        if g is None or any(p.poll() is not None for p in g.procs):
            dump = tmp_path_factory.mktemp(f"kv{world}{family}")
            g = BranchParallelGroup(world, ckpts[family], timeout_s=TIMEOUT_S, kv_dump_dir=dump, startup_timeout_s=240)
            running[world, family] = g.start()
        return g

    yield get
    for g in running.values():
        g.close()


def dumped_kv(group: BranchParallelGroup) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every rank's committed K/V after the group's latest request."""
    out_dir = Path(group.spec["kv_dump_dir"])
    last = max(int(re.search(r"request(\d+)", p.name).group(1)) for p in out_dir.glob("rank0-*"))
    paths = [out_dir / f"rank{r}-request{last}.safetensors" for r in range(group.world_size)]
    deadline = time.monotonic() + TIMEOUT_S  # workers finish the request a moment after rank 0 answers
    while not all(p.exists() for p in paths) and time.monotonic() < deadline:
        time.sleep(0.01)
    files = [load_file(p) for p in paths]
    return [(f["k"], f["v"]) for f in files]


@pytest.mark.parametrize(("world", "family"), [(1, "dream"), (2, "dream"), (3, "dream"), (2, "llada"), (3, "llada")])
def test_branch_parallel_equals_single_process(world, family, groups, references):
    reference = references[family]
    group = groups(world, family)
    owners = set()
    for cfg in configs(world):
        for prompt in PROMPTS:
            ref = reference.generate(prompt, cfg)[0]
            got = group.generate(prompt, cfg)[0]
            assert got.token_ids == ref.token_ids
            assert got.stats.forwards == ref.stats.forwards
            assert [t.winner for t in got.trace] == [t.winner for t in ref.trace]
            assert got.text == ref.text and got.finish_reason == ref.finish_reason
            assert set(got.stats.timing) >= PHASES - {"kv_broadcast"}
            if cfg.decoder == "vanilla":
                continue
            assert got.stats.timing["kv_broadcast"] >= 0 and got.stats.timing["all_gather"] > 0
            ref_k, ref_v = reference.runner.committed_kv()
            kvs = dumped_kv(group)
            for k, v in kvs:
                assert torch.equal(k, kvs[0][0]) and torch.equal(v, kvs[0][1])  # bit-identical across ranks
            assert kvs[0][0].shape == ref_k.shape
            torch.testing.assert_close(kvs[0][0], ref_k, atol=1e-5, rtol=0)
            torch.testing.assert_close(kvs[0][1], ref_v, atol=1e-5, rtol=0)
            owners |= {t.winner % world for t in got.trace}
    assert owners == set(range(world))  # every rank won at least once: its K/V broadcast was exercised
    if family != "dream":
        group.close()  # only the Dream groups serve the fault tests below; idle ranks would slow their timing


def test_branch_parallel_cache_is_the_winners_windows(groups, reference):
    """Over gloo, every rank's committed K/V is what the winners' windows produce, recomputed by the independent
    reference decoder (tests/support/reference_decoder.py): k + 1 = 4 candidates on 2 ranks, lookahead winners
    committing."""
    cfg = DecodeConfig(
        decoder="lopa",
        base="d2f",
        branches=3,
        block_size=4,
        max_new_tokens=16,
        threshold=0.5,
        tau_add=0.25,
        tau_act=0.5,
    )
    model = ReferenceTransformer(reference.model, "dream")
    ref = reference_decode(model, PROMPTS[1], cfg, reference.end_ids)
    assert lookahead_commits(ref) > 0  # committing the anchor's row instead of the winner's would show
    group = groups(2)
    got = group.generate(PROMPTS[1], cfg.replace(trace=True))[0]
    assert got.token_ids == ref.tokens[len(PROMPTS[1]) :][: len(got.token_ids)]
    assert got.stats.forwards == ref.forwards
    assert [t.winner for t in got.trace] == [s.winner for s in ref.steps]
    want_k, want_v = replayed_kv(model, ref.commits)
    for k, v in dumped_kv(group):
        torch.testing.assert_close(k, want_k, atol=1e-5, rtol=0)
        torch.testing.assert_close(v, want_v, atol=1e-5, rtol=0)


def test_user_error_leaves_the_group_usable(groups):
    group = groups(2)
    with pytest.raises(PromptTooLongError):
        group.generate([1] * 2040, DecodeConfig(max_new_tokens=16, block_size=4))
    assert len(group.generate([4, 5, 6], DecodeConfig(max_new_tokens=8, block_size=4))[0].token_ids) > 0


def _assert_all_gone(group: BranchParallelGroup) -> None:
    assert all(p.poll() is not None for p in group.procs)
    children = {c.pid for c in psutil.Process().children(recursive=True)}
    assert not children & set(group.pids)
    assert not any(psutil.pid_exists(pid) for pid in group.pids)


def test_killed_rank_is_named_by_rank0_within_timeout(groups):
    group = groups(2)
    group.inject_fault(1, "kill", iteration=2)
    cfg = DecodeConfig(decoder="lopa", branches=1, block_size=4, max_new_tokens=32, threshold=0.5)
    t0 = time.monotonic()
    with pytest.raises(DistributedError, match=rf"rank 1 \(pid {group.pids[1]}\) exited"):
        group.generate(PROMPTS[0], cfg)
    assert time.monotonic() - t0 < TIMEOUT_S
    _assert_all_gone(group)


def test_stuck_rank_is_named_by_rank0_at_the_timeout(groups):
    group = groups(3)
    group.inject_fault(2, "hang", iteration=3)  # alive, heartbeat going, never joins the next collective
    cfg = DecodeConfig(decoder="lopa", branches=2, block_size=4, max_new_tokens=32, threshold=0.5)
    t0 = time.monotonic()
    with pytest.raises(DistributedError, match=r"rank 2 is stuck"):
        group.generate(PROMPTS[1], cfg)
    elapsed = time.monotonic() - t0
    # alive and beating, the rank can only be caught by the collective's timeout, so not before it; the upper bound
    # only guards against a hang (how much later the error comes depends on the machine's load)
    assert TIMEOUT_S * 0.9 < elapsed < TIMEOUT_S + 60
    _assert_all_gone(group)


def test_process_state_sees_frozen_and_dead_processes():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(p.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while process_state(p.pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert process_state(p.pid) == "T"
    finally:
        p.kill()
        p.wait()
    assert process_state(p.pid) == "gone"


def test_cli_bp_launcher_prints_the_single_process_answer(ckpt, reference, capsys, monkeypatch):
    monkeypatch.setenv("LOPA_DIST_TIMEOUT", str(TIMEOUT_S))
    flags = ["--decoder", "lopa", "--branches", "2", "--block-size", "4", "--max-new-tokens", "16"]
    assert main(["generate", "--bp", "2", "--model", str(ckpt), "--json", *flags, "hello there"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ref = reference.generate("hello there", DecodeConfig(decoder="lopa", branches=2, block_size=4, max_new_tokens=16))
    assert got["token_ids"] == ref[0].token_ids
    assert got["stats"]["forwards"] == ref[0].stats.forwards
