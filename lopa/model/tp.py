"""Megatron-style tensor parallelism applied from outside the model classes (docs/dist.md).

A :class:`TPShard` says which slice of every weight one rank of a tensor-parallel group of ``size`` ranks holds:

- attention: q/k/v column-parallel by heads, ``o_proj`` row-parallel followed by an all-reduce. With fewer kv
  heads than ranks, kv heads are replicated: rank ``t`` holds kv head ``t // (size // kv_heads)``, which is the
  kv head every one of its query heads uses.
- MLP: gate/up column-parallel, ``down_proj`` row-parallel followed by an all-reduce.
- mixture of experts (:mod:`lopa.model.moe`): every expert's gate/up column-parallel and down row-parallel over
  ``moe_intermediate_size``, the router replicated; the block all-reduces its summed output once.
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
from lopa.model.moe import SparseMoeBlock

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
        if cfg.moe is not None and cfg.moe.moe_intermediate_size % self.size:
            problems.append(f"moe_intermediate_size={cfg.moe.moe_intermediate_size}")
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
        moe = cfg.moe and replace(cfg.moe, moe_intermediate_size=cfg.moe.moe_intermediate_size // self.size)
        return replace(
            cfg,
            num_attention_heads=hq,
            num_key_value_heads=hkv,
            intermediate_size=cfg.intermediate_size // self.size,
            moe=moe,
        )

    def span(self, key: str, cfg: ModelConfig) -> tuple[int, int, int] | None:
        """(dim, start, end) of ``key``'s slice on this rank, or None when the tensor is replicated."""
        parts = key.split(".")
        if len(parts) < 2 or parts[-2] not in _COLUMN + _ROW:
            return None
        name, kind = parts[-2], parts[-1]
        d = cfg.head_dim
        q0, hq, k0, hkv = self.heads(cfg)
        expert = "experts." in key and cfg.moe is not None  # an expert's MLP: moe_intermediate_size wide
        inner = (cfg.moe.moe_intermediate_size if expert else cfg.intermediate_size) // self.size  # type: ignore[union-attr]
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

    Every layer's ``self_attn`` gets local head counts and local q/k/v/o projections, every ``mlp`` (or every
    expert of a mixture-of-experts block) local gate/up/down; ``o_proj`` and a dense ``down_proj`` become
    :class:`RowParallelLinear`, an expert's ``down_proj`` a plain local Linear whose sum the block all-reduces once.
    Parameter names are unchanged, so the rank's state dict loads by name.
    """
    cfg: ModelConfig = model.config  # type: ignore[assignment]
    shard.check(cfg)
    reduce = AllReduce()
    local = shard.local_config(cfg)
    for layer in model.model.layers:  # type: ignore[union-attr]
        attn, mlp = layer.self_attn, layer.mlp
        attn.heads, attn.kv_heads = local.num_attention_heads, local.num_key_value_heads
        moe = isinstance(mlp, SparseMoeBlock)
        mlps = list(mlp.experts) if moe else [mlp]
        prefix = "experts.0." if moe else ""  # span() tells an expert's width by its key
        columns = [(attn, n, "") for n in ("q_proj", "k_proj", "v_proj")]
        columns += [(m, n, prefix) for m in mlps for n in ("gate_proj", "up_proj")]
        for owner, name, where in columns:
            old: nn.Linear = getattr(owner, name)
            out = shard.local_shape(f"{where}{name}.weight", cfg, tuple(old.weight.shape))[0]
            setattr(owner, name, nn.Linear(old.in_features, out, bias=old.bias is not None, device="meta"))
        for owner, name, where in [(attn, "o_proj", ""), *((m, "down_proj", prefix) for m in mlps)]:
            old = getattr(owner, name)
            local_in = shard.local_shape(f"{where}{name}.weight", cfg, tuple(old.weight.shape))[1]
            if where:  # an expert: summed with the other experts first, all-reduced once by the block
                new = nn.Linear(local_in, old.out_features, bias=False, device="meta")
            else:
                new = RowParallelLinear(local_in, old.out_features, old.bias is not None, reduce)
            setattr(owner, name, new)
        if moe:
            mlp.reduce = reduce
    model.config = local  # type: ignore[assignment]
    model.tp_shard = shard  # type: ignore[assignment]
    model.tp_reduce = reduce  # type: ignore[assignment]
    return reduce
