"""Checkpoints: round trips, atomic saves that survive a full disk, and clear errors for
every wrong checkpoint (missing, corrupt, pickle, other architecture, other shapes)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from difflab.nets import build
from difflab.schedules import cosine
from difflab.train import checkpoint as ckpt
from difflab.train.config import complete

NET = {"type": "mlp", "dim": 2, "hidden": 32, "depth": 2, "emb_dim": 16, "num_classes": None}


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
    import difflab

    net, ema = save_mlp(tmp_path / "c")
    den, cfg = ckpt.load_denoiser(tmp_path / "c", ema=False)
    assert cfg["net"] == NET and cfg["prediction"] == "v"
    x, t = torch.randn(5, 2), torch.rand(5, dtype=torch.float64) * 0.9 + 0.05
    ref = difflab.Denoiser(net, cosine(1000), "v").predict(x, t)
    got = den.predict(x, t)
    assert torch.equal(got.x0, ref.x0) and torch.equal(got.eps, ref.eps)
    den_ema, _ = ckpt.load_denoiser(tmp_path / "c")  # EMA weights by default
    for k, v in den_ema.net.state_dict().items():
        assert torch.equal(v, ema[k])
    # a run directory (holding checkpoint/) works too
    save_mlp(tmp_path / "run" / "checkpoint")
    (tmp_path / "run" / "config.json").write_text(json.dumps(config()))
    assert ckpt.resolve(tmp_path / "run") == tmp_path / "run" / "checkpoint"


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
    real = ckpt._write_file

    def flaky(p, data):
        calls["n"] += 1
        if calls["n"] == 3:  # config and model written, then the disk is full
            raise OSError(28, "No space left on device")
        real(p, data)

    monkeypatch.setattr(ckpt, "_write_file", flaky)
    with pytest.raises(OSError, match="No space left on device.*previous checkpoint there is "
                                      "intact"):
        save_mlp(path, seed=1)
    after = {f: (path / f).read_bytes() for f in os.listdir(path)}
    assert after == before
    assert sorted(os.listdir(tmp_path)) == ["c"]  # no temporary directory left behind
    monkeypatch.setattr(ckpt, "_write_file", real)
    save_mlp(path, seed=2)  # and the next save works
    assert json.loads((path / "state.json").read_text())["step"] == 2


def test_swap_interrupted_between_renames_is_recovered(tmp_path):
    save_mlp(tmp_path / "c")
    os.replace(tmp_path / "c", tmp_path / ".c.old")  # crash after the first rename
    den, _ = ckpt.load_denoiser(tmp_path / "c")
    assert (tmp_path / "c" / "model.safetensors").is_file()


def test_missing_checkpoint_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        ckpt.load_denoiser(tmp_path / "nothing")
    save_mlp(tmp_path / "c")
    (tmp_path / "c" / "ema.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="ema=False"):
        ckpt.load_denoiser(tmp_path / "c")
    ckpt.load_denoiser(tmp_path / "c", ema=False)
    (tmp_path / "c" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        ckpt.load_denoiser(tmp_path / "c", ema=False)


def test_pickle_files_are_refused_never_loaded(tmp_path):
    net = build(NET)
    for name in ("weights.pt", "model.ckpt", "noext"):
        torch.save(net.state_dict(), tmp_path / name)
        with pytest.raises(ValueError, match="never loads pickle"):
            ckpt.load_denoiser(tmp_path / name)


def test_corrupt_safetensors(tmp_path):
    save_mlp(tmp_path / "c")
    f = tmp_path / "c" / "ema.safetensors"
    f.write_bytes(f.read_bytes()[:40])  # truncated
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        ckpt.load_denoiser(tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ckpt.load_denoiser(tmp_path / "c")


def test_other_architecture_and_shape_mismatch(tmp_path):
    save_mlp(tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["net"] = {"type": "unet", "in_channels": 1, "model_channels": 8, "channel_mult": [1],
                  "num_res_blocks": 1, "attention_resolutions": [], "image_size": 8}
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="net type 'unet'.*missing .*unexpected"):
        ckpt.load_denoiser(tmp_path / "c")
    save_mlp(tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    cfg["net"]["hidden"] = 48
    (tmp_path / "d" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape mismatch"):
        ckpt.load_denoiser(tmp_path / "d")
    cfg["net"]["type"] = "transformer9000"
    (tmp_path / "d" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown network type"):
        ckpt.load_denoiser(tmp_path / "d")


def test_safetensors_written_by_others_load(tmp_path):
    """A checkpoint assembled by hand (config + save_file) is a valid checkpoint."""
    (tmp_path / "c").mkdir()
    net = build(NET)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(tmp_path / "c" / "model.safetensors"))
    (tmp_path / "c" / "config.json").write_text(json.dumps(config()))
    den, _ = ckpt.load_denoiser(tmp_path / "c", ema=False)
    for k, v in net.state_dict().items():
        assert torch.equal(den.net.state_dict()[k], v)
