"""Checkpoints: the layout (kind + named components), round trips for every kind, atomic saves
that survive a full disk, clear errors for every wrong checkpoint (missing, corrupt, pickle,
other architecture, other shapes), and checkpoints of the earlier layout (config.json +
model.safetensors) that still load, sample and resume exactly as before."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import difflab
from difflab import files
from difflab.nets import build
from difflab.schedules import cosine
from difflab.train import checkpoint as ckpt
from difflab.train.config import complete

NET = {"type": "mlp", "dim": 2, "hidden": 32, "depth": 2, "emb_dim": 16, "num_classes": None}
OLD = Path(__file__).parent / "data" / "old_checkpoint"  # made by make_old.py at d6cd48c
# The reference numbers were written on another machine: the same float32 operations may round
# differently in the last bit on another CPU (seen: 3e-8 in a logit, 1.5e-8 in a weight after six
# Adam steps), so "as before" means to a few float32 ulps, not bit for bit.
ACROSS_CPUS = {"rtol": 1e-5, "atol": 1e-6}


def config(net: dict = NET) -> dict:
    return complete({"net": dict(net), "schedule": cosine(1000).config(), "prediction": "v",
                     "data": {"name": "ring", "channels": 2}, "train": {"steps": 1}})


def save_mlp(path, seed: int = 0, net_cfg: dict = NET):
    torch.manual_seed(seed)
    net = build(net_cfg)
    ema = {k: v + 1 for k, v in net.state_dict().items()}
    ckpt.save_checkpoint(path, config=config(net_cfg), model=net.state_dict(), ema=ema,
                         state={"step": seed})
    return net, ema


def test_round_trip_and_denoiser(tmp_path):
    net, ema = save_mlp(tmp_path / "c")
    den, cfg = ckpt.load_denoiser(tmp_path / "c", ema=False)
    assert cfg["net"] == NET and cfg["prediction"] == "v" and cfg["kind"] == "diffusion"
    x, t = torch.randn(5, 2), torch.rand(5, dtype=torch.float64) * 0.9 + 0.05
    ref = difflab.Denoiser(net, cosine(1000), "v").predict(x, t)
    got = den.predict(x, t)
    assert torch.equal(got.x0, ref.x0) and torch.equal(got.eps, ref.eps)
    den_ema, _ = ckpt.load_denoiser(tmp_path / "c")  # EMA weights by default
    for k, v in den_ema.net.state_dict().items():
        assert torch.equal(v, ema[k])
    assert not any(p.requires_grad for p in den_ema.parameters())
    # the one loader dispatches on the kind
    den_load, cfg_load = ckpt.load(tmp_path / "c")
    assert cfg_load == cfg and torch.equal(den_load.predict(x, t).x0, den_ema.predict(x, t).x0)
    # a run directory (holding checkpoint/) works too
    save_mlp(tmp_path / "run" / "checkpoint")
    (tmp_path / "run" / "config.json").write_text(json.dumps(config()))
    assert ckpt.resolve(tmp_path / "run") == tmp_path / "run" / "checkpoint"
    assert ckpt.is_checkpoint(tmp_path / "run") and ckpt.is_checkpoint(tmp_path / "c")
    assert not ckpt.is_checkpoint(tmp_path)


def test_layout_kind_components_and_configs(tmp_path):
    save_mlp(tmp_path / "c")
    files = sorted(os.listdir(tmp_path / "c"))
    assert files == ["checkpoint.json", "net.ema.safetensors", "net.json", "net.safetensors",
                     "schedule.json", "state.json"]
    head = json.loads((tmp_path / "c" / "checkpoint.json").read_text())
    assert head["format"] == "difflab-checkpoint-2" and head["kind"] == "diffusion"
    assert head["components"] == ["net", "schedule"] and head["references"] == {}
    assert head["config"] == config()
    assert json.loads((tmp_path / "c" / "net.json").read_text()) == NET
    assert json.loads((tmp_path / "c" / "schedule.json").read_text()) == cosine(1000).config()
    assert ckpt.read_config(tmp_path / "c") == config()
    assert ckpt.weights_file(tmp_path / "c") == tmp_path / "c" / "net.ema.safetensors"
    assert ckpt.weights_file(tmp_path / "c", ema=False) == tmp_path / "c" / "net.safetensors"


def test_optimizer_and_generator_state_round_trip():
    net = build(NET)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.99))
    for _ in range(2):
        net(torch.randn(4, 2), torch.rand(4)).pow(2).mean().backward()
        opt.step()
    tensors, rest = ckpt.flatten_optimizer_state(opt.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    json.dumps(rest)  # JSON-safe
    back = ckpt.unflatten_optimizer_state(tensors, json.loads(json.dumps(rest)))
    opt2 = torch.optim.AdamW(build(NET).parameters(), lr=1.0)
    opt2.load_state_dict(back)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for k in a["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k])
    g = torch.Generator().manual_seed(5)
    torch.rand(3, generator=g)
    h = ckpt.generator_state_from_json(torch.Generator(), ckpt.generator_state_to_json(g))
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=h))


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "c"
    save_mlp(path, seed=0)
    before = {f: (path / f).read_bytes() for f in os.listdir(path)}
    calls = {"n": 0}
    real = files._write_file

    def flaky(p, data):
        calls["n"] += 1
        if calls["n"] == 3:  # checkpoint.json and net.json written, then the disk is full
            raise OSError(28, "No space left on device")
        real(p, data)

    monkeypatch.setattr(files, "_write_file", flaky)
    with pytest.raises(OSError, match="No space left on device.*previous checkpoint there is "
                                      "intact"):
        save_mlp(path, seed=1)
    after = {f: (path / f).read_bytes() for f in os.listdir(path)}
    assert after == before
    assert sorted(os.listdir(tmp_path)) == ["c"]  # no temporary directory left behind
    monkeypatch.setattr(files, "_write_file", real)
    save_mlp(path, seed=2)  # and the next save works
    assert json.loads((path / "state.json").read_text())["step"] == 2


def test_swap_interrupted_between_renames_is_recovered(tmp_path):
    save_mlp(tmp_path / "c")
    os.replace(tmp_path / "c", tmp_path / ".c.old")  # crash after the first rename
    ckpt.load_denoiser(tmp_path / "c")
    assert (tmp_path / "c" / "net.safetensors").is_file()


def test_missing_checkpoint_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        ckpt.load_denoiser(tmp_path / "nothing")
    save_mlp(tmp_path / "c")
    (tmp_path / "c" / "net.ema.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="ema=False"):
        ckpt.load_denoiser(tmp_path / "c")
    ckpt.load_denoiser(tmp_path / "c", ema=False)
    (tmp_path / "c" / "net.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="net.safetensors is missing"):
        ckpt.load_denoiser(tmp_path / "c", ema=False)
    (tmp_path / "d").mkdir()
    with pytest.raises(FileNotFoundError, match="has no checkpoint.json"):
        ckpt.load(tmp_path / "d")


def test_pickle_files_are_refused_never_loaded(tmp_path):
    net = build(NET)
    for name in ("weights.pt", "model.ckpt", "noext"):
        torch.save(net.state_dict(), tmp_path / name)
        with pytest.raises(ValueError, match="never loads pickle"):
            ckpt.load_denoiser(tmp_path / name)
        with pytest.raises(ValueError, match="never loads pickle"):
            ckpt.load(tmp_path / name)


def test_corrupt_safetensors_and_json(tmp_path):
    save_mlp(tmp_path / "c")
    f = tmp_path / "c" / "net.ema.safetensors"
    f.write_bytes(f.read_bytes()[:40])  # truncated
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        ckpt.load_denoiser(tmp_path / "c")
    (tmp_path / "c" / "checkpoint.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ckpt.load_denoiser(tmp_path / "c")
    (tmp_path / "c" / "checkpoint.json").write_text(json.dumps({"format": "other-9"}))
    with pytest.raises(ValueError, match="format 'other-9'"):
        ckpt.load(tmp_path / "c")


def test_other_architecture_and_shape_mismatch(tmp_path):
    save_mlp(tmp_path / "c")
    (tmp_path / "c" / "net.json").write_text(json.dumps(
        {"type": "unet", "in_channels": 1, "model_channels": 8, "channel_mult": [1],
         "num_res_blocks": 1, "attention_resolutions": [], "image_size": 8}))
    with pytest.raises(ValueError, match="net type 'unet'.*missing .*unexpected"):
        ckpt.load_denoiser(tmp_path / "c")
    save_mlp(tmp_path / "d")
    cfg = dict(NET, hidden=48)
    (tmp_path / "d" / "net.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape mismatch"):
        ckpt.load_denoiser(tmp_path / "d")
    cfg["type"] = "transformer9000"
    (tmp_path / "d" / "net.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown network type"):
        ckpt.load_denoiser(tmp_path / "d")


def test_safetensors_written_by_others_load(tmp_path):
    """A checkpoint assembled by hand in the earlier layout (config.json + save_file) is a
    valid checkpoint."""
    (tmp_path / "c").mkdir()
    net = build(NET)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(tmp_path / "c" / "model.safetensors"))
    (tmp_path / "c" / "config.json").write_text(json.dumps(config()))
    den, _ = ckpt.load_denoiser(tmp_path / "c", ema=False)
    for k, v in net.state_dict().items():
        assert torch.equal(den.net.state_dict()[k], v)


# --- every kind ---------------------------------------------------------------------------
TINY_CLASSIFIER = {"type": "classifier", "in_channels": 1, "num_classes": 2,
                   "model_channels": 8, "channel_mult": [1], "num_res_blocks": 1,
                   "attention_resolutions": [], "image_size": 4, "pool": "adaptive"}


def _stripes(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    rows = torch.arange(4).view(4, 1).expand(4, 4) % 2 * 2 - 1.0
    base = torch.stack([rows, rows.T])[y].unsqueeze(1)
    return (base * 0.7 + 0.3 * torch.randn(n, 1, 4, 4, generator=g)).clamp(-1, 1), y


def test_classifier_round_trip(tmp_path):
    from difflab.train.classifier import classifier_config, load_classifier, train_classifier

    cfg = classifier_config({"name": "stripes", "resolution": 4, "channels": 1,
                             "num_classes": 2}, cosine().config(), TINY_CLASSIFIER,
                            {"steps": 4, "batch_size": 8, "warmup": 2, "ema_decay": 0.9})
    summary = train_classifier(cfg, tmp_path / "clf", data=_stripes(32))
    head = json.loads((tmp_path / "clf" / "checkpoint" / "checkpoint.json").read_text())
    assert head["kind"] == "classifier" and head["components"] == ["net", "schedule"]
    assert "prediction" not in head["config"]  # no fake "logits" prediction any more
    net, loaded_cfg = ckpt.load(tmp_path / "clf")
    net2, _ = load_classifier(tmp_path / "clf")
    assert loaded_cfg["kind"] == "classifier" and loaded_cfg["schedule"] == cosine().config()
    x, t = torch.randn(3, 1, 4, 4), torch.full((3,), 500.0)
    assert torch.equal(net(x, t), net2(x, t)) and not any(p.requires_grad
                                                          for p in net.parameters())
    from safetensors.torch import load_file

    ema_w = load_file(str(tmp_path / "clf" / "checkpoint" / "net.ema.safetensors"))
    for k, v in net.state_dict().items():
        assert torch.equal(v, ema_w[k].to(v.dtype)), k
    raw, _ = ckpt.load(tmp_path / "clf", ema=False)
    assert not torch.equal(raw(x, t), net(x, t))
    assert summary["steps"] == 4
    save_mlp(tmp_path / "diff")
    with pytest.raises(ValueError, match="not a classifier checkpoint"):
        load_classifier(tmp_path / "diff")
    with pytest.raises(ValueError, match="classifier checkpoint, not a diffusion model"):
        ckpt.load_denoiser(tmp_path / "clf")


def test_feature_network_round_trip(tmp_path):
    from difflab.metrics.classifier import FeatureCNN
    from difflab.metrics.train_features import train_feature_net

    x, y = _stripes(40)
    x = torch.nn.functional.interpolate(x, size=8)  # FeatureCNN pools 3 times
    net = train_feature_net(x, y, num_classes=2, epochs=1, batch_size=16, seed=1,
                            out_dir=tmp_path / "feat")
    head = json.loads((tmp_path / "feat" / "checkpoint" / "checkpoint.json").read_text())
    assert head["kind"] == "feature" and head["components"] == ["net"]
    assert not (tmp_path / "feat" / "checkpoint" / "net.ema.safetensors").exists()  # no EMA
    loaded, cfg = ckpt.load(tmp_path / "feat")
    assert isinstance(loaded, FeatureCNN) and cfg["kind"] == "feature" and not loaded.training
    assert torch.equal(loaded(x), net(x)) and torch.equal(loaded.features(x), net.features(x))


# --- the earlier layout ----------------------------------------------------------------------
def _reference() -> dict:
    return json.loads((OLD / "reference.json").read_text())


@pytest.mark.parametrize("name", ["diffusion", "diffusion_cond"])
def test_old_layout_loads_and_samples_as_before(name):
    """Checkpoints written by d6cd48c (tests/data/old_checkpoint/make_old.py) load and give
    the samples they gave then (DDIM, 5 steps; EMA and raw weights; labels with the null label
    K of that version)."""
    ref = _reference()[name]
    noise = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    kw = {"cond": torch.tensor([0, 1, 0, 1])} if name.endswith("cond") else {}
    for ema, key in ((True, "sample_ema_ddim5"), (False, "sample_raw_ddim5")):
        den, cfg = ckpt.load_denoiser(OLD / name, ema=ema)
        assert cfg["kind"] == "diffusion" and cfg["prediction"] == "v"
        x = difflab.sample(den, noise, sampler="ddim", steps=5, **kw)
        torch.testing.assert_close(x, torch.tensor(ref[key]), rtol=0, atol=0)
    assert ckpt.read(OLD / name).layout == 1


def test_old_classifier_loads_as_before():
    from difflab.train.classifier import load_classifier

    ref = _reference()["classifier"]
    g = torch.Generator().manual_seed(0)
    torch.randn(16, 2, generator=g)  # make_old.py drew the toy points first
    images = (torch.rand(16, 1, 4, 4, generator=g) * 255).to(torch.uint8)
    net, cfg = load_classifier(OLD / "classifier")
    assert cfg["kind"] == "classifier"
    x = images[:4].float() / 127.5 - 1
    torch.testing.assert_close(net(x, torch.full((4,), 500.0)), torch.tensor(ref["logits_t05"]),
                               **ACROSS_CPUS)


@pytest.mark.parametrize("name", ["diffusion", "diffusion_cond"])
def test_old_layout_resumes_as_before(tmp_path, name):
    """A run directory holding an earlier-layout checkpoint continues as the code that wrote it
    did (the same six losses, to float32 round-off: see ACROSS_CPUS), and then saves in the
    current layout."""
    from difflab.train.trainer import Trainer

    ref = _reference()[name]
    shutil.copytree(OLD / name, tmp_path / "run" / "checkpoint")
    config = json.loads((OLD / name / "config.json").read_text())
    g = torch.Generator().manual_seed(0)
    points = torch.randn(16, 2, generator=g)
    labels = torch.arange(16) % 2 if name.endswith("cond") else None
    tr = Trainer(config, tmp_path / "run", data=(points, labels), resume=True)
    assert tr.step == 12
    losses = [tr.train_step() for _ in range(6)]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref["resume_losses"]),
                               **ACROSS_CPUS)
    for k, v in ref["weights_after_resume"].items():
        torch.testing.assert_close(tr.net.state_dict()[k].flatten()[:4], torch.tensor(v),
                                   **ACROSS_CPUS, msg=k)
    tr.save()
    assert ckpt.read(tmp_path / "run").layout == 2
    resumed = Trainer(config, tmp_path / "run", data=(points, labels), resume=True)
    assert resumed.step == 18
