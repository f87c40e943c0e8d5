"""The GPU benchmarks run on CPU with tiny shapes and report consistent numbers: the engine-loop benchmark
(bench/e2e.py), the step benchmark's targets (bench/gpu_step.py), the account of bytes / FLOPs / kernels
(bench/gpu_account.py) and the device check's bookkeeping (bench/gpu_check.sh). Nothing here is timed: the
checks are on structure, counts and arithmetic, which a CPU run proves as well as a GPU run."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lopa.engine.fast import FastRunner
from lopa.engine.runner import Runner

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("single_thread")


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _last_json(out: str) -> dict:
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


# ---- bench/e2e.py ----------------------------------------------------------------------------------------------
def test_random_llm_is_the_real_engine_over_a_random_model():
    e2e = _bench("e2e")
    cfg = e2e.gpu_step.model_config("tiny")
    llm = e2e.random_llm(cfg, "cpu", torch.float32, 2, 64)
    assert type(llm.runner) is Runner and llm.model.config == cfg and llm.max_num_seqs == 2
    out = llm.generate([[1, 2, 3, 4]] * 2, llm.decode_config(decoder="threshold", block_size=8, max_new_tokens=16))
    assert [len(o.token_ids) for o in out] == [16, 16]  # end tokens ignored: every sequence runs to the end
    fast = e2e.random_llm(cfg, "cpu", torch.float32, 2, 64, enforce_eager=False)
    assert isinstance(fast.runner, FastRunner)


def test_forward_clock_counts_every_forward_of_the_runner():
    e2e = _bench("e2e")
    llm = e2e.random_llm(e2e.gpu_step.model_config("tiny"), "cpu", torch.float32, 1, 64)
    clock = e2e.ForwardClock(llm.runner, e2e.SINGLE_FORWARD, cuda=False)
    out = llm.generate([5, 6, 7], llm.decode_config(decoder="lopa", base="threshold", branches=2, block_size=8,
                                                    max_new_tokens=16))  # fmt: skip
    assert clock.calls == llm.runner.forwards == out[0].stats.forwards > 0
    assert clock.total_ms() > 0
    with pytest.raises(AttributeError, match="no forward method"):
        e2e.ForwardClock(llm.runner, "no_such_forward", cuda=False)


def test_e2e_bench_runs_on_cpu(capsys):
    e2e = _bench("e2e")
    argv = ["--device", "cpu", "--shape", "tiny", "--seqs", "1", "3", "--branches", "2", "8"]
    assert e2e.main([*argv, "--block-size", "8", "--max-new-tokens", "16", "--prompt", "8", "--profile", "5"]) == 0
    out = capsys.readouterr().out
    summary = _last_json(out)
    assert summary["bench"] == "e2e" and summary["runners"] == ["Runner", "BatchRunner"]
    cells = [(r["decoder"], r["seqs"]) for r in summary["rows"]]
    assert cells == [(d, n) for d in ("threshold", "lopa-k2", "lopa-k8") for n in (1, 3)]
    for r in summary["rows"]:
        assert r["tokens"] == 16 * r["seqs"]
        assert r["iterations"] == r["seq_forwards_max"]  # the clock saw every forward the engine counted
        assert 2 <= r["iterations"] <= 16  # a prefill plus at least one token per iteration
        assert r["iter_ms"] == pytest.approx(r["forward_ms"] + r["host_ms"], rel=1e-3, abs=1e-3)
        assert r["host_share"] == pytest.approx(1 - r["forward_ms"] / r["iter_ms"], abs=1e-3)
        assert 0 < r["forward_ms"] <= r["iter_ms"]
        assert r["iter_ms"] == pytest.approx(r["wall_s"] * 1e3 / r["iterations"], rel=1e-3)
    target = [r for r in summary["rows"] if r["meets_target"] is not None]
    assert [(r["decoder"], r["seqs"]) for r in target] == [("lopa-k8", 1)]
    assert target[0]["meets_target"] == (target[0]["host_share"] <= 0.10)
    assert ("PASS" in out) != ("FAIL" in out)
    profiled = summary["host_profile"]
    assert set(profiled) == {"1", "3"} and all(len(rows) == 5 for rows in profiled.values())
    assert all(self_ms <= cum_ms + 1e-6 for rows in profiled.values() for _, _, self_ms, cum_ms in rows)


# ---- bench/gpu_step.py: targets --------------------------------------------------------------------------------
def test_gpu_step_reports_each_target_with_its_verdict(capsys):
    step = _bench("gpu_step")
    argv = ["--device", "cpu", "--shape", "tiny", "--branches", "1", "2", "--windows", "32", "--cache", "16"]
    argv += ["--seqs", "1", "16", "--batch-branches", "1", "--batch-window", "8", "--no-hf"]
    assert step.main([*argv, "--warmup", "0", "--reps", "1", "--matmul-size", "64"]) == 0
    out = capsys.readouterr().out
    s = _last_json(out)
    h, i, n, heads, kv, d, v = step.SHAPES["tiny"]
    assert s["linear_params"] == n * (h * (heads + 2 * kv) * d + heads * d * h + 3 * h * i) + h * v  # + LM head
    targets = {(t["target"], t["at"]): t for t in s["targets"]}
    assert set(targets) == {
        ("fast+score <= 1.1 x yardstick", "1x32"),  # 2 branches is outside the target's grid
        ("graph path not slower than eager", "1 seqs"),
        ("graph path not slower than eager", "16 seqs"),
        ("batched forward <= 1.3 x compute bound", "16 seqs"),
    }
    row = next(r for r in s["rows"] if r["branches"] == 1)
    assert row["fast_score_vs_yardstick"] == pytest.approx(row["fast_score_ms"] / row["yardstick_ms"], rel=0.01)
    assert targets["fast+score <= 1.1 x yardstick", "1x32"]["passed"] == (row["fast_score_vs_yardstick"] <= 1.1)
    assert next(r for r in s["rows"] if r["branches"] == 2)["meets_target"] is None
    for r in s["batch_rows"]:
        assert r["tokens"] == r["seqs"] * 2 * 8
        bound = 2 * s["linear_params"] * r["tokens"] / (s["matmul_tflops"] * 1e12) * 1e3
        assert r["compute_bound_ms"] == pytest.approx(bound, rel=1e-3)
        assert r["vs_compute_bound"] == pytest.approx(r["fast_ms"] / r["compute_bound_ms"], rel=0.01)
        assert r["not_slower"] == (r["fast_ms"] <= r["eager_ms"])
    assert s["all_targets_met"] == all(t["passed"] for t in s["targets"])
    assert "# TARGETS:" in out and "PROJECTION (not a measurement)" in out


# ---- bench/gpu_account.py --------------------------------------------------------------------------------------
def test_account_bytes_and_flops_follow_the_code_paths():
    acc = _bench("gpu_account")
    c = acc.gpu_step.model_config("7b")
    one, eight, batch = acc.CASES
    by_name = {k.name: k for k in acc.layer(one, c, "yardstick")}
    qkv = by_name["qkv_proj (+bias)"]
    assert qkv.bytes == 2 * (3584 * 4608 + 4608 + 32 * (3584 + 4608)) and qkv.flops == 2 * 32 * 3584 * 4608
    fast = {k.name: k for k in acc.layer(eight, c, "fast")}
    att = fast["attention (mem-efficient, mask, 768 slots)"]  # 512 + 32 rounded up to 256
    assert att.flops == 4 * 8 * 28 * 32 * 768 * 128
    assert acc.head(batch, c, "fast batch (cuDNN)").name == "LM head (4096 rows)"  # 80 rows -> 128, x 32 positions
    assert acc.head(batch, c, "eager batch").name == "LM head (2560 rows)"
    graph = {k.name: k for k in acc.layer(batch, c, "fast batch (cuDNN)")}
    eager = {k.name: k for k in acc.layer(batch, c, "eager batch")}
    assert graph["gate_up_proj"].flops / eager["gate_up_proj"].flops == 128 / 80
    r = acc.account(one, c, "yardstick", 2.92e12, 751e12)
    weights = 28 * (3584 * 4608 + 4608 + 3584 * 3584 + 3 * 3584 * 18944) + 3584 * 152064
    assert weights * 2 / 1e9 < r["gb"] < weights * 2 / 1e9 * 1.05  # 1 x 32 moves the weights and little else
    assert r["roofline_ms"] == pytest.approx(r["gb"] * 1e9 / 2.92e12 * 1e3, rel=0.02)  # and is bandwidth-bound


def test_account_runs_on_cpu_and_counts_kernels(capsys):
    acc = _bench("gpu_account")
    assert acc.main(["--device", "cpu", "--profile-shape", "tiny"]) == 0
    s = _last_json(capsys.readouterr().out)
    k = s["part2"]
    assert set(k) == {"fast", "yardstick", "fast batch", "eager batch"}
    assert all(p["per_layer"] > 0 and p["per_forward"] == 2 * p["per_layer"] + p["outside_layers"] for p in k.values())
    assert k["yardstick"]["by_op"]["aten::rms_norm"] == 5  # 2 per layer + the final norm: one op each
    assert k["fast"]["per_layer"] > k["yardstick"]["per_layer"]  # lopa's composite norms and RoPE
    assert all(v > 0 for v in s["part3_host_ms"].values())


# ---- bench/gpu_check.sh ----------------------------------------------------------------------------------------
def _check(tmp_path: Path, *args: str, scale: str = "1") -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_CHECK_SCALE": scale, "PYTHON": sys.executable}
    cmd = ["bash", str(ROOT / "bench" / "gpu_check.sh"), *args, str(tmp_path / "out")]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_gpu_check_records_every_step_and_goes_on_after_a_timeout(tmp_path):
    proc = _check(tmp_path, "--dry-run", "--only", "env account", scale="0.001")  # 1-second limits
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [s["step"] for s in summary["steps"]] == ["env", "account"]  # the second ran after the first failed
    assert [s["status"] for s in summary["steps"]] == ["TIMEOUT", "TIMEOUT"] and not summary["passed"]
    assert (tmp_path / "out" / "account.log").read_text().startswith("=== account (limit 1s)")


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_gpu_check_passing_step_writes_log_and_json(tmp_path):
    proc = _check(tmp_path, "--dry-run", "--only", "env")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["dry_run"] and summary["passed"] and summary["steps"][0]["status"] == "PASS"
    env = json.loads((tmp_path / "out" / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["installed"]["pytest"]


def test_gpu_check_refuses_bad_usage(tmp_path):
    assert _check(tmp_path, "--dry-run", "--only", "no_such_step").returncode == 2
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "OUTDIR is missing" in proc.stderr
    if not torch.cuda.is_available():
        proc = _check(tmp_path)  # no --dry-run on a machine without CUDA: a clear refusal, nothing run
        assert proc.returncode == 2 and "--dry-run" in proc.stderr
