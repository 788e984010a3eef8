"""``difflab distill``: a few-step consistency model from a trained diffusion model (issue #20).

    summary = distill("runs/fm", "runs/fm_cd", method="cd", solver="heun", max_minutes=30)
    # then: difflab sample runs/fm_cd --steps 1   (the consistency sampler, by default)

Methods (:mod:`difflab.train.distill`): ``cd`` consistency distillation (the teacher's ODE step
by ``solver``), ``ct`` improved consistency training from scratch (the teacher's architecture,
schedule and data only), ``ect`` easy consistency tuning (from the teacher's weights). A
text-to-image teacher (``difflab train t2i_canvas``) is distilled by latent consistency
distillation (``cd`` there means ``lcd``): the student takes the guidance weight w as an input,
trained over ``w_range``; ``difflab sample OUT --prompt ... --cfg W --steps 4`` samples it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from difflab.commands.common import (
    HelpFormatter,
    MissingFileError,
    ParameterError,
    param,
    set_threads,
)

__all__ = ["distill", "distill_run_config", "register", "cmd_distill"]


def distill_run_config(teacher: str | os.PathLike, *, method: str = "cd",
                       solver: str | None = None, steps: int | None = None,
                       batch_size: int | None = None, lr: float | None = None,
                       seed: int | None = None, threads: int | None = None,
                       cfg: float | None = None,
                       w_range: tuple[float, float] | None = None) -> dict[str, Any]:
    """The config of a consistency run from the diffusion or text-to-image checkpoint (or run
    directory) ``teacher``; ParameterError for a teacher that is neither, an unknown method or
    solver, bad numbers; MissingFileError for a missing checkpoint."""
    from difflab.commands.validate import check_number
    from difflab.samplers import STEPS
    from difflab.train import checkpoint as ckpt
    from difflab.train.distill import METHODS, distill_config

    if method not in METHODS:
        raise ParameterError(f"unknown {param('method')} {method!r}; valid: "
                             f"{', '.join(METHODS)}")
    if solver is not None and solver not in STEPS:
        raise ParameterError(f"unknown teacher {param('solver')} {solver!r}; valid (solvers "
                             f"with a one-step form): {', '.join(STEPS)}")
    check_number("steps", steps, minimum=1, integer=True)
    check_number("batch_size", batch_size, minimum=1, integer=True)
    check_number("lr", lr, minimum=0, strict=True)
    check_number("seed", seed, minimum=0, integer=True)
    check_number("threads", threads, minimum=0, integer=True)
    check_number("cfg", cfg, minimum=0)
    if not ckpt.is_checkpoint(ckpt.resolve(teacher)):
        raise MissingFileError(f"{param('teacher')} {teacher}: no checkpoint there (a run "
                               "directory of `difflab train`, or its checkpoint/)")
    path = ckpt.resolve(teacher)
    config = ckpt.read_config(path)
    train = {k: v for k, v in {"steps": steps, "batch_size": batch_size, "lr": lr,
                               "seed": seed, "threads": threads}.items() if v is not None}
    if config.get("kind") == "text_to_image":
        return _latent_config(config, path, method=method, solver=solver, train=train,
                              cfg=cfg, w_range=w_range)
    if w_range is not None:
        raise ParameterError(f"{param('w_range')} is for a text-to-image teacher (latent "
                             "consistency distillation); this teacher is a "
                             f"{config.get('kind', 'diffusion')!r} model")
    if config.get("kind", "diffusion") != "diffusion":
        raise ParameterError(f"{param('teacher')} {teacher} is a {config.get('kind')!r} "
                             "checkpoint, not a diffusion model; distill a checkpoint of "
                             "`difflab train`")
    cons = {"cfg": float(cfg)} if cfg is not None else None
    return distill_config(config, method=method, solver=solver,
                          teacher_path=str(Path(path).resolve()), train=train, consistency=cons)


def _latent_config(config: dict[str, Any], path: Any, *, method: str, solver: str | None,
                   train: dict[str, Any], cfg: float | None,
                   w_range: tuple[float, float] | None) -> dict[str, Any]:
    """The latent consistency config of the text-to-image teacher ``config`` at ``path``."""
    from difflab.train.distill import latent_distill_config

    if method != "cd":
        raise ParameterError(f"a text-to-image teacher is distilled with {param('method')} cd "
                             f"(latent consistency distillation); {method!r} is not "
                             "supported for it")
    cons: dict[str, Any] = {}
    if cfg is not None:
        cons["sample_cfg"] = float(cfg)
    if w_range is not None:
        lo, hi = (float(w) for w in w_range)
        if not 0 <= lo <= hi:
            raise ParameterError(f"{param('w_range')} must be LO HI with 0 <= LO <= HI, got "
                                 f"{lo:g} {hi:g}")
        cons["w_range"] = [lo, hi]
    try:
        return latent_distill_config(config, teacher_path=str(Path(path).resolve()),
                                     solver=solver, train=train, consistency=cons)
    except ValueError as e:
        raise ParameterError(f"{param('teacher')}: {e}") from None


def distill(teacher: str | os.PathLike | None, out: str | os.PathLike, *, method: str = "cd",
            solver: str | None = None, max_minutes: float | None = None,
            max_cpu_minutes: float | None = None, steps: int | None = None,
            batch_size: int | None = None, lr: float | None = None,
            seed: int | None = None, threads: int | None = None, cfg: float | None = None,
            w_range: tuple[float, float] | None = None, resume: bool = False,
            overwrite: bool = False, device: str | None = None,
            progress: bool = True) -> dict[str, Any] | None:
    """Train a consistency model from ``teacher`` into ``out`` for ``max_minutes`` of wall
    clock, ``max_cpu_minutes`` of this process's CPU time (the first spent ends it), or
    ``steps`` (``steps`` ``steps`` also sets the schedule of N(k) / ECT's stages, see
    :mod:`difflab.train.distill`). A text-to-image ``teacher`` is distilled by latent
    consistency distillation over guidance weights ``w_range`` (``cfg``: the weight its
    pipeline samples with by default). ``resume`` continues ``out`` (bit-identically; the teacher
    from the path its config names unless given). Returns the trainer's summary."""
    from difflab.commands.runs import check_run, open_run
    from difflab.commands.train import checkpoint_config
    from difflab.commands.validate import check_device, check_number
    from difflab.train import checkpoint as ckpt
    from difflab.train.distill import distill_modules
    from difflab.train.monitor import ProgressBar
    from difflab.train.trainer import Trainer

    check_device(device)
    check_number("max_minutes", max_minutes, minimum=0, strict=True)
    check_number("max_cpu_minutes", max_cpu_minutes, minimum=0, strict=True)
    check_run(out, resume=resume, overwrite=overwrite)
    if resume:
        config = checkpoint_config(out)
        if config is None or "consistency" not in config or "teacher" not in config:
            raise ParameterError(f"{param('out')} {out} holds no consistency run to resume")
        teacher = teacher or config["teacher"]["path"]
        if steps is not None:
            config["train"]["steps"] = int(steps)
    else:
        if teacher is None:
            raise ParameterError(f"give the {param('teacher')} checkpoint to distill")
        config = distill_run_config(teacher, method=method, solver=solver, steps=steps,
                                    batch_size=batch_size, lr=lr, seed=seed, threads=threads,
                                    cfg=cfg, w_range=w_range)
    teacher_path = ckpt.resolve(teacher)
    if max_cpu_minutes is not None:
        config["train"]["max_cpu_minutes"] = float(max_cpu_minutes)
    set_threads(config["train"].get("threads"))
    with open_run(out, resume=resume, overwrite=overwrite):
        bar = ProgressBar(enabled=progress)
        if config.get("kind") == "text_to_image":  # latent consistency distillation
            from difflab.train.distill import latent_distill_trainer

            model, _ = ckpt.load(teacher_path, ema=True)
            trainer = latent_distill_trainer(config, out, teacher=model,
                                             teacher_path=teacher_path, resume=resume,
                                             device=device, callback=bar)
        else:
            teacher_den, _ = ckpt.load_denoiser(teacher_path, ema=True)
            modules = distill_modules(config, teacher_den.net)
            refs = {"teacher": str(teacher_path)} if "teacher" in modules else None
            trainer = Trainer(config, out, modules=modules, references=refs, resume=resume,
                              device=device, callback=bar)
        try:
            summary = trainer.run(max_minutes=max_minutes)
        finally:
            trainer.close()
    return summary if trainer.dist.is_main else None


def register(subparsers: Any) -> None:
    """Add ``distill`` to the ``difflab`` command line."""
    from difflab.samplers import STEPS

    p = subparsers.add_parser(
        "distill", formatter_class=HelpFormatter,
        help="distil a diffusion model into a 1-4 step consistency model",
        description="Make a consistency model from a trained diffusion model RUN: consistency "
                    "distillation (cd; the teacher's ODE step by --solver), improved "
                    "consistency training from scratch (ct; the teacher's architecture and "
                    "data only) or easy consistency tuning (ect; from the teacher's weights). "
                    "Writes OUT/checkpoint; `difflab sample OUT --steps 1` samples it with the "
                    "consistency sampler. A class-conditional teacher is distilled with "
                    "classifier-free guidance --cfg (sample the student without guidance). A "
                    "text-to-image teacher is distilled by latent consistency distillation: "
                    "the student takes the guidance weight as an input (--w-range), so `difflab "
                    "sample OUT --prompt TEXT --cfg W --steps 4` costs one call per step.")
    p.add_argument("teacher", nargs="?", default=None,
                   help="the diffusion model's run directory or checkpoint (on --resume: "
                        "default the one the run was started from)")
    p.add_argument("--out", default=None, help="run directory (default: RUN_<method>)")
    p.add_argument("--method", default="cd", choices=("cd", "ct", "ect"),
                   help="cd: distillation, ct: consistency training, ect: consistency tuning")
    p.add_argument("--solver", default=None,
                   help=f"the teacher's one-step ODE solver for cd: {', '.join(STEPS)} "
                        "(default heun)")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance weight w of a class-conditional teacher (cd); "
                        "for a text-to-image teacher: the student's default sampling w "
                        "(default 3)")
    p.add_argument("--w-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="text-to-image teacher: the guidance weights w the student learns, "
                        "drawn uniformly (default 0 4)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock budget in minutes (a resumed run counts time spent)")
    p.add_argument("--max-cpu-minutes", type=float, default=None,
                   help="CPU-time budget in minutes (this process, all threads; a resumed run "
                        "counts what was spent)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps K (default 4000); also the length of the N(k) / ECT "
                        "stage schedule")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default 32)")
    p.add_argument("--lr", type=float, default=None, help="learning rate")
    p.add_argument("--seed", type=int, default=None, help="seed")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--resume", action="store_true", help="continue OUT exactly")
    p.add_argument("--overwrite", action="store_true",
                   help="move an earlier run in OUT aside and start afresh")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_distill)


def cmd_distill(args: argparse.Namespace) -> int:
    from difflab.commands.t2i import is_text_to_image

    out = args.out
    if out is None:
        if args.teacher is None:
            raise ParameterError(f"give the {param('teacher')} run or {param('out')}")
        out = str(Path(args.teacher).resolve().parent / (
            Path(args.teacher).resolve().name + f"_{args.method}"))
    summary = distill(args.teacher, out, method=args.method, solver=args.solver,
                      max_minutes=args.max_minutes, max_cpu_minutes=args.max_cpu_minutes,
                      steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      threads=args.threads, cfg=args.cfg, w_range=args.w_range,
                      resume=args.resume,
                      overwrite=args.overwrite, device=args.device, progress=not args.quiet)
    if summary is not None:
        print(f"{summary['steps']} steps in {summary['seconds'] / 60:.1f} min, "
              f"{summary['cpu_seconds'] / 60:.1f} CPU min ({summary['stopped_by']}); "
              f"checkpoint: {summary.get('checkpoint')}; sample it "
              f"with: difflab sample {out} " + (
                  '--prompt "a large bag in the top left" --steps 4'
                  if is_text_to_image(out) else "--steps 1"))
    return 0
