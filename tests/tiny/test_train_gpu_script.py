"""scripts/train_tiny_gpu.sh: its CPU rehearsal calibrates, trains both seeds to the sized step count (and a second
and a third stage, each from the seed's own previous final or best save) and packs checkpoints that load; bad
usage, a third stage without a second, an unknown save to start from and a machine without CUDA get a clear
refusal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from lopa.checkpoint.loader import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "train_tiny_gpu.sh"


def _run(tmp_path: Path, *args: str, **settings: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, **settings}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )


STAGE2 = "--lr 5e-4 --warmup 10 --on-policy-from 0 --on-policy-tokens model --visit-window --lookahead 2"
STAGE3 = "--lr 1e-4 --warmup 10 --on-policy-from 0 --on-policy-tokens model --lookahead 2 --lopa-trajectories"


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_dry_run_trains_both_seeds_in_three_stages_to_the_calibrated_steps_and_packs_loadable_checkpoints(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    shares = {"TINY_GPU_STAGE2_SHARE": "0.4", "TINY_GPU_STAGE3_SHARE": "0.2", "TINY_GPU_STAGE2_FROM": "final"}
    proc = _run(tmp_path, "--dry-run", str(out), TINY_GPU_STAGE2=STAGE2, TINY_GPU_STAGE3=STAGE3, **shares)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = (out / "report.txt").read_text()
    sized = report.split("calibration: ")[1].split("steps ")[1].split()
    steps, steps2, steps3, total = int(sized[0]), int(sized[1]), int(sized[2]), int(sized[4].rstrip(")"))
    assert all(n >= 100 and n % 100 == 0 for n in (steps, steps2, steps3))
    assert steps2 == max(100, int(total * 0.4) // 100 * 100) and steps3 == max(100, int(total * 0.2) // 100 * 100)
    assert steps + steps2 + steps3 <= max(total, 300)  # the shares
    assert report.rstrip().endswith("exit 0")
    assert "left-to-right: exact / well-formed" in report  # scripts/decoding_order.py on all six best saves
    assert all(f"/{stage}-s1/best |" in report for stage in ("gpu", "gpu2", "gpu3"))
    for seed in (0, 1):
        unpacked = tmp_path / f"unpacked{seed}"
        with tarfile.open(out / f"seed{seed}.tar.gz") as tar:
            names = tar.getnames()
            for log in ("train", "train2", "train3", "calibrate"):
                assert f"{log}-s{seed}.log" in names
            for stage in ("gpu", "gpu2", "gpu3"):
                assert f"{stage}-s{seed}/best/model.safetensors" in names
                state_files = [n for n in names if n.startswith(f"{stage}-s{seed}/train_state/")]
                assert state_files == [f"{stage}-s{seed}/train_state/state.json"]  # never weights, optimiser or EMA
            tar.extractall(unpacked, filter="data")
        for stage, n in (("gpu", steps), ("gpu2", steps2), ("gpu3", steps3)):
            run = unpacked / f"{stage}-s{seed}"
            state = json.loads((run / "train_state" / "state.json").read_text())
            assert state["step"] == n and state["args"]["seed"] == seed and state["args"]["workers"] == 1
            assert "test" in state  # the trainer's own test score, written at the end
            for ckpt in (run, run / "best"):
                assert sum(p.numel() for p in load_checkpoint(ckpt).model.parameters()) > 0
        second = json.loads((unpacked / f"gpu2-s{seed}" / "train_state" / "state.json").read_text())["args"]
        assert second["init_from"].endswith(f"gpu-s{seed}")  # each seed from its own stage-1 final save
        assert second["lookahead"] == 2 and second["visit_window"] and second["lr"] == 5e-4
        third = json.loads((unpacked / f"gpu3-s{seed}" / "train_state" / "state.json").read_text())["args"]
        assert third["init_from"].endswith(f"gpu2-s{seed}/best")  # from its own stage-2 best save (the default)
        assert third["lopa_trajectories"] and third["lr"] == 1e-4 and not third["visit_window"]


def test_refuses_bad_usage_and_a_machine_without_cuda(tmp_path: Path) -> None:
    proc = _run(tmp_path)
    assert proc.returncode == 2 and "OUTDIR is missing" in proc.stderr
    assert _run(tmp_path, "--bogus", str(tmp_path / "o")).returncode == 2
    proc = _run(tmp_path, "--dry-run", str(tmp_path / "o"), TINY_GPU_STAGE3=STAGE3)
    assert proc.returncode == 2 and "TINY_GPU_STAGE3 needs TINY_GPU_STAGE2" in proc.stderr
    proc = _run(tmp_path, "--dry-run", str(tmp_path / "o"), TINY_GPU_STAGE2=STAGE2, TINY_GPU_STAGE2_FROM="last")
    assert proc.returncode == 2 and "best or final, got 'last'" in proc.stderr
    if not torch.cuda.is_available():
        proc = _run(tmp_path, str(tmp_path / "o"))
        assert proc.returncode == 2 and "--dry-run" in proc.stderr
