"""The IDX file format of (Fashion-)MNIST (LeCun et al. 1998).

    bytes 0-1  zero
    byte  2    element type (0x08 unsigned byte, 0x09 signed byte, 0x0B int16, 0x0C int32,
               0x0D float32, 0x0E float64)
    byte  3    number of dimensions n
    then n big-endian uint32 sizes, then the data in C order (big-endian elements).

So an image file (n = 3) has its pixels at byte 16 and a label file (n = 1) at byte 8.
Files may be gzip-compressed (detected from the content, not the name).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["read_idx", "write_idx"]

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
          np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic
        raw = gzip.decompress(raw)
    return raw


def read_idx(path: str | Path) -> Tensor:
    """Read an IDX file (raw or gzip) into a tensor of its shape and element type."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ValueError(
            f"{path} is not an IDX file: the first 4 bytes must be 0, 0, a type code in "
            f"{sorted(hex(c) for c in _DTYPES)} and the number of dimensions; got {raw[:4]!r}"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_DTYPES[raw[2]])
    count = int(np.prod(shape)) if shape else 0
    if len(raw) - header != count * dtype.itemsize:
        raise ValueError(
            f"{path}: header says shape {shape} ({count * dtype.itemsize} bytes of data) but the "
            f"file holds {len(raw) - header} bytes after the {header}-byte header (truncated?)"
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)
    return torch.from_numpy(data.astype(dtype.newbyteorder("="), copy=True))


def write_idx(path: str | Path, array: Tensor | np.ndarray, *, compress: bool = False) -> None:
    """Write an array as an IDX file (gzip-compressed if ``compress``)."""
    a = array.numpy() if isinstance(array, Tensor) else np.asarray(array)
    if a.dtype == np.uint8 or a.dtype == np.int8:
        big = a
    else:
        big = a.astype(a.dtype.newbyteorder(">"))
    if big.dtype not in _CODES:
        raise ValueError(f"IDX cannot store dtype {a.dtype}; valid: uint8, int8, int16, int32, "
                         "float32, float64")
    header = bytes([0, 0, _CODES[big.dtype], a.ndim]) + np.asarray(a.shape, ">u4").tobytes()
    raw = header + np.ascontiguousarray(big).tobytes()
    Path(path).write_bytes(gzip.compress(raw) if compress else raw)
