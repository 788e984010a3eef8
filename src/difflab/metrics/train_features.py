"""Train the offline feature networks (small CNN classifiers) shipped in ``difflab/assets``.

    python -m difflab.metrics.train_features --dataset fashion_mnist --name fmnist
    python -m difflab.metrics.train_features --dataset mnist5k --name mnist

Trains :class:`~difflab.metrics.classifier.FeatureCNN` on the data set's ``train`` split with
cross-entropy, AdamW and a cosine learning-rate decay with linear warm-up; augmentation is a
random translation of up to ``--shift`` pixels (zero padding at the background value -1) and,
optionally, a horizontal flip. Accuracy is measured on the disjoint ``test`` split and written
with the exact command into ``<out>/feature_<name>.json`` next to
``<out>/feature_<name>.safetensors`` (float32 weights and BatchNorm statistics).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.metrics.classifier import FeatureCNN

__all__ = ["train_feature_net", "evaluate_accuracy", "main"]

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def random_shift(x: Tensor, shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by integers (dy, dx) in [-shift, shift], filling with -1 (black)."""
    if shift <= 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), value=-1.0)
    dy = torch.randint(0, 2 * shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * shift + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
    return padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None],
                  rows, cols]


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


def train_feature_net(x_train: Tensor, y_train: Tensor, *, num_classes: int, epochs: int = 12,
                      batch_size: int = 128, lr: float = 2e-3, weight_decay: float = 5e-4,
                      shift: int = 2, flip: bool = False, seed: int = 0,
                      x_test: Tensor | None = None, y_test: Tensor | None = None,
                      log=print) -> FeatureCNN:
    """Train a FeatureCNN on float images in [-1, 1] (N, C, H, W) and labels (N,)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = FeatureCNN(in_channels=x_train.shape[1], num_classes=num_classes,
                     resolution=x_train.shape[-1])
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    n = x_train.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, steps_per_epoch // 2)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    step = 0
    for epoch in range(epochs):
        t0 = time.time()
        perm = torch.randperm(n, generator=g)
        running = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            x = random_shift(x_train[idx], shift, g)
            if flip:
                f = torch.rand(x.shape[0], generator=g) < 0.5
                x = torch.where(f[:, None, None, None], x.flip(-1), x)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            loss = F.cross_entropy(net(x), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += float(loss.detach()) * idx.numel()
            step += 1
        msg = f"epoch {epoch + 1}/{epochs} loss {running / n:.4f} ({time.time() - t0:.0f}s)"
        if x_test is not None and y_test is not None:
            msg += f" test acc {evaluate_accuracy(net, x_test, y_test):.4f}"
        log(msg)
    net.eval()
    return net


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m difflab.metrics.train_features",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ASSETS), help="output directory")
    p.add_argument("--calibrate", metavar="STEM", default=None,
                   help="only (re)compute feature_scale of an existing <STEM>.safetensors on "
                        "its training split and rewrite <STEM>.json")
    args = p.parse_args(argv)

    from difflab.data import load_dataset

    if args.calibrate:
        return _calibrate_existing(Path(args.calibrate), argv, args.threads)

    torch.set_num_threads(args.threads)
    train, test = load_dataset(args.dataset, split="train"), load_dataset(args.dataset,
                                                                        split="test")
    if train.labels is None or test.labels is None:
        raise ValueError(f"{args.dataset!r} has no labels; a feature classifier needs them")
    x_train, x_test = to_unit(train.images), to_unit(test.images)
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    print(f"{args.dataset}: train {tuple(x_train.shape)}, test {tuple(x_test.shape)}, "
          f"{num_classes} classes", flush=True)
    t0 = time.time()
    net = train_feature_net(x_train, train.labels, num_classes=num_classes, epochs=args.epochs,
                            batch_size=args.batch_size, lr=args.lr,
                            weight_decay=args.weight_decay, shift=args.shift, flip=args.flip,
                            seed=args.seed, x_test=x_test, y_test=test.labels,
                            log=lambda m: print(m, flush=True))
    seconds = time.time() - t0
    acc = evaluate_accuracy(net, x_test, test.labels)
    train_acc = evaluate_accuracy(net, x_train, train.labels)
    scale = calibrate_feature_scale(net, x_train)
    print(f"feature_scale {scale:.6g}", flush=True)

    from difflab.metrics.features import save_feature_net

    command = "python -m difflab.metrics.train_features " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    meta = {
        "name": args.name,
        "dataset": args.dataset,
        "train_split": "train", "train_size": int(x_train.shape[0]),
        "test_split": "test", "test_size": int(x_test.shape[0]),
        "test_accuracy": round(acc, 5), "train_accuracy": round(train_acc, 5),
        "input": "float images in [-1, 1], NCHW, resolution and channels as in net",
        "features": "penultimate layer (after ReLU)",
        "command": command,
        "train_seconds": round(seconds, 1),
        "machine": f"2-core CPU (CI-class), torch threads = {args.threads}",
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
    }
    path = save_feature_net(net, Path(args.out) / f"feature_{args.name}", meta)
    print(json.dumps({"path": str(path), "test_accuracy": acc, "train_accuracy": train_acc,
                      "seconds": round(seconds, 1)}))
    return 0


def _calibrate_existing(stem: Path, argv: list[str] | None, threads: int) -> int:
    """Add feature_scale to a trained network saved before calibration was part of training
    (the weights are unchanged; only the JSON gains the scale and this command)."""
    from difflab.data import load_dataset
    from difflab.metrics.features import _load_cnn, save_feature_net

    torch.set_num_threads(threads)
    stem = stem.with_suffix("") if stem.suffix in (".safetensors", ".json") else stem
    ext = _load_cnn(stem, stem.name.removeprefix("feature_"))
    meta = {k: v for k, v in ext.meta.items() if k != "net"}
    x_train = to_unit(load_dataset(meta["dataset"], split=meta.get("train_split", "train")).images)
    scale = calibrate_feature_scale(ext.net, x_train)
    meta["calibration_command"] = "python -m difflab.metrics.train_features " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    save_feature_net(ext.net, stem, meta)
    print(json.dumps({"path": str(stem), "feature_scale": scale}))
    return 0


def to_unit(images: Tensor) -> Tensor:
    """uint8 -> float in [-1, 1] (difflab.data's convention)."""
    from difflab.data.dataset import to_float

    return to_float(images)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
