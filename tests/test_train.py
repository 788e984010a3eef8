"""The training loop: warm-up, EMA warm-up, data order, condition dropout, gradient
accumulation, overfitting a handful of images, kill-and-resume bit identity, DDP == one process."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from difflab.train.config import apply_overrides, complete, parse_override, preset
from difflab.train.ema import EMA, ema_decay
from difflab.train.trainer import Trainer, lr_at


# the tiny network every training test uses (the subprocess tests import it from here)
class TinyNet(nn.Module):
    """MLP on flattened 1x4x4 images with the time and an optional label as extra inputs."""

    def __init__(self, dim=16, hidden=64, num_classes=2):
        super().__init__()
        self.config = {"type": "tiny", "dim": dim, "hidden": hidden}
        self.dim = dim
        self.emb = nn.Embedding(num_classes + 1, hidden)
        self.inp = nn.Linear(dim + 2, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x, t, cond=None):
        s = (t.float() / 1000).view(-1, 1)
        h = self.inp(torch.cat([x.reshape(len(x), -1), torch.sin(3 * s), torch.cos(3 * s)], 1))
        if cond is not None:
            h = h + self.emb(cond)
        h = self.out(torch.nn.functional.silu(self.mid(torch.nn.functional.silu(h))))
        return h.view_as(x)


def tiny_net(seed: int = 0) -> nn.Module:
    """TinyNet with weights fixed by ``seed`` (independent of the global RNG state)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyNet()


def tiny_config(prediction: str = "eps", **train) -> dict:
    base = {"steps": 20, "batch_size": 8, "lr": 3e-3, "warmup": 5, "log_every": 5,
            "grid_size": 0, "threads": 1, "seed": 3}
    base.update(train)
    return complete({
        "net": {"type": "tiny"}, "schedule": {"type": "cosine", "timesteps": 1000},
        "prediction": prediction,
        "data": {"name": "tiny", "resolution": 4, "channels": 1, "num_classes": 2},
        "train": base})


def tiny_data(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, 1, 4, 4, generator=g) * 255).to(torch.uint8)
    return images, torch.arange(n) % 2


def make_trainer(tmp_path: Path, name: str = "run", data=None, prediction: str = "eps",
                 **train) -> Trainer:
    return Trainer(tiny_config(prediction, **train), tmp_path / name, data=data or tiny_data(),
                   net=tiny_net(), quiet=True)


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.net.state_dict().items()}


# --- schedules of the optimisation -------------------------------------------------------
def test_lr_warmup_and_cosine_decay():
    tc = {"lr": 1e-3, "warmup": 10, "steps": 110, "lr_decay": "none"}
    assert lr_at(0, tc) == pytest.approx(1e-4)          # (0 + 1) / 10
    assert lr_at(9, tc) == pytest.approx(1e-3)
    assert lr_at(500, tc) == pytest.approx(1e-3)
    tc.update(lr_decay="cosine", lr_min=1e-4)
    assert lr_at(10, tc) == pytest.approx(1e-3)          # p = 0
    assert lr_at(60, tc) == pytest.approx(1e-4 + 0.9e-3 * 0.5)   # p = 1/2, cos = 0
    assert lr_at(110, tc) == pytest.approx(1e-4)          # p = 1


def test_ema_decay_warms_up_and_forgets_the_initialisation():
    assert ema_decay(0, 0.999) == pytest.approx(0.1)
    assert ema_decay(90, 0.999) == pytest.approx(91 / 100)
    assert ema_decay(10**6, 0.999) == 0.999
    # a constant target: after n updates the weight left on the init is prod_k beta_k
    # = prod (1+k)/(10+k) = 9! n! / (n+9)!  ->  ~1e-13 after 200 steps (0.999^200 = 0.82)
    net = nn.Linear(3, 1, bias=False)
    nn.init.zeros_(net.weight)
    ema = EMA(net, 0.999)
    with torch.no_grad():
        net.weight.fill_(1.0)
    for _ in range(200):
        ema.update(net)
    left = math.exp(math.lgamma(10) + math.lgamma(201) - math.lgamma(210))
    assert 1 - ema.shadow["weight"][0, 0].item() == pytest.approx(left, rel=1e-3, abs=1e-7)


# --- data order, condition dropout, accumulation ----------------------------------------
def test_data_order_visits_every_example_once_per_epoch(tmp_path):
    tr = make_trainer(tmp_path, data=tiny_data(10))
    idx = tr.batch_indices(0, 30)
    for e in range(3):
        assert sorted(idx[10 * e:10 * e + 10].tolist()) == list(range(10))
    assert not torch.equal(idx[:10], idx[10:20])  # reshuffled each epoch
    tr2 = make_trainer(tmp_path, "again", data=tiny_data(10))
    assert torch.equal(tr2.batch_indices(7, 13), idx[7:20])  # a function of (seed, position)


def test_condition_dropout_rate_and_null_label(tmp_path):
    images, labels = tiny_data(64)
    tr = make_trainer(tmp_path, data=(images, labels), conditional=True, p_uncond=0.2,
                      batch_size=64)
    drops = 0
    n_batches = 50
    for _ in range(n_batches):
        batch = tr.draw(64)
        y, true = batch["cond"], labels[tr.batch_indices(tr.step * 64, 64)]
        null = y == 2
        assert torch.equal(y[~null], true[~null])
        drops += int(null.sum())
        tr.step += 1
    n = 64 * n_batches
    # binomial(n, 0.2): 5 standard deviations
    assert abs(drops / n - 0.2) < 5 * math.sqrt(0.2 * 0.8 / n)


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    a = make_trainer(tmp_path, "a", batch_size=8, grad_accum=1)
    b = make_trainer(tmp_path, "b", batch_size=8, grad_accum=4)
    for _ in range(3):
        la, lb = a.train_step(), b.train_step()
        assert la == pytest.approx(lb, rel=1e-5)
    for k, v in weights(a).items():
        torch.testing.assert_close(weights(b)[k], v, rtol=1e-5, atol=1e-6)


def test_tiny_model_overfits_a_handful_of_images(tmp_path):
    """Loss on a fixed evaluation batch (fixed t, eps) falls by more than 10x."""
    tr = make_trainer(tmp_path, data=tiny_data(4), steps=600, batch_size=32, lr=3e-3,
                      warmup=20, target="x0", prediction="x0")
    g = torch.Generator().manual_seed(1)
    x0 = tr.images.float().div(127.5).sub(1).repeat(16, 1, 1, 1)
    t = torch.linspace(0.02, 0.3, len(x0), dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g)

    def eval_loss() -> float:
        from difflab.objectives import diffusion_loss

        with torch.no_grad():
            return float(diffusion_loss(tr.denoiser, x0, target="x0", t=t, eps=eps).mean())

    before = eval_loss()
    summary = tr.run()
    after = eval_loss()
    assert summary["steps"] == 600 and summary["stopped_by"] == "steps"
    assert after < before / 10, (before, after)


def test_wall_clock_budget_stops_and_saves(tmp_path):
    tr = make_trainer(tmp_path, steps=10**6, max_minutes=0.02)  # 1.2 s
    s = tr.run()
    assert s["stopped_by"] == "time" and 0 < s["steps"] < 10**6
    assert (tmp_path / "run" / "checkpoint" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


# --- configs and bad input -----------------------------------------------------------------
def test_presets_and_overrides_round_trip():
    for name in ("fashion_mnist", "digits", "toy2d"):
        cfg = preset(name)
        assert complete(cfg) == cfg
    cfg = apply_overrides(preset("digits"), ["train.lr=3e-4", "net.model_channels=8",
                                             "train.conditional=true", "data.name=mine"])
    assert cfg["train"]["lr"] == 3e-4 and cfg["net"]["model_channels"] == 8
    assert cfg["data"]["name"] == "mine" and cfg["net"]["num_classes"] == 10
    assert parse_override("train.sampler=ddim") == (["train", "sampler"], "ddim")


@pytest.mark.parametrize("override, words", [
    ("train.weighting=snr", ["weighting", "min_snr"]),
    ("train.bogus=1", ["bogus", "valid"]),
    ("train.batch_size=0", ["batch_size", "positive"]),
    ("train.grad_accum=3", ["divisible"]),
    ('train.compile="yes"', ["train.compile", "max-autotune"]),
])
def test_bad_config_values_are_named(override, words):
    with pytest.raises(ValueError) as e:
        apply_overrides(preset("digits"), [override])
    for w in words:
        assert w in str(e.value)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("imagenet")


def test_bad_data_is_named(tmp_path):
    images, _ = tiny_data()
    with pytest.raises(ValueError, match="needs labels"):
        Trainer(tiny_config(conditional=True), tmp_path, data=(images, None), net=tiny_net())
    with pytest.raises(ValueError, match="resolution"):
        Trainer(tiny_config(), tmp_path, data=(torch.zeros(4, 1, 5, 5), None), net=tiny_net())


# --- exact resume after SIGKILL --------------------------------------------------------------
CHILD = textwrap.dedent('''
import sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, TESTS)
from test_train import tiny_config, tiny_data, tiny_net
from difflab.train.trainer import Trainer

orig = Trainer.save
def save(self):
    path = orig(self)
    print("saved", self.step, flush=True)
    return path
Trainer.save = save
tr = Trainer(tiny_config(ckpt_every=4, conditional=True), OUT, data=tiny_data(),
             net=tiny_net(), quiet=True)
tr.run(steps=10**6)
''')


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    total = 16
    ref = Trainer(tiny_config(ckpt_every=4, conditional=True), tmp_path / "ref",
                  data=tiny_data(), net=tiny_net(), quiet=True)
    ref.run(steps=total)
    out = tmp_path / "killed"
    script = tmp_path / "child.py"
    script.write_text(f"TESTS = {str(Path(__file__).parent)!r}\nOUT = {str(out)!r}\n" + CHILD)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.strip() == "saved 8":
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    resumed = Trainer(tiny_config(ckpt_every=4, conditional=True), out, data=tiny_data(),
                      net=tiny_net(), quiet=True, resume=True)
    assert resumed.step >= 8 and resumed.step % 4 == 0
    resumed.run(steps=total)
    for k, v in weights(ref).items():
        assert torch.equal(weights(resumed)[k], v), k
    for k, v in ref.ema.shadow.items():
        assert torch.equal(resumed.ema.shadow[k], v), k
    assert torch.equal(resumed.rng.get_state(), ref.rng.get_state())


# --- DDP: 2 gloo processes == 1 process on the full batch --------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str, steps: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from safetensors.torch import save_file

    tr = Trainer(tiny_config(batch_size=8, grad_accum=2, conditional=True), Path(out),
                 data=tiny_data(), net=tiny_net(), device="cpu", quiet=True)
    losses = [tr.train_step() for _ in range(steps)]
    if rank == 0:
        state = {k: v.contiguous() for k, v in tr.net.state_dict().items()}
        state["losses"] = torch.tensor(losses)
        save_file(state, os.path.join(out, "ddp.safetensors"))
    tr.close()


def test_ddp_two_processes_equal_one_process_full_batch(tmp_path):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    steps = 3
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), steps), nprocs=2, join=True)
    ddp_state = load_file(str(tmp_path / "ddp.safetensors"))
    single = Trainer(tiny_config(batch_size=8, grad_accum=2, conditional=True), tmp_path / "one",
                     data=tiny_data(), net=tiny_net(), device="cpu", quiet=True)
    losses = [single.train_step() for _ in range(steps)]
    torch.testing.assert_close(ddp_state.pop("losses"), torch.tensor(losses), rtol=1e-5,
                               atol=1e-7)
    for k, v in weights(single).items():
        torch.testing.assert_close(ddp_state[k], v, rtol=1e-5, atol=1e-6)


# --- precision and what a run leaves behind ---------------------------------------------
def test_bf16_autocast_step_matches_fp32_to_bf16_precision(tmp_path):
    a = make_trainer(tmp_path, "fp32", precision="fp32")
    b = make_trainer(tmp_path, "bf16", precision="bf16")
    assert isinstance(a.autocast(), __import__("contextlib").nullcontext)
    la, lb = a.train_step(), b.train_step()
    # bf16 keeps 8 mantissa bits: relative error ~ 2^-8 per op; a few ops -> a few percent
    assert math.isfinite(lb) and abs(la - lb) < 0.05 * abs(la)
    for p in b.net.parameters():  # master weights stay float32
        assert p.dtype == torch.float32


def test_progress_bar_metrics_log_and_loss_plot_without_matplotlib(tmp_path, monkeypatch):
    import io
    import json

    from difflab.train import monitor

    stream = io.StringIO()
    bar = monitor.ProgressBar(10, stream=stream)
    bar.update(5, 0.25, 123.0)
    assert "step 5/10" in stream.getvalue() and "loss 0.2500" in stream.getvalue()
    assert "123 img/s" in stream.getvalue()
    tr = make_trainer(tmp_path, steps=10, log_every=2)
    tr.run()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10]
    assert all(r["lr"] == pytest.approx(lr_at(r["step"] - 1, tr.tc)) for r in records)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    path = monitor.plot_loss(records, tmp_path / "loss.png")
    from PIL import Image

    assert Image.open(path).size == (600, 350)


def _unet_config(**train) -> dict:
    return complete({
        "net": {"type": "unet", "in_channels": 1, "out_channels": 1, "model_channels": 8,
                "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [],
                "image_size": 8},
        "schedule": {"type": "cosine", "timesteps": 1000}, "prediction": "v",
        "data": {"name": "tiny", "resolution": 8, "channels": 1},
        "train": {"steps": 3, "batch_size": 8, "grid_size": 0, "threads": 1, "seed": 3,
                  "log_every": 1, **train}})


def test_compiled_channels_last_training_matches_eager_and_saves_plain_weights(
        tmp_path, monkeypatch):
    """train.compile / train.channels_last change how the step runs, not what it computes.

    torch.compile is run with the aot_eager backend here (Dynamo graph capture and AOT
    autograd's joint forward/backward graph, without Inductor's minute of C++ code generation
    on a CPU); bench/train_gpu.py runs the Inductor backend on a GPU.
    """
    import functools

    from torch._dynamo.utils import counters

    from difflab.train.checkpoint import load_denoiser

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator().manual_seed(0)
    data = ((torch.rand(16, 1, 8, 8, generator=g) * 255).to(torch.uint8), None)
    eager = Trainer(_unet_config(), tmp_path / "eager", data=data, quiet=True)
    fast = Trainer(_unet_config(compile=True, channels_last=True), tmp_path / "fast", data=data,
                   quiet=True)
    conv = fast.net.encoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        assert fast.train_step() == pytest.approx(eager.train_step(), rel=1e-5)
    assert counters["stats"]["unique_graphs"] >= 1  # the step really went through Dynamo
    fast.save()
    den, _ = load_denoiser(tmp_path / "fast" / "checkpoint")  # plain keys: no _orig_mod.
    assert set(den.net.state_dict()) == set(eager.net.state_dict())
    for k, v in eager.ema.state_dict().items():
        torch.testing.assert_close(fast.ema.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_training_fits_solvers_that_sampling_uses_by_default(tmp_path, capsys):
    """train.fit_steps: after training, a bespoke solver per step count is fitted to the EMA
    weights and stored in the checkpoint; load_denoiser attaches it and both difflab.sample
    and `difflab sample` use it by default (same output); other step counts stay classical."""
    import numpy as np

    from difflab import samplers as S
    from difflab.cli import main
    from difflab.train.checkpoint import load_denoiser
    from difflab.train.trainer import train

    cfg = apply_overrides(preset("toy2d"), [
        "train.steps=30", "train.fit_steps=[3]", "train.fit_count=16", "train.fit_iters=10",
        "train.grid_size=0", "train.threads=1", "data.n=512"])
    summary = train(cfg, tmp_path / "run", quiet=True)
    assert summary["fitted"] == [3]
    den, _ = load_denoiser(tmp_path / "run")
    fit = den.solvers[3]
    assert fit["sampler"] == "bespoke" and fit["rmse"] <= fit["rmse_base"]
    noise = torch.randn((5, 2), generator=torch.Generator().manual_seed(3))
    x = S.sample(den, noise, steps=3)
    assert torch.equal(x, S.sample(den, noise, "bespoke", grid=fit))
    capsys.readouterr()
    out = tmp_path / "x.npy"
    assert main(["sample", str(tmp_path / "run"), "--steps", "3", "--count", "5", "--seed", "3",
                 "--out", str(out)]) == 0
    assert "using the bespoke solver fitted" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(out), x.numpy(), rtol=1e-5, atol=1e-6)
    assert main(["sample", str(tmp_path / "run"), "--steps", "4", "--count", "5",
                 "--out", str(out)]) == 0
    assert "(dpmpp_2m, 4 steps)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="fit_steps"):
        apply_overrides(preset("toy2d"), ["train.fit_steps=[0]"])
