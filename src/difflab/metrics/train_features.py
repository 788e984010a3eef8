"""Train the offline feature networks (small CNN classifiers) shipped in ``difflab/assets``.

    difflab train-features --dataset fashion_mnist --name fmnist
    difflab train-features --dataset mnist5k --name mnist

(:mod:`difflab.commands.train_features`) trains :class:`~difflab.metrics.classifier.FeatureCNN`
on the data set's ``train`` split on the one trainer (:mod:`difflab.train.trainer`) with the
:class:`~difflab.objectives.FeatureObjective`: cross-entropy, AdamW and a cosine learning-rate
decay with linear warm-up; augmentation is a random translation of up to ``shift`` pixels
(zero padding at the background value -1) and, optionally, a horizontal flip. Accuracy is measured
on the disjoint ``test`` split and written with the exact command into
``<out>/feature_<name>.json`` next to ``<out>/feature_<name>.safetensors`` (float32 weights
and BatchNorm statistics).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from difflab.metrics.classifier import FeatureCNN
from difflab.objectives import random_shift

__all__ = ["train_feature_net", "feature_config", "evaluate_accuracy", "calibrate_feature_scale",
           "random_shift", "to_unit", "KIND"]

KIND = "feature"  # the checkpoint kind of a feature network


@torch.no_grad()
def evaluate_accuracy(net: FeatureCNN, images: Tensor, labels: Tensor,
                      batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``net`` (eval mode) on float images in [-1, 1]."""
    was_training = net.training
    net.eval()
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        logits = net(images[i:i + batch_size])
        correct += int((logits.argmax(1) == labels[i:i + batch_size]).sum())
    net.train(was_training)
    return correct / images.shape[0]


@torch.no_grad()
def calibrate_feature_scale(net: FeatureCNN, images: Tensor, batch_size: int = 1000) -> float:
    """Set and return feature_scale = 1 / sqrt(mean_i ||h(x_i)||^2 / d) over ``images``
    (float in [-1, 1], the training split), so that the metric features have unit mean
    square there."""
    net.eval()
    total, count = 0.0, 0
    for i in range(0, images.shape[0], batch_size):
        h = net.hidden(images[i:i + batch_size]).double()
        total += float((h * h).sum())
        count += h.numel()
    scale = 1.0 / math.sqrt(total / count)
    net.set_feature_scale(scale)
    return scale


def feature_config(*, in_channels: int, resolution: int, num_classes: int, steps: int,
                   batch_size: int = 128, lr: float = 2e-3, weight_decay: float = 5e-4,
                   warmup: int = 1, shift: int = 2, flip: bool = False, seed: int = 0,
                   log_every: int = 100, data_name: str | None = None,
                   net: dict[str, Any] | None = None) -> dict[str, Any]:
    """The trainer config (kind "feature") of a feature network: AdamW, linear warm-up then
    cosine decay to 0 at ``steps``, no gradient clipping, no EMA, float32."""
    net = dict(net) if net is not None else FeatureCNN(
        in_channels=in_channels, num_classes=num_classes, resolution=resolution).config
    return {"kind": KIND, "net": net,
            "data": {"name": data_name, "resolution": resolution, "channels": in_channels,
                     "num_classes": num_classes},
            "train": {"seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr,
                      "warmup": warmup, "lr_decay": "cosine", "lr_min": 0.0,
                      "weight_decay": weight_decay, "grad_clip": 0.0, "ema_decay": 0.0,
                      "precision": "fp32", "log_every": log_every, "shift": shift,
                      "flip": flip}}


def train_feature_net(x_train: Tensor, y_train: Tensor, *, num_classes: int, epochs: int = 12,
                      batch_size: int = 128, lr: float = 2e-3, weight_decay: float = 5e-4,
                      shift: int = 2, flip: bool = False, seed: int = 0,
                      x_test: Tensor | None = None, y_test: Tensor | None = None,
                      log: Callable[[str], None] | None = None,
                      out_dir: str | os.PathLike | None = None,
                      device: str | None = None) -> FeatureCNN:
    """Train a FeatureCNN on float images in [-1, 1] (N, C, H, W) and labels (N,) on the one
    trainer (:class:`~difflab.train.trainer.Trainer`, :class:`~difflab.objectives.
    FeatureObjective`): ``epochs`` x ceil(N / batch_size) steps in the seeded epoch order,
    warm-up over half an epoch, then cosine decay. ``log`` receives one line per epoch (with
    the test accuracy when ``x_test``, ``y_test`` are given); ``out_dir`` also writes a
    checkpoint of kind "feature" (:func:`difflab.train.checkpoint.load` reads it). Returns the
    network in eval mode (on the CPU)."""
    from difflab.objectives import FeatureObjective
    from difflab.train.trainer import Trainer

    n = int(x_train.shape[0])
    steps_per_epoch = math.ceil(n / batch_size)
    config = feature_config(in_channels=int(x_train.shape[1]), resolution=int(x_train.shape[-1]),
                            num_classes=num_classes, steps=epochs * steps_per_epoch,
                            batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                            warmup=max(1, steps_per_epoch // 2), shift=shift, flip=flip,
                            seed=seed, log_every=steps_per_epoch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the initial weights, and the dropout's draws
        net = FeatureCNN.from_config(config["net"])
        t_epoch = time.perf_counter()

        def on_record(record: dict[str, Any]) -> None:
            nonlocal t_epoch
            if record.get("event") != "log" or log is None:
                return
            epoch = int(record["step"]) // steps_per_epoch
            msg = (f"epoch {epoch}/{epochs} loss {record['loss']:.4f} "
                   f"({time.perf_counter() - t_epoch:.0f}s)")
            if x_test is not None and y_test is not None:
                msg += f" test acc {evaluate_accuracy(trainer.net, x_test, y_test):.4f}"
            log(msg)
            t_epoch = time.perf_counter()

        trainer = Trainer(config, out_dir, data={"image": x_train, "label": y_train}, net=net,
                          objective=FeatureObjective(shift, flip), device=device,
                          callback=on_record)
        try:
            trainer.run()
        finally:
            trainer.close()
    return trainer.net.cpu().eval()


def _load_feature(ck: Any, ema: bool, device: Any) -> tuple[FeatureCNN, dict[str, Any]]:
    """The loader of checkpoints of kind "feature" (:func:`difflab.train.checkpoint.load`)."""
    import difflab.train.checkpoint as ckpt

    net = FeatureCNN.from_config(ck.component_config("net"))
    ckpt.load_weights(net, ck.weights("net", ema=ema and ck.has_weights("net", ema=True)),
                      source=str(ck.path), net_type="feature_cnn")
    return net.eval().requires_grad_(False).to(device), {"kind": ck.kind, **ck.config}


def _register() -> None:
    import difflab.train.checkpoint as ckpt

    ckpt.register_kind(KIND, _load_feature)


_register()


def to_unit(images: Tensor) -> Tensor:
    """uint8 -> float in [-1, 1] (difflab.data's convention)."""
    from difflab.data.dataset import to_float

    return to_float(images)

