"""Positioned safetensors reads (lopa.checkpoint.safetensors_io) return exactly what safetensors' own slices return."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lopa.checkpoint.safetensors_io import TensorFile
from lopa.errors import CorruptCheckpointError


@pytest.fixture()
def weights(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w32": torch.randn(7, 11, generator=g),
        "w16": torch.randn(5, 9, generator=g).to(torch.bfloat16),
        "half": torch.randn(3, 4, generator=g).to(torch.float16),
        "bias": torch.randn(13, generator=g),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, tensors


@pytest.mark.parametrize("key", ["w32", "w16", "half", "bias", "ids", "scalar", "empty"])
def test_whole_tensor_equals_safetensors(weights, key):
    path, tensors = weights
    with TensorFile(path) as data, safe_open(str(path), framework="pt") as ref:
        got = data.get_slice(key)[:]
        assert got.dtype == tensors[key].dtype and got.shape == tensors[key].shape
        assert torch.equal(got, tensors[key])
        if got.dim():
            assert torch.equal(got, ref.get_slice(key)[:])
        assert data.get_slice(key).get_shape() == list(tensors[key].shape)


@pytest.mark.parametrize("key", ["w32", "w16", "ids"])
@pytest.mark.parametrize(("start", "stop"), [(0, 1), (1, 3), (2, 2), (0, 100)])
def test_row_and_column_slices_equal_safetensors(weights, key, start, stop):
    path, tensors = weights
    with TensorFile(path) as data, safe_open(str(path), framework="pt") as ref:
        assert torch.equal(data.get_slice(key)[start:stop], ref.get_slice(key)[start:stop])
        assert torch.equal(data.get_slice(key)[:, start:stop], ref.get_slice(key)[:, start:stop])
    assert torch.equal(data_rows := TensorFile(path).get_slice("bias")[start:stop], tensors["bias"][start:stop])
    assert data_rows.is_contiguous()


def test_unsupported_slices_are_refused(weights):
    path, _ = weights
    with TensorFile(path) as data:
        with pytest.raises(ValueError, match="column slice"):
            data.get_slice("w32")[1:2, 0:3]
        with pytest.raises(ValueError, match="unsupported"):
            data.get_slice("w32")[::2]
        with pytest.raises(ValueError, match="2-D"):
            data.get_slice("bias")[:, 0:2]


def test_truncated_file_is_named(weights, tmp_path):
    path, _ = weights
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-40])
    with TensorFile(cut) as data, pytest.raises(CorruptCheckpointError, match="truncated"):
        for key in data.header:
            data.get_slice(key)[:]


def test_header_claiming_a_huge_size_is_refused(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(CorruptCheckpointError, match="too large"):
        TensorFile(bad)
