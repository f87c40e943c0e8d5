"""EngineConfig: how to load and size an engine (model, device, batch slots, mesh); its ``to_dict()`` is the spec
a launched rank reads."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from lopa.config.checks import _choice, _help, _int, _number
from lopa.errors import ConfigError

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
