"""The bundled tiny dLLM: word-problem task, tokenizer, ``lopa train`` and the shipped checkpoint.

Any command given no ``--model`` loads :func:`default_checkpoint_dir`. The checkpoint is trained from scratch
by ``lopa train`` (see ``checkpoint/MODEL_CARD.md`` for the exact command and scores).
"""

from __future__ import annotations

from pathlib import Path


def default_checkpoint_dir() -> Path:
    """Directory of the Dream-format checkpoint shipped inside the package."""
    return Path(__file__).resolve().parent / "checkpoint"
