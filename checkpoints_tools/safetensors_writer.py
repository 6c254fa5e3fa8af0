"""Streams tensors into a ``.safetensors`` file group by group.

The ``safetensors`` package only writes a file from a complete in-memory dict (and copies each
tensor to bytes on the way), which would hold a large model twice. The format is a u64 header
length, a JSON header of dtypes/shapes/byte ranges, then the raw little-endian bytes, so the
header can be written from DCP's metadata first and the data appended as it is loaded. The
result is read back by ``safetensors.safe_open`` in the tests.
"""

from __future__ import annotations

import json
import struct
import sys
from typing import BinaryIO

import torch

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def safetensors_dtype(dtype: torch.dtype) -> str:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype} has no safetensors equivalent (allowed: {', '.join(map(str, _DTYPES))})")
    return _DTYPES[dtype]


class SafetensorsStreamWriter:
    """Writes the header for ``specs`` (name -> (dtype, shape)) in the given order, then
    accepts the tensors in that same order through :meth:`write`."""

    def __init__(
        self, f: BinaryIO, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]
    ) -> None:
        if sys.byteorder != "little":
            raise RuntimeError("safetensors data is little-endian; this host is not")
        header: dict[str, object] = {"__metadata__": metadata}
        offset = 0
        self._expected: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
        for name, (dtype, shape) in specs.items():
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            header[name] = {
                "dtype": safetensors_dtype(dtype),
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._expected.append((name, dtype, tuple(shape), nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        self._f = f
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, dtype, shape, nbytes = self._expected[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (exp_name, dtype, shape):
            raise ValueError(f"expected {exp_name} {dtype} {shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()  # (nbytes,)
        assert data.nbytes == nbytes
        self._f.write(memoryview(data))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._expected):
            raise ValueError(f"only {self._next} of {len(self._expected)} tensors were written")
