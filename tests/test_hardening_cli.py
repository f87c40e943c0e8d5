"""Regression tests for what a newcomer hit on the command line: devices, empty benches, unwritable outputs."""

from __future__ import annotations

import pytest
import torch

from lopa.checkpoint.loader import load_checkpoint, resolve_device
from lopa.commands.main import main
from lopa.errors import DeviceUnavailableError


def _generate(ckpt, *extra: str) -> list[str]:
    return ["generate", "--model", str(ckpt), "--block-size", "8", "--max-new-tokens", "8", *extra, "hi"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_says_the_device_is_unavailable(tiny_ckpt, capsys) -> None:
    assert main(_generate(tiny_ckpt, "--device", "cuda")) == 2
    err = capsys.readouterr().err
    assert "no cuda device is available" in err and "safetensors" not in err
    with pytest.raises(DeviceUnavailableError, match="cuda"):
        load_checkpoint(tiny_ckpt, device="cuda:0")


@pytest.mark.parametrize(("device", "words"), [("tpu", "not a device torch knows"), ("meta", "meta holds no data")])
def test_unknown_or_dataless_devices_get_a_named_error(tiny_ckpt, capsys, device: str, words: str) -> None:
    assert main(_generate(tiny_ckpt, "--device", device)) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and "safetensors" not in err


def test_cpu_device_still_resolves() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError, match="numbered"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_bench_with_zero_problems_is_a_usage_error(tiny_ckpt, capsys) -> None:
    assert main(["bench", "--model", str(tiny_ckpt), "--n", "0"]) == 2
    assert "--n must be >= 1" in capsys.readouterr().err


def test_eval_out_that_cannot_be_written_fails_before_the_run(tiny_ckpt, tmp_path, capsys, monkeypatch) -> None:
    import lopa.commands.eval as eval_cli

    def no_model(_args):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(eval_cli, "load_llm", no_model)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    argv = ["eval", "--model", str(tiny_ckpt), "--task", "tiny", "--limit", "1", "--out", str(blocker / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "cannot be written" in err
