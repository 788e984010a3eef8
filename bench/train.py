"""Training benchmark: difflab's default preset vs the canonical diffusers recipe on
Fashion-MNIST, at the same wall-clock budget, trained side by side (one process each).

    python bench/train.py --minutes 10 --threads 1 --samples 1000      # all phases
    python bench/train.py --phase eval                                  # re-evaluate only

Phases (each reads what the one before wrote under --work):

1. train   two processes at once, ``--threads`` torch threads each, ``--minutes`` each:
           difflab: ``difflab.train`` with the ``fashion_mnist`` preset (+ ``--set`` overrides);
           diffusers: UNet2DModel + DDPMScheduler as in diffusers' examples/
           unconditional_image_generation/train_unconditional.py (AdamW lr 1e-4, betas
           (0.95, 0.999), weight decay 1e-6, 500 warm-up steps then constant (cosine needs a
           known step count; constant is kinder to a short run), EMA with warm-up
           (inv_gamma 1, power 3/4, max 0.9999), eps MSE, batch 16, grad clip 1, random flip,
           28x28 padded to 32x32 with the background value -1).
2. sample  ``--samples`` images per model at 10 and 20 network calls (NFE):
           difflab: ``difflab.sample`` (dpmpp_2m); diffusers: DDIMScheduler and
           DPMSolverMultistepScheduler (the better of the two is compared), 32 -> 28 crop.
3. eval    FID-FMNIST (difflab.metrics, the shipped Fashion-MNIST classifier features)
           against the Fashion-MNIST training set; falls back to a quick classifier trained
           here ("FID-quickCNN", clearly labelled) when the shipped network is missing.
           Writes docs/results/train.md and sample grids docs/results/train_*.png.

Throughput: images/s of each training loop, and its fraction of this machine's measured
peak for the same thread count (dense matmul and conv2d GFLOP/s, measured just before training
by two processes at once, as the trainers run; ``--phase peak`` re-measures it), with the
model's FLOPs per training image counted by torch's FlopCounterMode (forward x 3 for forward +
backward).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
NFES = (10, 20)


# ------------------------------------------------------------------------------------------
# training workers
# ------------------------------------------------------------------------------------------
def train_difflab(work: Path, minutes: float, overrides: list[str]) -> dict:
    from difflab.train import apply_overrides, preset
    from difflab.train.trainer import Trainer

    cfg = apply_overrides(preset("fashion_mnist"), [
        f"train.max_minutes={minutes}", "train.sample_every=0", "train.ckpt_every=0",
        "train.steps=1000000", "train.log_every=20", "train.grid_size=0"] + overrides)
    tr = Trainer(cfg, work / "difflab")
    t0 = time.perf_counter()
    s = tr.run()
    wall = time.perf_counter() - t0
    from difflab.nets import count_parameters

    return {"steps": s["steps"], "seconds": wall, "batch_size": cfg["train"]["batch_size"],
            "images_per_s": s["steps"] * cfg["train"]["batch_size"] / wall,
            "params": count_parameters(tr.net), "final_loss": s["loss"], "config": cfg}


def diffusers_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=32, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))


def pad32(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)


def train_diffusers(work: Path, minutes: float, lr: float = 1e-4, warmup: int = 500,
                    B: int = 16) -> dict:
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from difflab.data import load_dataset

    torch.manual_seed(0)
    images = load_dataset("fashion_mnist", split="train").images
    model = diffusers_unet()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.95, 0.999),
                            weight_decay=1e-6, eps=1e-8)
    lr_sched = get_scheduler("constant_with_warmup", optimizer=opt, num_warmup_steps=warmup)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0,
                   power=0.75)
    g = torch.Generator().manual_seed(0)
    perm, pos, step, losses = torch.randperm(len(images), generator=g), 0, 0, []
    t0 = time.perf_counter()
    model.train()
    while time.perf_counter() - t0 < minutes * 60:
        if pos + B > len(perm):
            perm, pos = torch.randperm(len(images), generator=g), 0
        x = images[perm[pos:pos + B]].float() / 127.5 - 1
        pos += B
        flip = torch.rand(B, generator=g) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        x = pad32(x)
        noise = torch.randn(x.shape, generator=g)
        t = torch.randint(0, 1000, (B,), generator=g)
        noisy = sched.add_noise(x, noise, t)
        loss = torch.nn.functional.mse_loss(model(noisy, t).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        opt.zero_grad()
        ema.step(model.parameters())
        step += 1
        losses.append(loss.item())
    wall = time.perf_counter() - t0
    ema.copy_to(model.parameters())
    model.save_pretrained(work / "diffusers" / "unet_ema")
    sched.save_pretrained(work / "diffusers" / "scheduler")
    (work / "diffusers" / "losses.json").write_text(json.dumps(losses))
    return {"steps": step, "seconds": wall, "batch_size": B, "images_per_s": step * B / wall,
            "lr": lr, "warmup": warmup,
            "params": sum(p.numel() for p in model.parameters()),
            "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:]))}


# ------------------------------------------------------------------------------------------
# sampling workers
# ------------------------------------------------------------------------------------------
def sample_difflab(work: Path, n: int, batch: int = 250) -> dict:
    import numpy as np

    import difflab
    from difflab.train import load_denoiser
    from difflab.train.monitor import to_uint8

    den, _ = load_denoiser(work / "difflab")
    out = {}
    for nfe in NFES:
        g = torch.Generator().manual_seed(123)
        noise = torch.randn(n, 1, 28, 28, generator=g)
        t0 = time.perf_counter()
        with torch.no_grad():
            x = torch.cat([difflab.sample(den, noise[i:i + batch], "dpmpp_2m", steps=nfe,
                                          generator=g) for i in range(0, n, batch)])
        np.save(work / f"difflab_dpmpp_2m_{nfe}.npy", to_uint8(x).numpy())
        out[f"dpmpp_2m_{nfe}"] = time.perf_counter() - t0
    return out


def sample_diffusers(work: Path, n: int, batch: int = 250,
                     schedulers: tuple[str, ...] = ("ddim", "dpmsolver")) -> dict:
    import numpy as np
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UNet2DModel

    from difflab.train.monitor import to_uint8

    model = UNet2DModel.from_pretrained(work / "diffusers" / "unet_ema").eval()
    base = json.loads((work / "diffusers" / "scheduler" / "scheduler_config.json").read_text())
    out = {}
    classes = {"ddim": DDIMScheduler, "dpmsolver": DPMSolverMultistepScheduler}
    for name, cls in ((k, classes[k]) for k in schedulers):
        for nfe in NFES:
            sched = cls.from_config(base)
            g = torch.Generator().manual_seed(123)
            noise = torch.randn(n, 1, 32, 32, generator=g)
            t0 = time.perf_counter()
            chunks = []
            for i in range(0, n, batch):
                x = noise[i:i + batch] * sched.init_noise_sigma
                sched.set_timesteps(nfe)
                with torch.no_grad():
                    for t in sched.timesteps:
                        eps = model(sched.scale_model_input(x, t), t).sample
                        x = sched.step(eps, t, x).prev_sample
                chunks.append(x[:, :, 2:30, 2:30])
            np.save(work / f"diffusers_{name}_{nfe}.npy", to_uint8(torch.cat(chunks)).numpy())
            out[f"{name}_{nfe}"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------------------
# throughput
# ------------------------------------------------------------------------------------------
def peak_gflops(threads: int) -> dict:
    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    t0, k = time.perf_counter(), 10
    for _ in range(k):
        a @ b
    mm = 2 * 1024**3 * k / (time.perf_counter() - t0) / 1e9
    conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    x = torch.randn(32, 64, 28, 28)
    with torch.no_grad():
        for _ in range(2):
            conv(x)
        t0, k = time.perf_counter(), 5
        for _ in range(k):
            conv(x)
    cv = 2 * 64 * 64 * 9 * 28 * 28 * 32 * k / (time.perf_counter() - t0) / 1e9
    return {"matmul_gflops": mm, "conv_gflops": cv}


def train_flops_per_image(which: str, work: Path) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    if which == "difflab":
        from difflab.train.checkpoint import load_denoiser

        den, _ = load_denoiser(work / "difflab")
        net, x, t = den.net, torch.randn(8, 1, 28, 28), torch.rand(8) * 999
        fn = lambda: net(x, t)  # noqa: E731
    else:
        net = diffusers_unet()
        x, t = torch.randn(8, 1, 32, 32), torch.randint(0, 1000, (8,))
        fn = lambda: net(x, t).sample  # noqa: E731
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        fn()
    return 3 * fc.get_total_flops() / 8  # forward + backward ~ 3 x forward


# ------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------
def quick_classifier_features():
    """Fallback feature net: a small CNN trained here for 1 epoch on Fashion-MNIST train."""
    from torch import nn

    from difflab.data import load_dataset

    torch.manual_seed(0)
    ds = load_dataset("fashion_mnist", split="train")
    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(64 * 49, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x_all, y_all = ds.images.float() / 127.5 - 1, ds.labels
    for i in range(0, 60000, 128):
        loss = nn.functional.cross_entropy(net(x_all[i:i + 128]), y_all[i:i + 128])
        opt.zero_grad()
        loss.backward()
        opt.step()
    feat = net[:-1].eval()

    def features(u8: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([feat(u8[i:i + 500].float() / 127.5 - 1)
                              for i in range(0, len(u8), 500)]).double()

    return features, x_all


def evaluate_all(work: Path, extra: Path | None = None) -> dict:
    """FIDs of every ``*_<nfe>.npy`` under ``work`` (and, keyed "ablation/<name>", under
    ``extra``), all with the same feature network."""
    import numpy as np

    files = sorted(work.glob("*_[0-9]*.npy"))
    names = {f: f.stem for f in files}
    if extra is not None:
        for f in sorted(extra.glob("*_[0-9]*.npy")):
            files.append(f)
            names[f] = "ablation/" + f.stem
    results = {}
    try:
        import difflab.metrics as M

        M.load_feature_net("fmnist")
        label = "FID-FMNIST"
        for f in files:
            u8 = torch.from_numpy(np.load(f)).permute(0, 3, 1, 2).contiguous()
            m = M.evaluate(u8, reference="fashion_mnist", feature_net="fmnist")
            results[names[f]] = float(m["fid"])
    except (FileNotFoundError, ImportError) as e:
        print(f"FID-FMNIST unavailable ({e}); using a quick classifier", file=sys.stderr)
        from difflab.metrics import frechet_distance, gaussian_stats

        label = "FID-quickCNN (1-epoch CNN trained in the bench)"
        features, _ = quick_classifier_features()
        from difflab.data import load_dataset

        real = gaussian_stats(features(load_dataset("fashion_mnist").images[:10000]))
        for f in files:
            u8 = torch.from_numpy(np.load(f)).permute(0, 3, 1, 2).contiguous()
            s = gaussian_stats(features(u8))
            results[names[f]] = float(frechet_distance(s.mu, s.sigma, real.mu, real.sigma))
    return {"label": label, "fid": results}


def save_grids(work: Path, out_dir: Path) -> list[str]:
    import numpy as np
    from PIL import Image

    paths = []
    for stem in ("difflab_dpmpp_2m_20", "diffusers_ddim_20", "diffusers_dpmsolver_20"):
        f = work / f"{stem}.npy"
        if not f.is_file():
            continue
        a = np.load(f)[:64, :, :, 0]
        grid = np.full((8 * 30 + 2, 8 * 30 + 2), 255, np.uint8)
        for i, img in enumerate(a):
            r, c = divmod(i, 8)
            grid[2 + r * 30:2 + r * 30 + 28, 2 + c * 30:2 + c * 30 + 28] = img
        p = out_dir / f"train_{stem}.png"
        Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2),
                                     Image.NEAREST).save(p)
        paths.append(p.name)
    return paths


def write_report(work: Path, out: Path, command: str) -> None:
    info = json.loads((work / "train_info.json").read_text())
    ev = json.loads((work / "eval.json").read_text())
    peak = info["peak"]
    fid = ev["fid"]
    lines = [
        "# Training benchmark: difflab default preset vs the diffusers recipe (Fashion-MNIST)",
        "",
        f"Command: `{info.get('command', command)}`"
        + (f" (evaluated again with `{info['eval_command']}`)  "
           if info.get("eval_command", info.get("command")) != info.get("command") else "  "),
        f"Machine: 2-core CPU (CI-class), shared with other jobs (load average during the run "
        f"{info.get('load', '?')}); each trainer ran in its own process with "
        f"{info['threads']} torch thread(s), side by side, {info['minutes']} min each.  ",
        f"Date: {info['date']}",
        "",
        "| | difflab `fashion_mnist` preset | diffusers recipe |",
        "|---|---|---|",
    ]
    d, u = info["difflab"], info["diffusers"]
    dc = d["config"]
    lines += [
        f"| network | ADM U-Net {dc['net']['model_channels']}ch x {dc['net']['channel_mult']},"
        f" {dc['net']['num_res_blocks']} res/level, 28x28, {d['params'] / 1e6:.2f}M params | "
        f"UNet2DModel (32, 64, 64), 1 layer/block, attention at 8x8, 32x32 (padded), "
        f"{u['params'] / 1e6:.2f}M params |",
        f"| recipe | {dc['prediction']}-prediction, {dc['train']['weighting']} weighting "
        f"(gamma {dc['train']['min_snr_gamma']}), {dc['schedule']['type']} schedule, lr "
        f"{dc['train']['lr']} (warm-up {dc['train']['warmup']}), batch "
        f"{dc['train']['batch_size']}, EMA max {dc['train']['ema_decay']} with warm-up "
        f"(1+n)/(10+n) | eps-prediction, plain MSE, linear betas, lr 1e-4 (warm-up 500), "
        f"batch 16, EMA max 0.9999 (power 3/4 warm-up) |",
        f"| optimizer steps in {info['minutes']} min | {d['steps']} | {u['steps']} |",
        f"| training images/s | {d['images_per_s']:.1f} | {u['images_per_s']:.1f} |",
        f"| training GFLOP/image (fwd+bwd) | {d['flops'] / 1e9:.3f} | {u['flops'] / 1e9:.3f} |",
        f"| achieved GFLOP/s | {d['images_per_s'] * d['flops'] / 1e9:.2f} | "
        f"{u['images_per_s'] * u['flops'] / 1e9:.2f} |",
        f"| fraction of measured matmul peak ({peak['matmul_gflops']:.1f} GFLOP/s) | "
        f"{d['images_per_s'] * d['flops'] / 1e9 / peak['matmul_gflops']:.1%} | "
        f"{u['images_per_s'] * u['flops'] / 1e9 / peak['matmul_gflops']:.1%} |",
        f"| fraction of measured conv2d peak ({peak['conv_gflops']:.1f} GFLOP/s) | "
        f"{d['images_per_s'] * d['flops'] / 1e9 / peak['conv_gflops']:.1%} | "
        f"{u['images_per_s'] * u['flops'] / 1e9 / peak['conv_gflops']:.1%} |",
    ]
    for nfe in NFES:
        dl = fid.get(f"difflab_dpmpp_2m_{nfe}")
        ud, us = fid.get(f"diffusers_ddim_{nfe}"), fid.get(f"diffusers_dpmsolver_{nfe}")
        best = min(v for v in (ud, us) if v is not None)
        lines.append(f"| {ev['label']} at {nfe} NFE ({info['samples']} samples) | "
                     f"{dl:.2f} (dpmpp_2m) | {ud:.2f} (DDIM), {us:.2f} (DPMSolver++) |")
        lines.append(f"| ratio difflab / best diffusers at {nfe} NFE | "
                     f"**{dl / best:.2f}** (target <= 0.5) | |")
    ratios = []
    for nfe in NFES:
        best = min(v for k, v in fid.items() if k.startswith("diffusers_") and
                   k.endswith(f"_{nfe}"))
        ratios.append(fid[f"difflab_dpmpp_2m_{nfe}"] / best)
    met = all(r <= 0.5 for r in ratios)
    lines += [
        "", f"**Target** (difflab's FID at most half of the best diffusers FID at 10 and at 20 "
        f"NFE): **{'met' if met else 'not met'}** in this run (ratios "
        + ", ".join(f"{r:.2f}" for r in ratios) + ")."]
    if ev["label"] == "FID-FMNIST":
        lines += [
            "", "How to read the FID-FMNIST numbers (scale from docs/results/metrics.md): test "
            "images score 0.4 at n = 2000, test images with noise std 0.3 score 52, blurred by "
            "1 px 37, and MNIST digits (nothing alike) 77: the feature space saturates, so "
            "near-noise samples stay below ~100 and a ratio of 0.5 against them asks for "
            "difflab <= ~36, the blurred-test-image level."]
    if info.get("quick_fid"):
        q = info["quick_fid"]
        lines += [
            "", f"An earlier evaluation of these same samples, before FID-FMNIST shipped, used "
            f"a 1-epoch CNN trained inside the bench (FID-quickCNN, an uncalibrated feature "
            f"space): ratios {q}. FID-FMNIST above is the number to quote."]
    if "ablation" in info:
        ab, abev = info["ablation"]["info"], info["ablation"]["eval"]
        fids = ", ".join(f"{abev['fid'][k]:.2f} at {k.rsplit('_', 1)[1]} NFE"
                         for k in sorted(abev["fid"], key=lambda k: int(k.rsplit("_", 1)[1])))
        lines += [
            "", "Ablation (not the canonical recipe): the same diffusers UNet2DModel and eps loss "
            f"with difflab's optimisation settings, lr {ab['lr']:g}, warm-up {ab['warmup']}, "
            f"batch {ab['batch_size']}, trained afterwards in its own run ({ab['steps']} steps, "
            f"{ab['images_per_s']:.1f} img/s, so more images than difflab saw in either run): "
            f"{ev['label']} {fids} (DPMSolver++). It separates "
            "the share of the gain that comes from the learning-rate schedule from the share "
            "of the rest of the recipe (v-prediction, min-SNR, cosine schedule, EMA warm-up, "
            "architecture). Commands: `python bench/train.py --work "
            f"{info['ablation']['work']} --only diffusers --minutes {info['minutes']} "
            f"--threads {info['threads']} --samples {info['samples']} --diffusers-lr "
            f"{ab['lr']:g} --diffusers-warmup {ab['warmup']} --diffusers-batch "
            f"{ab['batch_size']} --diffusers-schedulers dpmsolver` (phases train, sample, "
            "eval).",
        ]
    lines += info.get("extra_lines", [])
    lines += ["", "Sample grids (20 NFE, first 64 samples):", ""]
    lines += [f"![{p}]({p})" for p in info.get("grids", [])]
    lines += [
        "", "## Tuning runs (how the preset was chosen)", "",
        "Short runs of `difflab train fashion_mnist --max-minutes 5 --threads 1` under the same "
        "contention, two at a time, judged by eye on 64 EMA samples (dpmpp_2m, 10 steps); "
        "then run 2 of the benchmark above with batch 16:", "",
        "| batch | lr | optimizer steps in 5 min | samples |", "|---|---|---|---|",
        "| 64 | 2e-3 | 50 | ![](train_tune_b64_5min.png) noisy, grainy blobs |",
        "| 32 | 2e-3 | 94 | ![](train_tune_b32_5min.png) smooth garment silhouettes |", "",
        "At a few hundred steps the number of updates matters more than the batch size, so the "
        "preset uses batch 16 with a short warm-up (50 steps) and a high peak lr (2e-3, with "
        "gradient clipping at 1). v-prediction with min-SNR-5 weighting on the cosine schedule "
        "puts the effort on the mid noise levels that decide shapes; the EMA warm-up "
        "min(0.999, (1+n)/(10+n)) makes the averaged weights useful from the first hundred "
        "steps, where a constant 0.9999 would still be mostly the random initialisation.",
    ]
    lines += ["", "Notes: both trainers share the 2 cores with each other and with other jobs, so "
              "absolute images/s are lower than on an idle machine; the comparison is at equal "
              "wall-clock under the same contention. The FID reference is the Fashion-MNIST "
              "training set; FID-FMNIST values are comparable with each other only (see "
              "docs/results/metrics.md). The gain comes from the recipe only (same PyTorch "
              "kernels, fp32 on CPU).", ""]
    out.write_text("\n".join(lines))


# ------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", default="all",
                   choices=("all", "peak", "train", "sample", "eval", "report"))
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--work", default=str(ROOT / "runs" / "bench_train"))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--only", choices=("difflab", "diffusers"), default=None)
    p.add_argument("--diffusers-lr", type=float, default=1e-4,
                   help="ablation only: the recipe's lr is 1e-4")
    p.add_argument("--diffusers-warmup", type=int, default=500)
    p.add_argument("--diffusers-batch", type=int, default=16)
    p.add_argument("--diffusers-schedulers", default="ddim,dpmsolver")
    p.add_argument("--ablation", default=None,
                   help="work dir of a diffusers-only ablation run to add to the report")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--report", default=str(ROOT / "docs" / "results" / "train.md"))
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)

    if a.worker:  # a child process: one job, result as JSON on the last stdout line
        kind, job = a.worker.split(":")
        fn = {("train", "difflab"): lambda: train_difflab(work, a.minutes, a.overrides),
              ("train", "diffusers"): lambda: train_diffusers(
                  work, a.minutes, a.diffusers_lr, a.diffusers_warmup, a.diffusers_batch),
              ("peak", "difflab"): lambda: peak_gflops(a.threads),
              ("peak", "diffusers"): lambda: peak_gflops(a.threads),
              ("sample", "difflab"): lambda: sample_difflab(work, a.samples),
              ("sample", "diffusers"): lambda: sample_diffusers(
                  work, a.samples, schedulers=tuple(a.diffusers_schedulers.split(",")))
              }[(kind, job)]
        print(json.dumps(fn()))
        return

    def run_pair(kind: str) -> dict:
        jobs = [a.only] if a.only else ["difflab", "diffusers"]
        procs = {}
        for j in jobs:
            cmd = [sys.executable, __file__, "--worker", f"{kind}:{j}", "--work", str(work),
                   "--minutes", str(a.minutes), "--threads", str(a.threads),
                   "--samples", str(a.samples), "--diffusers-lr", str(a.diffusers_lr),
                   "--diffusers-warmup", str(a.diffusers_warmup),
                   "--diffusers-batch", str(a.diffusers_batch),
                   "--diffusers-schedulers", a.diffusers_schedulers,
                   ] + sum((["--set", s] for s in a.overrides), [])
            procs[j] = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        res = {}
        for j, pr in procs.items():
            out, _ = pr.communicate()
            if pr.returncode:
                raise SystemExit(f"{kind}:{j} failed with code {pr.returncode}")
            res[j] = json.loads(out.strip().splitlines()[-1])
        return res

    info_path = work / "train_info.json"

    def measure_peak() -> dict:
        """Peak GFLOP/s as the trainers see it: measured by two processes at once (one per
        trainer), each with --threads threads, and averaged."""
        runs = run_pair("peak").values()
        return {k: sum(r[k] for r in runs) / len(runs) for k in ("matmul_gflops", "conv_gflops")}

    if a.phase == "peak":  # re-measure the peak only (the machine must be as quiet as in training)
        info = json.loads(info_path.read_text())
        info["peak"] = measure_peak()
        info_path.write_text(json.dumps(info, indent=1))
        print(json.dumps(info["peak"]))
        return
    if a.phase in ("all", "train"):
        peak = measure_peak()
        res = run_pair("train")
        info = json.loads(info_path.read_text()) if info_path.is_file() and a.only else {}
        info.update(res, peak=peak)
        now = datetime.datetime.now(datetime.timezone.utc)
        info.update(command="python bench/train.py " + " ".join(sys.argv[1:]))
        info.update(minutes=a.minutes, threads=a.threads, samples=a.samples,
                    date=now.strftime("%Y-%m-%d %H:%M UTC"),
                    load=" / ".join(f"{x:.1f}" for x in os.getloadavg()))
        info_path.write_text(json.dumps(info, indent=1))
    if a.phase in ("all", "sample"):
        res = run_pair("sample")
        info = json.loads(info_path.read_text())
        info["sample_seconds"] = res
        info["samples"] = a.samples
        info_path.write_text(json.dumps(info, indent=1))
    if a.phase == "report":  # rewrite the report from train_info.json and eval.json
        write_report(work, Path(a.report), "python bench/train.py " + " ".join(sys.argv[1:]))
        print(Path(a.report).read_text())
        return
    if a.phase in ("all", "eval"):
        info = json.loads(info_path.read_text())
        if "peak" not in info:  # measured before training since the 'peak' phase exists
            info["peak"] = measure_peak()
        for j in ([a.only] if a.only else ["difflab", "diffusers"]):
            info[j]["flops"] = train_flops_per_image(j, work)
        ev = evaluate_all(work, Path(a.ablation) if a.ablation else None)
        (work / "eval.json").write_text(json.dumps(ev, indent=1))
        info_path.write_text(json.dumps(info, indent=1))
        if a.only:  # an ablation run: numbers only, added to the main report by --ablation
            print(json.dumps(ev, indent=1))
            return
        if a.ablation:
            fids = {k.split("/", 1)[1]: v for k, v in ev["fid"].items()
                    if k.startswith("ablation/")}
            info["ablation"] = {"info": json.loads((Path(a.ablation) / "train_info.json")
                                                   .read_text())["diffusers"],
                                "eval": {"label": ev["label"], "fid": fids},
                                "work": a.ablation}
        out_dir = Path(a.report).parent
        out_dir.mkdir(parents=True, exist_ok=True)
        info["grids"] = save_grids(work, out_dir)
        info_path.write_text(json.dumps(info, indent=1))
        command = "python bench/train.py " + " ".join(sys.argv[1:])
        if a.phase == "eval":
            info["eval_command"] = command
            info_path.write_text(json.dumps(info, indent=1))
        write_report(work, Path(a.report), command)
        print(Path(a.report).read_text())
        for stem, v in sorted(ev["fid"].items()):
            print(f"{stem}: {ev['label']} {v:.2f}")


if __name__ == "__main__":
    main()
