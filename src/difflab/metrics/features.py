"""Feature networks phi(x) for the metrics, and the image preprocessing they share.

Names accepted by :func:`load_feature_net`:

================ ========================================================= ===============
name             network                                                   metric label
================ ========================================================= ===============
``fmnist``       FeatureCNN trained on Fashion-MNIST (shipped, 128-d)       FID-FMNIST
``mnist``        FeatureCNN trained on MNIST 5k (shipped, 128-d)            FID-MNIST
``inception``    Inception-v3 FID network (pool3, 2048-d), weights from a   FID (Inception)
                 local ``pt_inception-2015-12-05-*.pth``: pass the path as
                 ``inception:/path/to.pth`` or set $DIFFLAB_INCEPTION_WEIGHTS
a path           ``<stem>.safetensors`` + ``<stem>.json`` saved by
                 :func:`save_feature_net`, or a ``.pth`` Inception state dict
================ ========================================================= ===============

Images enter as uint8 (0..255) or float in [-1, 1], NCHW. Floats are clamped to [-1, 1] and
quantised to 8 bits first (``difflab.data.to_uint8``), so generated samples are measured
exactly as they would be saved as PNG. They are then resized (antialiased bilinear) and
converted to the network's channel count (BT.601 luma for RGB -> gray, repeat for gray -> RGB).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from difflab.metrics.classifier import FeatureCNN

__all__ = ["FeatureExtractor", "load_feature_net", "save_feature_net", "prepare_images",
           "SHIPPED", "ASSETS", "feature_net_names"]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED = {"fmnist": "feature_fmnist", "mnist": "feature_mnist"}
LABELS = {"fmnist": "FID-FMNIST", "mnist": "FID-MNIST", "inception": "FID"}


def feature_net_names() -> list[str]:
    return [*SHIPPED, "inception"]


def prepare_images(images: Tensor, resolution: int | None, channels: int) -> Tensor:
    """uint8 or float [-1, 1] NCHW -> uint8 at (channels, resolution, resolution).

    ``resolution=None`` keeps the size (the Inception network resizes inside, as pytorch-fid).

    Floats outside [-1.5, 1.5] are refused (a [0, 1] or [0, 255] float tensor is almost
    certainly a convention mistake); values in the margin are clamped, as saving would.
    """
    from difflab.data.dataset import convert_channels, resize_images, to_uint8

    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4:
        raise ValueError(f"images must be NCHW (or NHW), got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise ValueError(f"images must be uint8 or float in [-1, 1], got {images.dtype}")
        if images.numel() and (images.min() < -1.5 or images.max() > 1.5):
            raise ValueError(
                f"float images must lie in [-1, 1] (difflab's convention), got range "
                f"[{float(images.min()):.3g}, {float(images.max()):.3g}]; pass uint8 0..255 or "
                "rescale with x / 127.5 - 1")
        images = to_uint8(images)
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {images.shape[1]}")
    if resolution is not None:
        images = resize_images(images, resolution)
    return convert_channels(images, channels)


class FeatureExtractor(nn.Module):
    """A feature network with its preprocessing: ``extractor(images) -> (N, feature_dim)``.

    ``net`` has ``features(x)`` taking float input in [-1, 1] at ``resolution``; classifiers
    also have ``forward(x) -> logits``. ``name`` is the registry name, ``label`` the metric
    label used in reports ("FID-FMNIST", ...).
    """

    def __init__(self, net: nn.Module, name: str, resolution: int | None, channels: int,
                 meta: dict[str, Any] | None = None):
        super().__init__()
        self.net = net.eval()
        self.name = name
        self.resolution = resolution
        self.channels = channels
        self.meta = dict(meta or {})
        self.label = LABELS.get(name, f"FID-{name}")
        for p in self.net.parameters():
            p.requires_grad_(False)

    @property
    def feature_dim(self) -> int:
        return int(self.net.feature_dim)

    @property
    def is_classifier(self) -> bool:
        return isinstance(self.net, FeatureCNN)

    def _inputs(self, images: Tensor) -> Tensor:
        from difflab.data.dataset import to_float

        return to_float(prepare_images(images, self.resolution, self.channels))

    @torch.no_grad()
    def forward(self, images: Tensor, batch_size: int = 500) -> Tensor:
        """phi(images) as float32 (N, feature_dim), computed in batches."""
        out = [self.net.features(self._inputs(images[i:i + batch_size]))
               for i in range(0, images.shape[0], batch_size)]
        return torch.cat(out).float() if out else torch.empty(0, self.feature_dim)

    @torch.no_grad()
    def logits(self, images: Tensor, batch_size: int = 500) -> Tensor:
        """Class logits (N, num_classes); only for classifier feature networks."""
        if not self.is_classifier:
            raise ValueError(f"feature network {self.name!r} is not a classifier; use one of "
                             f"{list(SHIPPED)}")
        out = [self.net(self._inputs(images[i:i + batch_size]))
               for i in range(0, images.shape[0], batch_size)]
        return torch.cat(out).float()


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.chmod(tmp, 0o644)  # shipped package data: readable by everyone
    os.replace(tmp, path)


def save_feature_net(net: FeatureCNN, stem: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``<stem>.safetensors`` (weights and buffers) and ``<stem>.json`` ({"net": config,
    ...meta}); returns the .safetensors path. Both writes are atomic."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights = stem.with_suffix(".safetensors")
    state = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}
    _atomic_write(weights, lambda p: save_file(state, str(p)))
    config = {"net": net.config, **meta}
    _atomic_write(stem.with_suffix(".json"),
                  lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    return weights


def _load_cnn(stem: Path, name: str) -> FeatureExtractor:
    weights, cfg_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    for p in (weights, cfg_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"feature network file {p} is missing; shipped nets: {list(SHIPPED)} "
                "(rebuild with `difflab train-features`, see bench/README.md)")
    config = json.loads(cfg_path.read_text())
    net = FeatureCNN.from_config(config["net"])
    net.load_state_dict(load_file(str(weights)), strict=True)
    return FeatureExtractor(net, name, int(config["net"]["resolution"]),
                            int(config["net"]["in_channels"]), config)


def load_feature_net(name: str | Path = "fmnist") -> FeatureExtractor:
    """A feature network by name ("fmnist", "mnist", "inception[:path.pth]") or file path."""
    if isinstance(name, FeatureExtractor):
        return name
    s = str(name)
    if s in SHIPPED:
        return _load_cnn(ASSETS / SHIPPED[s], s)
    if s == "inception" or s.startswith("inception:") or s.endswith(".pth"):
        from difflab.metrics.inception import load_inception

        path = s.split(":", 1)[1] if s.startswith("inception:") else (
            s if s.endswith(".pth") else os.environ.get("DIFFLAB_INCEPTION_WEIGHTS"))
        if not path:
            raise FileNotFoundError(
                "the Inception-v3 FID network needs its weights file, which difflab never "
                "downloads: get pt_inception-2015-12-05-6726825d.pth (pytorch-fid release) and "
                "pass feature_net='inception:/path/to/it.pth' or set $DIFFLAB_INCEPTION_WEIGHTS")
        net = load_inception(path)
        return FeatureExtractor(net, "inception", None, 3, {"weights": str(path)})
    p = Path(s)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    if stem.with_suffix(".safetensors").is_file():
        return _load_cnn(stem, stem.name.removeprefix("feature_"))
    raise ValueError(f"unknown feature network {s!r}; valid: {feature_net_names()}, "
                     "'inception:/path/to/pt_inception.pth', or a path to <stem>.safetensors")
