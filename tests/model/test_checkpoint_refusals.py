"""Checkpoints that used to hang, grow memory without bound, read files outside the checkpoint, or load and decode
garbage (non-finite or integer weights): each is refused by name, within seconds, before the model is built or any
weight is merged."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lopa import LLM
from lopa.checkpoint.checks import INDEX_FILE
from lopa.checkpoint.loader import load_checkpoint
from lopa.errors import AdapterError, CorruptCheckpointError, TensorMismatchError
from lopa.testing import make_tiny_checkpoint


def _edit(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))  # json writes NaN / Infinity as the bare words Python's json reads back


KEY = "model.layers.0.mlp.up_proj.weight"


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


def test_a_million_layers_is_refused_from_the_tensor_headers(ckpt: Path) -> None:
    """Run in a child process with a deadline: before the check, building the module grew memory for minutes."""
    _edit(ckpt / "config.json", num_hidden_layers=1_000_000)
    code = (
        "import sys\nfrom lopa.checkpoint.loader import load_checkpoint\nfrom lopa.errors import TensorMismatchError\n"
        f"try:\n    load_checkpoint({str(ckpt)!r})\nexcept TensorMismatchError as e:\n    print(e)\n    sys.exit(3)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "num_hidden_layers=1000000" in r.stdout and "layers 0..1 (2 distinct)" in r.stdout


@pytest.mark.parametrize("layers", [1, 3])
def test_a_layer_count_that_disagrees_with_the_weights_names_both(ckpt: Path, layers: int) -> None:
    _edit(ckpt / "config.json", num_hidden_layers=layers)
    with pytest.raises(TensorMismatchError, match=f"num_hidden_layers={layers}, but the weights hold layers 0..1"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_a_fifo_in_place_of_a_file_is_refused_without_blocking(ckpt: Path, name: str) -> None:
    (ckpt / name).unlink()
    os.mkfifo(ckpt / name)
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            LLM(ckpt)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 (handed to the test thread)
            outcome.append(e)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(60)
    if thread.is_alive():  # blocked opening the FIFO for reading: a writer that closes at once releases it
        fd = os.open(ckpt / name, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(60)
        pytest.fail(f"LLM(dir) blocked on a FIFO named {name}")
    error = outcome[0]
    assert isinstance(error, (CorruptCheckpointError, TensorMismatchError)), repr(error)
    assert "not a regular file" in str(error) or "not regular files" in str(error)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rope_theta", float("nan")),
        ("rope_theta", float("inf")),
        ("rope_theta", 0),
        ("rms_norm_eps", float("nan")),
        ("rope_scaling", {"rope_type": "linear", "factor": float("nan")}),
        ("rope_scaling", {"rope_type": "linear", "factor": 0}),
    ],
)
def test_non_finite_rope_and_norm_settings_are_refused(ckpt: Path, field: str, value: object) -> None:
    _edit(ckpt / "config.json", **{field: value})
    with pytest.raises(CorruptCheckpointError, match=field):
        load_checkpoint(ckpt)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_position_embeddings", -5),
        ("max_position_embeddings", 0),
        ("num_attention_heads", 0),
        ("hidden_size", -64),
        ("vocab_size", "many"),
    ],
)
def test_sizes_that_are_not_positive_integers_are_refused_by_field(ckpt: Path, field: str, value: object) -> None:
    _edit(ckpt / "config.json", **{field: value})
    with pytest.raises(CorruptCheckpointError, match="config.json") as info:
        LLM(ckpt)
    assert field in str(info.value) or "invalid value" in str(info.value)
    assert "[1, -5]" not in str(info.value)


@pytest.mark.parametrize("alpha", [float("inf"), float("-inf"), float("nan"), "8"])
def test_an_adapter_with_a_non_finite_alpha_is_refused(ckpt: Path, lora: Path, alpha: object) -> None:
    _edit(lora / "adapter_config.json", lora_alpha=alpha)
    with pytest.raises(AdapterError, match="lora_alpha"):
        load_checkpoint(ckpt, lora=lora)


def test_an_adapter_alpha_pattern_is_checked_too(ckpt: Path, lora: Path) -> None:
    _edit(lora / "adapter_config.json", alpha_pattern={"q_proj": float("inf")})
    with pytest.raises(AdapterError, match="lora_alpha=inf for .*q_proj"):
        load_checkpoint(ckpt, lora=lora)


def test_the_unmodified_copies_still_load(ckpt: Path, lora: Path) -> None:
    assert load_checkpoint(ckpt, lora=lora).model is not None
