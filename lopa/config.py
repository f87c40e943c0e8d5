"""DecodeConfig: every decoding parameter, its default, and its validation (the one home of all three).

The CLI builds its flags from these fields (kebab case), the server accepts them as the ``lopa`` extra body
field, and the engine reads them. ``validate()`` is the only place parameters are checked; it raises
:class:`~lopa.errors.ConfigError` with a message naming the field and the allowed range.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

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

# engine sizing (LLM(max_num_seqs=..., max_model_len=...), --max-num-seqs / --max-model-len)
DEFAULT_MAX_NUM_SEQS = {"cpu": 16, "cuda": 32}  # sequences decoded together; the KV pool has one slot each
DEFAULT_MAX_MODEL_LEN = 8192  # prompt + max_new_tokens at most (capped by the model's context)


def default_max_num_seqs(device_type: str) -> int:
    """Sequences decoded together by default on a device type."""
    return DEFAULT_MAX_NUM_SEQS.get(device_type, DEFAULT_MAX_NUM_SEQS["cpu"])


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


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _number(value: object) -> bool:
    """An int or float, but not a bool (``True`` would otherwise pass as 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
