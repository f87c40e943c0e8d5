"""Fixtures of the engine tests."""

from __future__ import annotations

import pytest

from tests.support.engine_utils import FakeGraphPools


@pytest.fixture
def fake_cuda_graphs(monkeypatch: pytest.MonkeyPatch) -> FakeGraphPools:
    """torch.cuda's graph, stream and pool-handle API replaced, for one test, by a CPU model of the allocator's
    bookkeeping of graph memory pools: the runners' real capture code runs on CPU (its replays do nothing)."""
    return FakeGraphPools().install(monkeypatch)
