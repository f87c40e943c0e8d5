"""DecodeConfig: how to decode one request, the one home of decoding defaults, validation and help.

The server also accepts it as the ``lopa`` body field; the commands build their flags from its fields.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from lopa.config.checks import _choice, _int, _number
from lopa.errors import ConfigError

Decoder = Literal["vanilla", "threshold", "d2f", "lopa"]
Base = Literal["threshold", "d2f"]
Confidence = Literal["maxprob", "margin", "neg_entropy"]
Order = Literal["maskgit_plus", "topk_margin", "entropy"]
BranchScore = Literal["mean", "shared"]

DECODERS: tuple[str, ...] = ("vanilla", "threshold", "d2f", "lopa")
BASES: tuple[str, ...] = ("threshold", "d2f")
CONFIDENCES: tuple[str, ...] = ("maxprob", "margin", "neg_entropy")
ORDERS: tuple[str, ...] = ("maskgit_plus", "topk_margin", "entropy")
BRANCH_SCORES: tuple[str, ...] = ("mean", "shared")
# decoding settings a checkpoint's generation_config.json may recommend (they replace the engine defaults)
RECOMMENDABLE: tuple[str, ...] = (
    "decoder",
    "base",
    "branches",
    "block_size",
    "max_new_tokens",
    "threshold",
    "tau_add",
    "tau_act",
    "confidence",
)

HELP: dict[str, str] = {
    "decoder": "decoding algorithm: vanilla | threshold | d2f | lopa",
    "base": "decoder that lopa wraps: threshold | d2f",
    "branches": "lopa: number k of lookahead branches verified beside the anchor",
    "max_new_tokens": "maximum number of generated tokens",
    "block_size": "positions per generated block (threshold, d2f, lopa)",
    "threshold": "tau_conf: fill a masked position when p(chosen token) > this (threshold, d2f)",
    "tau_add": "d2f: append a new block once the last block's decoded ratio reaches this",
    "tau_act": "d2f: fully activate a block once its predecessor's decoded ratio reaches this",
    "confidence": "confidence used for fallback, lookahead ranking and branch scores: maxprob | margin | neg_entropy",
    "order": "vanilla: which position to fill each step: maskgit_plus | topk_margin | entropy",
    "temperature": "0 = greedy; > 0 samples with the seeded generator",
    "top_p": "nucleus sampling mass (1 = off)",
    "top_k": "keep the k most likely tokens (0 = off)",
    "seed": "seed of the sampling generator",
    "stop": "stop strings; output is cut before the first one",
    "trace": "record a per-step trace (fills, candidates, confidences, winner)",
    "branch_score": "lopa branch score: mean over each branch's own masked positions (paper) | shared positions",
    "extra_fill": "also fill this many extra most-confident positions per step (the no-search control)",
    "min_fill": "threshold, d2f: when fewer than this many positions of a block pass tau, fill this many of the most "
    "confident (SDAR's block_size // denoising_steps)",
    "force_anchor": "lopa: the anchor always wins verification (diagnostic; equals the base decoder)",
    "max_iterations": "safety cap on decoding iterations per request (0 = automatic)",
}


@dataclass(frozen=True)
class DecodeConfig:
    """How to decode one request. Defaults are the engine's defaults."""

    decoder: Decoder = "lopa"
    base: Base = "d2f"
    branches: int = 4
    max_new_tokens: int = 128
    block_size: int = 16
    threshold: float = 0.9
    tau_add: float = 0.1
    tau_act: float = 0.95
    confidence: Confidence = "maxprob"
    order: Order = "maskgit_plus"
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)
    trace: bool = False
    branch_score: BranchScore = "mean"
    extra_fill: int = 0
    min_fill: int = 1
    force_anchor: bool = False
    max_iterations: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))

    def replace(self, **changes: Any) -> DecodeConfig:
        return dataclasses.replace(self, **changes)

    @property
    def uses_blocks(self) -> bool:
        """True for the block decoders, whose max_new_tokens must be a multiple of block_size."""
        return self.decoder != "vanilla"

    @property
    def base_decoder(self) -> str:
        """The block decoder that actually fills positions (lopa's base, or the decoder itself)."""
        return self.base if self.decoder == "lopa" else self.decoder

    @property
    def num_branches(self) -> int:
        """Lookahead branches in use (0 unless decoder is lopa)."""
        return self.branches if self.decoder == "lopa" else 0

    @property
    def cache_rows(self) -> int:
        """KV cache rows one request decodes with: the anchor plus every lookahead branch (k + 1); 0 for vanilla,
        which keeps no cache."""
        return 0 if self.decoder == "vanilla" else self.num_branches + 1

    def describe(self) -> str:
        """The settings that matter for this decoder, in one line for headers and summaries."""
        parts = [self.decoder]
        if self.decoder == "lopa":
            parts.append(f"base={self.base} k={self.branches}")
        if self.decoder == "vanilla":
            parts.append(f"order={self.order}")
        else:
            parts.append(f"block={self.block_size} tau={self.threshold}")
        if self.base_decoder == "d2f" and self.decoder != "vanilla":
            parts.append(f"tau_add={self.tau_add} tau_act={self.tau_act}")
        return " ".join(parts)

    def validate(self) -> DecodeConfig:
        """Check every field; returns self so calls can be chained."""
        _choice("decoder", self.decoder, DECODERS)
        _choice("base", self.base, BASES)
        _choice("confidence", self.confidence, CONFIDENCES)
        _choice("order", self.order, ORDERS)
        _choice("branch_score", self.branch_score, BRANCH_SCORES)
        _int("branches", self.branches, 0)
        _int("max_new_tokens", self.max_new_tokens, 1)
        _int("block_size", self.block_size, 1)
        _int("top_k", self.top_k, 0)
        _int("seed", self.seed, 0)
        _int("extra_fill", self.extra_fill, 0)
        _int("min_fill", self.min_fill, 1)
        _int("max_iterations", self.max_iterations, 0)
        for name in ("threshold", "tau_add", "tau_act"):
            value = getattr(self, name)
            if not _number(value) or not 0.0 < value <= 1.0:
                raise ConfigError(f"{name} must be in (0, 1], got {value!r}")
        if not _number(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            raise ConfigError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not _number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.uses_blocks and self.max_new_tokens % self.block_size:
            raise ConfigError(
                f"max_new_tokens ({self.max_new_tokens}) must be a multiple of block_size ({self.block_size}) "
                f"for the {self.decoder} decoder; try --max-new-tokens "
                f"{-(-self.max_new_tokens // self.block_size) * self.block_size}"
            )
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecodeConfig:
        """Build from user input (server body, JSON); unknown keys are an error, not ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown decoding parameter(s) {unknown}; known: {sorted(names)}")
        return cls(**d).validate()

    @classmethod
    def recommended(cls, generation_config: dict[str, Any]) -> DecodeConfig:
        """Engine defaults overridden by the decoding settings a checkpoint recommends.

        Only the keys in RECOMMENDABLE are read from ``generation_config.json`` (sampling settings there are
        ignored: decoding stays greedy unless asked). A recommendation that does not validate is ignored whole,
        with a warning that says why.
        """
        picked = {k: generation_config[k] for k in RECOMMENDABLE if k in generation_config}
        try:
            return cls(**picked).validate()
        except (ConfigError, TypeError) as e:
            warnings.warn(
                f"generation_config.json recommends invalid decoding settings ({e}); using the engine defaults "
                f"instead. Fix or remove {sorted(picked)} in that file.",
                UserWarning,
                stacklevel=1,  # one location: shown once even when the CLI and the LLM both read the file
            )
            return cls()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        return d
