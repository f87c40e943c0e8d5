"""scripts/train_tiny_gpu.sh: its CPU rehearsal calibrates, trains both seeds to the sized step count and packs
checkpoints that load; bad usage and a machine without CUDA get a clear refusal."""

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


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_dry_run_trains_both_seeds_to_the_calibrated_steps_and_packs_loadable_checkpoints(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _run(tmp_path, "--dry-run", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = (out / "report.txt").read_text()
    steps = int(report.split("calibration: ")[1].split("steps ")[1].split()[0])
    assert steps >= 100 and steps % 100 == 0
    assert report.rstrip().endswith("exit 0")
    assert "left-to-right: exact / well-formed" in report and "/gpu-s1/best |" in report  # scripts/decoding_order.py
    for seed in (0, 1):
        unpacked = tmp_path / f"unpacked{seed}"
        with tarfile.open(out / f"seed{seed}.tar.gz") as tar:
            names = tar.getnames()
            assert f"train-s{seed}.log" in names and f"calibrate-s{seed}.log" in names
            assert f"gpu-s{seed}/best/model.safetensors" in names
            state_files = [n for n in names if n.startswith(f"gpu-s{seed}/train_state/")]
            assert state_files == [f"gpu-s{seed}/train_state/state.json"]  # never weights, optimiser or EMA state
            tar.extractall(unpacked, filter="data")
        run = unpacked / f"gpu-s{seed}"
        state = json.loads((run / "train_state" / "state.json").read_text())
        assert state["step"] == steps and state["args"]["seed"] == seed and state["args"]["workers"] == 1
        assert "test" in state  # the trainer's own test score, written at the end
        for ckpt in (run, run / "best"):
            assert sum(p.numel() for p in load_checkpoint(ckpt).model.parameters()) > 0


def test_refuses_bad_usage_and_a_machine_without_cuda(tmp_path: Path) -> None:
    proc = _run(tmp_path)
    assert proc.returncode == 2 and "OUTDIR is missing" in proc.stderr
    assert _run(tmp_path, "--bogus", str(tmp_path / "o")).returncode == 2
    if not torch.cuda.is_available():
        proc = _run(tmp_path, str(tmp_path / "o"))
        assert proc.returncode == 2 and "--dry-run" in proc.stderr
