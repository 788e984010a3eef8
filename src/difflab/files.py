"""The one place difflab's outputs reach the disk: atomic writes and canonical bytes.

Every file difflab writes (checkpoints, sample grids and arrays, eval JSON, fitted solvers,
exported models) is made in memory as bytes and handed to :func:`write_bytes` (one file) or
:func:`write_dir` (a directory of files). Both write a temporary sibling, flush and fsync it,
then ``os.replace`` it over the destination: a reader sees the old file or the new one, never a
half-written one, and a failed write (a full disk, an I/O error) leaves the previous version
exactly as it was and no temporary files behind. :func:`_write_file` is the single function
that writes bytes to a file (fault-injection tests patch it).

The same tensors always give the same bytes: :func:`safetensors_bytes` writes the header with
sorted keys (safetensors' own writer orders the metadata by a hash map).

This module imports nothing from difflab (every layer may use it).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["write_bytes", "write_dir", "write_json", "json_bytes", "safetensors_bytes",
           "png_bytes", "npy_bytes", "move_aside", "old_path"]


def _write_file(path: Path, data: bytes) -> None:
    """Write bytes and fsync them: the one place that writes a file (tests patch it)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _tmp_name(final: Path) -> Path:
    return final.parent / f".{final.name}.tmp-{os.getpid()}-{threading.get_ident()}"


def old_path(path: Path) -> Path:
    """Where :func:`write_dir` parks the previous directory between its two renames."""
    return path.parent / f".{path.name}.old"


def write_bytes(path: str | os.PathLike, data: bytes, *, what: str = "file") -> Path:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, ``os.replace``). Raises
    OSError naming ``path`` when the disk refuses; the previous file is then intact."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    try:
        _write_file(tmp, data)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        prev = f"the previous {what} there is intact" if final.exists() else \
            f"no {what} was written"
        raise OSError(e.errno, f"could not write {what} {final}: {e.strerror or e}; {prev}. "
                               "Free disk space or choose another path") from e
    return final


def write_dir(path: str | os.PathLike, files: Iterable[tuple[str, bytes]], *,
              what: str = "directory") -> Path:
    """Write a directory of files atomically: a fresh temporary directory (each file fsync'ed),
    swapped in with ``os.replace``; between the two renames of the swap the previous one sits
    at :func:`old_path` (a reader moves it back, ``checkpoint.resolve``). On failure the
    temporary directory is removed and the previous directory is untouched."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        for name, data in files:
            _write_file(tmp / name, data)
        _fsync_dir(tmp)
        old = old_path(final)
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if old.exists():
            shutil.rmtree(old)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = f"the previous {what} there is intact" if final.exists() else \
            f"no previous {what} existed"
        raise OSError(e.errno, f"could not save {what} {final}: {e.strerror or e}; "
                               f"{prev}. Free disk space or choose another directory") from e
    return final


def json_bytes(obj: Any, indent: int | None = 2) -> bytes:
    """JSON with sorted keys (the same object, the same bytes)."""
    return (json.dumps(obj, indent=indent, sort_keys=True) + "\n").encode()


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2,
               what: str = "JSON file") -> Path:
    return write_bytes(path, json_bytes(obj, indent), what=what)


def safetensors_bytes(tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file's bytes with a canonical header (keys sorted, no spaces), so that
    the same tensors and metadata always give the same bytes."""
    from safetensors.torch import save as st_save

    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    raw = st_save(flat, metadata=metadata)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned
    return struct.pack("<Q", len(text)) + text + raw[8 + n:]


def png_bytes(image: Any) -> bytes:
    """A PIL image as PNG bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def npy_bytes(array: Any) -> bytes:
    """A numpy array as .npy bytes (never pickled)."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def move_aside(path: str | os.PathLike) -> Path:
    """Rename ``path`` to ``<path>.old-<UTC timestamp>`` (never deletes); returns the new
    name."""
    p = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest = p.with_name(f"{p.name}.old-{stamp}")
    k = 1
    while dest.exists():
        k += 1
        dest = p.with_name(f"{p.name}.old-{stamp}-{k}")
    os.replace(p, dest)
    return dest
