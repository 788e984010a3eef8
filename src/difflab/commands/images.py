"""Writing samples and reading images: the one writer of ``difflab sample --out`` and
``difflab eval --save-samples``, and the reader of ``difflab eval``'s sources.

Output formats (by the path's suffix):

* ``grid.png``   one PNG grid of all samples (2-D points: a scatter plot)
* ``DIR``        (no suffix) one PNG per sample, ``DIR/000000.png`` ...
* ``x.npy``      one array: uint8 NHWC in [0, 255] (``npy_dtype="uint8"``, the default, what
                 ``difflab eval`` and most FID tools read) or float32 NCHW in [-1, 1]
                 (``npy_dtype="float"``); 2-D points are always float32 (N, D)

uint8 is ``difflab.data.to_uint8``, round((x + 1) * 127.5) clamped to 0..255, in NHWC layout
(``difflab.train.monitor.to_uint8``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from difflab.commands.common import MissingFileError, ParameterError, param

__all__ = ["check_output", "check_file_output", "write_samples", "load_images", "NPY_DTYPES"]

NPY_DTYPES = ("uint8", "float")


def check_output(out: str | os.PathLike, npy_dtype: str = "uint8", *,
                 overwrite: bool = False, name: str = "out") -> Path:
    """``out`` as a Path if :func:`write_samples` can write it, else ParameterError naming
    parameter ``name``, so that a bad path fails before any sampling: a known format, a
    writable place, not a folder where a file is needed (or the reverse), and nothing there
    already unless ``overwrite``."""
    from difflab.commands.runs import check_writable_dir

    out = Path(out)
    if out.suffix not in ("", ".png", ".npy"):
        raise ParameterError(f"{param(name)} {out}: use a .png (grid), .npy (array) or a "
                             "directory name")
    if npy_dtype not in NPY_DTYPES:
        raise ParameterError(f"unknown {param('npy_dtype')} {npy_dtype!r}; valid: "
                             f"{', '.join(NPY_DTYPES)}")
    if out.suffix:  # one file
        if out.is_dir():
            raise ParameterError(f"{param(name)} {out} is an existing directory; give a file "
                                 "name")
        check_writable_dir(out.parent, name)
        if out.exists() and not overwrite:
            raise ParameterError(f"{param(name)} {out} exists; pass {param('overwrite')} to "
                                 "replace it, or choose another name")
    else:
        check_writable_dir(out, name)
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise ParameterError(f"{param(name)} {out} is a directory that is not empty; pass "
                                 f"{param('overwrite')} to replace it, or choose another name")
    return out


def check_file_output(out: str | os.PathLike, *, suffixes: tuple[str, ...] = (".json",),
                      overwrite: bool = False, name: str = "out") -> Path:
    """``out`` as a Path if a file with one of ``suffixes`` can be written there (a writable
    place, not a directory, not an existing file unless ``overwrite``), else ParameterError
    naming parameter ``name``. Check it before the work whose result it will hold."""
    from difflab.commands.runs import check_writable_dir

    out = Path(out)
    if suffixes and out.suffix.lower() not in suffixes:
        raise ParameterError(f"{param(name)} {out}: give a {' or '.join(suffixes)} file")
    if out.is_dir():
        raise ParameterError(f"{param(name)} {out} is an existing directory; give a file name")
    check_writable_dir(out.parent, name)
    if out.exists() and not overwrite:
        raise ParameterError(f"{param(name)} {out} exists; pass {param('overwrite')} to "
                             "replace it, or choose another name")
    return out


def write_samples(images: Tensor, out: str | os.PathLike, *, npy_dtype: str = "uint8",
                  nrow: int | None = None, overwrite: bool = False) -> Path:
    """Write samples (NCHW images in [-1, 1], or (N, D) points) to ``out`` in the format its
    suffix names (module docstring), atomically (:mod:`difflab.files`: the previous output, if
    any, stays whole until the new one is complete); ``nrow``: images per row of a PNG grid
    (default: a square); an existing ``out`` is refused unless ``overwrite``. Returns
    ``out``."""
    import difflab.files as files
    from difflab.train.monitor import save_grid, save_points, to_uint8

    out = check_output(out, npy_dtype, overwrite=overwrite)
    points = images.ndim == 2
    if out.suffix == "" and points:
        raise ParameterError(f"2-D samples cannot be written as images; give {param('out')} "
                             "x.npy (an array) or x.png (a scatter plot)")
    if out.suffix == ".npy":
        if points or npy_dtype == "float":
            arr = images.detach().float().cpu().numpy()
        else:
            arr = to_uint8(images).numpy()
        files.write_bytes(out, files.npy_bytes(arr), what="sample array")
    elif out.suffix == ".png":
        if points:
            save_points(images, out)
        else:
            save_grid(images, out, nrow=nrow, scale=2 if images.shape[-1] <= 32 else 1)
    else:
        from PIL import Image

        pngs = ((f"{i:06d}.png", files.png_bytes(
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)))
            for i, img in enumerate(to_uint8(images).numpy()))
        files.write_dir(out, pngs, what="sample directory")
    return out


def load_images(path: str | os.PathLike) -> tuple[Tensor, Tensor | None]:
    """Images (uint8 NCHW, or float NCHW in [-1, 1]) and labels (or None) from a ``.npy``
    array (NHWC, NCHW or NHW) or an image folder."""
    import numpy as np

    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"{param('source')} {p} does not exist (expected a checkpoint "
                               "directory, a .npy file or an image folder)")
    if p.suffix == ".npy":
        try:  # never unpickled: an object array is refused
            a = torch.from_numpy(np.load(p, allow_pickle=False))
        except (ValueError, EOFError, OSError, TypeError) as e:
            raise ParameterError(f"{param('source')} {p} is not a readable image array "
                                 f"(.npy of uint8 or float): {e}") from None
        if a.ndim == 3:
            a = a.unsqueeze(1)
        if a.ndim != 4:
            raise ValueError(f"{p}: expected an image array NHW, NHWC or NCHW, "
                             f"got {tuple(a.shape)}")
        if a.shape[1] not in (1, 3) and a.shape[-1] in (1, 3):
            a = a.permute(0, 3, 1, 2)
        if a.dtype != torch.uint8 and not a.is_floating_point():
            raise ValueError(f"{p}: dtype {a.dtype}; use uint8 0..255 or float in [-1, 1]")
        return a.contiguous(), None
    if p.is_dir():
        from difflab.data import load_image_folder

        ds = load_image_folder(p)
        return ds.images, ds.labels
    raise ValueError(f"{p}: not a checkpoint directory, .npy file or image folder")
