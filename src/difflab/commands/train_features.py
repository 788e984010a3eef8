"""``difflab train-features``: train the offline feature networks (small CNN classifiers) that
``difflab eval`` measures with, shipped in ``difflab/assets``
(:mod:`difflab.metrics.train_features`).

    difflab train-features --dataset fashion_mnist --name fmnist --epochs 15 --flip
    difflab train-features --dataset mnist5k --name mnist --epochs 40 --shift 2
    difflab train-features --calibrate src/difflab/assets/feature_fmnist

Accuracy is measured on the data set's disjoint ``test`` split and written, with the command,
into ``<out>/feature_<name>.json`` next to ``<out>/feature_<name>.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from difflab.commands.common import HelpFormatter, ParameterError, param, set_threads

__all__ = ["train_features", "calibrate_features", "register", "cmd_train_features"]


def train_features(dataset: str = "fashion_mnist", name: str = "fmnist", *, epochs: int = 12,
                   batch_size: int = 128, lr: float = 2e-3, weight_decay: float = 5e-4,
                   shift: int = 2, flip: bool = False, seed: int = 0,
                   out: str | os.PathLike | None = None, command: str | None = None,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train a feature network on ``dataset``'s train split (cross-entropy, AdamW, cosine
    learning rate; random shifts of up to ``shift`` pixels, optional flips), calibrate its
    feature scale there, measure its test accuracy and save it as ``out/feature_<name>``
    (default: the shipped assets) with ``command`` (how it was made) in its metadata. ``log``
    receives progress lines. Returns {"path", "test_accuracy", "train_accuracy", "seconds"}."""
    from difflab.data import load_dataset
    from difflab.metrics.features import ASSETS, save_feature_net
    from difflab.metrics.train_features import (
        calibrate_feature_scale,
        evaluate_accuracy,
        to_unit,
        train_feature_net,
    )

    say = log or (lambda line: None)
    train, test = load_dataset(dataset, split="train"), load_dataset(dataset, split="test")
    if train.labels is None or test.labels is None:
        raise ParameterError(f"{param('dataset')} {dataset!r} has no labels; a feature "
                             "classifier needs them")
    x_train, x_test = to_unit(train.images), to_unit(test.images)
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    say(f"{dataset}: train {tuple(x_train.shape)}, test {tuple(x_test.shape)}, "
        f"{num_classes} classes")
    t0 = time.time()
    net = train_feature_net(x_train, train.labels, num_classes=num_classes, epochs=epochs,
                            batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                            shift=shift, flip=flip, seed=seed, x_test=x_test,
                            y_test=test.labels, log=say)
    seconds = time.time() - t0
    acc = evaluate_accuracy(net, x_test, test.labels)
    train_acc = evaluate_accuracy(net, x_train, train.labels)
    scale = calibrate_feature_scale(net, x_train)
    say(f"feature_scale {scale:.6g}")
    meta = {
        "name": name,
        "dataset": dataset,
        "train_split": "train", "train_size": int(x_train.shape[0]),
        "test_split": "test", "test_size": int(x_test.shape[0]),
        "test_accuracy": round(acc, 5), "train_accuracy": round(train_acc, 5),
        "input": "float images in [-1, 1], NCHW, resolution and channels as in net",
        "features": "penultimate layer (after ReLU)",
        "command": command,
        "train_seconds": round(seconds, 1),
        "machine": f"torch threads = {torch.get_num_threads()}",
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
    }
    path = save_feature_net(net, Path(out if out is not None else ASSETS) / f"feature_{name}",
                            meta)
    return {"path": str(path), "test_accuracy": acc, "train_accuracy": train_acc,
            "seconds": round(seconds, 1)}


def calibrate_features(stem: str | os.PathLike, *, command: str | None = None) -> dict[str, Any]:
    """Add feature_scale to a feature network saved before calibration was part of training
    (the weights are unchanged; only its JSON gains the scale and ``command``)."""
    from difflab.data import load_dataset
    from difflab.metrics.features import load_feature_net, save_feature_net
    from difflab.metrics.train_features import calibrate_feature_scale, to_unit

    stem = Path(stem)
    stem = stem.with_suffix("") if stem.suffix in (".safetensors", ".json") else stem
    ext = load_feature_net(stem)
    meta = {k: v for k, v in ext.meta.items() if k != "net"}
    x_train = to_unit(load_dataset(meta["dataset"], split=meta.get("train_split", "train")).images)
    scale = calibrate_feature_scale(ext.net, x_train)
    meta["calibration_command"] = command
    save_feature_net(ext.net, stem, meta)
    return {"path": str(stem), "feature_scale": scale}


def register(subparsers: Any) -> None:
    """Add ``train-features`` to the ``difflab`` command line."""
    p = subparsers.add_parser(
        "train-features", formatter_class=HelpFormatter,
        help="train a feature network for difflab eval (FID-FMNIST / FID-MNIST)",
        description="Train a small CNN classifier on a data set's train split (cross-entropy, "
                    "AdamW, cosine learning rate with warm-up, random shifts), whose "
                    "penultimate layer `difflab eval --feature-net` measures with; its test "
                    "accuracy and this command are written next to the weights.")
    p.add_argument("--dataset", default="fashion_mnist",
                   help="difflab.data.load_dataset name with train and test splits")
    p.add_argument("--name", default="fmnist", help="feature network name (file stem)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--shift", type=int, default=2, help="max random translation (pixels)")
    p.add_argument("--flip", action="store_true", help="random horizontal flips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=None,
                   help="output directory (default: the package's assets)")
    p.add_argument("--calibrate", metavar="STEM", default=None,
                   help="only (re)compute feature_scale of an existing <STEM>.safetensors on "
                        "its training split and rewrite <STEM>.json")
    p.set_defaults(func=cmd_train_features)


def cmd_train_features(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    command = "difflab " + shlex.join(sys.argv[1:])
    if args.calibrate:
        result = calibrate_features(args.calibrate, command=command)
    else:
        result = train_features(args.dataset, args.name, epochs=args.epochs,
                                batch_size=args.batch_size, lr=args.lr,
                                weight_decay=args.weight_decay, shift=args.shift,
                                flip=args.flip, seed=args.seed, out=args.out, command=command,
                                log=lambda line: print(line, flush=True))
    print(json.dumps(result))
    return 0
