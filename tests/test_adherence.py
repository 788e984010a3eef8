"""The prompt-adherence evaluator (metrics/adherence.py): locating, reading and classifying the
object of a canvas. Real test canvases score ~1.0 on position and size and close to the
classifier's own accuracy on class; shuffled captions score at chance."""

import math

import pytest
import torch

from difflab.data.bundled import find_fashion_mnist, load_fashion_mnist
from difflab.data.canvas import canvas_dataset, compose, item_frame
from difflab.metrics.adherence import (
    adherence,
    crop_objects,
    locate_objects,
    prompt_targets,
    read_layout,
)
from difflab.metrics.features import load_feature_net

try:
    find_fashion_mnist()
    HAVE_FASHION = True
except FileNotFoundError:
    HAVE_FASHION = False
needs_fashion = pytest.mark.skipif(not HAVE_FASHION, reason="Debian package dataset-fashion-mnist")
N = 1500


@pytest.fixture(scope="module")
def real():
    ds = canvas_dataset("test", n=N, seed=0)
    return ds, adherence(ds.images, ds.captions)


def test_locate_and_read_layout_on_known_boxes():
    square = torch.full((18, 1, 28, 28), 255, dtype=torch.uint8)
    sizes, cells = torch.arange(18) // 9, torch.arange(18) % 9
    canvases = compose(square, sizes, cells)
    boxes, found = locate_objects(canvases, trim=0.0)
    assert found.all()
    for i in range(18):
        top, left, s = item_frame(int(sizes[i]), int(cells[i]))
        assert boxes[i].tolist() == [top, left, top + s - 1, left + s - 1]
    size, cell = read_layout(boxes, found)
    assert torch.equal(size, sizes) and torch.equal(cell, cells)
    # a stray pixel far away stretches the exact box but not the trimmed one
    specked = canvases[:1].clone()
    specked[0, 0, 63, 63] = 255
    assert locate_objects(specked, trim=0.0)[0][0].tolist()[2:] == [63, 63]
    assert torch.equal(locate_objects(specked)[0][0], boxes[0])
    # a blank canvas: nothing found, read as -1
    blank = torch.full((1, 1, 64, 64), -1.0)
    b, f = locate_objects(blank)
    assert not f[0] and read_layout(b, f)[1].item() == -1
    # crops: the exact frame of a known item comes back at 28 x 28
    crops = crop_objects(canvases, boxes, torch.tensor([16, 32]).repeat_interleave(9))
    assert crops.shape == (18, 1, 28, 28) and torch.allclose(crops, torch.ones(1), atol=1e-5)


@needs_fashion
def test_real_canvases_score_near_one_and_near_the_classifier(real):
    ds, r = real
    # measured on this sample (N = 1500, seed 0): position 1.000, size 0.999, class 0.861;
    # on all 10,000 test canvases: position 1.0000, size 0.9996, class 0.868
    assert r["n"] == N and r["found"] == 1.0
    assert r["position_accuracy"] >= 0.995 and r["size_accuracy"] >= 0.995
    # the classifier's own accuracy on these items at 28 x 28 (0.935 on the whole test set);
    # resizing to 16 px loses detail: small items ~0.82, large ~0.92
    net = load_feature_net("fmnist")
    items = load_fashion_mnist(split="test").images[ds.info["items"]]
    own = float((net.logits(items, 100).argmax(1) == ds.labels).float().mean())
    assert own - 0.10 <= r["class_accuracy"] <= own
    assert r["class_accuracy"] >= 0.83
    # the evaluator's crops classify as well as the exact frames the generator drew
    boxes = torch.tensor([[t, l, t + s - 1, l + s - 1] for t, l, s in
                          (item_frame(int(a), int(b)) for a, b in
                           zip(ds.extras["size"], ds.extras["cell"]))])
    exact = net.logits(crop_objects(ds.images, boxes), 100).argmax(1) == ds.labels
    assert abs(r["class_accuracy"] - float(exact.float().mean())) <= 0.01
    assert r["all_accuracy"] <= r["class_accuracy"]
    # held-out compositions are read like any other
    held = ds.extras["held_out"]
    assert held.any() and r["per_image"]["correct_position"][held].all()


def chance(pred: torch.Tensor, target: torch.Tensor, k: int) -> float:
    """Expected agreement of a random pairing: sum_k P(pred = k) P(target = k)."""
    p = torch.bincount(pred.clamp_min(0), minlength=k).double() / len(pred)
    q = torch.bincount(target, minlength=k).double() / len(target)
    return float((p * q).sum())


@needs_fashion
def test_shuffled_captions_score_at_chance(real):
    ds, r = real
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(0))
    shuffled = [ds.captions[i] for i in perm.tolist()]
    s = adherence(ds.images, shuffled)
    targets = prompt_targets(shuffled)
    pi = s["per_image"]
    for key, col, k, nominal in [("class_accuracy", 0, 10, 1 / 10),
                                 ("position_accuracy", 2, 9, 1 / 9),
                                 ("size_accuracy", 1, 2, 1 / 2)]:
        p = chance(pi[("class", "size", "cell")[col]], targets[:, col], k)
        assert abs(p - nominal) < 0.02  # balanced data: chance is ~1/K
        tolerance = 4 * math.sqrt(p * (1 - p) / N)  # 4 binomial standard deviations
        assert abs(s[key] - p) <= tolerance, (key, s[key], p, tolerance)


@needs_fashion
def test_crop_fid_against_real_canvases(real):
    ds, _ = real
    a, b = ds.images[:600], ds.images[600:1200]
    same = adherence(a, ds.captions[:600], reference=b)
    assert same["label"] == "FID-FMNIST" and 0 <= same["fid"] < 4  # measured 1.90
    # blurred objects are further from the real crops
    blurred = torch.nn.functional.avg_pool2d(a.float(), 3, 1, 1).round().to(torch.uint8)
    far = adherence(blurred, ds.captions[:600], reference=b)
    assert far["fid"] > 2 * same["fid"] + 1


def test_bad_input_is_refused_by_name():
    x = torch.full((2, 1, 64, 64), -1.0)
    with pytest.raises(ValueError, match="one prompt per image: 2 images, 1 prompts"):
        adherence(x, ["a small bag in the center"])
    with pytest.raises(ValueError, match="not a canvas caption"):
        adherence(x, ["a small bag in the center", "a cat"])
    with pytest.raises(ValueError, match="canvases are 64 x 64"):
        adherence(torch.zeros(1, 1, 32, 32), ["a small bag in the center"])
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
        adherence(x * 3, ["a small bag in the center"] * 2)
    r = adherence(x, ["a small bag in the center"] * 2)  # nothing found: all wrong
    assert r["found"] == 0 and r["position_accuracy"] == r["class_accuracy"] == 0
