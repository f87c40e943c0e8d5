"""`lopa bench` end to end: the table, the JSON line and the plot; a bench of zero problems is a usage error."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lopa.checkpoint.bundled import default_checkpoint_dir
from lopa.commands.bench import add_arguments
from lopa.commands.main import main
from lopa.metrics import aup, weight
from lopa.tiny.bench import selection
from lopa.tiny.bench_rows import Row, set_agreement
from lopa.tiny.bench_sweep import FAMILIES, FULL, QUICK, QUICK_FAMILIES, variants


def test_bench_on_a_random_checkpoint(tiny_ckpt, tmp_path, capsys):
    png = tmp_path / "bench.png"
    names = ["threshold", "threshold@0.7", "threshold+1", "lopa-d2f-k2", "lopa-threshold-k1-shared"]
    rc = main(
        [
            "bench",
            "--model",
            str(tiny_ckpt),
            "--n",
            "3",
            "--block-size",
            "8",
            "--max-new-tokens",
            "16",
            "--decoders",
            *names,
            "--plot",
            str(png),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert [r["name"] for r in result["rows"]] == names
    for r in result["rows"]:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["wellformed"] <= 1 and r["tpf"] > 0 and r["forwards"] >= 1
    assert any(line.startswith("| threshold |") for line in out)
    # a family's AUP needs two points of its sweep: d2f's has only lopa k=2 here
    assert set(result["aup"]) == {"threshold (τ sweep)", "lopa over threshold, shared score"}
    assert png.stat().st_size > 1000


@pytest.mark.skipif(not (default_checkpoint_dir() / "config.json").exists(), reason="bundled checkpoint not built")
def test_bench_on_a_fresh_problem_set_passes_the_seed_to_its_workers(capsys):
    runs = {}
    for extra in ([], ["--problem-seed", "7"], ["--problem-seed", "7", "--workers", "2"]):
        assert main(["bench", "--n", "8", "--decoders", "threshold", "threshold+1", *extra]) == 0
        runs[" ".join(extra)] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    fixed, one, two = runs[""], runs["--problem-seed 7"], runs["--problem-seed 7 --workers 2"]
    assert fixed["problem_seed"] is None and one["problem_seed"] == 7 and two["workers"] == 2
    lengths = [[(r["tpf"], r["forwards"]) for r in run["rows"]] for run in (fixed, one, two)]
    assert lengths[1] == lengths[2] and lengths[0] != lengths[1]  # other problems, the same in every worker


def test_bench_rejects_unknown_decoder(tiny_ckpt, capsys):
    assert main(["bench", "--model", str(tiny_ckpt), "--n", "1", "--decoders", "beam"]) == 2
    assert "unknown bench decoder" in capsys.readouterr().err


@pytest.mark.skipif(not (default_checkpoint_dir() / "config.json").exists(), reason="bundled checkpoint not built")
def test_bench_n10_on_the_bundled_model(capsys):
    assert main(["bench", "--n", "10"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert [r["name"] for r in result["rows"]] == QUICK
    assert result["n"] == 10 and result["block_size"] == 32 and result["max_new_tokens"] == 64
    assert set(result["aup"]) == set(QUICK_FAMILIES)  # every family of the default run was measured
    for r in result["rows"]:  # the ± column: the binomial standard error of the accuracy over 10 problems
        assert r["accuracy_se"] == pytest.approx(math.sqrt(r["accuracy"] * (1 - r["accuracy"]) / 10))
    assert any(line.startswith("| decoder | settings | acc | ± |") for line in out)
    for family in result["aup"].values():
        assert family["aup"] > 0 and family["points"] == sorted(family["points"])
    assert any(line.startswith("| lopa over threshold (k sweep) |") for line in out)


def _parse(*flags: str):
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(flags))


def test_default_set_and_full_sweep():
    """The default run is the issue's set (threshold τ 0.9, threshold+1, d2f, LoPA over threshold at k = 2, 4, 8)
    on 400 problems; --full is every decoder row (28) on 600 problems, with the τ / k sweeps' families."""
    names, families, n, min_points = selection(_parse())
    table = variants(32, 64)
    cfgs = [table[name] for name in names]
    assert [(c.decoder, c.base_decoder if c.decoder == "lopa" else "", c.num_branches) for c in cfgs] == [
        ("threshold", "", 0),
        ("threshold", "", 0),
        ("d2f", "", 0),
        ("lopa", "threshold", 2),
        ("lopa", "threshold", 4),
        ("lopa", "threshold", 8),
    ]
    assert all(c.threshold == 0.9 and c.branch_score == "mean" for c in cfgs)
    assert [c.extra_fill for c in cfgs] == [0, 1, 0, 0, 0, 0]  # threshold+1: the no-search control
    assert n == 400 and families == QUICK_FAMILIES and min_points == 1
    assert {m for members in families.values() for m in members} == set(names)  # every row is in a family
    # at 400 problems the standard error of any accuracy is at most 2.5 points
    assert math.sqrt(0.25 / n) <= 0.025

    names, families, n, _ = selection(_parse("--full"))
    assert names == FULL == list(table) and len(FULL) == 28 and n == 600 and families == FAMILIES
    assert selection(_parse("--full", "--n", "50"))[2] == 50
    assert selection(_parse("--decoders", "threshold", "d2f"))[:3] == (["threshold", "d2f"], FAMILIES, 600)


def test_aup_by_hand():
    # two points at the best accuracy: ρ₁·y₁ + ½·(ρ₂ − ρ₁)·(y₂ + y₁) = 1·90 + ½·1·180 = 180
    assert aup([(2.0, 90.0), (1.0, 90.0)], y_max=90.0).value == pytest.approx(180.0)
    # a point more than 5 points under y₁ is dropped, one within 5 is kept and weighted by W(y) = exp(−3(1 − y/y_max))
    result = aup([(1.0, 90.0), (2.0, 84.0), (3.0, 86.0)], y_max=90.0)
    assert result.points == ((1.0, 90.0), (3.0, 86.0))
    w = math.exp(-3 * (1 - 86 / 90))
    assert result.value == pytest.approx(90 + 0.5 * 2 * (86 * w + 90))
    assert weight(95.0, 90.0) == 1.0  # capped at 1


def test_bench_branch_parallel_matches_single_process(tiny_ckpt, capsys):
    common = [
        "bench",
        "--model",
        str(tiny_ckpt),
        "--n",
        "2",
        "--block-size",
        "8",
        "--max-new-tokens",
        "16",
        "--decoders",
        "lopa-d2f-k2",
        "--json-only",
    ]
    assert main(common) == 0
    single_run = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*common, "--bp", "2"]) == 0
    parallel_run = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (single_run["bp"], parallel_run["bp"]) == (0, 2)  # the rank count is recorded
    assert main([*common, "--tp", "2"]) == 0
    tensor_run = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert tensor_run["tp"] == 2
    single = single_run["rows"][0]
    for other in (parallel_run["rows"][0], tensor_run["rows"][0]):
        for key in ("accuracy", "wellformed", "tpf", "tpf_paper", "forwards"):
            assert other[key] == single[key], key


def test_bench_workers_equal_one_process(tiny_ckpt, capsys):
    common = ["bench", "--model", str(tiny_ckpt), "--n", "3", "--block-size", "8", "--max-new-tokens", "16"]
    common += ["--decoders", "lopa-threshold-k2", "threshold", "d2f", "threshold+1", "--json-only"]
    assert main([*common, "--workers", "1"]) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*common, "--workers", "2"]) == 0
    two = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (one["workers"], two["workers"]) == (1, 2)
    assert [r["name"] for r in two["rows"]] == ["lopa-threshold-k2", "threshold", "d2f", "threshold+1"]
    keys = ("accuracy", "wellformed", "tpf", "forwards", "agreement", "settings")
    assert [{k: r[k] for k in keys} for r in two["rows"]] == [{k: r[k] for k in keys} for r in one["rows"]]
    assert all("answers" not in r for r in one["rows"] + two["rows"])


def _children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux /proc)."""
    kids = []
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text()
        except (OSError, ValueError):
            continue
        fields = stat.rsplit(")", 1)[-1].split()  # after "pid (comm)": state, ppid, ...
        if fields[1] == str(pid) and fields[0] != "Z":
            kids.append(int(d.name))
    return kids


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads the process table from /proc")
def test_bench_killed_with_sigterm_leaves_no_worker_behind(tiny_ckpt):
    cmd = [sys.executable, "-m", "lopa", "bench", "--model", str(tiny_ckpt), "--n", "600", "--workers", "2"]
    cmd += ["--threads", "1", "--decoders", "threshold", "d2f", "--json-only"]
    parent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kids: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(kids) < 2 and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.2)
            kids = _children(parent.pid)
        assert len(kids) == 2, "the bench did not start its two workers"
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{k}").exists() for k in kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [k for k in kids if Path(f"/proc/{k}").exists()], "a worker outlived its bench"
    finally:
        parent.kill()
        for k in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(k, signal.SIGKILL)


def _answers_row(name: str, answers: list[int | None]) -> Row:
    return Row(name, "", 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, None, 0, "", "", 0.9, answers=answers)


def test_agreement_by_hand():
    """Each row's share of final answers equal to threshold τ=0.9's, position by position (None = no answer)."""
    reference = [12, 7, None, 30]
    rows = [
        _answers_row("d2f", [12, 8, None, 30]),
        _answers_row("threshold", reference),
        _answers_row("vanilla", [None, 7, 3, 29]),
    ]
    set_agreement(rows)
    assert [r.agreement for r in rows] == [3 / 4, 1.0, 1 / 4]
    alone = [_answers_row("d2f", [1])]
    set_agreement(alone)
    assert alone[0].agreement is None  # threshold was not run


def test_bench_with_zero_problems_is_a_usage_error(tiny_ckpt, capsys) -> None:
    assert main(["bench", "--model", str(tiny_ckpt), "--n", "0"]) == 2
    assert "--n must be >= 1" in capsys.readouterr().err
