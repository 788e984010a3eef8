"""``difflab train-controlnet``: train a ControlNet for a trained diffusion model (the base,
frozen and never written) on control images computed from the base's training data.

    config  = controlnet_training_config("runs/fm_base", control="canny",
                                         options=TrainOptions(max_minutes=30))
    summary = train_controlnet(config, "runs/fm_base_canny")

The control images of the whole training set are computed once at the start (Canny on
Fashion-MNIST's 60,000 images: about two seconds). ``--resume`` continues bit for bit from
OUT/checkpoint; ``--max-minutes`` counts the time already spent.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from difflab.commands.common import (
    HelpFormatter,
    MissingFileError,
    ParameterError,
    param,
    set_threads,
)
from difflab.commands.train import TrainOptions, checkpoint_config

__all__ = ["controlnet_training_config", "train_controlnet", "controlnet_run_directory",
           "register", "cmd_train_controlnet"]


def controlnet_run_directory(base: str | os.PathLike, control: str,
                             out: str | os.PathLike | None = None) -> Path:
    """``out``, or ``runs/<base run name>_<control>``."""
    if out:
        return Path(out)
    p = Path(base)
    name = p.parent.name if p.name == "checkpoint" else p.name
    return Path("runs") / f"{name}_{control}"


def controlnet_training_config(base: str | os.PathLike, *, control: str = "canny",
                               control_options: dict[str, Any] | None = None,
                               overrides: Sequence[str] = (),
                               options: TrainOptions | None = None) -> dict[str, Any]:
    """The config of a ControlNet run for the base checkpoint ``base``
    (:func:`difflab.train.controlnet.controlnet_config`), then ``options`` (they win)."""
    from difflab.conditioning.control import PREPROCESSORS
    from difflab.train import checkpoint as ckpt
    from difflab.train.controlnet import controlnet_config

    if not ckpt.is_checkpoint(base):
        raise MissingFileError(f"{param('base')} {base}: no checkpoint there (give the run "
                               "directory of a trained diffusion model)")
    if control not in PREPROCESSORS:
        raise ParameterError(f"unknown {param('control')} {control!r}; valid: "
                             f"{', '.join(sorted(PREPROCESSORS))}")
    cfg = controlnet_config(base, control=control, control_options=control_options,
                            overrides=overrides)
    return _with_options(cfg, options)


def _with_options(cfg: dict[str, Any], options: TrainOptions | None) -> dict[str, Any]:
    from difflab.train.config import check_loop

    updates = (options or TrainOptions()).train_updates()
    updates.pop("conditional", None)
    if updates:
        cfg = copy.deepcopy(cfg)
        cfg["train"].update(updates)
        check_loop(cfg["train"])
    return cfg


def train_controlnet(config: dict[str, Any], out: str | os.PathLike, *, resume: bool = False,
                     device: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Train the ControlNet of ``config`` into run directory ``out`` (``resume``: from
    ``out/checkpoint``), with ``train.threads`` threads and a progress bar unless
    ``progress=False``. Returns the trainer's summary."""
    from difflab.train.controlnet import controlnet_trainer
    from difflab.train.monitor import ProgressBar

    set_threads(config.get("train", {}).get("threads"))
    bar = ProgressBar(enabled=progress)
    trainer = controlnet_trainer(config, out, resume=resume, device=device, callback=bar)
    try:
        return trainer.run()
    finally:
        trainer.close()


def register(subparsers: Any) -> None:
    """Add ``train-controlnet`` to the ``difflab`` command line."""
    from difflab.commands.train import _add_train_flags

    p = subparsers.add_parser(
        "train-controlnet", formatter_class=HelpFormatter,
        help="train a ControlNet for a trained model (the base stays frozen)",
        description="Train a ControlNet (a trainable copy of the base U-Net's encoder joined "
                    "by zero convolutions) on control images computed from the base's "
                    "training data. The base checkpoint is only read; the ControlNet "
                    "checkpoint references it by path and SHA-256. Sample with `difflab sample "
                    "OUT --control-image edges.png`.")
    p.add_argument("base", help="run directory (or checkpoint) of the trained base model")
    p.add_argument("--control", default="canny",
                   help="control signal (difflab.conditioning.control: canny, hed, mask, "
                        "image, ...)")
    p.add_argument("--canny-low", type=float, default=None,
                   help="Canny's low hysteresis threshold on 8-bit grey (default 100)")
    p.add_argument("--canny-high", type=float, default=None,
                   help="Canny's high hysteresis threshold on 8-bit grey (default 200)")
    p.add_argument("--out", default=None,
                   help="run directory (default: runs/<base run name>_<control>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry with a JSON value, e.g. --set train.lr=5e-4 "
                        "--set settings.scale=0.8 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue exactly from OUT/checkpoint (its config, plus overrides)")
    _add_train_flags(p)
    p.set_defaults(func=cmd_train_controlnet)


def cmd_train_controlnet(args: argparse.Namespace) -> int:
    out = controlnet_run_directory(args.base, args.control, args.out)
    options = TrainOptions(steps=args.steps, max_minutes=args.max_minutes,
                           batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                           threads=args.threads)
    saved = checkpoint_config(out) if args.resume else None
    if args.resume and saved is None:
        print(f"difflab train-controlnet: no checkpoint in {out}, starting fresh",
              file=sys.stderr)
    if saved is not None:
        if saved.get("kind") != "controlnet":
            raise ParameterError(f"{param('out')} {out} holds a {saved.get('kind')} "
                                 "checkpoint, not a ControlNet run")
        from difflab.train.controlnet import apply_config_overrides

        config = _with_options(apply_config_overrides(saved, args.overrides), options)
    else:
        opts: dict[str, Any] = {}
        if args.canny_low is not None:
            opts["low"] = args.canny_low
        if args.canny_high is not None:
            opts["high"] = args.canny_high
        if opts and args.control != "canny":
            raise ParameterError(f"{param('canny_low')} / {param('canny_high')} apply to "
                                 f"--control canny, not {args.control!r}")
        config = controlnet_training_config(args.base, control=args.control,
                                            control_options=opts, overrides=args.overrides,
                                            options=options)
    print(f"difflab train-controlnet: {config['control']['preprocessor']} ControlNet for "
          f"{config['base']['path']} -> {out}/ (control images of the training set computed "
          "once at the start)", file=sys.stderr)
    summary = train_controlnet(config, out, resume=args.resume, device=args.device,
                               progress=not args.quiet)
    print(f"trained {summary['steps']} steps in {summary['seconds'] / 60:.1f} min "
          f"(stopped by {summary['stopped_by']}), final loss {summary['loss']:.4f}")
    print(f"checkpoint: {summary.get('checkpoint')} (the base is referenced, not copied)")
    print(f"sample:     difflab sample {out} --control-image edges.png --out grid.png")
    return 0
