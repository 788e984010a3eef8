"""ControlNet training on the one trainer (objectives/controlnet.py, train/controlnet.py) and its
command line (train-controlnet, sample --control-image): the base is never touched (weights
bit-identical, checkpoint files byte-identical), scale 0 is the base, resume is bit-identical, a
ControlNet trained for another base is refused, bad control input is a clear error."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.cli import main
from difflab.denoiser import Condition
from difflab.nets.controlnet import ControlSettings
from difflab.train import checkpoint as ckpt
from difflab.train import controlnet as TC
from difflab.train.config import complete
from difflab.train.trainer import Trainer

SIZE = 8
TINY_UNET = {"type": "unet", "in_channels": 1, "out_channels": 1, "model_channels": 8,
             "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [],
             "image_size": SIZE, "num_classes": None}


def squares(n: int = 24, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 1, 8, 8) images of white squares on black (clear Canny edges)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, SIZE, SIZE, dtype=torch.uint8)
    for i in range(n):
        a, b = torch.randint(1, 4, (2,), generator=g).tolist()
        w = int(torch.randint(2, 4, (1,), generator=g))
        x[i, 0, a:a + w, b:b + w] = 255
    return x


def base_config(name: str = "tiny") -> dict:
    return complete({
        "net": TINY_UNET, "schedule": {"type": "cosine", "timesteps": 1000}, "prediction": "v",
        "data": {"name": name, "resolution": SIZE, "channels": 1, "num_classes": 10},
        "train": {"steps": 3, "batch_size": 8, "grid_size": 0, "seed": 3, "log_every": 1,
                  "threads": 1, "weighting": "min_snr", "sample_every": 0}})


def train_base(path: Path, seed: int = 3) -> Path:
    cfg = base_config()
    cfg["train"]["seed"] = seed
    tr = Trainer(cfg, path, data=(squares(), None))
    tr.run()
    tr.close()
    return path / "checkpoint"


def file_bytes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return train_base(tmp_path_factory.mktemp("base") / "run")


def cn_data(config: dict) -> dict:
    images = squares()
    return {"image": images, "control": TC.control_images(
        images, config["control"]["preprocessor"], config["control"]["options"])}


def cn_trainer(base: Path, out: Path | None, resume: bool = False, **train) -> Trainer:
    cfg = TC.controlnet_config(base, steps=6, log_every=1, batch_size=8, warmup=2, **train)
    return TC.controlnet_trainer(cfg, out, data=cn_data(cfg), resume=resume)


def test_control_images_are_canny_edges_as_bool():
    edges = TC.control_images(squares(4), "canny")
    assert edges.dtype == torch.bool and edges.shape == (4, 1, SIZE, SIZE)
    assert edges.any() and not edges.all()


def test_training_leaves_the_base_bit_identical_and_its_files_untouched(base, tmp_path):
    before_files = file_bytes(base)
    den, _ = ckpt.load_denoiser(base)
    before = {k: v.clone() for k, v in den.net.state_dict().items()}
    tr = cn_trainer(base, tmp_path / "cn")
    cn0 = {k: v.clone() for k, v in tr.modules["controlnet"].state_dict().items()}
    tr.run()
    tr.close()
    # the frozen base: no gradients, no optimizer state, no EMA, weights unchanged
    assert all(not p.requires_grad for p in tr.modules["base"].parameters())
    assert set(tr.emas) == {"controlnet"}
    n_opt = sum(p.numel() for g in tr.optimizer.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in tr.modules["controlnet"].parameters())
    for k, v in tr.modules["base"].state_dict().items():
        assert torch.equal(v, before[k]), k
    assert file_bytes(base) == before_files
    # the ControlNet did train
    assert any(not torch.equal(v, cn0[k])
               for k, v in tr.modules["controlnet"].state_dict().items())
    # checkpoint: the ControlNet + settings, the base only referenced by path and hash
    head = json.loads((tmp_path / "cn" / "checkpoint" / "checkpoint.json").read_text())
    assert head["kind"] == "controlnet"
    assert {"controlnet", "settings", "control"} <= set(head["components"])
    assert "base" not in head["components"]
    assert head["references"]["base"] == {"path": str(base.resolve()),
                                          "sha256": ckpt.module_sha256(den.net)}
    files = {p.name for p in (tmp_path / "cn" / "checkpoint").iterdir()}
    assert not any(f.startswith("base") for f in files)
    # loads with the one loader into a controlled denoiser
    cden, cfg = ckpt.load(tmp_path / "cn")
    assert type(cden.net).__name__ == "ControlledUNet" and cfg["kind"] == "controlnet"


def test_control_scale_zero_equals_the_base(base, tmp_path):
    tr = cn_trainer(base, tmp_path / "cn")
    tr.run()
    tr.close()
    den0, _ = ckpt.load_denoiser(base)
    controlled, _ = TC.load_controlled([tmp_path / "cn"], settings=ControlSettings(scale=0.0))
    on, _ = TC.load_controlled([tmp_path / "cn"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, SIZE, SIZE, generator=g)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    control = TC.control_images(squares(4, seed=5), "canny").float()
    want = den0.predict(x, t).x0
    cond = Condition(control=control)
    assert torch.equal(controlled.predict(x, t, cond).x0, want)
    assert not torch.equal(on.predict(x, t, cond).x0, want)  # trained control does act


def test_resume_is_bit_identical_for_the_controlnet_objective(base, tmp_path):
    ref = cn_trainer(base, tmp_path / "ref")
    ref_losses = [ref.train_step() for _ in range(6)]
    first = cn_trainer(base, tmp_path / "split")
    losses = [first.train_step() for _ in range(3)]
    first.save()
    second = cn_trainer(base, tmp_path / "split", resume=True)
    assert second.step == 3
    losses += [second.train_step() for _ in range(3)]
    assert losses == ref_losses
    a = ref.modules["controlnet"].state_dict()
    b = second.modules["controlnet"].state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for k, v in ref.emas["controlnet"].state_dict().items():
        assert torch.equal(v, second.emas["controlnet"].state_dict()[k]), k


def test_a_controlnet_for_another_base_is_refused(base, tmp_path):
    tr = cn_trainer(base, tmp_path / "cn")
    tr.run()
    tr.close()
    other = train_base(tmp_path / "other", seed=4)
    with pytest.raises(TC.BaseMismatchError, match="trained for another base.*sha256"):
        TC.load_controlled([tmp_path / "cn"], base=other)
    # resuming against another base is refused too
    cfg = json.loads((tmp_path / "cn" / "checkpoint" / "checkpoint.json").read_text())["config"]
    cfg["base"]["path"] = str(other)
    with pytest.raises(ValueError, match="frozen module 'base'"):
        TC.controlnet_trainer(cfg, tmp_path / "cn", data=cn_data(cfg), resume=True)


def digits_base(tmp_path: Path) -> Path:
    cfg = base_config("digits")
    cfg["data"] = {"name": "digits", "resolution": SIZE, "channels": 1, "num_classes": 10}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    assert main(["train", str(path), "--out", str(tmp_path / "base"), "--quiet"]) == 0
    return tmp_path / "base"


def test_cli_trains_a_tiny_controlnet_and_samples_with_a_control_image(tmp_path, capsys):
    base_run = digits_base(tmp_path)
    before = file_bytes(base_run / "checkpoint")
    run = tmp_path / "cn"
    assert main(["train-controlnet", str(base_run), "--control", "canny", "--steps", "2",
                 "--out", str(run), "--quiet", "--threads", "1", "--batch-size", "8"]) == 0
    assert main(["train-controlnet", str(base_run), "--steps", "4", "--out", str(run),
                 "--quiet", "--resume", "--threads", "1"]) == 0
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 4
    assert file_bytes(base_run / "checkpoint") == before
    edges = np.zeros((SIZE, SIZE), np.uint8)
    edges[2:6, 2] = edges[2, 2:6] = 255
    Image.fromarray(edges).save(tmp_path / "edges.png")
    capsys.readouterr()
    grid = tmp_path / "grid.png"
    assert main(["sample", str(run), "--control-image", str(tmp_path / "edges.png"),
                 "--count", "4", "--steps", "2", "--out", str(grid),
                 "--control-scale", "0.8", "--control-interval", "0,"]) == 0
    assert "control | sample pairs" in capsys.readouterr().out
    with Image.open(grid) as im:
        w, h = im.size
    assert w > 1.8 * h  # 2 pairs a row, 2 rows: 4 tiles across, 2 down
    # two ControlNets at once (the same run twice, the second at scale 0)
    assert main(["sample", str(run), "--control-image", str(tmp_path / "edges.png"),
                 "--controlnet", str(run), "--control-image", str(tmp_path / "edges.png"),
                 "--control-scale", "1", "--control-scale", "0", "--count", "2", "--steps",
                 "2", "--out", str(tmp_path / "two.png")]) == 0


def test_cli_bad_control_input_is_a_clear_error(tmp_path, capsys):
    base_run = digits_base(tmp_path)
    run = tmp_path / "cn"
    assert main(["train-controlnet", str(base_run), "--steps", "1", "--out", str(run),
                 "--quiet", "--threads", "1"]) == 0
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((3 * SIZE, 3 * SIZE), np.uint8)).save(big)
    two = tmp_path / "two.npy"
    np.save(two, np.zeros((1, 2, SIZE, SIZE), np.uint8))
    capsys.readouterr()

    def err(*extra: str) -> str:
        code = main(["sample", str(run), "--count", "1", "--steps", "1", "--out",
                     str(tmp_path / "x.png"), "--overwrite", *extra])
        return f"{code} " + capsys.readouterr().err

    # a wrong size is resized with a notice
    out = err("--control-image", str(big))
    assert out.startswith("0 ") and "resized from 24x24 to 8x8" in out
    # a wrong channel count, a scale or interval that is not a number: errors naming the flag
    out = err("--control-image", str(two))
    assert out.startswith("2 ") and "--control-image" in out and "(2, 8, 8)" in out
    out = err("--control-image", str(big), "--control-scale", "strong")
    assert out.startswith("2 ") and "--control-scale must be a number, got 'strong'" in out
    out = err("--control-image", str(big), "--control-interval", "a,b")
    assert out.startswith("2 ") and "--control-interval" in out
    out = err()
    assert out.startswith("2 ") and "--control-image" in out
    out = err("--control-image", str(tmp_path / "missing.png"))
    assert out.startswith("2 ") and "--control-image" in out and "does not exist" in out
    # a ControlNet trained for another base
    other = tmp_path / "other"
    cfg = json.loads((base_run / "config.json").read_text())
    cfg["train"]["seed"] = 11
    (tmp_path / "other.json").write_text(json.dumps(cfg))
    assert main(["train", str(tmp_path / "other.json"), "--out", str(other), "--quiet"]) == 0
    capsys.readouterr()
    out = err("--control-image", str(big), "--base", str(other))
    assert out.startswith("2 ") and "trained for another base" in out and "--controlnet" in out


def test_read_control_image_shapes_and_notices(tmp_path):
    from difflab.commands.common import ParameterError
    from difflab.commands.controlnet import parse_interval, parse_scale, read_control_image

    stack = tmp_path / "three.npy"
    np.save(stack, np.zeros((3, SIZE, SIZE), np.uint8))  # (N, H, W): three grey images
    assert read_control_image(stack, (1, SIZE, SIZE)).shape == (3, 1, SIZE, SIZE)
    notes: list[str] = []
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.full((2 * SIZE, 2 * SIZE, 3), 255, np.uint8)).save(rgb)
    c = read_control_image(rgb, (1, SIZE, SIZE), notice=notes.append)
    assert c.shape == (1, 1, SIZE, SIZE) and torch.all(c == 1)
    assert any("converted" in n for n in notes) and any("resized" in n for n in notes)
    assert parse_interval("0,") == (0.0, float("inf")) and parse_scale("0.5") == 0.5
    for bad in ("nan", "x", "inf"):
        with pytest.raises(ParameterError, match="control_scale must be a number"):
            parse_scale(bad)
    with pytest.raises(ParameterError, match="control_interval"):
        parse_interval("5,1")
