"""The checkpoints shipped inside the package: where they live and the names they are served under.

Any command given no ``--model`` loads ``lopa-tiny``; ``--model lopa-tiny-block`` loads the block-diffusion one.
Both are trained from scratch by ``lopa train`` (``lopa/tiny/``; see each directory's ``MODEL_CARD.md`` for the exact
command and scores); this module only knows where they are, so the engine and the commands find them without
importing the training code.
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_MODEL_NAME = "lopa-tiny"  # model id of the bundled checkpoint (what `lopa serve` serves by default)
# every checkpoint shipped inside the package: its name -> its directory under lopa/tiny/
BUNDLED_CHECKPOINTS = {"lopa-tiny": "checkpoint", "lopa-tiny-block": "checkpoint-block"}


def default_checkpoint_dir() -> Path:
    """Directory of the Dream-format checkpoint shipped inside the package (``lopa/tiny/checkpoint``)."""
    return Path(__file__).resolve().parent.parent / "tiny" / "checkpoint"


def bundled_checkpoint_dir(name: str) -> Path | None:
    """Directory of the bundled checkpoint called ``name`` (``lopa-tiny``, ``lopa-tiny-block``), None for others."""
    sub = BUNDLED_CHECKPOINTS.get(name)
    return None if sub is None else Path(__file__).resolve().parent.parent / "tiny" / sub
