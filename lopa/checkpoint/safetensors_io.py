"""Positioned reads of safetensors tensors, or of one rank's slice of them, without a memory map.

``safe_open(...).get_slice(key)[:, a:b]`` reads through a memory map: a column slice of a row-major tensor touches
every page of it, and the mapped pages count in the reader's resident memory while the file is open. A
tensor-parallel rank that must never hold the full model therefore reads its bytes with ``os.preadv`` straight
into the destination tensor: a row slice is one read, a column slice one read per row of only its columns, and
nothing of the file is mapped. The loader still opens each file with safetensors first, which validates the header;
this module only reads data the header describes. Called by :mod:`lopa.checkpoint.loader`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from types import TracebackType

import torch
from torch import Tensor

from lopa.errors import CorruptCheckpointError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


class TensorSlice:
    """A lazily read tensor of a :class:`TensorFile`: ``get_shape()``, and ``[:]``, ``[a:b]`` or ``[:, a:b]``."""

    def __init__(self, file: TensorFile, key: str) -> None:
        entry = file.header[key]
        self._file, self._key = file, key
        self.dtype = _DTYPES[entry["dtype"]]
        self.shape = tuple(int(s) for s in entry["shape"])
        begin, end = (int(o) for o in entry["data_offsets"])
        self._offset = file.data_start + begin
        if end - begin != math.prod(self.shape) * self.dtype.itemsize:
            raise CorruptCheckpointError(f"{file.path}: tensor {key!r} has {end - begin} bytes, its shape needs more.")

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, index: slice | tuple[slice, ...]) -> Tensor:
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > 2 or any(not isinstance(s, slice) or s.step not in (None, 1) for s in index):
            raise ValueError(f"unsupported slice {index!r}: use [:], [a:b] or [:, a:b]")
        if len(index) == 2 and index[0] != slice(None):
            raise ValueError("a column slice reads every row: use [:, a:b]")
        if len(index) == 2:
            return self._columns(*index[1].indices(self.shape[-1] if self.shape else 0)[:2])
        if index[0] == slice(None):
            return self._whole()
        if not self.shape:
            raise ValueError(f"tensor {self._key!r} is a scalar: read it with [:]")
        return self._rows(*index[0].indices(self.shape[0])[:2])

    def _whole(self) -> Tensor:
        out = torch.empty(self.shape, dtype=self.dtype)
        nbytes = out.numel() * self.dtype.itemsize
        self._read_into(out, [self._offset] if nbytes else [], nbytes)
        return out

    def _rows(self, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` along dim 0: one contiguous read."""
        out = torch.empty((max(0, stop - start), *self.shape[1:]), dtype=self.dtype)
        row = math.prod(self.shape[1:]) * self.dtype.itemsize
        nbytes = out.numel() * self.dtype.itemsize
        self._read_into(out, [self._offset + start * row] if nbytes else [], nbytes)
        return out

    def _columns(self, start: int, stop: int) -> Tensor:
        """Columns ``start:stop`` of a 2-D tensor: one read of ``stop - start`` elements per row."""
        if len(self.shape) != 2:
            raise ValueError(f"a column slice needs a 2-D tensor; {self._key!r} has shape {self.shape}")
        rows, cols = self.shape
        width = max(0, stop - start)
        out = torch.empty((rows, width), dtype=self.dtype)
        size = self.dtype.itemsize
        offsets = [self._offset + (r * cols + start) * size for r in range(rows)] if width else []
        self._read_into(out, offsets, width * size)
        return out

    def _read_into(self, out: Tensor, offsets: list[int], chunk: int) -> None:
        """Fill ``out`` (contiguous) with ``len(offsets)`` reads of ``chunk`` bytes each, in order."""
        if not offsets:
            return
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()).cast("B")
        for i, offset in enumerate(offsets):
            part = view[i * chunk : (i + 1) * chunk]
            got = os.preadv(self._file.fd, [part], offset)
            while got < chunk:  # a short read (large chunks, signals): continue where it stopped
                more = os.preadv(self._file.fd, [part[got:]], offset + got)
                if more == 0:
                    raise CorruptCheckpointError(f"{self._file.path}: tensor {self._key!r} is truncated.")
                got += more


class TensorFile:
    """One open ``.safetensors`` file read with positioned reads; a context manager like ``safe_open``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
            if n > _MAX_HEADER:
                raise CorruptCheckpointError(f"{self.path}: safetensors header of {n} bytes is too large.")
            header = json.loads(os.pread(self.fd, n, 8))
            header.pop("__metadata__", None)
            self.header: dict[str, dict] = header
            self.data_start = 8 + n
        except Exception:
            os.close(self.fd)
            raise

    def get_slice(self, key: str) -> TensorSlice:
        return TensorSlice(self, key)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()
