"""Loading checkpoint directories of every supported family (:mod:`lopa.model.families`).

Owns the on-disk contract: ``config.json`` (its ``model_type`` names the family, which parses it),
``model.safetensors`` or shards listed in ``model.safetensors.index.json``, tokenizer files,
``generation_config.json``, and an optional peft LoRA adapter merged at load (:mod:`lopa.checkpoint.lora`).
Weights are read only from safetensors files (header checked by safetensors, bytes read by
:mod:`lopa.checkpoint.safetensors_io` without a memory map); pickle-based ``.bin`` / ``.pt`` files are refused
(:mod:`lopa.checkpoint.checks`). Tensor names are translated between the family's checkpoint names and the shared
module names of :class:`~lopa.model.transformer.Transformer` (the one transformer every family runs on); errors
name tensors as the checkpoint spells them. Every problem a user can cause raises a named :mod:`lopa.errors`
exception. Saving is :mod:`lopa.checkpoint.save`. Called by the LLM facade, the CLI, training and the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from lopa.checkpoint.checks import IGNORED_SUFFIXES, check_layer_count, check_values, unexpected_tensor, weight_files
from lopa.checkpoint.hub import resolve_model
from lopa.checkpoint.lora import linear_weight_shapes, plan_lora
from lopa.checkpoint.safetensors_io import TensorFile
from lopa.checkpoint.tokenizer import Tokenizer
from lopa.errors import (
    CheckpointError,
    ConfigError,
    CorruptCheckpointError,
    DeviceUnavailableError,
    TensorMismatchError,
)
from lopa.model.config import ModelConfig, read_json
from lopa.model.families import config_from_hf, family_named
from lopa.model.layers import Rotary
from lopa.model.tp import TPShard, shard_model
from lopa.model.transformer import Transformer

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


@dataclass
class Checkpoint:
    """A loaded checkpoint: everything the engine needs to decode."""

    path: Path
    config: ModelConfig  # special ids resolved from config, generation_config and tokenizer files
    model: Transformer  # eval mode, on device, in dtype, requires_grad off
    tokenizer: Tokenizer
    generation_config: dict


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device, config_dtype: Any = None) -> torch.dtype:
    """The dtype to load in: explicit > config's torch_dtype on CUDA > float32 (CPU half precision is slow)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type != "cuda" or not isinstance(config_dtype, str):
            return torch.float32
        return _DTYPES.get(config_dtype, torch.float32)
    if str(dtype) not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of float32, bfloat16, float16.")
    return _DTYPES[str(dtype)]


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device this machine has; DeviceUnavailableError otherwise (before any file is read)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise DeviceUnavailableError(f"--device {device!r} is not a device torch knows; use cpu, cuda or cuda:N") from e
    if dev.type == "cpu":
        return dev
    if dev.type == "meta":
        raise DeviceUnavailableError(
            "--device meta holds no data, so weights cannot be loaded onto it; use cpu or cuda"
        )
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise DeviceUnavailableError(
            f"--device {device!r}: no {dev.type} device is available on this machine (torch {torch.__version__}); "
            f"use --device cpu"
        )
    count = getattr(backend, "device_count", lambda: 1)()
    if dev.index is not None and dev.index >= count:
        raise DeviceUnavailableError(
            f"--device {device!r}: this machine has {count} {dev.type} device(s), numbered 0..{count - 1}"
        )
    return dev


def load_checkpoint(
    path: str | Path,
    lora: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    shard: TPShard | None = None,
    revision: str | None = None,
) -> Checkpoint:
    """Load a checkpoint directory, or a hub id at ``revision`` (``checkpoint/hub.py``), and merge an optional LoRA
    adapter, onto ``device`` in ``dtype``.

    With ``shard`` (tensor parallelism, :mod:`lopa.model.tp`) only that rank's slices are read and the model
    has the rank's local shapes; ``Checkpoint.config`` stays the full model's."""
    device = resolve_device(device)
    path = resolve_model(path, revision)  # a local directory, else a hub id from the hub cache (checkpoint/hub.py)
    raw = read_json(path / "config.json", required=True)
    config = config_from_hf(raw, source=str(path / "config.json"))
    generation_config = read_json(path / "generation_config.json", required=False)
    tokenizer = Tokenizer.from_dir(path, config, generation_config)
    config = replace(
        config,
        mask_token_id=tokenizer.mask_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    for field in ("mask_token_id", "eos_token_id"):
        if not 0 <= getattr(config, field) < config.vocab_size:
            raise CorruptCheckpointError(
                f"{path}: {field}={getattr(config, field)} is outside the vocabulary (vocab_size="
                f"{config.vocab_size}); fix {field} in config.json."
            )
    dt = resolve_dtype(dtype, device, raw.get("torch_dtype", raw.get("dtype")))
    model = _load_model(path, config, device, dt, lora, shard)
    return Checkpoint(path=path, config=config, model=model, tokenizer=tokenizer, generation_config=generation_config)


def _load_model(
    path: Path,
    config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    lora: str | Path | None,
    shard: TPShard | None = None,
) -> Transformer:
    files = weight_files(path)
    check_layer_count(path, files, config)  # before the module is built: its size comes from config.json
    # Build on the meta device so no random weights are allocated, then assign the loaded tensors:
    # only one copy of the weights ever exists, already on the target device and dtype.
    with torch.device("meta"):
        model = Transformer(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}  # full shapes, checked before any slicing
    if shard is not None and shard.size > 1:
        if lora is not None:
            raise ConfigError("a LoRA adapter cannot be merged into a tensor-parallel shard; merge it first")
        shard_model(model, shard)  # local shapes: each rank reads only its slices below
    else:
        shard = None
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    family = family_named(config.family)
    # The adapter is validated before any weight is read, and merged into each weight in fp32 before the cast
    # to ``dtype``, so a bf16 model gets one rounding of W + BA, not two.
    updates = (
        plan_lora(lora, linear_weight_shapes(model), config.tie_word_embeddings, family.to_shared)
        if lora is not None
        else {}
    )
    state: dict[str, Tensor] = {}
    for file in files:
        try:
            # safe_open validates the header; the bytes are then read with positioned reads (no memory map), so
            # a tensor-parallel shard never has the file's other slices resident.
            with safe_open(str(file), framework="pt", device="cpu") as f, TensorFile(file) as data:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    name = family.tensor_to_shared(key)
                    if key.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and config.tie_word_embeddings):
                        continue
                    if name not in expected:
                        raise unexpected_tensor(file, key, family.name)
                    sl = data.get_slice(key)
                    shape = torch.Size(sl.get_shape())
                    if shape != expected[name]:
                        raise TensorMismatchError(
                            f"{file.name}: tensor {key!r} has shape {tuple(shape)} but config.json implies "
                            f"{tuple(expected[name])}; config.json and the weights disagree."
                        )
                    t = sl[:] if shard is None else shard.read(name, config, sl)  # a shard reads only its slice
                    check_values(file, key, t)
                    t = t.to(device)
                    state[name] = updates[name].merge_into(t.float()).to(dtype) if name in updates else t.to(dtype)
        except CheckpointError:  # already named (mismatch, bad values, missing file)
            raise
        except Exception as e:  # safetensors raises its own error type for a bad header or truncated data
            raise CorruptCheckpointError(
                f"{file} is not a valid safetensors file ({e}); re-download or re-save it."
            ) from e
    missing = sorted(family.tensor_to_checkpoint(k) for k in set(expected) - set(state))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise TensorMismatchError(
            f"{path}: {len(missing)} tensor(s) missing from the weights: {shown}. The checkpoint is incomplete or "
            f"config.json describes a different model (tie_word_embeddings, num_hidden_layers?)."
        )
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True replaced the shared Parameter
    # The RoPE table is not a checkpoint tensor: rebuild it on the device, kept in fp32 for precision.
    with torch.device(device):
        model.rotary = Rotary(config.head_dim, config.rope_theta, config.rope_scaling, config.max_position_embeddings)
    if not (bool(torch.isfinite(model.rotary.inv_freq).all()) and math.isfinite(float(model.rotary.scale))):
        raise CorruptCheckpointError(
            f"{path}/config.json: rope_theta={config.rope_theta!r} with rope_scaling={config.rope_scaling!r} gives "
            f"non-finite RoPE frequencies; the model would decode garbage. Fix the RoPE settings in config.json."
        )
    model.requires_grad_(False)
    return model.eval()
