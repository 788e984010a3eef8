"""``difflab train-classifier``: train the noise-aware classifier p(y | x_t, t) that
classifier guidance uses (:mod:`difflab.train.classifier`).

    difflab train-classifier --like runs/cond --out runs/clf --max-minutes 10
    difflab train-classifier --data fashion_mnist --steps 2000 --out runs/clf

    config = classifier_training_config(like="runs/cond", max_minutes=10)
    summary = train_noise_classifier(config, "runs/clf")
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from difflab.commands.common import (
    HelpFormatter,
    MissingFileError,
    ParameterError,
    param,
    set_threads,
)

__all__ = ["classifier_training_config", "train_noise_classifier", "register",
           "cmd_train_classifier"]

_SECTIONS = ("net", "schedule", "data", "train")


def classifier_training_config(*, like: str | os.PathLike | None = None,
                               data: str | None = None, overrides: Sequence[str] = (),
                               steps: int | None = None, max_minutes: float | None = None,
                               batch_size: int | None = None, lr: float | None = None,
                               ema_decay: float | None = None, seed: int | None = None,
                               threads: int | None = None) -> dict[str, Any]:
    """A complete classifier config (:func:`difflab.train.classifier.classifier_config`): the
    data section and noise schedule of the diffusion checkpoint ``like`` (so that the two
    match; default: the fashion_mnist preset's), the data set ``data`` if given, the train
    options given, then ``overrides`` (``"section.key=JSON"``, sections net, schedule, data,
    train)."""
    from difflab.train import checkpoint as ckpt
    from difflab.train.classifier import classifier_config
    from difflab.train.config import parse_override, preset

    if like:
        if not ckpt.is_checkpoint(like):
            raise MissingFileError(f"{param('like')} {like}: no checkpoint there; give a "
                                   "diffusion checkpoint or run directory")
        like_cfg = ckpt.read_config(like)
        if like_cfg.get("kind", "diffusion") != "diffusion":
            raise ParameterError(f"{param('like')} {like} is a {like_cfg['kind']} checkpoint; "
                                 "give a diffusion checkpoint")
        data_section, schedule = dict(like_cfg.get("data", {})), like_cfg["schedule"]
    else:
        base = preset("fashion_mnist")
        data_section, schedule = dict(base["data"]), base["schedule"]
    if data and data != data_section.get("name"):
        from difflab.data import load_dataset

        ds = load_dataset(data, split="train")
        data_section = {"name": data, "resolution": int(ds.images.shape[-1]),
                        "channels": int(ds.images.shape[1]),
                        "num_classes": int(ds.labels.max()) + 1 if ds.labels is not None
                        else None, "split": "train"}
    train = {k: v for k, v in (("steps", steps), ("max_minutes", max_minutes),
                               ("batch_size", batch_size), ("lr", lr),
                               ("ema_decay", ema_decay), ("seed", seed),
                               ("threads", threads)) if v is not None}
    cfg = classifier_config(data_section, dict(schedule), None, train)
    for text in overrides:
        parts, value = parse_override(text)
        if parts[0] not in _SECTIONS or len(parts) < 2:
            raise ParameterError(f"{param('overrides')} {text}: keys start with "
                                 f"{', '.join(s + '.' for s in _SECTIONS)}")
        node = cfg
        for key in parts[:-1]:
            node = node.setdefault(key, {})
        node[parts[-1]] = value
    return classifier_config(cfg["data"], cfg["schedule"], cfg["net"], cfg["train"])


def train_noise_classifier(config: dict[str, Any], out: str | os.PathLike, *,
                           device: str | None = None, progress: bool = True,
                           overwrite: bool = False) -> dict[str, Any]:
    """Train the classifier of ``config`` into ``out`` with ``train.threads`` torch threads
    and a progress bar on stderr unless ``progress=False``
    (:func:`difflab.train.classifier.train_classifier`); returns its summary."""
    from difflab.commands.runs import open_run
    from difflab.commands.validate import check_config, check_device
    from difflab.train.classifier import train_classifier
    from difflab.train.monitor import ProgressBar

    check_device(device)
    check_config(config)
    set_threads(config["train"].get("threads"))
    with open_run(out, overwrite=overwrite):  # an earlier run there: refused or moved aside
        return train_classifier(config, out, device=device,
                                callback=ProgressBar(enabled=progress))


def register(subparsers: Any) -> None:
    """Add ``train-classifier`` to the ``difflab`` command line."""
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
    p.add_argument("--overwrite", action="store_true",
                   help="move an earlier run in OUT aside (to OUT.old-<time>) and start afresh")
    p.set_defaults(func=cmd_train_classifier)


def cmd_train_classifier(args: argparse.Namespace) -> int:
    from difflab.commands.runs import check_run
    from difflab.commands.train import TrainOptions, check_options
    from difflab.commands.validate import check_device, check_number

    check_options(TrainOptions(steps=args.steps, max_minutes=args.max_minutes,
                               batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                               threads=args.threads))
    check_number("ema_decay", args.ema_decay, minimum=0, maximum=0.9999)
    check_device(args.device)
    check_run(args.out, overwrite=args.overwrite)  # before any work
    config = classifier_training_config(
        like=args.like, data=args.data, overrides=args.overrides, steps=args.steps,
        max_minutes=args.max_minutes, batch_size=args.batch_size, lr=args.lr,
        ema_decay=args.ema_decay, seed=args.seed, threads=args.threads)
    d = config["data"]
    print(f"difflab train-classifier: {d['name']} ({d['num_classes']} classes, "
          f"{d.get('resolution')}px), schedule {config['schedule'].get('type')}; writing to "
          f"{args.out}/", file=sys.stderr)
    summary = train_noise_classifier(config, args.out, device=args.device,
                                     progress=not args.quiet, overwrite=args.overwrite)
    print(f"trained {summary['steps']} steps in {summary['seconds'] / 60:.1f} min "
          f"(stopped by {summary['stopped_by']}), final loss {summary['loss']:.4f}")
    if summary["accuracy"]:
        accs = ", ".join(f"t={t}: {a:.3f}" for t, a in summary["accuracy"].items())
        print(f"held-out accuracy on noised images: {accs}")
    print(f"checkpoint: {summary['checkpoint']}")
    return 0
