"""`lopa bench` end to end: the table, the JSON line and the plot."""

from __future__ import annotations

import json

import pytest

from lopa.cli import main
from lopa.tiny import default_checkpoint_dir
from lopa.tiny.bench import DEFAULT


def test_bench_on_a_random_checkpoint(tiny_ckpt, tmp_path, capsys):
    png = tmp_path / "bench.png"
    names = ["threshold", "threshold+1", "lopa-d2f-k2", "lopa-threshold-k1-shared"]
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
        assert 0 <= r["accuracy"] <= 1 and r["tpf"] > 0 and r["forwards"] >= 1
    assert any(line.startswith("| threshold |") for line in out)
    assert png.stat().st_size > 1000


def test_bench_rejects_unknown_decoder(tiny_ckpt, capsys):
    assert main(["bench", "--model", str(tiny_ckpt), "--n", "1", "--decoders", "beam"]) == 2
    assert "unknown bench decoder" in capsys.readouterr().err


@pytest.mark.skipif(not (default_checkpoint_dir() / "config.json").exists(), reason="bundled checkpoint not built")
def test_bench_n5_on_the_bundled_model(capsys):
    assert main(["bench", "--n", "5", "--json-only"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["name"] for r in result["rows"]] == DEFAULT
    assert result["n"] == 5


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
    single, parallel = single_run["rows"][0], parallel_run["rows"][0]
    for key in ("accuracy", "tpf", "tpf_paper", "forwards"):
        assert parallel[key] == single[key]
