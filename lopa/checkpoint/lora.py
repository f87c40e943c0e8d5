"""LoRA adapters in peft's on-disk format, merged into the base weights.

:func:`plan_lora` reads and validates an adapter; :func:`lopa.checkpoint.loader.load_checkpoint` calls it before reading
the base weights and merges each update as its weight streams in (before the dtype cast). :func:`merge_lora` does
the same for an already-loaded model. An adapter directory holds
``adapter_config.json`` (r, lora_alpha, target_modules, use_rslora, fan_in_fan_out, optional rank/alpha patterns)
and ``adapter_model.safetensors`` with keys such as
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. Module names are the checkpoint family's own
(``model.transformer.blocks.0.q_proj`` for LLaDA) and ``target_modules`` is matched against them, as peft does;
the family's name table maps them onto the shared modules. The merge is ``W += scale * B @ A``, done in
fp32 and cast back, so the merged model costs nothing extra at decode time. Pickled adapters are refused.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from lopa.errors import AdapterError, CheckpointNotFoundError, CorruptCheckpointError, UnsafeWeightsError
from lopa.model.families import family_named

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(adapter_config, tensors) of a peft LoRA directory; raises a named error for anything unusable."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointNotFoundError(f"LoRA adapter directory {path} does not exist; pass a peft adapter directory.")
    cfg_file, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not cfg_file.is_file():
        raise CheckpointNotFoundError(f"{cfg_file} does not exist; a peft LoRA adapter directory needs it.")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{cfg_file} is not valid JSON ({e}).") from e
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{cfg_file}: peft_type {peft_type!r} is not supported; only LoRA adapters can be merged.")
    if cfg.get("use_dora"):
        raise AdapterError(f"{cfg_file}: DoRA adapters (use_dora=true) are not supported; use a plain LoRA adapter.")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{cfg_file}: bias={cfg['bias']!r} adapters are not supported; train with bias='none'.")
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            raise UnsafeWeightsError(
                f"{path}/adapter_model.bin is a pickle file, which lopa never loads; convert it to "
                f"{ADAPTER_WEIGHTS} (e.g. peft's save_pretrained(..., safe_serialization=True))."
            )
        raise CheckpointNotFoundError(f"{weights} does not exist; a peft LoRA adapter directory needs it.")
    try:
        with safe_open(str(weights), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as e:  # safetensors raises its own error type for a bad header
        raise CorruptCheckpointError(f"{weights} is not a valid safetensors file ({e}); re-save the adapter.") from e
    return cfg, tensors


@dataclass(frozen=True)
class LoraUpdate:
    """One module's low-rank update; :meth:`delta` materialises it only when it is merged."""

    a: Tensor  # (r, in)
    b: Tensor  # (out, r)
    scale: float
    fan_in_fan_out: bool

    def delta(self, device: torch.device | str = "cpu") -> Tensor:
        d = self.b.to(device).float() @ self.a.to(device).float()  # (out, in)
        return (d.T if self.fan_in_fan_out else d) * self.scale

    def merge_into(self, w: Tensor) -> Tensor:
        """``w + delta`` computed in fp32 and cast back to ``w``'s dtype once."""
        return (w.float() + self.delta(w.device)).to(w.dtype)


def plan_lora(
    path: str | Path,
    weight_shapes: dict[str, torch.Size],
    tied_head: bool = False,
    to_shared: Callable[[str], str | None] | None = None,
) -> dict[str, LoraUpdate]:
    """Read and validate an adapter against the base's linear weights, before anything is merged.

    ``weight_shapes`` maps each linear module name (``model.layers.0.self_attn.q_proj``) to its weight shape.
    ``to_shared`` maps the adapter's module names (the checkpoint family's) onto those names; identity if None.
    Returns the update per shared weight name (``...q_proj.weight``). Raises AdapterError naming the first bad
    tensor as the adapter spells it.
    """
    cfg, tensors = read_adapter(path)
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(
                f"adapter tensor {key!r} is not a LoRA A/B matrix (embedding LoRA and modules_to_save are not "
                f"supported); is this an adapter for another base?"
            )
        pairs.setdefault(m["module"], {})[m["part"]] = t
    targets = cfg.get("target_modules")
    plan: dict[str, LoraUpdate] = {}
    for name, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"adapter module {name!r} has lora_{next(iter(ab))} but not its partner; re-save it.")
        shared = to_shared(name) if to_shared is not None else name
        if shared not in weight_shapes:
            raise AdapterError(
                f"adapter tensor {name}.lora_A.weight targets {name!r}, which is not a linear layer of this model; "
                f"is this an adapter for another base?"
            )
        if targets is not None and not is_targeted(name, targets):
            raise AdapterError(f"adapter module {name!r} is not in target_modules={targets!r}; the adapter is broken.")
        if tied_head and shared == "lm_head":
            raise AdapterError(
                "the adapter changes lm_head, but this model ties lm_head to the embeddings; unsupported."
            )
        a, b = ab["A"], ab["B"]  # (r, in), (out, r)
        fan = bool(cfg.get("fan_in_fan_out"))
        fits = a.dim() == 2 and b.dim() == 2 and a.shape[0] == b.shape[1]
        shape = (a.shape[1], b.shape[0]) if fan else (b.shape[0], a.shape[1])
        if not fits or tuple(weight_shapes[shared]) != shape:
            raise AdapterError(
                f"adapter tensors {name}.lora_A/B have shapes {tuple(a.shape)} / {tuple(b.shape)}, which do not fit "
                f"the model's {name}.weight {tuple(weight_shapes[shared])}; is this an adapter for another base?"
            )
        declared = _pattern(cfg.get("rank_pattern"), name, cfg.get("r"))
        if declared is not None and declared != a.shape[0]:
            raise AdapterError(
                f"adapter_config.json declares r={declared!r} for {name!r}, but its lora_A/B tensors have rank "
                f"{a.shape[0]}; peft would scale the update by lora_alpha/{declared!r}: re-save the adapter."
            )
        for part, t in (("A", a), ("B", b)):
            if not t.is_floating_point():
                raise AdapterError(f"adapter tensor {name}.lora_{part}.weight has dtype {t.dtype}, not a float type.")
            if not torch.isfinite(t).all():
                raise AdapterError(f"adapter tensor {name}.lora_{part}.weight holds NaN or inf values; re-train it.")
        plan[f"{shared}.weight"] = LoraUpdate(a, b, _scale(cfg, name, a.shape[0]), fan)
    return plan


def linear_weight_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Weight shape of every nn.Linear in ``model`` (works on the meta device too)."""
    return {name: m.weight.shape for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def merge_lora(model: nn.Module, path: str | Path) -> list[str]:
    """Merge the adapter at ``path`` into an already-loaded ``model`` in place; returns the merged weight names.

    The whole adapter is validated first, so a bad adapter never leaves a half-merged model.
    """
    config = getattr(model, "config", None)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    to_shared = family_named(config.family).to_shared if config is not None else None
    plan = plan_lora(path, linear_weight_shapes(model), tied_head=tied, to_shared=to_shared)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, update in plan.items():
            params[key].copy_(update.merge_into(params[key]))
    return sorted(plan)


def is_targeted(name: str, targets: str | list[str]) -> bool:
    """peft's rule: a regex string must match the full name; a list entry must equal the name or its suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None or targets == "all-linear"
    return any(name == t or name.endswith(f".{t}") for t in targets)


def _scale(cfg: dict[str, Any], name: str, rank: int) -> float:
    """lora_alpha / r (or / sqrt(r) with rsLoRA), honouring peft's per-module rank/alpha patterns."""
    alpha_value = _pattern(cfg.get("alpha_pattern"), name, cfg.get("lora_alpha", 8))
    r_value = _pattern(cfg.get("rank_pattern"), name, rank)
    for field, value in (("lora_alpha", alpha_value), ("r", r_value)):
        number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
        if not math.isfinite(number) or (field == "r" and number <= 0):
            raise AdapterError(
                f"adapter_config.json: {field}={value!r} for {name!r} is not a finite number"
                f"{' > 0' if field == 'r' else ''}; the merged weights would be garbage. Fix adapter_config.json."
            )
    alpha, r = float(alpha_value), float(r_value)
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _pattern(patterns: dict[str, Any] | None, name: str, default: Any) -> Any:
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", name):
            return value
    return default
