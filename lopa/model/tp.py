"""Megatron-style tensor parallelism applied from outside the model classes (docs/dist.md).

A :class:`TPShard` says which slice of every weight one rank of a tensor-parallel group of ``size`` ranks holds:

- attention: q/k/v column-parallel by heads, ``o_proj`` row-parallel followed by an all-reduce. With fewer kv
  heads than ranks, kv heads are replicated: rank ``t`` holds kv head ``t // (size // kv_heads)``, which is the
  kv head every one of its query heads uses.
- MLP: gate/up column-parallel, ``down_proj`` row-parallel followed by an all-reduce.
- embeddings, final norm, LM head, rotary table: replicated (every rank computes the full logits, so scoring
  needs no communication; see docs/dist.md for the memory this costs).

:func:`shard_model` rewrites a model built on the meta device (shapes only) into one rank's local shapes;
:meth:`TPShard.read` takes one rank's slice of a checkpoint tensor from a safetensors slice, so the loader
never reads a full weight that it would then cut. ``model.config`` of a sharded model is the *local* view
(heads, kv heads, intermediate size of this rank), so the runner allocates the cache shard by itself.
The all-reduce is an :class:`AllReduce` hook that :mod:`lopa.parallel` binds to the group's timed collective.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from lopa.errors import ConfigError
from lopa.model.config import ModelConfig

_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # output features split
_ROW = ("o_proj", "down_proj")  # input features split, all-reduce after


class AllReduce:
    """Sum over the tensor-parallel group, in place; bound to a collective once the group exists."""

    def __init__(self) -> None:
        self.fn: Callable[[Tensor], Tensor] | None = None

    def __call__(self, t: Tensor) -> Tensor:
        if self.fn is None:
            raise RuntimeError("tensor-parallel all-reduce used before lopa.parallel bound it to a process group")
        return self.fn(t)


class RowParallelLinear(nn.Linear):
    """``nn.Linear`` over this rank's slice of the input features, summed over the group (bias on rank 0 only)."""

    def __init__(self, local_in: int, out: int, bias: bool, reduce: AllReduce, device: str = "meta") -> None:
        super().__init__(local_in, out, bias=bias, device=device)
        self.reduce = reduce

    def forward(self, x: Tensor) -> Tensor:
        return self.reduce(F.linear(x, self.weight, self.bias))


@dataclass(frozen=True)
class TPShard:
    """Rank ``rank`` of a tensor-parallel group of ``size`` ranks."""

    rank: int
    size: int

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ConfigError(f"tensor-parallel rank {self.rank} of {self.size} is not valid")

    def check(self, cfg: ModelConfig) -> None:
        """Named error when the model's shape cannot be split ``size`` ways."""
        heads, kv, inner = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
        problems = []
        if heads % self.size:
            problems.append(f"num_attention_heads={heads}")
        if kv % self.size and self.size % kv:
            problems.append(f"num_key_value_heads={kv} (neither a multiple nor a divisor of it)")
        if inner % self.size:
            problems.append(f"intermediate_size={inner}")
        if problems:
            raise ConfigError(
                f"--tp {self.size} does not divide this model: {', '.join(problems)}; choose a tensor-parallel "
                "size that divides the attention heads and the MLP width"
            )

    def heads(self, cfg: ModelConfig) -> tuple[int, int, int, int]:
        """(first q head, local q heads, first kv head, local kv heads) of this rank."""
        hq = cfg.num_attention_heads // self.size
        kv = cfg.num_key_value_heads
        if kv % self.size == 0:
            hkv = kv // self.size
            return self.rank * hq, hq, self.rank * hkv, hkv
        return self.rank * hq, hq, self.rank // (self.size // kv), 1  # replicated kv heads

    def local_config(self, cfg: ModelConfig) -> ModelConfig:
        _, hq, _, hkv = self.heads(cfg)
        return replace(
            cfg, num_attention_heads=hq, num_key_value_heads=hkv, intermediate_size=cfg.intermediate_size // self.size
        )

    def span(self, key: str, cfg: ModelConfig) -> tuple[int, int, int] | None:
        """(dim, start, end) of ``key``'s slice on this rank, or None when the tensor is replicated."""
        parts = key.split(".")
        if len(parts) < 2 or parts[-2] not in _COLUMN + _ROW:
            return None
        name, kind = parts[-2], parts[-1]
        d = cfg.head_dim
        q0, hq, k0, hkv = self.heads(cfg)
        inner = cfg.intermediate_size // self.size
        ranges = {
            "q_proj": (q0 * d, (q0 + hq) * d),
            "k_proj": (k0 * d, (k0 + hkv) * d),
            "v_proj": (k0 * d, (k0 + hkv) * d),
            "o_proj": (q0 * d, (q0 + hq) * d),
            "gate_proj": (self.rank * inner, (self.rank + 1) * inner),
            "up_proj": (self.rank * inner, (self.rank + 1) * inner),
            "down_proj": (self.rank * inner, (self.rank + 1) * inner),
        }
        start, end = ranges[name]
        if name in _ROW:
            return (1, start, end) if kind == "weight" else None  # a row-parallel bias is whole (kept on rank 0)
        return 0, start, end

    def read(self, key: str, cfg: ModelConfig, sl: Any) -> Tensor:
        """This rank's slice of tensor ``key`` from a safetensors ``get_slice`` handle (reads only that slice)."""
        span = self.span(key, cfg)
        if span is None:
            t = sl[:]
            if key.endswith(tuple(f"{r}.bias" for r in _ROW)) and self.rank != 0:
                t = t.zero_()  # added once after the sum
            return t
        dim, start, end = span
        return sl[start:end] if dim == 0 else sl[:, start:end]

    def local_shape(self, key: str, cfg: ModelConfig, full: tuple[int, ...]) -> tuple[int, ...]:
        span = self.span(key, cfg)
        if span is None:
            return full
        dim, start, end = span
        shape = list(full)
        shape[dim] = end - start
        return tuple(shape)


def shard_model(model: nn.Module, shard: TPShard) -> AllReduce:
    """Turn a meta-device model (Dream module classes) into ``shard``'s local shapes; returns its all-reduce hook.

    Every layer's ``self_attn`` gets local head counts and local q/k/v/o projections, every ``mlp`` local
    gate/up/down; ``o_proj`` and ``down_proj`` become :class:`RowParallelLinear`. Parameter names are unchanged,
    so the rank's state dict loads by name.
    """
    cfg: ModelConfig = model.config  # type: ignore[assignment]
    shard.check(cfg)
    reduce = AllReduce()
    local = shard.local_config(cfg)
    for layer in model.model.layers:  # type: ignore[union-attr]
        attn, mlp = layer.self_attn, layer.mlp
        attn.heads, attn.kv_heads = local.num_attention_heads, local.num_key_value_heads
        for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            owner = attn if hasattr(attn, name) else mlp
            old: nn.Linear = getattr(owner, name)
            out = shard.local_shape(f"{name}.weight", cfg, tuple(old.weight.shape))[0]
            setattr(owner, name, nn.Linear(old.in_features, out, bias=old.bias is not None, device="meta"))
        for owner, name in ((attn, "o_proj"), (mlp, "down_proj")):
            old = getattr(owner, name)
            local_in = shard.local_shape(f"{name}.weight", cfg, tuple(old.weight.shape))[1]
            new = RowParallelLinear(local_in, old.out_features, old.bias is not None, reduce)
            setattr(owner, name, new)
    model.config = local  # type: ignore[assignment]
    model.tp_shard = shard  # type: ignore[assignment]
    model.tp_reduce = reduce  # type: ignore[assignment]
    return reduce
