"""The bundled tiny dLLMs: word-problem task, tokenizer, ``lopa train`` and the shipped checkpoints.

Any command given no ``--model`` loads :func:`default_checkpoint_dir` (``lopa-tiny``, Dream format). ``--model``
also takes the bundled names of :data:`BUNDLED_CHECKPOINTS`: ``lopa-tiny`` and ``lopa-tiny-block`` (the
block-diffusion model, SDAR format, in ``checkpoint-block/``). Both are trained from scratch by ``lopa train``
(see each directory's ``MODEL_CARD.md`` for the exact command and scores).
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_CHECKPOINTS = {"lopa-tiny": "checkpoint", "lopa-tiny-block": "checkpoint-block"}  # name -> directory


def default_checkpoint_dir() -> Path:
    """Directory of the Dream-format checkpoint shipped inside the package."""
    return Path(__file__).resolve().parent / "checkpoint"


def bundled_checkpoint_dir(name: str) -> Path | None:
    """Directory of the bundled checkpoint called ``name`` (see :data:`BUNDLED_CHECKPOINTS`), None for others."""
    sub = BUNDLED_CHECKPOINTS.get(name)
    return None if sub is None else Path(__file__).resolve().parent / sub
