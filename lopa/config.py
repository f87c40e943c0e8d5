"""The settings objects, each the one home of its defaults, validation and help (``field(metadata={"help"})``).

- :class:`DecodeConfig`: how to decode one request. The server also accepts it as the ``lopa`` body field.
- :class:`EngineConfig`: how to load and size an engine (model, device, batch slots, mesh); its ``to_dict()`` is
  the spec a launched rank reads.
- :class:`ServerConfig`: how ``lopa serve`` listens and what it admits.

The commands build their flags from these fields (kebab case, ``lopa/commands/flags.py``). ``validate()`` is the
only place values are checked; it raises :class:`~lopa.errors.ConfigError` naming the field and the allowed range.
"""

from __future__ import annotations

import dataclasses
import typing
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

DType = Literal["float32", "bfloat16", "float16"]
LogLevel = Literal["critical", "error", "warning", "info", "debug"]

# engine sizing (EngineConfig.max_num_seqs / max_model_len)
DEFAULT_MAX_NUM_SEQS = {"cpu": 16, "cuda": 32}  # sequences decoded together; the KV pool has one slot each
DEFAULT_MAX_MODEL_LEN = 8192  # prompt + max_new_tokens at most (capped by the model's context)
DEFAULT_DIST_TIMEOUT_S = 30.0  # every collective (and the dead-rank detection) finishes or fails within this
DEFAULT_STARTUP_TIMEOUT_S = 300.0  # ranks wait this long for each other to start and load the model


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


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _number(value: object) -> bool:
    """An int or float, but not a bool (``True`` would otherwise pass as 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def _help(text: str, default: str | None = None) -> dict[str, str]:
    """A field's flag metadata: its help and, when the field's own default (None) means something, what."""
    return {"help": text} if default is None else {"help": text, "default": default}


@dataclass(frozen=True)
class EngineConfig:
    """How to load and size an engine: the checkpoint, where it runs, its batch slots and its mesh.

    ``None`` means "decided at load time": :meth:`resolve` fills in the device's batch size and the model's
    context. ``LLM.engine_config`` holds the resolved copy; :meth:`to_dict` is the spec a launched rank reads.
    """

    model: str | None = field(
        default=None,
        metadata=_help(
            "checkpoint directory or Hugging Face hub id ORG/NAME (needs lopa[hub])", "the bundled tiny model"
        ),
    )
    revision: str | None = field(default=None, metadata=_help("hub branch, tag or commit of a hub --model", "main"))
    lora: str | None = field(default=None, metadata=_help("peft-format LoRA adapter directory merged at load"))
    device: str = field(default="cpu", metadata=_help("cpu, cuda or cuda:N"))
    dtype: DType | None = field(default=None, metadata=_help("model dtype", "the checkpoint's"))
    enforce_eager: bool | None = field(
        default=None,
        metadata=_help("eager forward only: no fused weights, padded buckets or CUDA graphs", "fast path on CUDA"),
    )
    max_num_seqs: int | None = field(
        default=None,
        metadata=_help(
            "sequences decoded together in one forward per iteration",
            f"{DEFAULT_MAX_NUM_SEQS['cpu']} on CPU, {DEFAULT_MAX_NUM_SEQS['cuda']} on CUDA",
        ),
    )
    max_model_len: int | None = field(
        default=None,
        metadata=_help(
            "longest prompt + max_new_tokens served; sizes the KV pool",
            f"the model's context, <= {DEFAULT_MAX_MODEL_LEN}",
        ),
    )
    tp: int = field(
        default=1,
        metadata=_help(
            "tensor-parallel ranks per branch group (with --bp M: M x N ranks; under torchrun: divides the world)"
        ),
    )
    bp: int = field(default=1, metadata=_help("branch groups of a mesh (bp x tp ranks)"))
    dist_timeout: float | None = field(
        default=None,
        metadata=_help(
            "seconds before a silent rank is an error", f"$LOPA_DIST_TIMEOUT, else {DEFAULT_DIST_TIMEOUT_S:g}"
        ),
    )
    dist_port: int | None = field(default=None, metadata=_help("rendezvous port for a mesh", "a free one"))
    startup_timeout: float = field(
        default=DEFAULT_STARTUP_TIMEOUT_S, metadata=_help("seconds ranks wait for each other to start and load")
    )
    threads: int | None = field(
        default=None,
        metadata=_help(
            "CPU threads torch may use", "torch's choice, one per core; on a busy machine 1 is often faster"
        ),
    )

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)

    @property
    def world_size(self) -> int:
        """Ranks of the mesh (1: one process)."""
        return self.bp * self.tp

    def validate(self) -> EngineConfig:
        """Check every field that can be checked before the model loads; returns self."""
        if self.dtype is not None:
            _choice("dtype", self.dtype, typing.get_args(DType))
        for name in ("max_num_seqs", "max_model_len", "threads", "dist_port"):
            if getattr(self, name) is not None:
                _int(name, getattr(self, name), 0 if name == "dist_port" else 1)
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in (self.bp, self.tp)):
            raise ConfigError(f"--bp and --tp must be positive, got --bp {self.bp} --tp {self.tp}")
        for name in ("dist_timeout", "startup_timeout"):
            value = getattr(self, name)
            if value is not None and (not _number(value) or not value > 0):
                raise ConfigError(f"{name} must be a number of seconds > 0, got {value!r}")
        if self.world_size > 1 and (self.max_num_seqs or 1) > 1:
            from lopa.errors import BatchingError

            raise BatchingError(
                "--bp / --tp / --branch-parallel decode one sequence at a time (the ranks split one sequence's "
                "branches or weights); drop --max-num-seqs or set it to 1"
            )
        return self

    def resolve(self, device_type: str, context: int | None = None) -> EngineConfig:
        """The defaults decided at load time filled in: batch slots for ``device_type`` (``cpu``, ``cuda``) and,
        given the model's ``context``, ``max_model_len`` (checked against it)."""
        cfg = self.validate()
        if cfg.max_num_seqs is None:
            cfg = cfg.replace(max_num_seqs=default_max_num_seqs(device_type))
        if context is not None:
            length = min(context, DEFAULT_MAX_MODEL_LEN) if cfg.max_model_len is None else cfg.max_model_len
            if not 1 <= length <= context:
                raise ConfigError(f"max_model_len must be an integer in [1, {context}], got {cfg.max_model_len!r}")
            cfg = cfg.replace(max_model_len=length)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain JSON values (the spec a launched rank rebuilds with :meth:`from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown engine setting(s) {unknown}; known: {sorted(names)}")
        return cls(**d).validate()


@dataclass(frozen=True)
class ServerConfig:
    """How ``lopa serve`` listens and what it admits (the per-request limits are :meth:`limits`)."""

    host: str = field(default="127.0.0.1", metadata=_help("address to bind (0.0.0.0 = all)"))
    port: int = field(default=8000, metadata=_help("TCP port"))
    served_model_name: str | None = field(default=None, metadata=_help("model id clients send", "the checkpoint name"))
    queue_limit: int = field(
        default=64,
        metadata=_help("prompts that may wait for the engine (a request's prompts count one each); more get 503"),
    )
    max_prompts_per_request: int = field(
        default=32, metadata=_help("prompts one /v1/completions request may carry; more get 400")
    )
    max_body_bytes: int = field(default=1 << 20, metadata=_help("largest request body in bytes; more gets 413"))
    max_branches: int = field(default=32, metadata=_help("largest lopa.branches a request may ask for; more gets 400"))
    max_kv_cache_mb: int = field(
        default=4096,
        metadata=_help(
            "largest KV cache one request may need (branch rows x (prompt + max_new_tokens) positions, summed "
            "over its prompts), in MiB; more gets 400"
        ),
    )
    max_connections: int | None = field(
        default=None,
        metadata=_help(
            "open connections; over it the one waiting longest for its request headers is closed",
            "ulimit -n less 64, at most 4096",
        ),
    )
    header_timeout: float = field(default=10.0, metadata=_help("seconds a connection has to send a request's headers"))
    body_timeout: float = field(
        default=30.0, metadata=_help("seconds a request has to send its whole body; later gets 408")
    )
    api_docs: bool = field(
        default=False,
        metadata=_help("serve FastAPI's /docs and /redoc pages (their scripts load from a CDN)", "off"),
    )
    log_level: LogLevel = field(default="info", metadata=_help("uvicorn log level"))

    def replace(self, **changes: Any) -> ServerConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> ServerConfig:
        """Check every field; returns self. Messages name the field as ``create_app`` and the flags spell it."""
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
        if not isinstance(self.queue_limit, int) or isinstance(self.queue_limit, bool) or self.queue_limit < 1:
            raise ConfigError(f"queue_limit must be an integer >= 1, got {self.queue_limit!r}")
        body = self.max_body_bytes
        if not isinstance(body, int) or isinstance(body, bool) or body < 1024:
            raise ConfigError(f"max_body_bytes must be an integer >= 1024, got {body!r}")
        if self.max_connections is not None and (not isinstance(self.max_connections, int) or self.max_connections < 1):
            raise ConfigError(f"--max-connections must be >= 1, got {self.max_connections}")
        for name in ("header_timeout", "body_timeout"):
            value = getattr(self, name)
            if not _number(value) or not value > 0:  # also refuses nan
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0 seconds, got {value}")
        _choice("log_level", self.log_level, typing.get_args(LogLevel))
        return self
