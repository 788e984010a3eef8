"""The one training loop, generic over an objective and its modules: AdamW with linear warm-up
(and optional cosine decay), gradient clipping and accumulation, EMA of the declared modules,
mixed precision, DDP, one epoch order, one exact resume path.

One optimizer step n uses the global batch of B examples

    indices    = the next B entries of the epoch stream      (data.EpochOrder: seed, epoch)
    batch      = their named fields ("image" float in [-1, 1], "label", ...)
    prepared   = objective.prepare(batch, rng)                 (all randomness, generator rng)
    L          = mean over micro-batches and ranks of objective.loss(modules, part)

The randomness is drawn for the *global* batch on every rank from CPU generators and then cut
into micro-batches (gradient accumulation) and rank shards, so the update does not depend on
the number of processes or micro-batches (up to float summation order), and the generator
state plus the step count are all a resume needs to continue bit for bit.

Modules: the objective names which it trains (``trainable``: in the optimizer, with gradients,
an EMA if listed in ``ema``, saved in the checkpoint) and which it only reads (``frozen``: no
gradients, optimizer state or EMA, not saved: the checkpoint references them by the SHA-256 of
their weights). The diffusion model (:class:`~difflab.objectives.DiffusionObjective`), the
noise-aware classifier (:mod:`difflab.train.classifier`) and the FID feature networks
(:mod:`difflab.metrics.train_features`) all train here.

The library never prints and never sets the process's thread count: progress goes to the
caller's ``callback(record)`` (records: :mod:`difflab.train.monitor`), and ``train.threads``
is applied by the caller (the command line).

On a GPU the loop never waits for the device inside a step: batches go up from pinned memory
without blocking, the loss is read back (and checked for NaN / inf) only every ``log_every``
steps, the EMA is one multi-tensor update, AdamW is the fused kernel, and ``train.compile`` /
``train.channels_last`` compile the trained modules and store them NHWC. Checkpoints always
hold the plain modules' weights (no ``torch.compile`` / DDP key prefixes).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import difflab.files as files
import difflab.train.checkpoint as ckpt
import difflab.train.ddp as ddp
from difflab.data.dataset import EpochOrder, take
from difflab.denoiser import Condition
from difflab.objectives import (
    ClassifierObjective,
    DiffusionObjective,
    FeatureObjective,
    HybridObjective,
    Objective,
    VLBObjective,
    get_weighting,
)
from difflab.schedules import from_config
from difflab.train.config import LOOP_DEFAULTS, check_loop, complete, model_identity
from difflab.train.ema import EMA
from difflab.train.monitor import MetricsLog, plot_loss, read_metrics, save_grid, save_points

__all__ = ["Trainer", "train", "objective_from_config", "load_training_data", "lr_at",
           "TOY_NAMES"]

TOY_NAMES = ("ring", "moons", "swiss_roll")
Callback = Callable[[dict[str, Any]], None]


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


#: objective factories by config kind: ``factory(config) -> Objective``
OBJECTIVES: dict[str, Callable[[dict[str, Any]], Objective]] = {}
#: modules that register the kinds not built in, imported when a config first asks for one
OBJECTIVE_MODULES: dict[str, str] = {"controlnet": "difflab.train.controlnet",
                                     "autoencoder": "difflab.train.t2i",
                                     "text_to_image": "difflab.train.t2i",
                                     "consistency": "difflab.train.distill"}


def register_objective(kind: str, factory: Callable[[dict[str, Any]], Objective]) -> None:
    """Make configs with ``"kind": kind`` train ``factory(config)`` (a module above the
    objectives layer registers an objective that needs samplers, e.g. a teacher's ODE step)."""
    OBJECTIVES[kind] = factory


def objective_from_config(config: dict[str, Any]) -> Objective:
    """The objective a config trains: by ``config["kind"]`` (default "diffusion")."""
    kind = config.get("kind", "diffusion")
    if kind not in OBJECTIVES and kind in OBJECTIVE_MODULES:
        importlib.import_module(OBJECTIVE_MODULES[kind])
    if kind not in OBJECTIVES:
        raise ValueError(f"unknown config kind {kind!r}; valid: {sorted(OBJECTIVES)}, or pass "
                         "objective=")
    return OBJECTIVES[kind](config)


def _diffusion_objective(config: dict[str, Any]) -> Objective:
    tc = config["train"]
    schedule, parameterization = ckpt.denoiser_parts(config)
    weighting = get_weighting(tc.get("weighting", "none"),
                              gamma=float(tc.get("min_snr_gamma", 5.0)),
                              sigma_data=float(config.get("sigma_data", 0.5)))
    if tc.get("objective", "simple") == "vlb":
        return VLBObjective(schedule, parameterization, steps=tc.get("vlb_steps"),
                            second_order=float(tc.get("second_order", 0.0)))
    if tc.get("objective", "simple") == "hybrid":
        return HybridObjective(schedule, parameterization, target=tc.get("target"),
                               weighting=weighting, lambda_vlb=float(tc.get("lambda_vlb", 0.001)))
    return DiffusionObjective(
        schedule, parameterization, target=tc.get("target"), weighting=weighting,
        t_sampler=tc.get("t_sampler", "uniform"), conditional=bool(tc.get("conditional")),
        p_uncond=float(tc.get("p_uncond", 0.0)))


register_objective("diffusion", _diffusion_objective)
register_objective("classifier", lambda config: ClassifierObjective(
    from_config(config["schedule"]), ema=float(config["train"].get("ema_decay", 0.0)) > 0))
register_objective("feature", lambda config: FeatureObjective(
    int(config["train"].get("shift", 2)), bool(config["train"].get("flip", False))))


def _fields(data: Any) -> dict[str, Tensor | None]:
    """Named data fields from a dict, or from an (images, labels) pair."""
    if isinstance(data, Mapping):
        return dict(data)
    images, labels = data
    return {"image": torch.as_tensor(images),
            "label": None if labels is None else torch.as_tensor(labels).long()}


def _complete(config: dict[str, Any]) -> dict[str, Any]:
    """A diffusion config completed by :func:`~difflab.train.config.complete`; another kind's
    ``train`` section gets the loop defaults it lacks, checked."""
    if config.get("kind", "diffusion") == "diffusion":
        return complete(config)
    cfg = copy.deepcopy(config)
    cfg["train"] = {**LOOP_DEFAULTS, **cfg.get("train", {})}
    check_loop(cfg["train"])
    return cfg


class Trainer:
    """Train the modules of an objective (see the module docstring).

    Args:
        config: a config with a "train" section (the loop options ``LOOP_DEFAULTS``) and a
            "data" section; a diffusion config (``config.preset(...)``,
            ``config.load_config(...)``) is completed, other kinds come complete from their
            builders (:func:`difflab.train.classifier.classifier_config`).
        out_dir: run directory; rank 0 writes ``checkpoint/``, ``metrics.jsonl``, ``config.json``
            (and for a diffusion model ``samples/``, ``samples.png``, ``loss.png``) there.
            None: nothing is written (a run in memory).
        data: named fields ``{"image": ..., "label": ...}`` (images uint8 in [0, 255] or float
            in [-1, 1]; labels long), or an (images, labels) pair; default: loaded from
            ``config["data"]``.
        net: the network ``"net"`` (default: built from ``config["net"]`` with seed
            ``train.seed``; it must be rebuildable from ``config["net"]`` to be loaded back).
        modules: further named modules (or ``"net"``): the objective's frozen ones must be here.
        objective: default :func:`objective_from_config`.
        references: for frozen modules, the path they were loaded from (recorded in the
            checkpoint beside their SHA-256).
        resume: continue from ``out_dir/checkpoint`` if it exists (bit-identically).
        device: "cpu", "cuda" or None (CUDA when available).
        callback: receives the progress records (:mod:`difflab.train.monitor`); rank 0 only.
    """

    def __init__(self, config: dict[str, Any], out_dir: str | os.PathLike | None = None, *,
                 data: Any = None, net: nn.Module | None = None,
                 modules: Mapping[str, nn.Module] | None = None,
                 objective: Objective | None = None,
                 references: Mapping[str, str | os.PathLike | None] | None = None,
                 resume: bool = False, device: str | None = None,
                 callback: Callback | None = None):
        self.config = _complete(config)
        self.kind = self.config.get("kind", "diffusion")
        tc = self.tc = self.config["train"]
        self.dist = ddp.setup(device)
        self.device = self.dist.device
        self.out = Path(out_dir) if out_dir is not None else None
        self.callback = callback if self.dist.is_main else None
        self.objective = objective if objective is not None else objective_from_config(
            self.config)
        # data
        self.fields = _fields(data if data is not None else load_training_data(
            self.config["data"], tc["seed"]))
        self._check_data()
        self.order = EpochOrder(len(self.fields["image"]), int(tc["seed"]))
        # modules: trained ones (optimizer, EMA, checkpoint) and frozen ones (read only)
        obj = self.objective
        given = dict(modules or {})
        if net is not None:
            given["net"] = net
        declared = set(obj.trainable) | set(obj.frozen) | set(obj.ema_targets)
        unknown = sorted(set(given) - declared)
        if unknown:
            raise ValueError(f"modules {unknown} are not used by the {obj.kind} objective; it "
                             f"trains {list(obj.trainable)} and reads {list(obj.frozen)}")
        owned = getattr(obj, "owned_modules", None)  # e.g. a learned schedule (VLB)
        for name, m in (owned() if owned is not None else {}).items():
            given.setdefault(name, m)
        for name in obj.frozen:
            if name not in given:
                raise ValueError(f"the {obj.kind} objective reads a frozen module {name!r}; "
                                 "pass it in modules=")
        self.modules: dict[str, nn.Module] = {}
        for name in obj.trainable:
            if name not in given:
                if not isinstance(self.config.get(name), dict):
                    raise ValueError(f"no module {name!r}: pass it in modules= or give its "
                                     f"config as config[{name!r}]")
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(int(tc["seed"]))
                    given[name] = ckpt.build_net(self.config[name])
            m = given[name].to(self.device)
            if tc["channels_last"]:
                m = m.to(memory_format=torch.channels_last)
            self.modules[name] = m
        for name in obj.frozen:
            self.modules[name] = given[name].to(self.device).eval().requires_grad_(False)
        self.references = {
            name: {"path": None if (references or {}).get(name) is None
                   else str((references or {})[name]),
                   "sha256": ckpt.module_sha256(self.modules[name])}
            for name in obj.frozen}
        use_ema = float(tc["ema_decay"]) > 0
        self.emas: dict[str, EMA] = {name: EMA(self.modules[name], tc["ema_decay"])
                                     for name in obj.ema if use_ema}
        self._ema_copies: dict[str, nn.Module] = {}
        for target, source in obj.ema_targets.items():  # objectives reading EMA weights
            if source not in self.emas:
                raise ValueError(f"ema target {target!r} needs an EMA of {source!r}; list it "
                                 "in the objective's ema and set train.ema_decay > 0")
            self.modules[target] = self.ema_module(source)
        # what the objective calls: trained modules through DDP and torch.compile
        self.forward_modules: dict[str, nn.Module] = dict(self.modules)
        self._ddp: list[nn.Module] = []
        for name in obj.trainable:
            m = self.modules[name]
            if self.dist.enabled:
                from torch.nn.parallel import DistributedDataParallel

                ids = [self.device.index] if self.device.type == "cuda" else None
                m = DistributedDataParallel(m, device_ids=ids)
                self._ddp.append(m)
            if tc["compile"]:
                m = torch.compile(m, mode=None if tc["compile"] is True else tc["compile"])
            self.forward_modules[name] = m
        self.params = [p for name in obj.trainable for p in self.modules[name].parameters()]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=float(tc["lr"]), betas=tuple(tc["betas"]),
            weight_decay=float(tc["weight_decay"]), fused=self.device.type == "cuda")
        # randomness: data order from (seed, epoch); everything else from one generator
        self.rng = torch.Generator().manual_seed(int(tc["seed"]) * 7919 + 1)
        self.step = 0
        self.log = MetricsLog(self.out / "metrics.jsonl") if self.out is not None else None
        self.train_seconds = 0.0
        self.train_cpu_seconds = 0.0  # CPU time of this process spent training (all threads)
        self.fits: dict[int, Any] = {}  # difflab.fitting.Fit by steps, fitted to the EMA weights
        self.last_logs: dict[str, Any] = {}  # the objective's logs of the last step
        if resume:
            self.try_resume()

    # -- convenient names ---------------------------------------------------------------------
    @property
    def net(self) -> nn.Module:
        """The plain module ``"net"`` (no DDP / compile wrapper)."""
        return self.modules["net"]

    @property
    def model(self) -> nn.Module:
        """``"net"`` as the objective calls it (through DDP / torch.compile)."""
        return self.forward_modules["net"]

    @property
    def ema(self) -> EMA | None:
        """The EMA of ``"net"`` (None without one)."""
        return self.emas.get("net")

    @property
    def images(self) -> Tensor:
        return self.fields["image"]

    @property
    def labels(self) -> Tensor | None:
        return self.fields.get("label")

    @property
    def schedule(self) -> Any:
        return getattr(self.objective, "schedule", None)

    @property
    def denoiser(self) -> Any:
        """The trained network as a denoiser (diffusion objectives)."""
        return self.objective.denoiser(self.model)

    def _emit(self, record: dict[str, Any]) -> None:
        if self.callback is not None:
            self.callback(record)

    # -- data ----------------------------------------------------------------------------
    def _check_data(self) -> None:
        d = self.config.get("data", {})
        images = self.fields.get("image")
        if images is None or len(images) == 0:
            raise ValueError(f"data {d.get('name')!r} is empty")
        if images.ndim == 4:
            c, h, w = images.shape[1:]
            res, ch = d.get("resolution"), d.get("channels")
            if (res and (h, w) != (res, res)) or (ch and c != ch):
                raise ValueError(
                    f"data {d.get('name')!r} has images of shape {(c, h, w)} (C, H, W) but the "
                    f"config says channels={ch}, resolution={res}; set data.channels / "
                    "data.resolution (and the net's in/out channels) to match")
        self.objective.check_data(self.fields, d.get("name"))
        labels, nc = self.fields.get("label"), d.get("num_classes")
        if labels is not None and nc and "label" in self.objective.fields and len(labels) and (
                int(labels.min()) < 0 or int(labels.max()) >= int(nc)):
            raise ValueError(f"labels must lie in 0..{int(nc) - 1} (data.num_classes={nc}), got "
                             f"{int(labels.min())}..{int(labels.max())}")

    def permutation(self, epoch: int) -> Tensor:
        """The data order of an epoch (:class:`~difflab.data.dataset.EpochOrder`)."""
        return self.order.permutation(epoch)

    def batch_indices(self, start: int, n: int) -> Tensor:
        """Indices of examples start .. start + n - 1 of the endless epoch stream."""
        return self.order.indices(start, n)

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

    def draw(self, B: int) -> dict[str, Any]:
        """Everything about the global batch of this step: its fields (examples ``step * B``
        .. of the epoch stream) and the objective's randomness from ``self.rng``. An objective
        whose randomness depends on the iteration (``uses_step = True``: a consistency model's
        discretisation N(k), ECT's stage) gets ``step=`` the 0-based optimizer step, the
        counter a checkpoint restores, so a resumed run draws the same."""
        batch = take(self.fields, self.batch_indices(self.step * B, B))
        if getattr(self.objective, "uses_step", False):
            return self.objective.prepare(batch, self.rng, step=self.step)
        return self.objective.prepare(batch, self.rng)

    def train_step(self) -> float:
        """One optimizer step; returns the global-batch loss (averaged over ranks)."""
        return float(self._step())

    def _to_device(self, x: Any) -> Any:
        if isinstance(x, Condition):
            return x.to(self.device)
        if self.device.type != "cuda":
            return x.to(self.device)
        return x.pin_memory().to(self.device, non_blocking=True)

    def _step(self) -> Tensor:
        """One optimizer step; the global-batch loss as a 0-d tensor on the device (reading
        it is what makes the host wait for the GPU, so the loop does that only to log). The
        objective's logs, averaged over micro-batches, are left in ``self.last_logs``."""
        tc = self.tc
        B, accum = int(tc["batch_size"]), int(tc["grad_accum"])
        lr = lr_at(self.step, tc)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.draw(B)
        self.optimizer.zero_grad(set_to_none=True)
        micro = B // accum
        total = torch.zeros((), device=self.device)
        logs: dict[str, Any] = {}
        for name in self.objective.trainable:
            self.forward_modules[name].train()
        for m in range(accum):
            sl = slice(m * micro, (m + 1) * micro)
            local = ddp.shard(micro, self.dist)
            part = {k: self._to_device(v[sl][local]) for k, v in batch.items()}
            with contextlib.ExitStack() as stack:
                if self.dist.enabled and m < accum - 1:
                    for wrapped in self._ddp:
                        stack.enter_context(wrapped.no_sync())
                with self.autocast():
                    loss, part_logs = self.objective.loss(self.forward_modules, part)
                    loss = loss / accum
                loss.backward()
            total += loss.detach()
            for k, v in part_logs.items():
                v = v.detach() if isinstance(v, Tensor) else float(v)
                logs[k] = logs.get(k, 0.0) + v / accum
        if tc["grad_clip"] and tc["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(self.params, float(tc["grad_clip"]))
        self.optimizer.step()
        for name, ema in self.emas.items():
            ema.update(self.modules[name])
        for target, source in self.objective.ema_targets.items():
            self.emas[source].copy_to(self.modules[target])
        self.step += 1
        if self.dist.enabled:
            torch.distributed.all_reduce(total)
            total /= self.dist.world_size
        self.last_logs = logs
        return total

    # -- checkpoints ---------------------------------------------------------------------
    def _component_config(self, name: str) -> dict[str, Any]:
        cfg = self.config.get(name)
        if isinstance(cfg, dict):
            return dict(cfg)
        return dict(getattr(self.modules[name], "config", None) or {})

    def state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """(state.json, optimizer tensors) of the run now."""
        N = len(self.fields["image"])
        consumed = self.step * int(self.tc["batch_size"])
        opt_tensors, opt_rest = ckpt.flatten_optimizer_state(self.optimizer.state_dict())
        return {
            "step": self.step,
            "ema_updates": {name: ema.num_updates for name, ema in self.emas.items()},
            "rng": ckpt.generator_state_to_json(self.rng),
            "data_order": {"seed": int(self.tc["seed"]), "examples_seen": consumed,
                           "epoch": consumed // N, "offset": consumed % N},
            "optimizer": opt_rest,
            "modules": {"trainable": list(self.objective.trainable),
                        "frozen": list(self.objective.frozen)},
            "train_seconds": self.train_seconds,
            "train_cpu_seconds": self.train_cpu_seconds,
            "world_size": self.dist.world_size,
        }, opt_tensors

    def save(self) -> Path | None:
        """Rank 0 writes ``out_dir/checkpoint`` atomically: the trained modules (and their
        EMA), the schedule's config, the optimizer and the training state; frozen modules
        only as references."""
        if not self.dist.is_main or self.out is None:
            return None
        state, opt_tensors = self.state()
        components = {}
        for name in self.objective.trainable:
            ema = self.emas.get(name)
            components[name] = ckpt.Component(self._component_config(name),
                                               self.modules[name].state_dict(),
                                               None if ema is None else ema.state_dict())
        if isinstance(self.config.get("schedule"), dict) and "schedule" not in components:
            components["schedule"] = ckpt.Component(dict(self.config["schedule"]))
        extra = getattr(self.objective, "checkpoint_components", None)  # untrained parts:
        for name, cfg in (extra() if extra is not None else {}).items():  # a config, or a
            components.setdefault(name, cfg if isinstance(cfg, ckpt.Component)  # Component
                                  else ckpt.Component(dict(cfg)))        # with fixed weights
        path = ckpt.save(self.out / "checkpoint", kind=self.kind, config=self.config,
                         components=components, optimizer=opt_tensors, state=state,
                         references=self.references)
        self._emit({"event": "checkpoint", "step": self.step, "path": str(path)})
        return path

    def try_resume(self) -> bool:
        """Continue from ``out_dir/checkpoint`` (either layout) if there is one; raises a
        ValueError when it was trained for another model (kind, network, schedule,
        parameterisation) or with other frozen modules."""
        if self.out is None:
            return False
        path = ckpt.resolve(self.out / "checkpoint")
        if not ckpt.is_checkpoint(path):
            return False
        ck = ckpt.read(path)
        saved = model_identity({"kind": ck.kind, **ck.config})
        wanted = model_identity(self.config)
        if saved != wanted:
            diff = "; ".join(f"{k}: checkpoint {saved[k]!r} vs this run {wanted[k]!r}"
                             for k in wanted if saved.get(k) != wanted[k])
            raise ValueError(f"cannot resume: the checkpoint in {path} was trained for another "
                             f"model ({diff}); use another output directory or the "
                             "checkpoint's config")
        for name, ref in self.references.items():
            old = ck.references.get(name, {}).get("sha256")
            if old != ref["sha256"]:
                raise ValueError(f"cannot resume: frozen module {name!r} is not the one the "
                                 f"checkpoint in {path} was trained with (sha256 {old} there, "
                                 f"{ref['sha256']} here)")
        state = ck.state()
        if "step" not in state or "optimizer" not in state:
            raise ValueError(f"cannot resume from {path}: it holds no training state "
                             f"({ckpt.STATE} with the optimizer's); it can only be loaded")
        for name in self.objective.trainable:
            ckpt.load_weights(self.modules[name], ck.weights(name),
                              source=str(ck.weights_file(name)),
                              net_type=str(self._component_config(name).get("type")))
        updates = state.get("ema_updates", 0)
        for name, ema in self.emas.items():
            n = updates.get(name, 0) if isinstance(updates, dict) else int(updates)
            ema.load_state_dict(ck.weights(name, ema=True), n)
        self.optimizer.load_state_dict(
            ckpt.unflatten_optimizer_state(ck.optimizer(), state["optimizer"]))
        ckpt.generator_state_from_json(self.rng, state["rng"])
        self.step = int(state["step"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.train_cpu_seconds = float(state.get("train_cpu_seconds", 0.0))
        for target, source in self.objective.ema_targets.items():
            self.emas[source].copy_to(self.modules[target])
        if self.dist.is_main and self.log is not None:
            self.log.truncate_after(self.step)
        return True

    # -- EMA weights, samples, fitted solvers (diffusion) -----------------------------------
    def ema_module(self, name: str = "net") -> nn.Module:
        """A copy of module ``name`` holding its EMA weights now (no gradients, eval mode;
        the same copy on every call)."""
        if name not in self._ema_copies:
            self._ema_copies[name] = copy.deepcopy(self.modules[name]).eval().requires_grad_(
                False)
        self.emas[name].copy_to(self._ema_copies[name])
        return self._ema_copies[name]

    def ema_denoiser(self) -> Any:
        """The EMA weights as a denoiser (its fitted solvers: ``self.fits``)."""
        return self.objective.denoiser(self.ema_module("net"))

    @torch.no_grad()
    def sample(self, n: int | None = None, seed: int = 0) -> Tensor:
        """n samples from the EMA weights with ``train.sampler`` (auto: the solver fitted for
        ``train.sample_steps`` when there is one, else the default) and a fixed seed."""
        import difflab

        tc = self.tc
        n = n or int(tc["grid_size"])
        den = self.ema_denoiser()
        g = torch.Generator().manual_seed(seed)
        shape = (n,) + tuple(self.images.shape[1:])
        noise = torch.randn(shape, generator=g).to(self.device)
        cond = None
        if getattr(self.objective, "conditional", False):
            cond = (torch.arange(n) % int(self.config["data"]["num_classes"])).to(self.device)
        fit = self.fits.get(int(tc["sample_steps"])) if tc["sampler"] == "auto" else None
        steps = None if fit is not None else int(tc["sample_steps"])
        # auto without a fit: the classical default, not the probe (the weights change
        # between monitoring grids, so each grid would pay for a new probe)
        sampler = difflab.samplers.DEFAULT if tc["sampler"] == "auto" and fit is None \
            else tc["sampler"]
        return difflab.sample(den, noise, sampler=sampler, steps=steps, fit=fit,
                              cond=cond, generator=g)

    def fit_solvers(self, checkpoint: Path) -> dict[int, Any]:
        """Fit a bespoke solver for each of ``train.fit_steps`` to the EMA weights (``train.
        fit_count`` calibration images, ``train.fit_iters`` L-BFGS iterations;
        :func:`difflab.fitting.fit_solvers`) and store them with the checkpoint
        (:func:`difflab.fitting.save_fit`): sampling the checkpoint then uses them."""
        from difflab.fitting import fit_solvers, save_fit

        tc = self.tc
        if getattr(self.objective, "conditional", False):
            self._emit({"event": "message", "text": "train.fit_steps skipped: this model is "
                        "class-conditional, and a fit serves one guidance weight; fit the one "
                        "you sample with: difflab tune-grid RUN --fast --cfg W"})
            return {}
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(int(tc["seed"]) + 1000)
        noise = torch.randn((int(tc["fit_count"]),) + tuple(self.images.shape[1:]),
                            generator=g).to(self.device)

        def log(msg: str) -> None:
            self._emit({"event": "message", "text": msg})

        fits = fit_solvers(self.ema_denoiser(), tc["fit_steps"], noise,
                           max_iter=int(tc["fit_iters"]), log=log)
        fits = {k: fit.with_(seed=int(tc["seed"]) + 1000) for k, fit in fits.items()}
        weights = ckpt.weights_file(checkpoint, ema=True)
        for fit in fits.values():
            save_fit(checkpoint, fit, ema=True, weights=weights)
        self.fits.update(fits)
        log(f"fitted bespoke solvers for {sorted(fits)} steps in "
            f"{(time.perf_counter() - t0) / 60:.1f} min -> {checkpoint}")
        return fits

    def save_samples(self, path: Path) -> Path:
        x = self.sample()
        if x.ndim == 2:
            out = save_points(x, path, extent=3.0)
        else:
            nrow = int(self.config["data"]["num_classes"]) if getattr(
                self.objective, "conditional", False) else None
            out = save_grid(x, path, nrow=nrow, scale=2 if x.shape[-1] <= 32 else 1)
        self._emit({"event": "samples", "step": self.step, "path": str(out)})
        return out

    # -- the loop --------------------------------------------------------------------------
    def run(self, steps: int | None = None, max_minutes: float | None = None) -> dict[str, Any]:
        """Train until ``steps`` (default train.steps), the wall-clock budget (default
        train.max_minutes) or the CPU budget (train.max_cpu_minutes: this process's CPU time,
        all threads; on rank 0 under torchrun) is spent; resumed runs count the time already
        spent. Rank 0 saves the final
        checkpoint (and for a diffusion model fits the solvers, saves a sample grid and the
        loss plot). Returns a summary dict."""
        tc = self.tc
        diffusion = isinstance(self.objective, DiffusionObjective)
        total = int(steps if steps is not None else tc["steps"])
        budget = max_minutes if max_minutes is not None else tc.get("max_minutes")
        budget_s = float(budget) * 60 if budget else math.inf
        cpu_budget = tc.get("max_cpu_minutes")
        cpu_budget_s = float(cpu_budget) * 60 if cpu_budget else math.inf
        if self.dist.is_main and self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            files.write_json(self.out / "config.json", self.config, what="run config")
            self.log.truncate_after(self.step)  # a fresh run starts a fresh log
        self._emit({"event": "start", "step": self.step, "total": total,
                    "budget_s": None if math.isinf(budget_s) else budget_s - self.train_seconds})
        B = int(tc["batch_size"])
        t_last, n_last, loss = time.perf_counter(), self.step, float("nan")
        start_seconds, start_cpu = self.train_seconds, self.train_cpu_seconds
        t_start, c_start = time.perf_counter(), time.process_time()
        stopped_by = "steps"
        log_every = int(tc["log_every"])
        sample_every = int(tc.get("sample_every") or 0) if diffusion else 0
        loss_t: Tensor | None = None
        while self.step < total:
            loss_t = self._step()
            logs = self.last_logs
            logged = self.step % log_every == 0 or self.step == total
            if logged or self.device.type == "cpu":
                loss = _check_finite(loss_t, self.step)  # waits for the device: only when
                # the loss is shown or the device is the CPU
            self.train_seconds = start_seconds + time.perf_counter() - t_start
            self.train_cpu_seconds = start_cpu + time.process_time() - c_start
            if logged:
                now = time.perf_counter()
                ips = (self.step - n_last) * B / max(now - t_last, 1e-9)
                t_last, n_last = now, self.step
                record = {"step": self.step, "loss": loss, "lr": lr_at(self.step - 1, tc),
                          "images_per_s": ips, "seconds": self.train_seconds,
                          "cpu_seconds": self.train_cpu_seconds,
                          **{k: float(v) for k, v in logs.items()}}
                if self.dist.is_main and self.log is not None:
                    self.log.write(record)
                self._emit({"event": "log", **record})
            self._emit({"event": "step", "step": self.step, "total": total,
                        "seconds": self.train_seconds})
            if (self.dist.is_main and self.out is not None and sample_every
                    and self.step % sample_every == 0):
                self.save_samples(self.out / "samples" / f"step_{self.step:07d}.png")
            if tc["ckpt_every"] and self.step % tc["ckpt_every"] == 0:
                _check_finite(loss_t, self.step)  # never save a diverged state
                self.save()
            if self._out_of_time(budget_s, cpu_budget_s):
                stopped_by = "time"
                break
        if loss_t is not None:
            loss = _check_finite(loss_t, self.step)
        summary = {"steps": self.step, "loss": loss, "seconds": self.train_seconds,
                   "cpu_seconds": self.train_cpu_seconds,
                   "stopped_by": stopped_by, "out": None if self.out is None else str(self.out)}
        if self.dist.is_main and self.out is not None:
            summary["checkpoint"] = str(self.save())
            if diffusion and tc.get("fit_steps"):
                summary["fitted"] = sorted(self.fit_solvers(Path(summary["checkpoint"])))
            if diffusion and tc.get("grid_size"):
                summary["samples"] = str(self.save_samples(self.out / "samples.png"))
            records = read_metrics(self.log.path) if self.log.path.is_file() else []
            if records:
                summary["loss_plot"] = str(plot_loss(records, self.out / "loss.png"))
        self._emit({"event": "end", "summary": summary})
        return summary

    def _out_of_time(self, budget_s: float, cpu_budget_s: float = math.inf) -> bool:
        if math.isinf(budget_s) and math.isinf(cpu_budget_s):
            return False
        spent = self.train_seconds >= budget_s or self.train_cpu_seconds >= cpu_budget_s
        if not self.dist.enabled:
            return spent
        # rank 0 decides, so that every rank stops at the same step
        flag = torch.tensor([float(spent)], device=self.device)
        torch.distributed.broadcast(flag, 0)
        return bool(flag.item())

    def close(self) -> None:
        ddp.cleanup(self.dist)


def _check_finite(loss_t: Tensor, step: int) -> float:
    """The loss as a float; FloatingPointError when it is NaN or infinite (the run stops, the
    last checkpoint saved before stays as it was)."""
    loss = float(loss_t)
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"training stopped: the loss became {loss} by step {step} (on a GPU it is read "
            "every train.log_every steps and before each checkpoint); the last checkpoint is "
            "intact. Lower train.lr or enable train.grad_clip, then resume")
    return loss


def train(config: dict[str, Any], out_dir: str | os.PathLike | None = None,
          **kw: Any) -> dict[str, Any]:
    """Build a :class:`Trainer` (keyword arguments as its), run it (``steps``,
    ``max_minutes``), clean up; returns the summary."""
    run_kw = {k: kw.pop(k) for k in ("steps", "max_minutes") if k in kw}
    trainer = Trainer(config, out_dir, **kw)
    try:
        return trainer.run(**run_kw)
    finally:
        trainer.close()
