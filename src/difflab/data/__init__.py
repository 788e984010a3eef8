"""Data: bundled image data sets, image folders and 2-D toy sets.

    ds = difflab.data.load_dataset("fashion_mnist", split="train")
    ds.images          # uint8 (N, C, H, W)
    ds.labels          # long (N,) or None;  ds.num_classes, ds.name
    it = ds.batches(128, seed=0, flip=False)    # endless, resumable: it.state_dict()
    x, y = next(it)    # float32 in [-1, 1]

Names: "fashion_mnist", "mnist5k", "mnist10k", "digits", or the path of an image folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from difflab.data.bundled import (
    FASHION_MNIST_CLASSES,
    load_digits,
    load_fashion_mnist,
    load_mnist5k,
    load_mnist10k,
)
from difflab.data.canvas import (
    CaptionedDataset,
    canvas_dataset,
    load_captioned,
    load_captioned_folder,
    parse_caption,
)
from difflab.data.dataset import (
    BatchIterator,
    ImageDataset,
    convert_channels,
    random_flip,
    resize_images,
    to_float,
    to_uint8,
)
from difflab.data.folder import IMAGE_EXTENSIONS, find_images, load_image_folder
from difflab.data.idx import read_idx, write_idx
from difflab.data.toy2d import TOY2D_NAMES, toy2d

__all__ = [
    "DATASET_NAMES", "FASHION_MNIST_CLASSES", "IMAGE_EXTENSIONS", "TOY2D_NAMES",
    "BatchIterator", "CaptionedDataset", "ImageDataset", "canvas_dataset", "load_captioned",
    "load_captioned_folder", "parse_caption", "convert_channels", "find_images", "load_dataset",
    "load_digits", "load_fashion_mnist", "load_image_folder", "load_mnist5k", "load_mnist10k",
    "random_flip", "read_idx", "resize_images", "to_float", "to_uint8", "toy2d", "write_idx",
]

DATASET_NAMES = ("fashion_mnist", "mnist5k", "mnist10k", "digits")


def load_dataset(name_or_path: str | Path, split: str = "train", resolution: int | None = None,
                 channels: int | None = None, **kw: Any) -> ImageDataset:
    """Load a named data set or an image folder as an :class:`ImageDataset`.

    Args:
        name_or_path: one of ``DATASET_NAMES`` or a folder of PNG/JPEG images.
        split: "train", "test" or "all". An image folder with a ``<split>`` subfolder
            loads that subfolder; otherwise a folder has only "train" (= "all").
        resolution: resize (antialiased) and center-crop to this side length.
        channels: 1 (grayscale) or 3 (RGB); converted if the data differ.
        **kw: passed on: ``path`` (fashion_mnist, mnist5k, mnist10k); ``class_dirs``,
            ``skip_bad``, ``name`` (image folders).
    """
    name = str(name_or_path)
    if name == "fashion_mnist":
        ds = load_fashion_mnist(kw.pop("path", None), split)
    elif name == "mnist5k":
        ds = load_mnist5k(split, kw.pop("path", None))
    elif name == "mnist10k":
        ds = load_mnist10k(split, kw.pop("path", None))
    elif name == "digits":
        ds = load_digits(split)
    elif Path(name).is_dir():
        root = Path(name)
        if (root / split).is_dir():
            root = root / split
        elif split not in ("train", "all"):
            raise ValueError(f"image folder {name} has no {split!r} subfolder; a folder without "
                             "split subfolders has only split='train' (= 'all')")
        kw.setdefault("name", name)  # the path as given, so a config can reload it
        ds = load_image_folder(root, resolution, channels, **kw)
        kw = {}
    else:
        what = "is not a folder" if Path(name).exists() else "is neither a data set nor a folder"
        raise FileNotFoundError(f"{name!r} {what}; valid: {list(DATASET_NAMES)} or the path "
                                "of a folder of PNG/JPEG images")
    if kw:
        raise ValueError(f"unknown options for {name!r}: {sorted(kw)}")
    if channels is not None:
        ds.images = convert_channels(ds.images, channels)
    if resolution is not None:
        ds.images = resize_images(ds.images, resolution)
    return ds
