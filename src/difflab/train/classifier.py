"""Train the noise-aware classifier p(y | x_t, t) used by classifier guidance
(Dhariwal & Nichol 2021, Sec. 4.1 and App. C; Song et al. 2021, Sec. 5 / Eq. 48).

The classifier sees images noised by the *diffusion model's* forward process,

    t ~ U(0, 1],  eps ~ N(0, I),  x_t = alpha_t x_0 + sigma_t eps      (difflab.process.q_sample)
    loss = -log softmax(f(x_t, net_time(t)))_y                           (cross-entropy)

so that grad_x log p(y | x_t, t) is meaningful at every noise level a sampler visits. At t -> 1
x_t carries no information about y and the best accuracy falls to the class prior (chance);
at small t it is an ordinary image classifier.

The classifier trains on the one trainer (:mod:`difflab.train.trainer`) with the
:class:`~difflab.objectives.ClassifierObjective`. Its checkpoint (:mod:`difflab.train.checkpoint`)
has kind "classifier", the components ``net`` (rebuilt by :func:`difflab.nets.build`) and
``schedule`` (the noise schedule it was trained for: guidance refuses a diffusion model with
another one), and a config with ``"data"`` (name, resolution, channels, num_classes) and
``"train"``. ``load_classifier`` reads it back (also from the earlier config.json layout).

Command line: ``difflab train-classifier`` (:mod:`difflab.commands.train_classifier`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import difflab.files as files
from difflab.train.config import LOOP_DEFAULTS, check_loop

__all__ = ["KIND", "CLASSIFIER_TRAIN_DEFAULTS", "classifier_config", "train_classifier",
           "load_classifier", "classifier_accuracy_at"]

KIND = "classifier"

CLASSIFIER_TRAIN_DEFAULTS: dict[str, Any] = {
    **LOOP_DEFAULTS,          # the loop's options (difflab.train.config), with these defaults:
    "steps": 2000,            # optimizer steps (stop earlier at max_minutes)
    "batch_size": 128,
    "lr": 1e-3,
    "warmup": 50,             # linear learning-rate warm-up steps
    "weight_decay": 0.05,     # AdamW (ADM used 0.05 for its classifiers)
    "ema_decay": 0.999,       # warmed up as in difflab.train.ema; 0 disables the EMA
    "log_every": 50,
    "precision": "fp32",
    "eval_times": [0.1, 0.5, 0.9, 1.0],  # held-out accuracy at these t after training
    "eval_count": 1000,       # held-out images for that evaluation
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
    """A complete classifier config (``"kind": "classifier"``): ``data`` (name, resolution,
    channels, num_classes, split), ``schedule`` (a :meth:`NoiseSchedule.config`), an optional
    ``net`` (default: the encoder classifier sized for the data) and ``train`` options (see
    ``CLASSIFIER_TRAIN_DEFAULTS``: the loop's options and the evaluation after training)."""
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
    check_loop(tc)
    net = dict(net) if net is not None else _default_net(data)
    if net.get("num_classes") not in (None, int(data["num_classes"])):
        raise ValueError(f"net.num_classes={net['num_classes']} but the data has "
                         f"{data['num_classes']} classes")
    return {"kind": KIND, "net": net, "schedule": dict(schedule), "data": data, "train": tc}


@torch.no_grad()
def classifier_accuracy_at(net: nn.Module, schedule, images: Tensor, labels: Tensor,
                           t: float, *, seed: int = 0, batch_size: int = 500) -> float:
    """Accuracy of ``net`` on x_t ~ q(x_t | x_0) at one time t (fixed noise from ``seed``)."""
    from difflab.data import to_float
    from difflab.objectives import noised

    g = torch.Generator().manual_seed(seed)
    device = next(net.parameters()).device
    correct = 0
    for i in range(0, len(images), batch_size):
        x0 = to_float(images[i:i + batch_size])
        eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
        x_t, net_t = noised(schedule, x0, torch.tensor(float(t)), eps)
        pred = net(x_t.to(device), net_t.to(device)).argmax(1).cpu()
        correct += int((pred == labels[i:i + batch_size]).sum())
    return correct / len(images)


def train_classifier(config: dict[str, Any], out_dir: str | os.PathLike, *,
                     data: tuple[Tensor, Tensor] | None = None,
                     eval_data: tuple[Tensor, Tensor] | None = None,
                     steps: int | None = None, max_minutes: float | None = None,
                     device: str | None = None,
                     callback: Callable[[dict[str, Any]], None] | None = None
                     ) -> dict[str, Any]:
    """Train a noise-aware classifier (see the module docstring) on the one trainer
    (:class:`~difflab.train.trainer.Trainer` with a
    :class:`~difflab.objectives.ClassifierObjective`) and save ``out_dir/checkpoint`` (kind
    "classifier": components ``net`` and ``schedule``).

    Args:
        config: from :func:`classifier_config`.
        data: optional (images uint8 or float in [-1, 1], labels) overriding config["data"].
        eval_data: held-out (images, labels) for the accuracy-versus-t table (default: the
            data set's "test" split when it has one, else none).
        steps / max_minutes: override train.steps / train.max_minutes.
        callback: the trainer's progress records (:mod:`difflab.train.monitor`).

    Returns the trainer's summary (``steps``, ``loss``, ``seconds``, ``stopped_by``,
    ``checkpoint``) with ``accuracy``: {t: held-out accuracy} of the saved weights (EMA if
    enabled), also written to ``out_dir/eval.json``.
    """
    from difflab.objectives import ClassifierObjective
    from difflab.schedules import from_config
    from difflab.train.trainer import Trainer, load_training_data

    config = classifier_config(config["data"], config["schedule"], config.get("net"),
                               config.get("train"))
    tc = config["train"]
    if data is None:
        data = load_training_data(config["data"], tc["seed"])
        if data[1] is None:
            raise ValueError(f"data {config['data'].get('name')!r} has no labels; a classifier "
                             "needs labelled data")
        if eval_data is None and config["data"].get("split", "train") == "train":
            try:
                eval_data = load_training_data({**config["data"], "split": "test"}, tc["seed"])
            except (ValueError, FileNotFoundError):
                eval_data = None
    schedule = from_config(config["schedule"])
    objective = ClassifierObjective(schedule, ema=float(tc["ema_decay"]) > 0)
    trainer = Trainer(config, out_dir, data=data, objective=objective, device=device,
                      callback=callback)
    try:
        summary = trainer.run(steps=steps, max_minutes=max_minutes)
        summary["accuracy"] = {}
        if eval_data is not None and trainer.dist.is_main:
            net = trainer.ema_module("net") if trainer.ema is not None else trainer.net.eval()
            n = int(tc["eval_count"])
            ev_x, ev_y = eval_data[0][:n], torch.as_tensor(eval_data[1][:n]).long()
            summary["accuracy"] = {str(t): classifier_accuracy_at(net, schedule, ev_x, ev_y, t)
                                   for t in tc["eval_times"]}
            files.write_json(Path(out_dir) / "eval.json", summary["accuracy"], indent=1)
    finally:
        trainer.close()
    return summary


def load_classifier(path: str | os.PathLike, ema: bool = True,
                    device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(classifier net in eval mode, config) from a classifier checkpoint (either layout;
    :func:`difflab.train.checkpoint.load`).

    Raises ValueError if ``path`` is a checkpoint of another kind (a diffusion model).
    """
    import difflab.train.checkpoint as ckpt

    kind = ckpt.read(path).kind
    if kind != KIND:
        raise ValueError(f"{ckpt.resolve(path)} is not a classifier checkpoint (its kind is "
                         f"{kind!r}). Train a noise-aware classifier for this model's data "
                         "and noise schedule (train_classifier) and pass its directory")
    return ckpt.load(path, ema=ema, device=device)
