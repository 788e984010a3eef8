"""The one training loop: warm-up, EMA warm-up, data order, condition dropout, gradient
accumulation, overfitting a handful of images, kill-and-resume bit identity, DDP == one process,
frozen modules, resume bit identity for the diffusion and the classifier objectives, the
classifier and feature-network objectives on the same loop, progress through a callback."""

from __future__ import annotations

import json
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

    def forward(self, x, t, labels=None):
        s = (t.float() / 1000).view(-1, 1)
        h = self.inp(torch.cat([x.reshape(len(x), -1), torch.sin(3 * s), torch.cos(3 * s)], 1))
        if labels is not None:  # the null label -1 is the last row
            h = h + self.emb(torch.where(labels < 0, self.emb.num_embeddings - 1, labels))
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
                   net=tiny_net())


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
        y, true = batch["cond"].labels, labels[tr.batch_indices(tr.step * 64, 64)]
        null = y == -1  # Condition's null label
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
    assert (tmp_path / "run" / "checkpoint" / "net.safetensors").is_file()
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_cpu_budget_stops_counts_and_resumes(tmp_path):
    """train.max_cpu_minutes: the process's CPU time (time.process_time) spent in the loop,
    saved with the run and counted on by a resumed run."""
    import time

    c0 = time.process_time()
    tr = make_trainer(tmp_path, steps=10**6, max_cpu_minutes=0.01)  # 0.6 CPU s
    s = tr.run()
    spent = time.process_time() - c0
    assert s["stopped_by"] == "time" and 0 < s["steps"] < 10**6
    assert 0.6 <= s["cpu_seconds"] <= spent
    again = Trainer(tiny_config("eps", steps=10**6, max_cpu_minutes=0.02), tmp_path / "run",
                    data=tiny_data(), net=tiny_net(), resume=True)
    assert again.train_cpu_seconds == pytest.approx(s["cpu_seconds"])
    s2 = again.run()
    assert s2["steps"] > s["steps"] and s2["cpu_seconds"] >= 1.2
    assert s2["cpu_seconds"] - s["cpu_seconds"] < 1.2  # the rest of the budget, not all of it


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
             net=tiny_net())
tr.run(steps=10**6)
''')


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    total = 16
    ref = Trainer(tiny_config(ckpt_every=4, conditional=True), tmp_path / "ref",
                  data=tiny_data(), net=tiny_net())
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
                      net=tiny_net(), resume=True)
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
                 data=tiny_data(), net=tiny_net(), device="cpu")
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
                     data=tiny_data(), net=tiny_net(), device="cpu")
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
    eager = Trainer(_unet_config(), tmp_path / "eager", data=data)
    fast = Trainer(_unet_config(compile=True, channels_last=True), tmp_path / "fast", data=data)
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


def test_training_fits_solvers_stored_with_the_checkpoint(tmp_path, capsys):
    """train.fit_steps: after training, a bespoke solver per step count is fitted to the EMA
    weights and stored with the checkpoint; nothing is left on the loaded denoiser (a fit is
    passed explicitly), and `difflab sample` runs the stored fit by default (same output);
    other step counts stay classical."""
    import numpy as np

    from difflab import samplers as S
    from difflab.cli import main
    from difflab.fitting import load_fits
    from difflab.train import checkpoint as ckpt
    from difflab.train.trainer import train

    cfg = apply_overrides(preset("toy2d"), [
        "train.steps=30", "train.fit_steps=[3]", "train.fit_count=16", "train.fit_iters=10",
        "train.grid_size=0", "data.n=512"])
    records = []
    summary = train(cfg, tmp_path / "run", callback=records.append)
    assert summary["fitted"] == [3]
    assert any(r["event"] == "message" and "fitted" in r["text"] for r in records)
    den, _ = ckpt.load_denoiser(tmp_path / "run")
    assert not getattr(den, "solvers", None)  # no hidden state changes what sample() runs
    path = ckpt.resolve(tmp_path / "run")
    fits = load_fits(path, weights=ckpt.weights_file(path, ema=True))
    fit = fits[3]
    assert fit.sampler == "bespoke" and fit.rmse <= fit.rmse_base and fit.seed == 1000
    noise = torch.randn((5, 2), generator=torch.Generator().manual_seed(3))
    x = S.sample(den, noise, fit=fit)
    capsys.readouterr()
    out = tmp_path / "x.npy"
    assert main(["sample", str(tmp_path / "run"), "--steps", "3", "--count", "5", "--seed", "3",
                 "--out", str(out)]) == 0
    assert "bespoke solver fitted" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(out), x.numpy(), rtol=1e-5, atol=1e-6)
    assert main(["sample", str(tmp_path / "run"), "--steps", "4", "--count", "5",
                 "--out", str(out), "--overwrite"]) == 0
    assert "(dpmpp_2m, 4 steps)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="fit_steps"):
        apply_overrides(preset("toy2d"), ["train.fit_steps=[0]"])


# --- one loop for every objective -----------------------------------------------------------
def _state(tr: Trainer) -> dict[str, torch.Tensor]:
    """Weights, EMA, optimizer tensors and generator state of a trainer."""
    out = {f"net.{k}": v.clone() for k, v in tr.net.state_dict().items()}
    for name, ema in tr.emas.items():
        out.update({f"ema.{name}.{k}": v.clone() for k, v in ema.state_dict().items()})
    for i, entry in tr.optimizer.state_dict()["state"].items():
        out.update({f"opt.{i}.{k}": torch.as_tensor(v).clone() for k, v in entry.items()})
    out["rng"] = tr.rng.get_state()
    return out


def _straight_vs_resumed(make, total: int = 12):
    """N steps straight vs N/2, save, a new trainer resuming, N/2: the same losses and the same
    weights, EMA, optimizer and generator state, bit for bit."""
    ref = make("ref", False)
    ref_losses = [ref.train_step() for _ in range(total)]
    first = make("split", False)
    losses = [first.train_step() for _ in range(total // 2)]
    first.save()
    second = make("split", True)
    assert second.step == total // 2
    losses += [second.train_step() for _ in range(total - total // 2)]
    assert losses == ref_losses
    a, b = _state(ref), _state(second)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_is_bit_identical_for_the_diffusion_objective(tmp_path):
    _straight_vs_resumed(lambda name, resume: Trainer(
        tiny_config(conditional=True, grad_accum=2, lr_decay="cosine", weighting="min_snr",
                    steps=12), tmp_path / name, data=tiny_data(), net=tiny_net(),
        resume=resume))


CLASSIFIER_NET = {"type": "classifier", "in_channels": 1, "num_classes": 2, "model_channels": 8,
                  "channel_mult": [1], "num_res_blocks": 1, "attention_resolutions": [],
                  "image_size": 4, "pool": "adaptive"}


def classifier_setup(**train):
    from difflab.schedules import cosine
    from difflab.train.classifier import classifier_config

    cfg = classifier_config({"name": "tiny", "resolution": 4, "channels": 1, "num_classes": 2},
                            cosine().config(), CLASSIFIER_NET,
                            {"steps": 12, "batch_size": 8, "warmup": 3, "seed": 2,
                             "ema_decay": 0.9, **train})
    return cfg, tiny_data(10)


def test_resume_is_bit_identical_for_the_classifier_objective(tmp_path):
    cfg, data = classifier_setup(grad_accum=2)
    _straight_vs_resumed(lambda name, resume: Trainer(cfg, tmp_path / name, data=data,
                                                      resume=resume))


def test_resume_refuses_another_model(tmp_path):
    tr = make_trainer(tmp_path, steps=2)
    tr.run()
    for change, word in ((dict(prediction="v"), "prediction"),
                         ({"schedule": {"type": "linear", "timesteps": 1000}}, "schedule")):
        cfg = tiny_config(change.pop("prediction", "eps"))
        cfg.update(change)
        with pytest.raises(ValueError, match=f"cannot resume.*{word}"):
            Trainer(cfg, tmp_path / "run", data=tiny_data(), net=tiny_net(), resume=True)
    cfg, data = classifier_setup()
    with pytest.raises(ValueError, match="cannot resume.*kind"):
        Trainer(cfg, tmp_path / "run", data=data, resume=True)


class _Distill(__import__("difflab").objectives.Objective):
    """Regress the trained net on a frozen teacher's output (a test objective)."""

    kind = "distill"
    trainable, frozen, ema = ("net",), ("teacher",), ("net",)

    def prepare(self, batch, generator):
        x = batch["image"]
        return {"x": x, "t": torch.rand(len(x), generator=generator) * 1000}

    def loss(self, modules, batch):
        with torch.no_grad():
            target = modules["teacher"](batch["x"], batch["t"])
        out = modules["net"](batch["x"], batch["t"])
        return (out - target).pow(2).mean(), {"target_rms": target.pow(2).mean().sqrt()}


def test_frozen_module_is_not_trained_averaged_or_saved(tmp_path):
    from difflab.train import checkpoint as ckpt

    cfg = {"kind": "distill", "net": {"type": "tiny"},
           "data": {"name": "tiny", "resolution": 4, "channels": 1},
           "train": {"steps": 6, "batch_size": 4, "lr": 1e-2, "warmup": 1, "log_every": 2}}
    teacher = tiny_net(seed=7)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    tr = Trainer(cfg, tmp_path / "run", data={"image": tiny_data()[0]}, net=tiny_net(),
                 modules={"teacher": teacher}, objective=_Distill(),
                 references={"teacher": "runs/teacher/checkpoint"})
    summary = tr.run()
    assert summary["steps"] == 6
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    optimized = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in tr.net.parameters()}
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert {id(p) for p in tr.optimizer.state} <= {id(p) for p in tr.net.parameters()}
    assert set(tr.emas) == {"net"}
    path = tmp_path / "run" / "checkpoint"
    assert sorted(os.listdir(path)) == ["checkpoint.json", "net.ema.safetensors", "net.json",
                                        "net.safetensors", "optimizer.safetensors",
                                        "state.json"]
    head = json.loads((path / "checkpoint.json").read_text())
    assert head["kind"] == "distill" and head["components"] == ["net"]
    assert head["references"] == {"teacher": {"path": "runs/teacher/checkpoint",
                                              "sha256": ckpt.module_sha256(teacher)}}
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("target_rms" in r for r in records)  # the objective's logs reach the log
    # resuming needs the same teacher
    with pytest.raises(ValueError, match="frozen module 'teacher'"):
        Trainer(cfg, tmp_path / "run", data={"image": tiny_data()[0]}, net=tiny_net(),
                modules={"teacher": tiny_net(seed=8)}, objective=_Distill(), resume=True)
    again = Trainer(cfg, tmp_path / "run", data={"image": tiny_data()[0]}, net=tiny_net(),
                    modules={"teacher": teacher}, objective=_Distill(), resume=True)
    assert again.step == 6
    with pytest.raises(ValueError, match="pass it in modules="):
        Trainer(cfg, None, data={"image": tiny_data()[0]}, net=tiny_net(), objective=_Distill())


def test_objective_call_is_loss_of_prepare_and_diffusion_loss_is_its_per_example_form():
    from difflab.objectives import DiffusionObjective, MinSNR, diffusion_loss
    from difflab.schedules import cosine

    obj = DiffusionObjective(cosine(), "v", weighting=MinSNR(5.0), conditional=True,
                             p_uncond=0.3)
    assert obj.target == "v"  # the parameterisation's native target by default
    x0, labels = torch.rand(6, 1, 4, 4) * 2 - 1, torch.arange(6) % 2
    modules = {"net": tiny_net()}
    loss, logs = obj(modules, {"image": x0, "label": labels}, torch.Generator().manual_seed(4))
    prepared = obj.prepare({"image": x0, "label": labels}, torch.Generator().manual_seed(4))
    assert torch.equal(loss, obj.loss(modules, prepared)[0]) and logs == {}
    per = diffusion_loss(obj.denoiser(modules["net"]), x0, cond=prepared["cond"], target="v",
                         weighting="min_snr", t=prepared["t"], eps=prepared["eps"])
    assert torch.equal(per.mean(), loss)


def test_classifier_objective_trains_on_the_loop(tmp_path):
    from difflab.train.classifier import train_classifier

    cfg, (images, labels) = classifier_setup(steps=30, lr=1e-2)
    records = []
    summary = train_classifier(cfg, tmp_path / "clf", data=(images, labels),
                               eval_data=(images, labels), callback=records.append)
    assert summary["steps"] == 30 and set(summary["accuracy"]) == {"0.1", "0.5", "0.9", "1.0"}
    logs = [r for r in records if r["event"] == "log"]
    assert logs and all("acc_noised" in r for r in logs)
    assert json.loads((tmp_path / "clf" / "eval.json").read_text()) == summary["accuracy"]


def test_feature_objective_schedule_and_determinism():
    """The feature networks train on the same loop; their old learning-rate schedule (warm-up
    over half an epoch, then cosine to 0) is lr_at's, and a seed fixes the result."""
    from difflab.metrics.train_features import feature_config, train_feature_net

    lr, n, batch, epochs = 2e-3, 100, 16, 3
    spe = math.ceil(n / batch)
    total, warmup = epochs * spe, max(1, spe // 2)

    def old_lr(step):  # metrics/train_features.py before the one trainer
        if step < warmup:
            return lr * (step + 1) / warmup
        return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    tc = feature_config(in_channels=1, resolution=8, num_classes=2, steps=total, lr=lr,
                        warmup=warmup)["train"]
    for step in range(total):
        assert lr_at(step, tc) == pytest.approx(old_lr(step), rel=1e-12, abs=1e-18)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 1, 8, 8, generator=g) * 2 - 1, torch.arange(40) % 2
    lines = []
    a = train_feature_net(x, y, num_classes=2, epochs=2, batch_size=16, seed=3, log=lines.append,
                          x_test=x, y_test=y)
    b = train_feature_net(x, y, num_classes=2, epochs=2, batch_size=16, seed=3)
    assert len(lines) == 2 and lines[0].startswith("epoch 1/2") and "test acc" in lines[0]
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_the_library_reports_through_the_callback_and_never_prints(tmp_path, capfd):
    import io

    from difflab.train import monitor

    records = []
    tr = Trainer(tiny_config(steps=6, log_every=3, ckpt_every=3), tmp_path / "run",
                 data=tiny_data(), net=tiny_net(), callback=records.append)
    tr.run()
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    events = [r["event"] for r in records]
    assert events[0] == "start" and events[-1] == "end"
    assert events.count("step") == 6 and events.count("log") == 2
    assert events.count("checkpoint") == 3  # steps 3 and 6, and the final save
    logged = [r["step"] for r in records if r["event"] == "log"]
    assert logged == [3, 6]
    stream = io.StringIO()
    bar = monitor.ProgressBar(stream=stream)
    for r in records:
        bar(r)
    assert "step 6/6" in stream.getvalue()


class _SelfDistill(_Distill):
    """Regress the net on its own EMA (an objective with an EMA target network)."""

    kind = "self-distill"
    frozen = ()
    ema_targets = {"teacher": "net"}

    def loss(self, modules, batch):  # denoise, and stay near the EMA
        out = modules["net"](batch["x"], batch["t"])
        with torch.no_grad():
            target = modules["teacher"](batch["x"], batch["t"])
        return (out - batch["x"]).pow(2).mean() + 0.1 * (out - target).pow(2).mean(), {}


def test_ema_target_module_holds_the_ema_weights(tmp_path):
    cfg = {"kind": "self-distill", "net": {"type": "tiny"},
           "data": {"name": "tiny", "resolution": 4, "channels": 1},
           "train": {"steps": 4, "batch_size": 4, "lr": 1e-2, "warmup": 1, "ema_decay": 0.5}}
    tr = Trainer(cfg, tmp_path / "run", data={"image": tiny_data()[0]}, net=tiny_net(),
                 objective=_SelfDistill())
    tr.run()
    target = tr.modules["teacher"]
    assert not any(p.requires_grad for p in target.parameters())
    assert not torch.equal(target.out.weight, tr.net.out.weight)  # the net moved, the EMA lags
    for k, v in target.state_dict().items():
        assert torch.equal(v, tr.ema.shadow[k]), k
    assert not {id(p) for p in target.parameters()} & {
        id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    head = json.loads((tmp_path / "run" / "checkpoint" / "checkpoint.json").read_text())
    assert head["components"] == ["net"]
    resumed = Trainer(cfg, tmp_path / "run", data={"image": tiny_data()[0]}, net=tiny_net(),
                      objective=_SelfDistill(), resume=True)
    for k, v in resumed.modules["teacher"].state_dict().items():
        assert torch.equal(v, target.state_dict()[k]), k
