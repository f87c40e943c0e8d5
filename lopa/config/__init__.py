"""The settings objects, each the one home of its defaults, validation and help (``field(metadata={"help"})``).

- :class:`DecodeConfig`: how to decode one request. The server also accepts it as the ``lopa`` body field.
- :class:`EngineConfig`: how to load and size an engine (model, device, batch slots, mesh); its ``to_dict()`` is
  the spec a launched rank reads.
- :class:`ServerConfig`: how ``lopa serve`` listens and what it admits.

The commands build their flags from these fields (kebab case, ``lopa/commands/flags.py``). ``validate()`` is the
only place values are checked; it raises :class:`~lopa.errors.ConfigError` naming the field and the allowed range.
The three live in ``decode.py``, ``engine.py`` and ``server.py``; ``checks.py`` holds the checks they share.
"""

from __future__ import annotations

from lopa.config.decode import (
    BASES,
    BRANCH_SCORES,
    CONFIDENCES,
    DECODERS,
    HELP,
    ORDERS,
    RECOMMENDABLE,
    Base,
    BranchScore,
    Confidence,
    DecodeConfig,
    Decoder,
    Order,
)
from lopa.config.engine import (
    DEFAULT_DIST_TIMEOUT_S,
    DEFAULT_MAX_MODEL_LEN,
    DEFAULT_MAX_NUM_SEQS,
    DEFAULT_STARTUP_TIMEOUT_S,
    DType,
    EngineConfig,
    LogLevel,
    default_max_num_seqs,
)
from lopa.config.server import ServerConfig

__all__ = [
    "BASES",
    "BRANCH_SCORES",
    "CONFIDENCES",
    "DECODERS",
    "DEFAULT_DIST_TIMEOUT_S",
    "DEFAULT_MAX_MODEL_LEN",
    "DEFAULT_MAX_NUM_SEQS",
    "DEFAULT_STARTUP_TIMEOUT_S",
    "HELP",
    "ORDERS",
    "RECOMMENDABLE",
    "Base",
    "BranchScore",
    "Confidence",
    "DType",
    "DecodeConfig",
    "Decoder",
    "EngineConfig",
    "LogLevel",
    "Order",
    "ServerConfig",
    "default_max_num_seqs",
]
