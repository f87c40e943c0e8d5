"""lopa sweep: the grid, the Pareto front, the table and the PNG plots (scripted model, no weights)."""

import csv
import json
from pathlib import Path

import pytest

import lopa.commands.sweep as sweep_command
from lopa.commands.main import main
from lopa.config import DecodeConfig
from lopa.errors import ConfigError
from lopa.eval import plots, sweep
from lopa.testing import FakeLLM


@pytest.mark.parametrize(
    ("points", "front"),
    [
        ([(1, 1), (2, 2), (3, 1), (1, 3)], [1, 2, 3]),  # (1,1) is beaten by (2,2)
        ([(1, 1)], [0]),
        ([(1, 1), (1, 1)], [0, 1]),  # equal points do not dominate each other
        ([(1, 5), (2, 4), (3, 3), (2, 2), (0, 0)], [0, 1, 2]),
        ([(2, 2), (2, 3)], [1]),  # same x, higher y wins
        ([], []),
    ],
)
def test_pareto_front(points: list[tuple[float, float]], front: list[int]) -> None:
    assert plots.pareto_front(points) == front


def test_grid_expands_branches_for_lopa_only() -> None:
    configs = sweep.grid(DecodeConfig(max_new_tokens=32), ["vanilla", "threshold", "lopa"], [1, 4], [0.9, 0.7])
    names = [sweep.run_name(c) for c in configs]
    assert names == [
        "vanilla",
        "threshold-t0.9",
        "threshold-t0.7",
        "lopa-d2f-k1-t0.9",
        "lopa-d2f-k4-t0.9",
        "lopa-d2f-k1-t0.7",
        "lopa-d2f-k4-t0.7",
    ]
    assert all(c.branches == 0 for c in configs if c.decoder != "lopa")
    with pytest.raises(ConfigError, match="unknown decoder"):
        sweep.grid(DecodeConfig(), ["nope"], [1], [0.9])
    with pytest.raises(ConfigError, match="threshold"):
        sweep.grid(DecodeConfig(), ["threshold"], [1], [1.5])


def test_plots_write_png_files(tmp_path: Path) -> None:
    keys = ("name", "decoder", "branches", "threshold", "score", "tok_s", "tpf")
    rows = [
        dict(zip(keys, ("threshold-t0.9", "threshold", 0, 0.9, 0.5, 10.0, 1.5), strict=True)),
        dict(zip(keys, ("lopa-k2", "lopa", 2, 0.9, 0.55, 14.0, 2.0), strict=True)),
        dict(zip(keys, ("lopa-k4", "lopa", 4, 0.9, 0.52, 18.0, 2.6), strict=True)),
    ]
    for path in (
        plots.plot_tpf_vs_branches(rows, tmp_path / "tpf.png"),
        plots.plot_score_vs_throughput(rows, tmp_path / "score.png"),
    ):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_sweep_command_writes_table_and_plots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "gsm8k.jsonl"
    rows = [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(3)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def answer(prompt: str) -> str:
        i = int(prompt.rsplit("What is ", 1)[1].split(" ")[0])
        return f" {i} + 1 = {i + 1 if i else 5}\n#### {i + 1 if i else 5}"

    monkeypatch.setattr(sweep_command, "load_llm", lambda args: FakeLLM(answer))
    out = tmp_path / "sweep"
    argv = ["sweep", "--task", "gsm8k", "--data", str(data), "--decoders", "threshold,lopa", "--branch-grid", "1,2"]
    argv += ["--thresholds", "0.9,0.8", "--max-new-tokens", "64", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    with open(out / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == [
        "threshold-t0.9",
        "threshold-t0.8",
        "lopa-d2f-k1-t0.9",
        "lopa-d2f-k2-t0.9",
        "lopa-d2f-k1-t0.8",
        "lopa-d2f-k2-t0.8",
    ]
    assert all(float(r["score"]) == pytest.approx(2 / 3) for r in table)
    for r in table:
        summary = json.loads((out / "runs" / r["name"] / "summary.json").read_text())
        assert summary["settings"]["decode"]["threshold"] == float(r["threshold"])
    assert (out / "tpf_vs_branches.png").stat().st_size > 0
    assert (out / "score_vs_tok_s.png").stat().st_size > 0
    assert "| name |" in (out / "sweep.md").read_text()
