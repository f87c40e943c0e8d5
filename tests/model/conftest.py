"""Fixtures of the model and checkpoint tests: private, mutable copies of the shared tiny checkpoint and adapter."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture
def ckpt(tiny_ckpt: Path, tmp_path: Path) -> Path:
    """A private, mutable copy of the shared tiny checkpoint."""
    return Path(shutil.copytree(tiny_ckpt, tmp_path / "ckpt"))


@pytest.fixture
def lora(tiny_lora: Path, tmp_path: Path) -> Path:
    """A private, mutable copy of the shared tiny adapter."""
    return Path(shutil.copytree(tiny_lora, tmp_path / "lora"))
