"""``difflab train | sample | demo`` end to end on tiny configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from difflab.cli import build_parser, main

TINY_UNET = {"type": "unet", "in_channels": 1, "out_channels": 1, "model_channels": 8,
             "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [],
             "image_size": 8, "num_classes": None}


def tiny_digits_config(tmp_path) -> str:
    cfg = {"net": TINY_UNET, "schedule": {"type": "cosine", "timesteps": 1000},
           "prediction": "v",
           "data": {"name": "digits", "resolution": 8, "channels": 1, "num_classes": 10},
           "train": {"steps": 3, "batch_size": 8, "log_every": 1, "sample_steps": 2,
                     "grid_size": 10, "threads": 1, "target": "v", "weighting": "min_snr"}}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_help_lists_every_option_with_defaults(capsys):
    parser = build_parser()
    for cmd, options in {
        "train": ["--out", "--set", "--conditional", "--resume", "--steps", "--max-minutes",
                  "--batch-size", "--lr", "--seed", "--threads", "--device"],
        "sample": ["--sampler", "--steps", "--seed", "--count", "--label", "--guidance",
                   "--out", "--npy-dtype", "--no-ema"],
        "demo": ["--out", "--max-minutes", "--data", "--threads"],
    }.items():
        with pytest.raises(SystemExit):
            parser.parse_args([cmd, "--help"])
        text = capsys.readouterr().out
        for opt in options:
            assert opt in text, (cmd, opt)
        assert "(default:" in text


def test_train_sample_resume_on_a_tiny_config(tmp_path, capsys):
    cfg = tiny_digits_config(tmp_path)
    run = tmp_path / "run"
    assert main(["train", cfg, "--out", str(run), "--quiet", "--conditional"]) == 0
    out = capsys.readouterr().out
    assert "trained 3 steps" in out and str(run / "checkpoint") in out
    for f in ("checkpoint/checkpoint.json", "checkpoint/net.safetensors",
              "checkpoint/net.ema.safetensors", "checkpoint/optimizer.safetensors",
              "checkpoint/state.json", "metrics.jsonl", "samples.png", "loss.png"):
        assert (run / f).is_file(), f
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in records)

    # --resume continues from the saved step with the checkpoint's config
    assert main(["train", cfg, "--out", str(run), "--quiet", "--resume", "--steps", "5"]) == 0
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] == 5 and state["data_order"]["examples_seen"] == 40
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2, 3, 4, 5]

    # sample: .npy (uint8 NHWC), a PNG grid, a directory of PNGs, one label
    npy = tmp_path / "x.npy"
    assert main(["sample", str(run), "--out", str(npy), "--count", "6", "--steps", "3"]) == 0
    a = np.load(npy)
    assert a.shape == (6, 8, 8, 1) and a.dtype == np.uint8
    # no --sampler, fit or spacing: the plan a probe of this model chose, said in one line
    out = capsys.readouterr().out
    assert "on the 3-step grid a probe of this model chose (t = 1.000, " in out, out
    f32 = tmp_path / "f.npy"
    assert main(["sample", str(run), "--out", str(f32), "--count", "6", "--steps", "3",
                 "--npy-dtype", "float"]) == 0
    b = np.load(f32)
    # floats as the sampler returned them, not 0..255 (this 3-step model's exact ODE solution
    # reaches |x| ~ 4: the bound is on the scale, not on the model)
    assert b.shape == (6, 1, 8, 8) and b.dtype == np.float32 and np.abs(b).max() < 10
    # uint8 is round((x + 1) * 127.5) of the same samples (same seed)
    ref = np.round((np.clip(b, -1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.array_equal(ref, a)
    assert main(["sample", str(run), "--out", str(tmp_path / "g.png"), "--count", "4",
                 "--steps", "2", "--label", "3", "--guidance", "1.5"]) == 0
    assert Image.open(tmp_path / "g.png").size[0] > 16
    assert main(["sample", str(run / "checkpoint"), "--out", str(tmp_path / "imgs"),
                 "--count", "3", "--steps", "2", "--sampler", "ddim"]) == 0
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == \
        ["000000.png", "000001.png", "000002.png"]


def test_toy2d_preset_trains_and_samples_points(tmp_path):
    run = tmp_path / "toy"
    assert main(["train", "toy2d", "--out", str(run), "--steps", "3", "--quiet",
                 "--set", "train.grid_size=16", "--set", "train.threads=1"]) == 0
    assert main(["sample", str(run), "--out", str(tmp_path / "p.npy"), "--count", "5"]) == 0
    assert np.load(tmp_path / "p.npy").shape == (5, 2)


def test_bad_input_exits_2_with_a_named_error(tmp_path, capsys):
    assert main(["train", "nonexistent_preset"]) == 2
    assert "presets" in capsys.readouterr().err
    assert main(["train", "digits", "--set", "train.weighting=snr"]) == 2
    assert "min_snr" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "missing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    run = tmp_path / "run"
    assert main(["train", tiny_digits_config(tmp_path), "--out", str(run), "--quiet",
                 "--steps", "1"]) == 0
    capsys.readouterr()
    assert main(["sample", str(run), "--sampler", "nope"]) == 2
    assert "valid" in capsys.readouterr().err
    assert main(["sample", str(run), "--label", "3"]) == 2
    assert "conditional" in capsys.readouterr().err
    assert main(["sample", str(run), "--out", str(tmp_path / "x.jpg")]) == 2
    assert ".npy" in capsys.readouterr().err
    assert main(["demo", "--data", "imagenet", "--out", str(tmp_path / "d")]) == 2
    assert "valid" in capsys.readouterr().err


def test_help_of_the_other_commands(capsys):
    parser = build_parser()
    for cmd, options in {
        "eval": ["--num", "--sampler", "--steps", "--seed", "--save-samples", "--label", "--cfg",
                 "--cfg-rescale", "--classifier", "--classifier-scale"],
        "tune-grid": ["--sampler", "--steps", "--count", "--no-eval-times", "--start"],
        "train-classifier": ["--like", "--data", "--set", "--threads"],
        "train-features": ["--dataset", "--name", "--epochs", "--calibrate"],
        "demo": ["--set"],
    }.items():
        with pytest.raises(SystemExit):
            parser.parse_args([cmd, "--help"])
        text = capsys.readouterr().out
        for opt in options:
            assert opt in text, (cmd, opt)


def test_one_seed_gives_the_same_images_in_sample_and_eval(tmp_path, monkeypatch, capsys):
    """`difflab sample` and `difflab eval --save-samples` draw the same images for one seed
    (one chunked, seeded sampling loop), whatever the batch size, also with a stochastic
    sampler and classifier-free guidance; both write uint8 NHWC arrays."""
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", tiny_digits_config(tmp_path), "--out", str(run), "--quiet",
                 "--conditional", "--steps", "2"]) == 0
    for sampler, extra in (("ddpm", ["--cfg", "1.5"]), ("dpmpp_2m", [])):
        npy = tmp_path / f"{sampler}.npy"
        assert main(["sample", str(run), "--out", str(npy), "--count", "7", "--steps", "3",
                     "--sampler", sampler, "--seed", "11", "--batch-size", "2", *extra]) == 0
        saved = tmp_path / "saved"
        assert main(["eval", str(run), "--reference", "digits", "--feature-net", "fmnist",
                     "--n-ref", "40", "--no-cache", "--num", "7", "--steps", "3", "--sampler",
                     sampler, "--seed", "11", "--batch-size", "3", "--kid-subsets", "2",
                     "--kid-subset-size", "5", "--save-samples", str(saved), *extra]) == 0
        a, b = np.load(npy), np.load(saved / f"{sampler}_3.npy")
        assert a.shape == b.shape == (7, 8, 8, 1) and a.dtype == b.dtype == np.uint8
        assert np.array_equal(a, b), sampler
    # another seed gives other images
    other = tmp_path / "other.npy"
    assert main(["sample", str(run), "--out", str(other), "--count", "7", "--steps", "3",
                 "--sampler", "dpmpp_2m", "--seed", "12"]) == 0
    assert not np.array_equal(np.load(other), np.load(tmp_path / "dpmpp_2m.npy"))


def test_library_errors_name_parameters_and_the_cli_prints_flags(tmp_path, capsys):
    from difflab.commands import Guidance, ParameterError, generate

    run = tmp_path / "run"
    assert main(["train", tiny_digits_config(tmp_path), "--out", str(run), "--quiet",
                 "--conditional", "--steps", "1"]) == 0
    capsys.readouterr()
    # the library names its parameters ...
    with pytest.raises(ParameterError, match=r"^cfg_rescale only changes guided predictions; "
                                             r"give cfg W > 0$"):
        generate(run, count=2, guidance=Guidance(cfg_rescale=0.5))
    with pytest.raises(ParameterError, match=r"^count must be at least 1, got 0$"):
        generate(run, count=0)
    with pytest.raises(ParameterError, match=r"^unknown sampler 'nope'; valid: auto, "):
        generate(run, count=1, sampler="nope")
    # ... and the command line names its flags (per command: eval's count is --num)
    for argv, expected in (
        (["sample", str(run), "--cfg-rescale", "0.5"],
         "difflab sample: error: --cfg-rescale only changes guided predictions; give --cfg W > 0"),
        (["sample", str(run), "--count", "0"], "--count must be at least 1, got 0"),
        (["sample", str(run), "--cfg", "-1"], "--cfg must be >= 0"),
        (["sample", str(run), "--classifier-scale", "2"],
         "--classifier-scale needs --classifier CKPT"),
        (["sample", str(run), "--sampler", "nope"], "unknown --sampler 'nope'; valid: auto, "),
        (["eval", str(run), "--reference", "digits", "--feature-net", "fmnist", "--num", "0",
          "--n-ref", "10", "--no-cache"], "difflab eval: error: --num must be at least 1"),
        (["tune-grid", str(run), "--eval-times-only", "--no-eval-times"],
         "--eval-times-only and --no-eval-times exclude each other"),
        (["train-classifier", "--like", str(tmp_path / "nope")], "--like "),
        (["demo", "--data", "imagenet", "--out", str(tmp_path / "demo")],  # not the cwd's run
         "unknown demo --data 'imagenet'; valid: auto"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, (argv, err)
