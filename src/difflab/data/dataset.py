"""The in-memory image data set, the one epoch order of training, and batches of named fields.

Images are stored as uint8 NCHW (0..255) and become model inputs only in a batch:

    x = images / 127.5 - 1        in [-1, 1]        (DESIGN.md: images are floats in [-1, 1])

The epoch order (:class:`EpochOrder`) is the one every training loop uses: epoch e visits the
N examples in the order ``randperm(N)`` of a generator seeded with ``seed * 1_000_003 + e``,
and the examples form one endless stream, epoch after epoch, so a batch is a pure function of
(seed, position) and a run resumes exactly from the number of examples it has consumed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.objectives import random_flip  # the one flip (FeatureObjective's augmentation)

__all__ = ["ImageDataset", "EpochOrder", "BatchIterator", "take", "to_float", "to_uint8",
           "random_flip", "mix_seed", "resize_images", "convert_channels"]

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers via the SplitMix64 finaliser (Steele et al. 2014).

    Used to give every (seed, epoch, position) of a :class:`BatchIterator` its own flips.
    """
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


class EpochOrder:
    """The seeded order in which training visits N examples (module docstring).

    ``permutation(e)`` is epoch e's order; ``indices(start, n)`` the examples start ..
    start + n - 1 of the endless stream of epochs (a batch may straddle two epochs).
    """

    def __init__(self, n: int, seed: int = 0):
        if n < 1:
            raise ValueError(f"the data hold no examples (n={n})")
        self.n, self.seed = int(n), int(seed)
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def permutation(self, epoch: int) -> Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(epoch))
            self._perm, self._epoch = torch.randperm(self.n, generator=g), int(epoch)
        return self._perm

    def indices(self, start: int, n: int) -> Tensor:
        out = []
        while n > 0:
            epoch, off = divmod(start, self.n)
            k = min(n, self.n - off)
            out.append(self.permutation(epoch)[off:off + k])
            start, n = start + k, n - k
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def take(fields: Mapping[str, Tensor | None], index: Tensor) -> dict[str, Tensor]:
    """The rows ``index`` of every named field (``"image"``, ``"label"``, ...), uint8 images
    converted to float in [-1, 1] (:func:`to_float`); absent (None) fields are left out."""
    out = {}
    for name, value in fields.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):  # e.g. captions: a list of strings
            out[name] = [value[i] for i in torch.as_tensor(index).tolist()]
            continue
        rows = value[index]
        out[name] = to_float(rows) if rows.dtype == torch.uint8 else rows
    return out


def to_float(images: Tensor) -> Tensor:
    """uint8 0..255 -> float32 in [-1, 1]: x = u / 127.5 - 1 (floats are returned as float32)."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 127.5 - 1
    return images.to(torch.float32)


def to_uint8(x: Tensor) -> Tensor:
    """float in [-1, 1] -> uint8: round((x + 1) * 127.5), clamped to 0..255."""
    return ((x.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def resize_images(images: Tensor, resolution: int | tuple[int, int]) -> Tensor:
    """Resize a uint8 NCHW batch with antialiased bilinear interpolation (shorter side to
    ``resolution``, then a center crop when an int is given and the images are not square)."""
    h, w = images.shape[-2:]
    if isinstance(resolution, int):
        if (h, w) == (resolution, resolution):
            return images
        scale = resolution / min(h, w)
        size = (max(resolution, round(h * scale)), max(resolution, round(w * scale)))
    else:
        size = tuple(resolution)
    x = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True,
                      align_corners=False)
    if isinstance(resolution, int):
        top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        x = x[..., top:top + resolution, left:left + resolution]
    return x.round().clamp(0, 255).to(torch.uint8)


def convert_channels(images: Tensor, channels: int) -> Tensor:
    """1 <-> 3 channels: gray -> RGB repeats; RGB -> gray uses ITU-R BT.601 luma
    Y = 0.299 R + 0.587 G + 0.114 B (as PIL's convert("L"))."""
    c = images.shape[1]
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if c == channels:
        return images
    if c == 1:
        return images.expand(-1, 3, -1, -1).contiguous()
    if c == 3:
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        y = (images.float() * w).sum(1, keepdim=True)
        return y.round().clamp(0, 255).to(images.dtype)
    raise ValueError(f"cannot convert {c}-channel images to {channels} channels")


@dataclass(eq=False)  # tensors have no single truth value: compare by identity
class ImageDataset:
    """Images in memory: ``images`` uint8 (N, C, H, W), ``labels`` long (N,) or None.

    ``num_classes`` is 0 for unlabelled data; ``class_names`` names the labels when known.
    """

    images: Tensor
    labels: Tensor | None
    name: str
    num_classes: int = 0
    class_names: list[str] | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must be NCHW, got shape {tuple(self.images.shape)}")
        if self.labels is not None and self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must have shape ({self.images.shape[0]},), got "
                             f"{tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def resolution(self) -> int:
        """The image side length (height; images here are square unless loaded otherwise)."""
        return self.images.shape[2]

    def subset(self, indices: Tensor) -> ImageDataset:
        labels = None if self.labels is None else self.labels[indices]
        return ImageDataset(self.images[indices], labels, self.name, self.num_classes,
                            self.class_names, dict(self.info))

    def get_batch(self, indices: Tensor, *, flip: bool = False,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """Images ``indices`` as float32 in [-1, 1] (randomly flipped if ``flip``) and labels."""
        x = to_float(self.images[indices])
        if flip:
            x = random_flip(x, generator)
        return x, None if self.labels is None else self.labels[indices]

    def batches(self, batch_size: int, *, seed: int = 0, flip: bool = False,
                drop_last: bool = True) -> BatchIterator:
        """An endless, seeded epoch-permutation iterator; see :class:`BatchIterator`."""
        return BatchIterator(self, batch_size, seed=seed, flip=flip, drop_last=drop_last)

    def config(self) -> dict:
        """The JSON-safe description checkpoints store under "data"."""
        return {"name": self.name, "resolution": self.resolution, "channels": self.channels,
                "num_classes": self.num_classes}


class BatchIterator:
    """Endless batches of an :class:`ImageDataset` in the :class:`EpochOrder`, epoch by epoch.

    A batch is the next ``batch_size`` indices of epoch ``epoch``'s permutation from
    ``position``; its flips use a generator seeded with mix(seed, epoch, position). Its whole
    state is (epoch, position, seed), so after ``load_state_dict(state_dict())`` it yields
    exactly the batches the original would have. With ``drop_last`` (default) an epoch ends
    when fewer than ``batch_size`` images remain. (The trainer reads the same
    :class:`EpochOrder` as one stream instead, without dropping.)
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, *, seed: int = 0,
                 flip: bool = False, drop_last: bool = True):
        n = len(dataset)
        if batch_size < 1 or (drop_last and batch_size > n):
            raise ValueError(f"batch_size must be in [1, {n}] (the data set size), "
                             f"got {batch_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.flip = bool(flip)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.position = 0
        self._order = EpochOrder(n, seed)

    @property
    def seed(self) -> int:
        return self._order.seed

    def permutation(self, epoch: int) -> Tensor:
        return self._order.permutation(epoch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = EpochOrder(len(self.dataset), int(state["seed"]))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        return self

    def __next__(self) -> tuple[Tensor, Tensor | None]:
        n = len(self.dataset)
        remaining = n - self.position
        if remaining <= 0 or (self.drop_last and remaining < self.batch_size):
            self.epoch, self.position = self.epoch + 1, 0
        idx = self.permutation(self.epoch)[self.position:self.position + self.batch_size]
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, self.position))
        self.position += idx.numel()
        return self.dataset.get_batch(idx, flip=self.flip, generator=g)
