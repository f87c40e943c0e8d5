"""Checkpoints and adapters that used to load silently and must be refused with a named error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lopa.checkpoint.checks import INDEX_FILE
from lopa.checkpoint.loader import load_checkpoint
from lopa.errors import AdapterError, CorruptCheckpointError, TensorMismatchError
from lopa.testing import make_tiny_checkpoint

KEY = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture
def ckpt(tiny_ckpt: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_ckpt, tmp_path / "ckpt"))


@pytest.fixture
def lora(tiny_lora: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_lora, tmp_path / "lora"))


def _set_tensor(ckpt: Path, key: str, value: torch.Tensor) -> None:
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors[key] = value
    save_file(tensors, str(ckpt / "model.safetensors"))


def test_the_unmodified_copies_load(ckpt: Path, lora: Path) -> None:
    """The control for the refusals below: the copies load to exactly the weights on disk, and the adapter changes
    exactly the modules it targets, each by (alpha / r) · B @ A read from its own files."""
    on_disk = load_file(str(ckpt / "model.safetensors"))
    base = load_checkpoint(ckpt).model.state_dict()
    merged = load_checkpoint(ckpt, lora=lora).model.state_dict()
    assert set(base) == set(on_disk) and all(torch.equal(base[k], w) for k, w in on_disk.items())
    config = json.loads((lora / "adapter_config.json").read_text())
    adapter = load_file(str(lora / "adapter_model.safetensors"))
    prefix = "base_model.model."
    targeted = sorted(k.removeprefix(prefix).replace(".lora_A", "") for k in adapter if ".lora_A." in k)
    assert targeted and all(k.split(".")[-2] in config["target_modules"] for k in targeted)
    assert sorted(k for k in base if not torch.equal(base[k], merged[k])) == targeted
    for k in targeted:
        a, b = (
            adapter[prefix + k.replace(".weight", ".lora_A.weight")],
            adapter[prefix + k.replace(".weight", ".lora_B.weight")],
        )
        torch.testing.assert_close(merged[k], on_disk[k] + config["lora_alpha"] / config["r"] * b @ a)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(ckpt: Path, bad: float) -> None:
    w = load_file(str(ckpt / "model.safetensors"))[KEY]
    w[3, 5] = bad
    _set_tensor(ckpt, KEY, w)
    with pytest.raises(CorruptCheckpointError, match=rf"{KEY}.*NaN or inf"):
        load_checkpoint(ckpt)


def test_integer_weights_are_refused(ckpt: Path) -> None:
    w = load_file(str(ckpt / "model.safetensors"))[KEY]
    _set_tensor(ckpt, KEY, torch.zeros(w.shape, dtype=torch.int32))
    with pytest.raises(TensorMismatchError, match=rf"{KEY}.*dtype int32"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("where", ["../outside.safetensors", "ABSOLUTE", "sub/../../x.safetensors", "notes.txt"])
def test_shard_index_may_only_name_files_inside_the_checkpoint(tmp_path: Path, where: str) -> None:
    path = make_tiny_checkpoint(tmp_path / "sharded", shards=2)
    index = json.loads((path / INDEX_FILE).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    target = str(tmp_path / "outside.safetensors") if where == "ABSOLUTE" else where
    shutil.copyfile(path / first, tmp_path / "outside.safetensors")  # a real file there: refused, not missing
    index["weight_map"] = {k: (target if v == first else v) for k, v in index["weight_map"].items()}
    (path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match="inside"):
        load_checkpoint(path)


def _edit_adapter(lora: Path, **changes) -> None:
    cfg = json.loads((lora / "adapter_config.json").read_text())
    cfg.update(changes)
    (lora / "adapter_config.json").write_text(json.dumps(cfg))


def test_adapter_whose_declared_rank_disagrees_with_its_tensors_is_refused(ckpt: Path, lora: Path) -> None:
    r = json.loads((lora / "adapter_config.json").read_text())["r"]
    _edit_adapter(lora, r=r * 2)
    with pytest.raises(AdapterError, match=rf"r={r * 2}.*rank {r}"):
        load_checkpoint(ckpt, lora=lora)


def test_adapter_rank_pattern_is_checked_too(ckpt: Path, lora: Path) -> None:
    r = json.loads((lora / "adapter_config.json").read_text())["r"]
    _edit_adapter(lora, rank_pattern={"q_proj": r + 1})
    with pytest.raises(AdapterError, match="q_proj"):
        load_checkpoint(ckpt, lora=lora)


def test_adapter_with_nan_is_refused(ckpt: Path, lora: Path) -> None:
    tensors = load_file(str(lora / "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(lora / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="NaN"):
        load_checkpoint(ckpt, lora=lora)
