"""The training loop: AdamW with linear warm-up, gradient clipping and accumulation, EMA,
mixed precision, class-conditional training with condition dropout, DDP, exact resume.

One optimizer step n uses the global batch of B examples

    indices    = the next B entries of the per-epoch permutations  (data order: seed, epoch)
    t, eps     = objectives.sample_t(schedule, B), N(0, I)          (generator ``rng``)
    drop       = U(0, 1) < p_uncond                                  (generator ``rng``)
    L          = mean_i  w(t_i) || f_theta(x_t,i, t_i, c_i) - f_i ||^2   (objectives.diffusion_loss)

All of it is drawn for the *global* batch on every rank from CPU generators and then cut into
micro-batches (gradient accumulation) and rank shards, so the update does not depend on the
number of processes or micro-batches (up to float summation order), and the generator states
plus the step count are all a resume needs to continue bit for bit.

On a GPU the loop never waits for the device inside a step: batches go up from pinned memory
without blocking, the loss is read back (and checked for NaN / inf) only every ``log_every``
steps, the EMA is one multi-tensor update, AdamW is the fused kernel, and ``train.compile`` /
``train.channels_last`` compile the network and store it NHWC. Checkpoints always hold the
plain network's weights (no ``torch.compile`` / DDP key prefixes).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from difflab.denoiser import Denoiser
from difflab.objectives import diffusion_loss, sample_t
from difflab.schedules import from_config
from difflab.train import checkpoint as ckpt
from difflab.train import ddp
from difflab.train.config import complete
from difflab.train.ema import EMA
from difflab.train.monitor import (
    MetricsLog,
    ProgressBar,
    plot_loss,
    read_metrics,
    save_grid,
    save_points,
)

__all__ = ["Trainer", "train", "load_training_data", "lr_at", "TOY_NAMES"]

TOY_NAMES = ("ring", "moons", "swiss_roll")


def lr_at(step: int, train_cfg: dict[str, Any]) -> float:
    """Learning rate of optimizer step ``step`` (0-based):

    lr_n = lr * min(1, (n + 1) / warmup)                       (linear warm-up)
    times, with lr_decay="cosine", lr_min/lr + (1 - lr_min/lr) (1 + cos(pi p)) / 2,
    p = (n - warmup) / (steps - warmup) in [0, 1].
    """
    lr, warm = float(train_cfg["lr"]), int(train_cfg["warmup"])
    factor = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
    if train_cfg.get("lr_decay", "none") == "cosine" and step >= warm:
        p = min(1.0, (step - warm) / max(1, train_cfg["steps"] - warm))
        floor = float(train_cfg.get("lr_min", 0.0)) / lr
        factor *= floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
    return lr * factor


def load_training_data(data_cfg: dict[str, Any], seed: int = 0
                       ) -> tuple[Tensor, Tensor | None]:
    """(images or points, labels) for a config's data section.

    Images stay as stored (uint8 NCHW, converted per batch) or float in [-1, 1]; toy data
    ("ring", "moons", "swiss_roll") is (n, 2) float.
    """
    name = data_cfg["name"]
    if name in TOY_NAMES:
        from difflab.data import toy2d

        g = torch.Generator().manual_seed(int(seed))
        pts = toy2d(name, int(data_cfg.get("n", 8192)), generator=g)
        return torch.as_tensor(pts, dtype=torch.float32), None
    from difflab.data import load_dataset

    split = data_cfg.get("split", "train")
    ds = load_dataset(name, split=split)
    res, ch = data_cfg.get("resolution"), data_cfg.get("channels")
    if (res and tuple(ds.images.shape[2:]) != (res, res)) or (ch and ds.images.shape[1] != ch):
        ds = load_dataset(name, split=split, resolution=res, channels=ch)
    images = torch.as_tensor(ds.images)
    labels = getattr(ds, "labels", None)
    return images, (None if labels is None else torch.as_tensor(labels).long())


def _to_float(x: Tensor) -> Tensor:
    """uint8 in [0, 255] -> float in [-1, 1]: x / 127.5 - 1; float passes through."""
    return x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()


class Trainer:
    """Train a denoiser from a config (see :mod:`difflab.train.config`).

    Args:
        config: a complete config (``config.preset(...)`` or ``config.load_config(...)``).
        out_dir: run directory; rank 0 writes ``checkpoint/``, ``metrics.jsonl``,
            ``samples/``, ``samples.png`` and ``loss.png`` there.
        data: optional (images, labels) overriding ``config["data"]`` (images uint8 in
            [0, 255] or float in [-1, 1]).
        net: optional network overriding ``config["net"]`` (it must still be rebuildable by
            ``difflab.nets.build(config["net"])`` for :func:`load_denoiser`).
        resume: continue from ``out_dir/checkpoint`` if it exists.
        device: "cpu", "cuda" or None (CUDA when available).
        quiet: no progress bar.
    """

    def __init__(self, config: dict[str, Any], out_dir: str | os.PathLike, *,
                 data: tuple[Tensor, Tensor | None] | None = None, net: nn.Module | None = None,
                 resume: bool = False, device: str | None = None, quiet: bool = False):
        self.config = complete(config)
        tc = self.config["train"]
        self.tc = tc
        if tc.get("threads"):
            torch.set_num_threads(int(tc["threads"]))
        self.dist = ddp.setup(device)
        self.device = self.dist.device
        self.out = Path(out_dir)
        self.quiet = quiet or not self.dist.is_main
        # data
        images, labels = data if data is not None else load_training_data(
            self.config["data"], tc["seed"])
        self.images, self.labels = images, labels
        self._check_data()
        # model, EMA, optimizer
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(tc["seed"]))
            self.net = (net if net is not None else ckpt.build_net(self.config["net"]))
        self.net = self.net.to(self.device)
        if tc["channels_last"]:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.ema_net = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.schedule = from_config(self.config["schedule"])
        self.ema = EMA(self.net, tc["ema_decay"])
        self.model = self.net
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.net, device_ids=ids)
        self.ddp_model = self.model
        if tc["compile"]:
            mode = None if tc["compile"] is True else tc["compile"]
            self.model = torch.compile(self.model, mode=mode)
        self.denoiser = Denoiser(self.model, self.schedule, self.config["prediction"],
                                 float(self.config.get("sigma_data", 0.5)))
        self.optimizer = torch.optim.AdamW(
            self.net.parameters(), lr=float(tc["lr"]), betas=tuple(tc["betas"]),
            weight_decay=float(tc["weight_decay"]), fused=self.device.type == "cuda")
        # randomness: data order from (seed, epoch); t / eps / dropout from one generator
        self.rng = torch.Generator().manual_seed(int(tc["seed"]) * 7919 + 1)
        self.step = 0
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)
        self.log = MetricsLog(self.out / "metrics.jsonl")
        self.train_seconds = 0.0
        self.solvers: dict[int, dict[str, Any]] = {}  # fitted to the final EMA weights
        if resume:
            self.try_resume()

    # -- data ----------------------------------------------------------------------------
    def _check_data(self) -> None:
        d = self.config["data"]
        if self.images.ndim == 4:
            c, h, w = self.images.shape[1:]
            res, ch = d.get("resolution"), d.get("channels")
            if (res and (h, w) != (res, res)) or (ch and c != ch):
                raise ValueError(
                    f"data {d.get('name')!r} has images of shape {(c, h, w)} (C, H, W) but the "
                    f"config says channels={ch}, resolution={res}; set data.channels / "
                    "data.resolution (and the net's in/out channels) to match")
        if self.tc["conditional"] and self.labels is None:
            raise ValueError(f"train.conditional=true needs labels, but data "
                             f"{d.get('name')!r} has none; train unconditionally")
        if len(self.images) == 0:
            raise ValueError(f"data {d.get('name')!r} is empty")

    def permutation(self, epoch: int) -> Tensor:
        """The data order of an epoch: randperm from a generator seeded by (seed, epoch)."""
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(int(self.tc["seed"]) * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.images), generator=g), epoch
        return self._perm

    def batch_indices(self, start: int, n: int) -> Tensor:
        """Indices of examples start .. start + n - 1 of the endless epoch stream."""
        N = len(self.images)
        out = []
        while n > 0:
            epoch, off = divmod(start, N)
            take = min(n, N - off)
            out.append(self.permutation(epoch)[off:off + take])
            start, n = start + take, n - take
        return torch.cat(out)

    # -- one optimizer step ------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        prec = self.tc["precision"]
        dev = self.device.type
        if prec == "auto":
            use = dev == "cuda" and torch.cuda.is_bf16_supported()
        else:
            use = prec == "bf16"
        if not use:
            return contextlib.nullcontext()
        return torch.autocast(dev, dtype=torch.bfloat16)

    def draw(self, B: int) -> dict[str, Tensor]:
        """Everything random about one global batch, in a fixed order from ``self.rng``."""
        tc = self.tc
        idx = self.batch_indices(self.step * B, B)
        x0 = _to_float(self.images[idx])
        t = sample_t(self.schedule, B, kind=tc["t_sampler"], generator=self.rng)
        eps = torch.randn(x0.shape, generator=self.rng)
        out = {"x0": x0, "t": t, "eps": eps}
        if tc["conditional"]:
            y = self.labels[idx].clone()
            drop = torch.rand(B, generator=self.rng) < float(tc["p_uncond"])
            y[drop] = int(self.config["data"]["num_classes"])  # the learned null label
            out["cond"] = y
        return out

    def train_step(self) -> float:
        """One optimizer step; returns the global-batch loss (averaged over ranks)."""
        return float(self._step())

    def _to_device(self, x: Tensor) -> Tensor:
        if self.device.type != "cuda":
            return x.to(self.device)
        return x.pin_memory().to(self.device, non_blocking=True)

    def _step(self) -> Tensor:
        """One optimizer step; the global-batch loss as a 0-d tensor on the device (reading
        it is what makes the host wait for the GPU, so the loop does that only to log)."""
        tc = self.tc
        B, accum = int(tc["batch_size"]), int(tc["grad_accum"])
        lr = lr_at(self.step, tc)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.draw(B)
        self.optimizer.zero_grad(set_to_none=True)
        micro = B // accum
        total = torch.zeros((), device=self.device)
        self.model.train()
        for m in range(accum):
            sl = slice(m * micro, (m + 1) * micro)
            local = ddp.shard(micro, self.dist)
            part = {k: self._to_device(v[sl][local]) for k, v in batch.items()}
            sync = self.dist.enabled and m < accum - 1
            ctx = self.ddp_model.no_sync() if sync else contextlib.nullcontext()
            with ctx, self.autocast():
                loss = diffusion_loss(
                    self.denoiser, part["x0"], cond=part.get("cond"), target=tc["target"],
                    weighting=tc["weighting"], gamma=float(tc["min_snr_gamma"]),
                    t=part["t"], eps=part["eps"]).mean() / accum
            loss.backward()
            total += loss.detach()
        if tc["grad_clip"] and tc["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), float(tc["grad_clip"]))
        self.optimizer.step()
        self.ema.update(self.net)
        self.step += 1
        if self.dist.enabled:
            torch.distributed.all_reduce(total)
            total /= self.dist.world_size
        return total

    # -- checkpoints ---------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        N = len(self.images)
        consumed = self.step * int(self.tc["batch_size"])
        opt_tensors, opt_rest = ckpt.flatten_optimizer_state(self.optimizer.state_dict())
        return {
            "step": self.step,
            "ema_updates": self.ema.num_updates,
            "rng": ckpt.generator_state_to_json(self.rng),
            "data_order": {"seed": int(self.tc["seed"]), "examples_seen": consumed,
                           "epoch": consumed // N, "offset": consumed % N},
            "optimizer": opt_rest,
            "train_seconds": self.train_seconds,
            "world_size": self.dist.world_size,
        }, opt_tensors

    def save(self) -> Path | None:
        """Rank 0 writes ``out_dir/checkpoint`` atomically."""
        if not self.dist.is_main:
            return None
        state, opt_tensors = self.state()
        return ckpt.save_checkpoint(
            self.out / "checkpoint", config=self.config, model=self.net.state_dict(),
            ema=self.ema.state_dict(), optimizer=opt_tensors, state=state)

    def try_resume(self) -> bool:
        path = ckpt.resolve(self.out / "checkpoint")
        if not (path / ckpt.CONFIG).is_file():
            return False
        config, tensors, state = ckpt.load_checkpoint(path, optimizer=True)
        if config["net"] != self.config["net"]:
            raise ValueError(f"cannot resume: the checkpoint in {path} was trained with net "
                             f"{config['net']} but this run asks for {self.config['net']}; use "
                             "another --out or the checkpoint's config")
        src = str(path)
        ckpt.load_weights(self.net, tensors["model"], source=src, net_type=config["net"]["type"])
        self.ema.load_state_dict(tensors["ema"], state["ema_updates"])
        self.optimizer.load_state_dict(
            ckpt.unflatten_optimizer_state(tensors["optimizer"], state["optimizer"]))
        ckpt.generator_state_from_json(self.rng, state["rng"])
        self.step = int(state["step"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        if self.dist.is_main:
            self.log.truncate_after(self.step)
        return True

    # -- samples -------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int | None = None, seed: int = 0) -> Tensor:
        """n samples from the EMA weights with the configured sampler (fixed seed)."""
        import difflab

        tc = self.tc
        n = n or int(tc["grid_size"])
        den = self.ema_denoiser()
        g = torch.Generator().manual_seed(seed)
        shape = (n,) + tuple(self.images.shape[1:])
        noise = torch.randn(shape, generator=g).to(self.device)
        cond = None
        if tc["conditional"]:
            cond = (torch.arange(n) % int(self.config["data"]["num_classes"])).to(self.device)
        return difflab.sample(den, noise, sampler=tc["sampler"], steps=int(tc["sample_steps"]),
                              cond=cond, generator=g)

    def ema_denoiser(self) -> Denoiser:
        """The EMA weights as a denoiser, with the solvers fitted to them (:meth:`fit_solvers`)."""
        self.ema.copy_to(self.ema_net)
        den = Denoiser(self.ema_net, self.schedule, self.config["prediction"],
                       float(self.config.get("sigma_data", 0.5)))
        den.solvers.update(self.solvers)
        return den

    def fit_solvers(self, checkpoint: Path) -> dict[int, dict[str, Any]]:
        """Fit a bespoke solver for each of ``train.fit_steps`` to the EMA weights (``train.
        fit_count`` calibration images, ``train.fit_iters`` L-BFGS iterations;
        :func:`difflab.samplers.bespoke.fit_solvers`) and store them in the checkpoint's
        grids.json, where ``load_denoiser`` finds them: ``difflab sample`` then uses them."""
        from difflab.samplers.bespoke import fit_solvers
        from difflab.train.grids import save_tuned_grid

        tc = self.tc
        if tc["conditional"]:
            print("train.fit_steps skipped: fitted solvers serve unconditional sampling and "
                  "this model is class-conditional", file=sys.stderr)
            return {}
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(int(tc["seed"]) + 1000)
        noise = torch.randn((int(tc["fit_count"]),) + tuple(self.images.shape[1:]),
                            generator=g).to(self.device)
        den = self.ema_denoiser()

        def log(msg: str) -> None:
            if not self.quiet:
                print(msg, file=sys.stderr)

        fits = fit_solvers(den, tc["fit_steps"], noise, max_iter=int(tc["fit_iters"]),
                           log=log)
        for fit in fits.values():
            fit["seed"] = int(tc["seed"]) + 1000
            save_tuned_grid(checkpoint, fit, ema=True)
        self.solvers.update(fits)
        log(f"fitted bespoke solvers for {sorted(fits)} steps in "
            f"{(time.perf_counter() - t0) / 60:.1f} min -> {checkpoint}/grids.json")
        return fits

    def save_samples(self, path: Path) -> Path:
        x = self.sample()
        if x.ndim == 2:
            return save_points(x, path, extent=3.0)
        nrow = int(self.config["data"]["num_classes"]) if self.tc["conditional"] else None
        return save_grid(x, path, nrow=nrow, scale=2 if x.shape[-1] <= 32 else 1)

    # -- the loop --------------------------------------------------------------------------
    def run(self, steps: int | None = None, max_minutes: float | None = None) -> dict[str, Any]:
        """Train until ``steps`` (default train.steps) or the wall-clock budget (default
        train.max_minutes; resumed runs count time already spent); rank 0 saves the final
        checkpoint, a sample grid and the loss plot. Returns a summary dict."""
        tc = self.tc
        total = int(steps if steps is not None else tc["steps"])
        budget = max_minutes if max_minutes is not None else tc.get("max_minutes")
        budget_s = float(budget) * 60 if budget else math.inf
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(self.config, indent=2))
            self.log.truncate_after(self.step)  # a fresh run starts a fresh log
        bar = ProgressBar(total, enabled=not self.quiet,
                          budget_s=budget_s - self.train_seconds)
        B = int(tc["batch_size"])
        t_last, n_last, loss = time.perf_counter(), self.step, float("nan")
        last_ips = 0.0
        start_seconds = self.train_seconds
        t_start = time.perf_counter()
        stopped_by = "steps"
        log_every = int(tc["log_every"])
        loss_t: Tensor | None = None
        while self.step < total:
            loss_t = self._step()
            logged = self.step % log_every == 0 or self.step == total
            if logged or self.device.type == "cpu" or bar.tty:
                loss = float(loss_t)  # waits for the device: only when it is shown or free
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"loss became {loss} by step {self.step} (on a GPU it is read every "
                        "train.log_every steps); lower train.lr or enable train.grad_clip")
            self.train_seconds = start_seconds + time.perf_counter() - t_start
            if logged:
                now = time.perf_counter()
                ips = (self.step - n_last) * B / max(now - t_last, 1e-9)
                t_last, n_last = now, self.step
                if self.dist.is_main:
                    self.log.write({"step": self.step, "loss": loss, "lr": lr_at(self.step - 1, tc),
                                    "images_per_s": ips, "seconds": self.train_seconds})
                bar.update(self.step, loss, ips)
                last_ips = ips
            elif bar.tty:  # an interactive terminal gets every step
                bar.update(self.step, loss, last_ips)
            if self.dist.is_main and tc["sample_every"] and self.step % tc["sample_every"] == 0:
                self.save_samples(self.out / "samples" / f"step_{self.step:07d}.png")
            if tc["ckpt_every"] and self.step % tc["ckpt_every"] == 0:
                self.save()
            if self._out_of_time(budget_s):
                stopped_by = "time"
                break
        bar.close()
        if loss_t is not None:
            loss = float(loss_t)
        summary = {"steps": self.step, "loss": loss, "seconds": self.train_seconds,
                   "stopped_by": stopped_by, "out": str(self.out)}
        if self.dist.is_main:
            summary["checkpoint"] = str(self.save())
            if tc["fit_steps"]:
                summary["fitted"] = sorted(self.fit_solvers(Path(summary["checkpoint"])))
            if tc["grid_size"]:
                summary["samples"] = str(self.save_samples(self.out / "samples.png"))
            records = read_metrics(self.log.path) if self.log.path.is_file() else []
            if records:
                summary["loss_plot"] = str(plot_loss(records, self.out / "loss.png"))
        return summary

    def _out_of_time(self, budget_s: float) -> bool:
        if math.isinf(budget_s):
            return False
        if not self.dist.enabled:
            return self.train_seconds >= budget_s
        # rank 0 decides, so that every rank stops at the same step
        flag = torch.tensor([float(self.train_seconds >= budget_s)], device=self.device)
        torch.distributed.broadcast(flag, 0)
        return bool(flag.item())

    def close(self) -> None:
        ddp.cleanup(self.dist)


def train(config: dict[str, Any], out_dir: str | os.PathLike, **kw: Any) -> dict[str, Any]:
    """Build a :class:`Trainer`, run it, clean up; returns the summary."""
    run_kw = {k: kw.pop(k) for k in ("steps", "max_minutes") if k in kw}
    trainer = Trainer(config, out_dir, **kw)
    try:
        return trainer.run(**run_kw)
    finally:
        trainer.close()
