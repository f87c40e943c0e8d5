"""Building blocks of the Qwen2/Dream backbone: RMSNorm, rotary embeddings, SwiGLU MLP.

Attention lives in ``transformer.py`` (and reaches K/V through ``kv_access.py``) because it is where the cache
and the branch layout meet. Everything here is stateless apart from parameters and the RoPE frequency buffer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lopa.errors import UnsupportedModelError


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in fp32, cast back, then scale. The normalisation is ``F.rms_norm`` (one fused
    kernel where the backend has one, instead of a cast, pow, mean, add, rsqrt and mul each)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * h.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward without biases."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_inv_freq(
    head_dim: int, theta: float, scaling: dict[str, Any] | None, max_positions: int
) -> tuple[Tensor, float]:
    """Inverse frequencies (head_dim // 2,) in fp32 and the attention scaling factor for the cos/sin tables."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv_freq.float(), 1.0
    kind = scaling["rope_type"]
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return (inv_freq / factor).float(), 1.0
    if kind == "llama3":
        return _llama3(inv_freq, scaling, factor).float(), 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling, factor, max_positions)
    raise UnsupportedModelError(f"rope_scaling type {kind!r} is not supported by this forward.")


def _llama3(inv_freq: Tensor, s: dict[str, Any], factor: float) -> Tensor:
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(head_dim: int, theta: float, s: dict[str, Any], factor: float, max_positions: int) -> tuple[Tensor, float]:
    orig = int(s.get("original_max_position_embeddings") or max_positions)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = s.get("attention_factor")
    if attn is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # (head_dim // 2,) weight of the extrapolated frequency
    return inter * (1 - keep) + extra * keep, float(attn)


class Rotary(nn.Module):
    """cos/sin tables for absolute positions; applied to q and k after projection."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None, max_positions: int) -> None:
        super().__init__()
        inv_freq, self.scale = rope_inv_freq(head_dim, theta, scaling, max_positions)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._inv_freq_fp32 = inv_freq  # master copy: model.to(bfloat16) must not round the frequencies

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Rotary:
        out = super()._apply(fn, recurse)
        # Rounding inv_freq to bf16 shifts angles by whole radians at long positions; keep it fp32 on any device.
        self.inv_freq = self._inv_freq_fp32.to(self.inv_freq.device)
        return out

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq  # (rows, L, head_dim // 2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (rows, L, head_dim)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (rows, heads, L, head_dim); cos/sin: (rows, L, head_dim)."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
