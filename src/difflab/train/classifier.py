"""Train the noise-aware classifier p(y | x_t, t) used by classifier guidance
(Dhariwal & Nichol 2021, Sec. 4.1 and App. C; Song et al. 2021, Sec. 5 / Eq. 48).

The classifier sees images noised by the *diffusion model's* forward process,

    t ~ U(0, 1],  eps ~ N(0, I),  x_t = alpha_t x_0 + sigma_t eps      (difflab.process.q_sample)
    loss = -log softmax(f(x_t, net_time(t)))_y                           (cross-entropy)

so that grad_x log p(y | x_t, t) is meaningful at every noise level a sampler visits. At t -> 1
x_t carries no information about y and the best accuracy falls to the class prior (chance);
at small t it is an ordinary image classifier.

A classifier checkpoint is a difflab checkpoint directory (the atomic safetensors + JSON
writer of :mod:`difflab.train.checkpoint`) whose ``config.json`` has ``"kind": "classifier"``,
``"net"`` (rebuilt by :func:`difflab.nets.build`), ``"schedule"`` (the noise schedule it was
trained for: guidance refuses a diffusion model with another one), ``"data"`` (name,
resolution, channels, num_classes) and ``"train"``. ``load_classifier`` reads it back.

Command line (registered by :func:`register`)::

    difflab train-classifier --like runs/cond --out runs/clf --max-minutes 10
    difflab train-classifier --data fashion_mnist --steps 2000 --out runs/clf
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.cli import HelpFormatter

__all__ = ["CLASSIFIER_TRAIN_DEFAULTS", "classifier_config", "train_classifier",
           "load_classifier", "classifier_accuracy_at", "register", "cmd_train_classifier"]

KIND = "classifier"

CLASSIFIER_TRAIN_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "steps": 2000,            # optimizer steps (stop earlier at max_minutes)
    "max_minutes": None,      # wall-clock budget; None = no limit
    "batch_size": 128,
    "lr": 1e-3,
    "warmup": 50,             # linear learning-rate warm-up steps
    "betas": [0.9, 0.999],
    "weight_decay": 0.05,     # AdamW (ADM used 0.05 for its classifiers)
    "grad_clip": 1.0,         # max global grad norm; 0 disables
    "ema_decay": 0.999,       # warmed up as in difflab.train.ema; 0 disables the EMA
    "log_every": 50,
    "eval_times": [0.1, 0.5, 0.9, 1.0],  # held-out accuracy at these t after training
    "eval_count": 1000,       # held-out images for that evaluation
    "threads": None,
}


def _default_net(data: dict[str, Any]) -> dict[str, Any]:
    res, ch = data.get("resolution"), int(data.get("channels") or 1)
    if not res:  # flat data: not an image classifier
        raise ValueError(f"data {data.get('name')!r} has no resolution; the noise-aware "
                         "classifier (net type 'classifier') needs images. Pass net= a "
                         "config of a network that maps (x, t) to num_classes logits")
    mult = [1, 2, 2] if res >= 16 else [1, 2]
    return {"type": "classifier", "in_channels": ch, "num_classes": int(data["num_classes"]),
            "model_channels": 32, "channel_mult": mult, "num_res_blocks": 1,
            "attention_resolutions": [], "image_size": int(res), "pool": "attention"}


def classifier_config(data: dict[str, Any], schedule: dict[str, Any],
                      net: dict[str, Any] | None = None,
                      train: dict[str, Any] | None = None) -> dict[str, Any]:
    """A complete classifier config: ``data`` (name, resolution, channels, num_classes, split),
    ``schedule`` (a :meth:`NoiseSchedule.config`), an optional ``net`` (default: the encoder
    classifier sized for the data) and ``train`` options (see ``CLASSIFIER_TRAIN_DEFAULTS``)."""
    data = dict(data)
    if not data.get("num_classes"):
        raise ValueError(f"a classifier needs labelled data: data {data.get('name')!r} has no "
                         "num_classes")
    data.setdefault("split", "train")
    unknown = sorted(set(train or {}) - set(CLASSIFIER_TRAIN_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown classifier train option(s) {unknown}; valid: "
                         f"{sorted(CLASSIFIER_TRAIN_DEFAULTS)}")
    tc = copy.deepcopy(CLASSIFIER_TRAIN_DEFAULTS)
    tc.update(train or {})
    for key in ("steps", "batch_size"):
        if not isinstance(tc[key], int) or tc[key] < 1:
            raise ValueError(f"train.{key} must be a positive integer, got {tc[key]!r}")
    if not 0.0 <= float(tc["ema_decay"]) < 1.0:
        raise ValueError(f"train.ema_decay must lie in [0, 1), got {tc['ema_decay']}")
    net = dict(net) if net is not None else _default_net(data)
    if net.get("num_classes") not in (None, int(data["num_classes"])):
        raise ValueError(f"net.num_classes={net['num_classes']} but the data has "
                         f"{data['num_classes']} classes")
    return {"kind": KIND, "net": net, "schedule": dict(schedule), "prediction": "logits",
            "data": data, "train": tc}


def _lr_at(step: int, tc: dict[str, Any]) -> float:
    """Linear warm-up to train.lr, then constant."""
    return float(tc["lr"]) * min(1.0, (step + 1) / max(1, int(tc["warmup"])))


def _noised(schedule, x0: Tensor, generator: torch.Generator,
            t: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(x_t, net_time(t)) with t ~ U(0, 1] (or the given t), x_t ~ q(x_t | x_0)."""
    from difflab.objectives import sample_t
    from difflab.process import q_sample

    if t is None:
        t = sample_t(schedule, x0.shape[0], generator=generator)
    t = torch.as_tensor(t, dtype=torch.float64).expand(x0.shape[0])
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    x_t = q_sample(schedule, x0, t, eps).to(x0.dtype)
    return x_t, schedule.net_time(t).to(x0.dtype)


@torch.no_grad()
def classifier_accuracy_at(net: nn.Module, schedule, images: Tensor, labels: Tensor,
                           t: float, *, seed: int = 0, batch_size: int = 500) -> float:
    """Accuracy of ``net`` on x_t ~ q(x_t | x_0) at one time t (fixed noise from ``seed``)."""
    from difflab.data import to_float

    g = torch.Generator().manual_seed(seed)
    device = next(net.parameters()).device
    correct = 0
    for i in range(0, len(images), batch_size):
        x0 = to_float(images[i:i + batch_size])
        x_t, net_t = _noised(schedule, x0, g, torch.tensor(float(t)))
        pred = net(x_t.to(device), net_t.to(device)).argmax(1).cpu()
        correct += int((pred == labels[i:i + batch_size]).sum())
    return correct / len(images)


def train_classifier(config: dict[str, Any], out_dir: str | os.PathLike, *,
                     data: tuple[Tensor, Tensor] | None = None,
                     eval_data: tuple[Tensor, Tensor] | None = None,
                     steps: int | None = None, max_minutes: float | None = None,
                     device: str | None = None, quiet: bool = True) -> dict[str, Any]:
    """Train a noise-aware classifier (see the module docstring) and save ``out_dir/checkpoint``.

    Args:
        config: from :func:`classifier_config`.
        data: optional (images uint8 or float in [-1, 1], labels) overriding config["data"].
        eval_data: held-out (images, labels) for the accuracy-versus-t table (default: the
            data set's "test" split when it has one, else none).
        steps / max_minutes: override train.steps / train.max_minutes.

    Returns a summary with ``steps``, ``loss``, ``seconds``, ``checkpoint`` and ``accuracy``
    ({t: held-out accuracy} of the saved weights, EMA if enabled).
    """
    from difflab.data import to_float
    from difflab.schedules import from_config
    from difflab.train import checkpoint as ckpt
    from difflab.train.ema import EMA
    from difflab.train.monitor import MetricsLog
    from difflab.train.trainer import load_training_data

    config = classifier_config(config["data"], config["schedule"], config.get("net"),
                               config.get("train"))
    tc = config["train"]
    if tc.get("threads"):
        torch.set_num_threads(int(tc["threads"]))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    images, labels = data if data is not None else load_training_data(config["data"],
                                                                      tc["seed"])
    if labels is None:
        raise ValueError(f"data {config['data'].get('name')!r} has no labels; a classifier "
                         "needs labelled data")
    labels = torch.as_tensor(labels).long()
    nc = int(config["data"]["num_classes"])
    if int(labels.min()) < 0 or int(labels.max()) >= nc:
        raise ValueError(f"labels must lie in 0..{nc - 1} (data.num_classes={nc}), got "
                         f"{int(labels.min())}..{int(labels.max())}")
    if eval_data is None and data is None and config["data"].get("split", "train") == "train":
        try:
            eval_data = load_training_data({**config["data"], "split": "test"}, tc["seed"])
        except (ValueError, FileNotFoundError):
            eval_data = None
    schedule = from_config(config["schedule"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(tc["seed"]))
        net = ckpt.build_net(config["net"])
    net = net.to(dev)
    ema = EMA(net, float(tc["ema_decay"])) if tc["ema_decay"] else None
    opt = torch.optim.AdamW(net.parameters(), lr=float(tc["lr"]), betas=tuple(tc["betas"]),
                            weight_decay=float(tc["weight_decay"]))
    g = torch.Generator().manual_seed(int(tc["seed"]) * 7919 + 3)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out / "metrics.jsonl")
    total = int(steps if steps is not None else tc["steps"])
    budget = max_minutes if max_minutes is not None else tc.get("max_minutes")
    budget_s = float(budget) * 60 if budget else math.inf
    B, N = int(tc["batch_size"]), len(images)
    perm, pos = torch.randperm(N, generator=g), 0
    t0, step, loss_v, stopped_by = time.perf_counter(), 0, float("nan"), "steps"
    net.train()
    while step < total:
        if pos + B > N:
            perm, pos = torch.randperm(N, generator=g), 0
        idx = perm[pos:pos + min(B, N)]
        pos += len(idx)
        x_t, net_t = _noised(schedule, to_float(images[idx]), g)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, tc)
        logits = net(x_t.to(dev), net_t.to(dev))
        loss = F.cross_entropy(logits.float(), labels[idx].to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc["grad_clip"]:
            nn.utils.clip_grad_norm_(net.parameters(), float(tc["grad_clip"]))
        opt.step()
        if ema is not None:
            ema.update(net)
        step += 1
        loss_v = float(loss.detach())
        if not math.isfinite(loss_v):
            raise FloatingPointError(f"classifier loss became {loss_v} at step {step}; "
                                     "lower train.lr")
        seconds = time.perf_counter() - t0
        if step % int(tc["log_every"]) == 0 or step == total:
            acc = float((logits.argmax(1).cpu() == labels[idx]).float().mean())
            log.write({"step": step, "loss": loss_v, "train_acc_noised": acc,
                       "seconds": seconds})
            if not quiet:
                print(f"step {step}/{total} loss {loss_v:.4f} acc(noised) {acc:.3f} "
                      f"{seconds:.0f}s", file=sys.stderr)
        if seconds >= budget_s:
            stopped_by = "time"
            break
    net.eval()
    weights = ema.state_dict() if ema is not None else net.state_dict()
    path = ckpt.save_checkpoint(out / "checkpoint", config=config, model=net.state_dict(),
                                ema=ema.state_dict() if ema is not None else None,
                                state={"step": step, "train_seconds": seconds})
    summary: dict[str, Any] = {"steps": step, "loss": loss_v, "seconds": seconds,
                               "stopped_by": stopped_by, "checkpoint": str(path),
                               "accuracy": {}}
    if eval_data is not None:
        ev_net = ckpt.build_net(config["net"]).to(dev)
        ev_net.load_state_dict(weights)
        ev_net.eval()
        n = int(tc["eval_count"])
        ev_x, ev_y = eval_data[0][:n], torch.as_tensor(eval_data[1][:n]).long()
        summary["accuracy"] = {str(t): classifier_accuracy_at(ev_net, schedule, ev_x, ev_y, t)
                               for t in tc["eval_times"]}
        (out / "eval.json").write_text(json.dumps(summary["accuracy"], indent=1))
    return summary


def load_classifier(path: str | os.PathLike, ema: bool = True,
                    device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(classifier net in eval mode, config) from a classifier checkpoint directory.

    Raises ValueError if ``path`` is a diffusion-model checkpoint rather than a classifier.
    """
    from difflab.train import checkpoint as ckpt

    config, tensors, _ = ckpt.load_checkpoint(path)
    if config.get("kind") != KIND:
        raise ValueError(f"{ckpt.resolve(path)} is not a classifier checkpoint (its config.json "
                         "has no \"kind\": \"classifier\"; it looks like a diffusion model). "
                         "Train a noise-aware classifier with `difflab train-classifier --like "
                         "<diffusion checkpoint> --out DIR` and pass DIR")
    key = "ema" if ema and "ema" in tensors else "model"
    net = ckpt.build_net(config["net"])
    ckpt.load_weights(net, tensors[key], source=f"{ckpt.resolve(path)} ({key})",
                      net_type=str(config["net"].get("type")))
    net.eval().requires_grad_(False)
    return net.to(device), config


# --- command line --------------------------------------------------------------------------
def register(subparsers: Any) -> None:
    """Add ``difflab train-classifier``."""
    p = subparsers.add_parser(
        "train-classifier", formatter_class=HelpFormatter,
        help="train a noise-aware classifier p(y | x_t, t) for classifier guidance",
        description="Train a noise-aware classifier on images noised by a diffusion schedule "
                    "(cross-entropy at t ~ U(0, 1]); use it with `difflab sample --classifier "
                    "OUT --classifier-scale S`. --like CKPT takes the data set and schedule "
                    "from a diffusion checkpoint, so that the two match.")
    p.add_argument("--like", default=None, metavar="CKPT",
                   help="diffusion checkpoint whose data section and schedule to use")
    p.add_argument("--data", default=None,
                   help="data set name or image folder (default: from --like, else "
                        "fashion_mnist)")
    p.add_argument("--out", default="runs/classifier", help="run directory")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 2000)")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default 128)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--ema-decay", type=float, default=None,
                   help="EMA decay (default 0.999, 0 disables)")
    p.add_argument("--seed", type=int, default=None, help="seed (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry, e.g. --set net.model_channels=64 "
                        "(sections: net, schedule, data, train)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_train_classifier)


def _config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from difflab.train.config import parse_override, preset

    if args.like:
        from difflab.train import checkpoint as ckpt

        like_path = ckpt.resolve(args.like) / ckpt.CONFIG
        if not like_path.is_file():
            raise FileNotFoundError(f"--like {args.like}: no {ckpt.CONFIG} there; give a "
                                    "diffusion checkpoint or run directory")
        like = json.loads(like_path.read_text())
        if like.get("kind") == KIND:
            raise ValueError(f"--like {args.like} is a classifier; give a diffusion checkpoint")
        data, schedule = dict(like.get("data", {})), like["schedule"]
    else:
        base = preset("fashion_mnist")
        data, schedule = dict(base["data"]), base["schedule"]
    if args.data and args.data != data.get("name"):
        from difflab.data import load_dataset

        ds = load_dataset(args.data, split="train")
        data = {"name": args.data, "resolution": int(ds.images.shape[-1]),
                "channels": int(ds.images.shape[1]),
                "num_classes": int(ds.labels.max()) + 1 if ds.labels is not None else None,
                "split": "train"}
    cfg: dict[str, Any] = {"data": data, "schedule": dict(schedule), "net": None, "train": {}}
    for flag, key in (("steps", "steps"), ("max_minutes", "max_minutes"),
                      ("batch_size", "batch_size"), ("lr", "lr"), ("ema_decay", "ema_decay"),
                      ("seed", "seed"), ("threads", "threads")):
        if getattr(args, flag) is not None:
            cfg["train"][key] = getattr(args, flag)
    cfg = classifier_config(cfg["data"], cfg["schedule"], None, cfg["train"])
    for text in args.overrides:
        parts, value = parse_override(text)
        if parts[0] not in ("net", "schedule", "data", "train") or len(parts) < 2:
            raise ValueError(f"--set {text}: keys start with net., schedule., data. or train.")
        node = cfg
        for key in parts[:-1]:
            node = node.setdefault(key, {})
        node[parts[-1]] = value
    return classifier_config(cfg["data"], cfg["schedule"], cfg["net"], cfg["train"])


def cmd_train_classifier(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    d = config["data"]
    print(f"difflab train-classifier: {d['name']} ({d['num_classes']} classes, "
          f"{d.get('resolution')}px), schedule {config['schedule'].get('type')}; writing to "
          f"{args.out}/", file=sys.stderr)
    summary = train_classifier(config, args.out, device=args.device, quiet=args.quiet)
    print(f"trained {summary['steps']} steps in {summary['seconds'] / 60:.1f} min "
          f"(stopped by {summary['stopped_by']}), final loss {summary['loss']:.4f}")
    if summary["accuracy"]:
        accs = ", ".join(f"t={t}: {a:.3f}" for t, a in summary["accuracy"].items())
        print(f"held-out accuracy on noised images: {accs}")
    print(f"checkpoint: {summary['checkpoint']}")
    return 0
