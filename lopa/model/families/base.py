"""The :class:`Family` record every family file fills in, and its checkpoint ↔ shared name translation.

A family file (``lopa/model/families/<name>.py``) declares one ``FAMILY = Family(...)``; the registry in
:mod:`lopa.model.families` collects them. This module holds only the record, so family files and the registry
both import it and neither imports the other's importer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lopa.model.config import ATTENTION_PATTERNS, ModelConfig

NameTable = tuple[tuple[str, str], ...]  # (checkpoint module pattern, shared module pattern); "{i}" = layer index


@dataclass(frozen=True, eq=False)
class Family:
    """One checkpoint lineage: what differs between lineages that run on the one shared transformer."""

    name: str
    model_types: tuple[str, ...]  # config.json "model_type" values this family loads; the first is the one written
    checkpoints: tuple[str, ...]  # example checkpoint names (docs, error messages)
    logit_shift: int  # the raw output at window index j predicts the token at j + logit_shift (0 or 1)
    attention: str  # attention among positions: "bidirectional" or "block_causal"
    parse: Callable[[dict[str, Any], str], ModelConfig]  # (config.json dict, source) -> ModelConfig
    export: Callable[[ModelConfig], dict[str, Any]]  # ModelConfig -> the config.json this family writes
    names: NameTable = ()  # empty: the checkpoint uses the shared names
    mask_token: str = "<|mask|>"
    eos_token: str = "<|endoftext|>"
    end_tokens: tuple[str, ...] = ()  # besides eos, tokens that end a turn when the vocabulary has them
    decode_defaults: Mapping[str, Any] = field(default_factory=dict)
    _compiled: tuple[tuple[tuple[re.Pattern[str], str], ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.logit_shift not in (0, 1):
            raise ValueError(f"family {self.name}: logit_shift must be 0 or 1, got {self.logit_shift}")
        if self.attention not in ATTENTION_PATTERNS:
            raise ValueError(f"family {self.name}: attention must be one of {ATTENTION_PATTERNS}")
        to_shared = tuple((_pattern(ck), sh) for ck, sh in self.names)
        to_ckpt = tuple((_pattern(sh), ck) for ck, sh in self.names)
        object.__setattr__(self, "_compiled", (to_shared, to_ckpt))

    def make_config(self, *sizes: int, **fields: Any) -> ModelConfig:
        """A ModelConfig of this family: ModelConfig's arguments plus the family's name, shift and attention.

        The one way a ModelConfig is built, by the family's parser and by code that makes a model directly
        (tests, ``lopa train``); ``model_type`` defaults to the family's first spelling.
        """
        fields.setdefault("model_type", self.model_types[0])
        fields.setdefault("attention", self.attention)
        return ModelConfig(*sizes, **fields, family=self.name, logit_shift=self.logit_shift)

    def to_shared(self, module: str) -> str | None:
        """The shared module name of a checkpoint module name; None when the name is not one of this family's."""
        return module if not self.names else _translate(module, self._compiled[0])

    def to_checkpoint(self, module: str) -> str:
        """The checkpoint module name of a shared module name."""
        if not self.names:
            return module
        out = _translate(module, self._compiled[1])
        if out is None:
            raise KeyError(f"{module!r} has no {self.name} checkpoint name")
        return out

    def tensor_to_shared(self, key: str) -> str | None:
        """``model.transformer.blocks.0.q_proj.weight`` → ``model.layers.0.self_attn.q_proj.weight`` (LLaDA)."""
        module, _, param = key.rpartition(".")
        shared = self.to_shared(module) if module else None
        return f"{shared}.{param}" if shared is not None else None

    def tensor_to_checkpoint(self, key: str) -> str:
        module, _, param = key.rpartition(".")
        return f"{self.to_checkpoint(module)}.{param}"


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)"))


def _translate(name: str, table: tuple[tuple[re.Pattern[str], str], ...]) -> str | None:
    for pattern, template in table:
        m = pattern.fullmatch(name)
        if m is not None:
            return template.format(**m.groupdict())
    return None
