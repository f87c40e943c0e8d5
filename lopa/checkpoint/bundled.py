"""The checkpoint shipped inside the package: where it lives and the name it is served under.

Any command given no ``--model`` loads it. It is trained from scratch by ``lopa train`` (``lopa/tiny/``; see
``lopa/tiny/checkpoint/MODEL_CARD.md`` for the exact command and scores); this module only knows its location, so
the engine and the commands find it without importing the training code.
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_MODEL_NAME = "lopa-tiny"  # model id of the bundled checkpoint (what `lopa serve` serves by default)


def default_checkpoint_dir() -> Path:
    """Directory of the Dream-format checkpoint shipped inside the package (``lopa/tiny/checkpoint``)."""
    return Path(__file__).resolve().parent.parent / "tiny" / "checkpoint"
