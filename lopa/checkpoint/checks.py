"""What the loader refuses before and while it reads weights, each as a named :mod:`lopa.errors` exception.

Which files hold the weights (:func:`weight_files`: the shard index, stray or non-regular files, pickle-only
checkpoints), whether the tensor names hold exactly the configured layers (:func:`check_layer_count`, read from
the headers before any module is built), and whether each tensor's values can be weights (:func:`check_values`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from lopa.errors import CheckpointNotFoundError, CorruptCheckpointError, TensorMismatchError, UnsafeWeightsError
from lopa.model.config import ModelConfig, read_json
from lopa.model.families import family_named

INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Older exports store the RoPE table; it is recomputed from the config, never loaded.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from the shard index when there is one."""
    index = path / INDEX_FILE
    if index.is_file():
        data = read_json(index, required=True)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CorruptCheckpointError(f"{index} has no 'weight_map'; re-save the checkpoint.")
        root, names = path.resolve(), sorted({str(v) for v in weight_map.values()})
        outside = [n for n in names if (path / n).resolve().parent != root or not n.endswith(".safetensors")]
        if outside:
            raise CorruptCheckpointError(
                f"{index} names shard(s) {outside} that are not *.safetensors files inside {path}; a shard index "
                f"may only list files of its own directory."
            )
        files = [path / name for name in names]
        odd = [f.name for f in files if f.exists() and not f.is_file()]
        if odd:
            raise CorruptCheckpointError(
                f"{index} lists {odd}, which are not regular files; shards must be plain files."
            )
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointNotFoundError(
                f"{index} lists shard(s) {missing} that are not in {path}; the download is incomplete."
            )
        return files
    files = sorted(path.glob("*.safetensors"))
    odd = [f.name for f in files if not f.is_file()]
    if odd:  # a FIFO would block the reader forever, a directory fails deep inside safetensors
        raise CorruptCheckpointError(f"{path}: {odd} are not regular files; weights must be plain *.safetensors files.")
    if files:
        return files
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise UnsafeWeightsError(
            f"{path} holds weights only as pickle files {pickled}; lopa never unpickles weights. Convert them to "
            f"safetensors (e.g. model.save_pretrained(dir, safe_serialization=True))."
        )
    raise CheckpointNotFoundError(f"{path} has no *.safetensors weight files; add model.safetensors.")


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def check_layer_count(path: Path, files: list[Path], config: ModelConfig) -> None:
    """TensorMismatchError unless the weights hold exactly layers 0..num_hidden_layers-1 (read from the headers).

    The module is built from config.json, so a config claiming a million layers would allocate a million layer
    objects before any tensor is compared: the count is checked against the tensor names first.
    """
    family = family_named(config.family)
    layers: set[int] = set()
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                keys = list(f.keys())
        except Exception as e:  # safetensors raises its own error type for a bad header
            raise CorruptCheckpointError(
                f"{file} is not a valid safetensors file ({e}); re-download or re-save it."
            ) from e
        for key in keys:
            name = family.tensor_to_shared(key)
            if name is None and not key.endswith(IGNORED_SUFFIXES):  # another family's names: say so, not "0 layers"
                raise unexpected_tensor(file, key, family.name)
            m = _LAYER.match(name or "")
            if m is not None:
                layers.add(int(m[1]))
    n = config.num_hidden_layers
    if layers != set(range(n)):
        have = f"layers 0..{max(layers)} ({len(layers)} distinct)" if layers else "no layers"
        missing = sorted(set(range(n)) - layers)
        extra = sorted(layers - set(range(n)))
        parts = [
            f"missing layer(s) {_few(missing)}" if missing else "",
            f"extra layer(s) {_few(extra)}" if extra else "",
        ]
        raise TensorMismatchError(
            f"{path}/config.json says num_hidden_layers={n}, but the weights hold {have}: "
            f"{'; '.join(p for p in parts if p)}. config.json and the weights disagree."
        )


def unexpected_tensor(file: Path, key: str, family: str) -> TensorMismatchError:
    return TensorMismatchError(
        f"{file.name}: unexpected tensor {key!r}; the checkpoint does not match a {family} model with this "
        f"config.json (wrong architecture, or an unmerged adapter?)."
    )


def _few(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:3]))
    return shown + (f" and {len(numbers) - 3} more" if len(numbers) > 3 else "")


def check_values(file: Path, key: str, t: Tensor) -> None:
    """Weights must be floating point and finite: an integer or NaN tensor would decode garbage silently."""
    if not t.is_floating_point():
        raise TensorMismatchError(
            f"{file.name}: tensor {key!r} has dtype {str(t.dtype).removeprefix('torch.')}; model weights must be "
            f"float32, bfloat16 or float16. The file was not written by a model's save."
        )
    # In chunks of 1M elements: one whole-tensor mask per weight would fragment the heap by a quarter of the model.
    if not all(bool(torch.isfinite(c).all()) for c in t.reshape(-1).split(1 << 20)):
        raise CorruptCheckpointError(
            f"{file.name}: tensor {key!r} holds NaN or inf values; the weights are corrupt (re-download them, or "
            f"restore a checkpoint saved before training diverged)."
        )
