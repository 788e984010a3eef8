"""Image folders: every PNG / JPEG below a directory (recursively), as one ImageDataset.

Each image is converted to grayscale (``channels=1``) or RGB (``channels=3``; transparency
is composited onto white), and, when ``resolution`` is given, resized so its shorter side is
``resolution`` (Lanczos) and center-cropped to ``resolution x resolution``. Without
``resolution`` all images must have the same size. Random flips happen per batch
(:meth:`ImageDataset.get_batch`), not at load time.

With ``class_dirs=True`` the first-level subdirectories are the classes (sorted names ->
labels 0..K-1), as in torchvision's ImageFolder.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from difflab.data.dataset import ImageDataset

__all__ = ["IMAGE_EXTENSIONS", "find_images", "load_image", "load_image_folder"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def find_images(root: str | Path) -> list[Path]:
    """All files with an image extension below ``root``, sorted (hidden entries skipped)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory (expected a folder of images)")
    return sorted(p for p in root.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def load_image(path: Path, channels: int | None = None,
               resolution: int | None = None) -> np.ndarray:
    """One image as uint8 HWC (C = 1 or 3); raises ValueError naming the file if unreadable."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if channels is None:
                channels = 1 if im.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                im = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im.alpha_composite(rgba)
            im = im.convert("L" if channels == 1 else "RGB")
            if resolution is not None:
                w, h = im.size
                s = resolution / min(w, h)
                nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
                im = im.resize((nw, nh), Image.LANCZOS)
                left, top = (nw - resolution) // 2, (nh - resolution) // 2
                im = im.crop((left, top, left + resolution, top + resolution))
            a = np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise ValueError(
            f"cannot read image {path}: {e}. Fix: delete or replace this file, or pass "
            "skip_bad=True (CLI: --skip-bad) to skip unreadable images."
        ) from e
    return a[:, :, None] if a.ndim == 2 else a


def load_image_folder(root: str | Path, resolution: int | None = None,
                      channels: int | None = None, *, class_dirs: bool = False,
                      skip_bad: bool = False, name: str | None = None) -> ImageDataset:
    """Load all images below ``root``; see the module docstring.

    Args:
        resolution: side length after resize + center crop; None keeps the size (all images
            must then have the same size).
        channels: 1 (grayscale) or 3 (RGB); None: 1 if every image is grayscale, else 3.
        class_dirs: label images by their first-level subdirectory.
        skip_bad: skip unreadable images with one warning that counts them, instead of
            raising. The skipped paths are in ``dataset.info["skipped"]``.
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 (grayscale), 3 (RGB) or None (auto), got {channels}")
    if resolution is not None and (not isinstance(resolution, int) or resolution < 1):
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    root = Path(root)
    paths = find_images(root)
    if not paths:
        raise FileNotFoundError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root} or its subfolders")
    arrays: list[np.ndarray] = []
    kept: list[Path] = []
    skipped: list[str] = []
    for p in paths:
        try:
            arrays.append(load_image(p, channels, resolution))
            kept.append(p)
        except ValueError:
            if not skip_bad:
                raise
            skipped.append(str(p))
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) of {len(paths)} in {root} "
                      f"(first: {skipped[0]})", stacklevel=2)
    if not arrays:
        raise ValueError(f"all {len(paths)} images in {root} are unreadable (first: {skipped[0]})")
    if channels is None:  # auto: gray only if every image was gray
        c = 3 if any(a.shape[2] == 3 for a in arrays) else 1
        arrays = [np.repeat(a, 3, axis=2) if a.shape[2] != c else a for a in arrays]
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        first = arrays[0].shape[:2]
        j = next(i for i, a in enumerate(arrays) if a.shape[:2] != first)
        raise ValueError(
            f"images have different sizes: {kept[0]} is {first[1]}x{first[0]} but {kept[j]} is "
            f"{arrays[j].shape[1]}x{arrays[j].shape[0]} (width x height). Fix: pass "
            "resolution=N (CLI: --resize N) to resize and center-crop every image to N x N."
        )
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels, class_names = None, None
    if class_dirs:
        tops = [p.relative_to(root).parts for p in kept]
        loose = [kept[i] for i, t in enumerate(tops) if len(t) < 2]
        if loose:
            raise ValueError(f"class_dirs=True needs every image inside a class subfolder, but "
                             f"{loose[0]} lies directly in {root}")
        class_names = sorted({t[0] for t in tops})
        labels = torch.tensor([class_names.index(t[0]) for t in tops], dtype=torch.long)
    return ImageDataset(images, labels, name or root.name, len(class_names or []), class_names,
                        {"source": str(root), "skipped": skipped})
