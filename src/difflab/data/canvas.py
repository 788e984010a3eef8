"""Captioned images: the Fashion-MNIST canvas data set that makes text control measurable, and
image folders with captions, both as a :class:`CaptionedDataset` of named fields.

The canvas data set (issue #18). Each canvas is 64 x 64, one channel, background -1 (uint8 0),
holding one Fashion-MNIST item resized with antialiased bilinear resampling to s = 16 px
("small") or s = 32 px ("large") and centred on one of 9 cells, whose centres are 16 / 32 / 48
px down and across (pixel i covers [i, i + 1), so the s x s frame of an item in a cell with
centre (c_y, c_x) covers rows c_y - s/2 .. c_y + s/2 - 1, clipped into the canvas). Its caption:

    "a {small|large} {class} in the {top|middle|bottom} {left|center|right}"

with the middle cell written "in the center" and the classes t-shirt, trouser, pullover, dress,
coat, sandal, shirt, sneaker, bag, ankle boot (Fashion-MNIST's labels 0..9). Cells are numbered
row-major: cell = 3 * row + column (0 = top left, 4 = center, 8 = bottom right); sizes 0 = small,
1 = large. :func:`parse_caption` inverts :func:`caption`.

A canvas data set is a pure function of (split, n, seed, held_out): training canvases use the
Fashion-MNIST training images, test canvases its test images. ``held_out`` compositions (class,
size, cell) never occur in training canvases (a sample of them measures generalisation to
unseen combinations of seen words); test canvases contain every composition, flagged in the
"held_out" field.

Image folders with captions (:func:`load_captioned_folder`): every image below a folder (as
:func:`difflab.data.load_image_folder`) with its caption from a ``.txt`` file beside it
(``cat.png`` + ``cat.txt``) or from a ``captions.jsonl`` in the folder, one
``{"file_name": "relative/path.png", "text": "a caption"}`` per line.

Named fields (what the trainer and the objectives consume; :meth:`CaptionedDataset.batch`):
"image" (float in [-1, 1], NCHW; stored uint8), "caption" (list[str]), and where known "label"
and "class" (the item's class), "size", "cell", "held_out" (long / bool tensors).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from difflab.data.bundled import load_fashion_mnist
from difflab.data.dataset import ImageDataset, mix_seed, resize_images, to_float
from difflab.data.folder import find_images, load_image_folder

__all__ = [
    "CANVAS_SIZE", "CELL_CENTRES", "ITEM_SIZES", "SIZE_NAMES", "ROW_NAMES", "COLUMN_NAMES",
    "CANVAS_CLASSES", "CELL_NAMES", "HELD_OUT", "CaptionedDataset", "caption", "parse_caption",
    "all_captions", "item_frame", "compose", "canvas_dataset", "load_captioned_folder",
    "load_captioned",
]

CANVAS_SIZE = 64
CELL_CENTRES = (16, 32, 48)
ITEM_SIZES = (16, 32)
SIZE_NAMES = ("small", "large")
ROW_NAMES = ("top", "middle", "bottom")
COLUMN_NAMES = ("left", "center", "right")
CANVAS_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                  "sneaker", "bag", "ankle boot")
CELL_NAMES = tuple("center" if (r, c) == (1, 1) else f"{ROW_NAMES[r]} {COLUMN_NAMES[c]}"
                   for r in range(3) for c in range(3))
#: compositions (class, size, cell) absent from training canvases: "a large bag in the top
#: left", "a small sneaker in the center", "a large dress in the bottom right", "a small
#: trouser in the top right", "a small coat in the middle left"
HELD_OUT = ((8, 1, 0), (7, 0, 4), (3, 1, 8), (1, 0, 2), (4, 0, 3))


# -- captions ---------------------------------------------------------------------------------
def caption(cls: int, size: int, cell: int) -> str:
    """The caption of class ``cls`` (0..9) at ``size`` (0 small, 1 large) in ``cell`` (0..8)."""
    _check_composition(cls, size, cell)
    return f"a {SIZE_NAMES[size]} {CANVAS_CLASSES[cls]} in the {CELL_NAMES[cell]}"


_CAPTION = re.compile(r"an? (small|large) (.+) in the (.+)")
_GRAMMAR = ("'a {small|large} {class} in the {top|middle|bottom} {left|center|right}' (the "
            "middle cell: 'in the center'); classes: " + ", ".join(CANVAS_CLASSES))


def parse_caption(text: str) -> tuple[int, int, int]:
    """(class, size, cell) of a canvas caption; the inverse of :func:`caption`. Case, repeated
    spaces and a final period are ignored; anything else off the grammar is a ValueError."""
    m = _CAPTION.fullmatch(" ".join(str(text).lower().split()).rstrip("."))
    if m is not None:
        size_name, cls_name, place = m.groups()
        place = "center" if place == "middle center" else place
        if cls_name in CANVAS_CLASSES and place in CELL_NAMES:
            return (CANVAS_CLASSES.index(cls_name), SIZE_NAMES.index(size_name),
                    CELL_NAMES.index(place))
    raise ValueError(f"caption {text!r} is not a canvas caption: expected {_GRAMMAR}")


def all_captions() -> list[str]:
    """The 180 captions, composition index (cls * 2 + size) * 9 + cell."""
    return [caption(c, s, k) for c in range(10) for s in range(2) for k in range(9)]


def _check_composition(cls: int, size: int, cell: int) -> None:
    if not (0 <= int(cls) < 10 and 0 <= int(size) < 2 and 0 <= int(cell) < 9):
        raise ValueError(f"a composition is (class 0..9, size 0..1, cell 0..8), got "
                         f"({cls}, {size}, {cell})")


# -- geometry ---------------------------------------------------------------------------------
def item_frame(size: int, cell: int) -> tuple[int, int, int]:
    """(top, left, side) of the s x s frame of an item of ``size`` in ``cell``: centred on the
    cell centre (c - s/2), clipped into the canvas."""
    _check_composition(0, size, cell)
    s = ITEM_SIZES[size]
    r, c = divmod(int(cell), 3)
    top = min(max(CELL_CENTRES[r] - s // 2, 0), CANVAS_SIZE - s)
    left = min(max(CELL_CENTRES[c] - s // 2, 0), CANVAS_SIZE - s)
    return top, left, s


def compose(items: Tensor, sizes: Tensor, cells: Tensor) -> Tensor:
    """Canvases (N, C, 64, 64) uint8 from items (N, C, h, w) uint8 (background 0): item i
    resized (antialiased bilinear) to ``ITEM_SIZES[sizes[i]]`` and placed in ``cells[i]``."""
    if items.ndim != 4 or items.dtype != torch.uint8:
        raise ValueError(f"items must be uint8 (N, C, h, w), got {items.dtype} "
                         f"{tuple(items.shape)}")
    sizes, cells = torch.as_tensor(sizes).long(), torch.as_tensor(cells).long()
    N = items.shape[0]
    if sizes.shape != (N,) or cells.shape != (N,):
        raise ValueError(f"sizes and cells must be ({N},), got {tuple(sizes.shape)} and "
                         f"{tuple(cells.shape)}")
    canvases = torch.zeros(N, items.shape[1], CANVAS_SIZE, CANVAS_SIZE, dtype=torch.uint8)
    for size in range(len(ITEM_SIZES)):
        sel = (sizes == size).nonzero().flatten()
        if not sel.numel():
            continue
        s = ITEM_SIZES[size]
        resized = resize_images(items[sel], (s, s))
        for cell in range(9):
            j = (cells[sel] == cell).nonzero().flatten()
            if j.numel():
                top, left, _ = item_frame(size, cell)
                canvases[sel[j], :, top:top + s, left:left + s] = resized[j]
    return canvases


# -- the data set of named fields -------------------------------------------------------------
@dataclass(eq=False)
class CaptionedDataset(ImageDataset):
    """An :class:`ImageDataset` whose images have captions, and optionally further per-image
    fields (``extras``: name -> (N,) tensor, e.g. "class", "size", "cell", "held_out")."""

    captions: list[str] = field(default_factory=list)
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.images.shape[0]
        if len(self.captions) != n:
            raise ValueError(f"{n} images but {len(self.captions)} captions")
        for name, v in self.extras.items():
            if v.shape[:1] != (n,):
                raise ValueError(f"field {name!r} must have {n} rows, got {tuple(v.shape)}")

    def fields(self) -> dict[str, Any]:
        """Every named field, whole: "image" (uint8), "caption" (list[str]), "label" (if
        labelled) and the extras."""
        out: dict[str, Any] = {"image": self.images, "caption": self.captions}
        if self.labels is not None:
            out["label"] = self.labels
        out.update(self.extras)
        return out

    def batch(self, index: Tensor | Sequence[int]) -> dict[str, Any]:
        """The rows ``index`` of every field; images as float32 in [-1, 1], captions as a
        list of strings."""
        index = torch.as_tensor(index, dtype=torch.long)
        out: dict[str, Any] = {}
        for name, value in self.fields().items():
            if name == "caption":
                out[name] = [value[i] for i in index.tolist()]
            elif name == "image":
                out[name] = to_float(value[index])
            else:
                out[name] = value[index]
        return out

    def subset(self, indices: Tensor) -> CaptionedDataset:
        indices = torch.as_tensor(indices, dtype=torch.long)
        return CaptionedDataset(
            self.images[indices], None if self.labels is None else self.labels[indices],
            self.name, self.num_classes, self.class_names, dict(self.info),
            [self.captions[i] for i in indices.tolist()],
            {k: v[indices] for k, v in self.extras.items()})

    def config(self) -> dict:
        return {**super().config(), "captions": True,
                **{k: self.info[k] for k in ("split", "n", "seed", "held_out") if k in self.info}}


@functools.lru_cache(maxsize=2)
def _source(path: str | None, split: str) -> ImageDataset:
    """The Fashion-MNIST split the canvases are made from (read once per process; only
    indexed, never modified)."""
    return load_fashion_mnist(path, split)


def _item_order(n_items: int, n: int, generator: torch.Generator) -> Tensor:
    """n item indices: successive random permutations of the n_items items."""
    perms = [torch.randperm(n_items, generator=generator) for _ in range(-(-n // n_items))]
    return torch.cat(perms)[:n]


def canvas_dataset(split: str = "train", n: int | None = None, seed: int = 0,
                   held_out: Sequence[tuple[int, int, int]] = HELD_OUT,
                   path: str | Path | None = None) -> CaptionedDataset:
    """The canvas data set (module docstring).

    Args:
        split: "train" (Fashion-MNIST training items, ``held_out`` compositions excluded) or
            "test" (its test items, every composition; "held_out" flags the held-out ones).
        n: number of canvases; default one per item of the split (60,000 / 10,000). Items are
            visited in random order, again in a new order when n exceeds them.
        seed: the canvases are a pure function of (split, n, seed, held_out).
        held_out: (class, size, cell) compositions kept out of training.
        path: the Fashion-MNIST folder (default: found as ``load_fashion_mnist`` finds it).

    Each canvas's (size, cell) is drawn uniformly from the compositions allowed for its item's
    class (all 18 for test canvases).
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; valid: ['train', 'test']")
    held = sorted({tuple(int(v) for v in h) for h in held_out})
    for h in held:
        if len(h) != 3:
            raise ValueError(f"held_out entries are (class, size, cell), got {h}")
        _check_composition(*h)
    source = _source(None if path is None else str(path), split)
    n = len(source) if n is None else int(n)
    if n < 1:
        raise ValueError(f"n must be a positive number of canvases, got {n}")
    items = _item_order(len(source), n, torch.Generator().manual_seed(mix_seed(seed, 0)))
    cls = source.labels[items]
    # the (size, cell) pairs allowed per class, as combo = size * 9 + cell
    allowed = torch.zeros(10, 18, dtype=torch.long)
    n_allowed = torch.zeros(10, dtype=torch.long)
    for c in range(10):
        ok = [k for k in range(18) if split == "test" or (c, k // 9, k % 9) not in held]
        if not ok:
            raise ValueError(f"held_out leaves class {CANVAS_CLASSES[c]!r} no composition")
        allowed[c, :len(ok)] = torch.tensor(ok)
        n_allowed[c] = len(ok)
    u = torch.rand(n, generator=torch.Generator().manual_seed(mix_seed(seed, 1)),
                   dtype=torch.float64)
    k = (u * n_allowed[cls]).long().clamp(max=17)
    combo = allowed[cls, k]
    size, cell = combo // 9, combo % 9
    held_set = set(held)
    is_held = torch.tensor([(c, s, k) in held_set for c, s, k in
                            zip(cls.tolist(), size.tolist(), cell.tolist())], dtype=torch.bool)
    captions = [caption(c, s, k) for c, s, k in zip(cls.tolist(), size.tolist(), cell.tolist())]
    info = {"source": source.info.get("source"), "split": split, "n": n, "seed": seed,
            "held_out": [caption(*h) for h in held], "items": items}
    return CaptionedDataset(compose(source.images[items], size, cell), cls.clone(), "canvas",
                            10, list(CANVAS_CLASSES), info, captions,
                            {"class": cls.clone(), "size": size, "cell": cell,
                             "held_out": is_held})


# -- image folders with captions --------------------------------------------------------------
def _read_jsonl(path: Path, root: Path) -> dict[Path, str]:
    out: dict[Path, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from e
        name = next((row[k] for k in ("file_name", "file", "image") if k in row), None) \
            if isinstance(row, dict) else None
        text = next((row[k] for k in ("text", "caption") if k in row), None) \
            if isinstance(row, dict) else None
        if not isinstance(name, str) or not isinstance(text, str):
            raise ValueError(f"{path}, line {lineno}: expected an object with \"file_name\" and "
                             f"\"text\" strings, got {line.strip()[:80]!r}")
        key = (root / name).resolve()
        if key in out:
            raise ValueError(f"{path}, line {lineno}: a second caption for {name!r}")
        out[key] = text.strip()
    return out


def load_captioned_folder(root: str | Path, resolution: int | None = None,
                          channels: int | None = None, *, skip_bad: bool = False,
                          name: str | None = None) -> CaptionedDataset:
    """Every image below ``root`` (as :func:`difflab.data.load_image_folder`: ``resolution``,
    ``channels``, ``skip_bad``) with its caption from ``<image stem>.txt`` beside it or from
    ``root/captions.jsonl``. An image without a caption, a caption for a file that is not an
    image of the folder, or two different captions for one image are ValueErrors naming the
    file. If every caption is a canvas caption, the "class", "size" and "cell" fields are
    filled in (so canvases saved as PNGs load back as canvases)."""
    root = Path(root)
    ds = load_image_folder(root, resolution, channels, skip_bad=skip_bad, name=name)
    skipped = set(ds.info.get("skipped", []))
    paths = [p for p in find_images(root) if str(p) not in skipped]
    jsonl = root / "captions.jsonl"
    listed = _read_jsonl(jsonl, root) if jsonl.is_file() else {}
    resolved = {p.resolve() for p in find_images(root)}
    stray = [k for k in listed if k not in resolved]
    if stray:
        raise ValueError(f"{jsonl} has a caption for {stray[0]}, which is not an image of {root}")
    captions, missing = [], []
    for p in paths:
        txt = p.with_suffix(".txt")
        beside = " ".join(txt.read_text(encoding="utf-8").split()) if txt.is_file() else None
        text = listed.get(p.resolve())
        if text is not None and beside is not None and " ".join(text.split()) != beside:
            raise ValueError(f"{p} has two different captions: {beside!r} in {txt.name} and "
                             f"{text!r} in {jsonl.name}")
        text = text if text is not None else beside
        if text is None:
            missing.append(p)
        captions.append(text if text is not None else "")
    if missing:
        raise ValueError(f"{len(missing)} image(s) of {root} have no caption (first: "
                         f"{missing[0]}); give each image a .txt beside it or a line in "
                         f"{jsonl.name}")
    extras: dict[str, Tensor] = {}
    labels, num_classes, class_names = ds.labels, ds.num_classes, ds.class_names
    try:
        parsed = torch.tensor([parse_caption(c) for c in captions], dtype=torch.long)
    except ValueError:
        parsed = None
    if parsed is not None:
        extras = {"class": parsed[:, 0], "size": parsed[:, 1], "cell": parsed[:, 2]}
        if labels is None:
            labels, num_classes, class_names = parsed[:, 0].clone(), 10, list(CANVAS_CLASSES)
    info = {**ds.info, "captions": str(jsonl) if listed else ".txt"}
    return CaptionedDataset(ds.images, labels, ds.name, num_classes, class_names, info,
                            captions, extras)


def load_captioned(name_or_path: str | Path, split: str = "train", **kw: Any) -> CaptionedDataset:
    """One front door for captioned data: "canvas" (:func:`canvas_dataset`; ``n``, ``seed``,
    ``held_out``, ``path``) or a folder of captioned images (:func:`load_captioned_folder`; a
    ``<split>`` subfolder is used when there is one)."""
    if str(name_or_path) == "canvas":
        return canvas_dataset(split, **kw)
    root = Path(name_or_path)
    if not root.is_dir():
        raise FileNotFoundError(f"{str(name_or_path)!r} is neither 'canvas' nor a folder of "
                                "captioned images")
    if (root / split).is_dir():
        root = root / split
    elif split not in ("train", "all"):
        raise ValueError(f"captioned folder {name_or_path} has no {split!r} subfolder; a folder "
                         "without split subfolders has only split='train' (= 'all')")
    kw.setdefault("name", str(name_or_path))
    return load_captioned_folder(root, **kw)
