"""The caption data set of issue #18 (data/canvas.py): captions and their inverse, determinism,
held-out compositions, geometry, named fields, and image folders with captions."""

import json

import numpy as np
import pytest
import torch

from difflab.data.bundled import find_fashion_mnist, load_fashion_mnist
from difflab.data.canvas import (
    CANVAS_CLASSES,
    CELL_NAMES,
    HELD_OUT,
    CaptionedDataset,
    all_captions,
    canvas_dataset,
    caption,
    compose,
    item_frame,
    load_captioned,
    load_captioned_folder,
    parse_caption,
)

try:
    find_fashion_mnist()
    HAVE_FASHION = True
except FileNotFoundError:
    HAVE_FASHION = False
needs_fashion = pytest.mark.skipif(not HAVE_FASHION, reason="Debian package dataset-fashion-mnist")


def test_captions_follow_the_grammar_and_parse_back():
    assert caption(8, 1, 0) == "a large bag in the top left"
    assert caption(9, 0, 4) == "a small ankle boot in the center"
    assert caption(0, 0, 5) == "a small t-shirt in the middle right"
    assert caption(3, 1, 7) == "a large dress in the bottom center"
    assert CELL_NAMES[4] == "center" and len(set(CELL_NAMES)) == 9
    captions = all_captions()
    assert len(captions) == len(set(captions)) == 180
    for i, text in enumerate(captions):
        cls, size, cell = parse_caption(text)
        assert (cls * 2 + size) * 9 + cell == i
    assert parse_caption("A  Large Ankle Boot in the Middle Center.") == (9, 1, 4)
    for bad in ["a huge bag in the top left", "a small sock in the center",
                "a small bag in the middle", "a small bag", ""]:
        with pytest.raises(ValueError, match="not a canvas caption"):
            parse_caption(bad)


@needs_fashion
def test_canvases_are_deterministic_and_fields_consistent():
    a = canvas_dataset("train", n=300, seed=3)
    b = canvas_dataset("train", n=300, seed=3)
    c = canvas_dataset("train", n=300, seed=4)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (300, 1, 64, 64) and a.images.dtype == torch.uint8
    for i, text in enumerate(a.captions):
        assert parse_caption(text) == (int(a.extras["class"][i]), int(a.extras["size"][i]),
                                       int(a.extras["cell"][i]))
    assert torch.equal(a.labels, a.extras["class"])
    # background is -1 (uint8 0) everywhere outside the item's frame
    for i in range(20):
        top, left, s = item_frame(int(a.extras["size"][i]), int(a.extras["cell"][i]))
        outside = a.images[i, 0].clone()
        outside[top:top + s, left:left + s] = 0
        assert outside.max() == 0 and a.images[i, 0].max() > 100
    batch = a.batch(torch.tensor([5, 0, 7]))
    assert batch["image"].dtype == torch.float32 and batch["image"].min() == -1
    assert batch["image"].max() <= 1 and batch["caption"] == [a.captions[i] for i in (5, 0, 7)]
    assert torch.equal(batch["cell"], a.extras["cell"][[5, 0, 7]])
    sub = a.subset(torch.tensor([2, 1]))
    assert isinstance(sub, CaptionedDataset) and sub.captions == a.captions[2:0:-1]
    assert a.config()["split"] == "train" and a.config()["captions"] is True


@needs_fashion
def test_held_out_compositions_absent_from_training_and_present_in_test():
    held = {caption(*h) for h in HELD_OUT}
    train = canvas_dataset("train", n=6000, seed=0)
    assert held.isdisjoint(train.captions) and not train.extras["held_out"].any()
    assert sorted(train.info["held_out"]) == sorted(held)
    # every other composition still occurs, near uniformly for each class
    assert len(set(train.captions)) == 180 - len(HELD_OUT)
    test = canvas_dataset("test", n=4000, seed=0)
    flagged = {t for t, h in zip(test.captions, test.extras["held_out"].tolist()) if h}
    assert flagged == held
    sizes = test.extras["size"].float().mean().item()
    assert abs(sizes - 0.5) < 0.05
    cells = torch.bincount(test.extras["cell"], minlength=9).float() / 4000
    assert (cells - 1 / 9).abs().max() < 0.025
    # test canvases are made from Fashion-MNIST's test images, training ones from its train
    assert test.info["split"] == "test" and train.info["split"] == "train"
    with pytest.raises(ValueError, match="no composition"):
        canvas_dataset("train", n=5, held_out=[(0, s, k) for s in range(2) for k in range(9)])
    with pytest.raises(ValueError, match="unknown split"):
        canvas_dataset("valid")


def bbox_centre(img):
    ys, xs = np.nonzero(img.numpy() > 0)
    return (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2, \
        max(ys.max() - ys.min(), xs.max() - xs.min()) + 1


def test_geometry_item_centred_on_its_cell():
    # a known item: a filled square (the whole 28 x 28 frame)
    square = torch.full((18, 1, 28, 28), 255, dtype=torch.uint8)
    sizes = torch.arange(18) // 9
    cells = torch.arange(18) % 9
    canvases = compose(square, sizes, cells)
    for i in range(18):
        cy, cx, extent = bbox_centre(canvases[i, 0])
        r, c = divmod(int(cells[i]), 3)
        assert abs(cy - (16, 32, 48)[r]) <= 1 and abs(cx - (16, 32, 48)[c]) <= 1
        assert extent == (16, 32)[int(sizes[i])]
    # large items at the edge cells fill the canvas exactly to its border (no clipping needed)
    assert item_frame(1, 0) == (0, 0, 32) and item_frame(1, 8) == (32, 32, 32)


@needs_fashion
def test_geometry_real_item_centred_on_its_cell():
    # a real item: Fashion-MNIST test image 0 (an ankle boot), in all 18 layouts
    boot = load_fashion_mnist(split="test").images[:1].expand(18, -1, -1, -1)
    sizes, cells = torch.arange(18) // 9, torch.arange(18) % 9
    canvases = compose(boot.contiguous(), sizes, cells)
    for i in range(18):
        cy, cx, extent = bbox_centre(canvases[i, 0])
        r, c = divmod(int(cells[i]), 3)
        assert abs(cy - (16, 32, 48)[r]) <= 1 and abs(cx - (16, 32, 48)[c]) <= 1
        assert (16, 32)[int(sizes[i])] - 2 <= extent <= (16, 32)[int(sizes[i])]
    # the data set places its items the same way
    ds = canvas_dataset("test", n=50, seed=0)
    items = load_fashion_mnist(split="test").images[ds.info["items"]]
    assert torch.equal(ds.images, compose(items, ds.extras["size"], ds.extras["cell"]))


def write_png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)


@needs_fashion
def test_captioned_folder_txt_and_jsonl(tmp_path):
    ds = canvas_dataset("test", n=4, seed=1)
    root = tmp_path / "caps"
    (root / "sub").mkdir(parents=True)
    names = ["a.png", "b.png", "sub/c.png", "sub/d.png"]
    for name, img in zip(names, ds.images):
        write_png(root / name, img[0].numpy())
    (root / "a.txt").write_text(ds.captions[0] + "\n")
    (root / "sub" / "c.txt").write_text(ds.captions[2])
    with open(root / "captions.jsonl", "w") as f:
        f.write(json.dumps({"file_name": "b.png", "text": ds.captions[1]}) + "\n")
        f.write(json.dumps({"file_name": "sub/d.png", "text": ds.captions[3]}) + "\n")
    got = load_captioned_folder(root)
    assert got.captions == ds.captions and torch.equal(got.images, ds.images)
    # canvas captions are recognised: the parsed fields come back
    assert torch.equal(got.extras["cell"], ds.extras["cell"])
    assert torch.equal(got.labels, ds.labels) and got.class_names == list(CANVAS_CLASSES)
    assert load_captioned(root).captions == ds.captions  # the one front door
    assert load_captioned("canvas", "test", n=4, seed=1).captions == ds.captions
    b = got.batch([3])
    assert b["caption"] == [ds.captions[3]] and b["image"].shape == (1, 1, 64, 64)

    # free-text captions: no canvas fields
    (root / "a.txt").write_text("a photo of something")
    assert "cell" not in load_captioned_folder(root).extras
    # a missing caption, two different captions, a caption for no image, bad JSON
    (root / "a.txt").unlink()
    with pytest.raises(ValueError, match=r"1 image\(s\) .* no caption .*a.png"):
        load_captioned_folder(root)
    (root / "a.txt").write_text(ds.captions[0])
    (root / "b.txt").write_text("something else")
    with pytest.raises(ValueError, match="b.png has two different captions"):
        load_captioned_folder(root)
    (root / "b.txt").unlink()
    with open(root / "captions.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "zzz.png", "text": "x"}) + "\n")
    with pytest.raises(ValueError, match="zzz.png, which is not an image"):
        load_captioned_folder(root)
    (root / "captions.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1: not valid JSON"):
        load_captioned_folder(root)
    with pytest.raises(FileNotFoundError, match="neither 'canvas' nor a folder"):
        load_captioned(tmp_path / "nowhere")
