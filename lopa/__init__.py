"""lopa: an inference engine for diffusion language models with Lookahead Parallel Decoding.

Public API: ``LLM`` (load a checkpoint, generate), ``DecodeConfig`` (every decoding parameter),
``Completion`` (what generate returns), ``__version__``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lopa.config import DecodeConfig
from lopa.engine.output import Completion

__version__ = "0.1.0"
__all__ = ["LLM", "DecodeConfig", "Completion", "__version__"]

if TYPE_CHECKING:
    from lopa.llm import LLM


def __getattr__(name: str) -> Any:
    # LLM pulls in torch and the model; import it on first use so `lopa --help` stays fast.
    if name == "LLM":
        from lopa.llm import LLM

        return LLM
    raise AttributeError(f"module 'lopa' has no attribute {name!r}")
