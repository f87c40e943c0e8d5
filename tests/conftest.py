"""Shared fixtures: a tiny random Dream checkpoint and a LoRA adapter for it, built once per test run.

``tiny_ckpt`` is a checkpoint directory (GQA, untied head, ChatML template); ``tiny_lora`` a peft adapter for it;
``tiny_checkpoint`` the loaded :class:`lopa.checkpoint.loader.Checkpoint` (fp32, CPU). Tests must not modify them.
``single_thread`` runs a module with one torch thread, like each rank of a mesh.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lopa.checkpoint.loader import Checkpoint, load_checkpoint
from lopa.testing import make_random_lora, make_tiny_checkpoint


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """@pytest.mark.gpu tests skip themselves on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module: these models are tiny, and intra-op threads only add sync cost (10x slower on
    a busy 2-core machine); each rank of a mesh runs one thread too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt") / "tiny-dream", seed=0)


@pytest.fixture(scope="session")
def tiny_lora(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_lora(tiny_ckpt, tmp_path_factory.mktemp("tiny_lora") / "tiny-lora", seed=1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_ckpt: Path) -> Checkpoint:
    return load_checkpoint(tiny_ckpt)
