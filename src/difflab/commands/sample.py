"""``difflab sample``: samples of a checkpoint, written as a PNG grid, a .npy array or a
directory of PNGs (:mod:`difflab.commands.images` lists the formats).

    samples = generate("runs/fm", count=16, steps=10, guidance=Guidance(cfg=1.5, label=3))
    write_samples(samples.images, "grid.png")

A local diffusers model or pipeline folder samples the same way (``difflab sample FOLDER``;
:func:`~difflab.commands.model.load_diffusers_model`): a text pipeline with ``--prompt`` (its
CLIP text encoder; ``--cfg`` w = diffusers' guidance_scale - 1), a ControlNet pipeline with
``--control-image``, a latent one decoded by its VAE; the fits ``difflab tune-grid FOLDER``
stored in ``FOLDER.difflab/`` run as a difflab checkpoint's do.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from difflab.commands.common import HelpFormatter, ParameterError, param
from difflab.commands.controlnet import add_control_args, cmd_sample_controlled, is_controlnet
from difflab.commands.guidance import Guidance, add_guidance_args, guidance_from_args
from difflab.commands.images import NPY_DTYPES, check_output, write_samples
from difflab.commands.model import (
    Samples,
    Solver,
    choose_solver,
    load_diffusers_model,
    load_model,
    sample_images,
)
from difflab.commands.t2i import add_prompt_args, cmd_sample_t2i, is_text_to_image

__all__ = ["generate", "register", "cmd_sample", "cmd_sample_diffusers"]


def generate(checkpoint: str | os.PathLike, *, count: int = 64, steps: int = 10,
             sampler: str = "auto", spacing: str | None = None, seed: int = 0,
             batch_size: int = 256, ema: bool = True, device: str | torch.device = "cpu",
             guidance: Guidance | None = None, prompts: list[str] | None = None,
             negative_prompt: str | None = None, control: Any = None) -> Samples:
    """``count`` samples of a checkpoint (or run directory): ``sampler`` ("auto": the solver
    fitted to the checkpoint for ``steps`` if there is one, else the probe's plan, else
    dpmpp_2m) for ``steps`` steps
    on the ``spacing`` rule's grid (None: the grid stored with the checkpoint for that sampler
    and step count, else the sampler's default; :func:`~difflab.commands.model.choose_solver`),
    from ``seed``, guided by ``guidance``; its EMA weights unless ``ema=False``. Returns
    :class:`~difflab.commands.model.Samples` (``.images``: (count, *shape) in about [-1, 1]).
    ``prompts`` (sample i takes prompt i mod P), ``negative_prompt`` and ``control`` (a
    ControlNet's control images, or a function of its input shape giving them) condition a
    diffusers pipeline folder (:func:`~difflab.commands.model.load_diffusers_model`).
    """
    from difflab.commands.validate import check_device, check_memory

    if isinstance(count, bool) or not isinstance(count, int) or count < 1:  # before loading
        raise ParameterError(f"{param('count')} must be at least 1, got {count}")
    check_device(device)
    if prompts is not None or control is not None:
        model = load_diffusers_model(checkpoint, ema=ema, device=device, guidance=guidance,
                                     prompts=prompts, negative_prompt=negative_prompt,
                                     control=control)
    else:
        model = load_model(checkpoint, ema=ema, device=device, guidance=guidance)
    check_memory(count, model.shape)  # before sampling: the samples must fit in memory
    solver = choose_solver(model.checkpoint, sampler, steps, spacing=spacing, ema=ema,
                           guidance=model.guided.fits)
    return sample_images(model, solver, count, seed=seed, batch_size=batch_size)


def register(subparsers: Any) -> None:
    """Add ``sample`` to the ``difflab`` command line."""
    from difflab.samplers import SPACINGS

    s = subparsers.add_parser(
        "sample", formatter_class=HelpFormatter, help="sample images from a checkpoint",
        description="Sample from a checkpoint. --out: a .png file writes one grid, a .npy file "
                    "one array (uint8 NHWC in [0,255] or float32 NCHW in [-1,1], see "
                    "--npy-dtype), anything else a directory of PNGs (000000.png, ...).")
    s.add_argument("checkpoint", help="checkpoint directory (or the run directory holding it), "
                                      "or a local diffusers model / pipeline folder")
    s.add_argument("--sampler", default="auto",
                   help="sampler name (difflab.samplers.names()), or auto: the bespoke solver "
                        "fitted to the checkpoint for --steps (written by `difflab train` with "
                        "train.fit_steps or by `difflab tune-grid --sampler bespoke`) if there "
                        "is one, else the plan a probe of the model picks (2-40 steps; kept "
                        "in ~/.cache/difflab/plans, DIFFLAB_CACHE=DIR|off), else dpmpp_2m")
    s.add_argument("--steps", type=int, default=10, help="sampler steps")
    s.add_argument("--spacing", default=None, choices=SPACINGS,
                   help="time grid rule (default: the grid `difflab tune-grid` fitted for this "
                        "sampler and step count, else the sampler's default)")
    s.add_argument("--seed", type=int, default=0,
                   help="seed of the noise (one seed gives the same images whatever "
                        "--batch-size, and the same as `difflab eval --save-samples`)")
    s.add_argument("--count", type=int, default=None,
                   help=f"number of samples (default: {DEFAULT_COUNT}; with --prompt / "
                        "--prompts-file: sample i takes prompt i mod P)")
    s.add_argument("--out", default="samples.png", help="output: grid .png, .npy, or directory")
    s.add_argument("--npy-dtype", choices=NPY_DTYPES, default="uint8",
                   help="array type for a .npy output")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (default: refuse)")
    s.add_argument("--batch-size", type=int, default=256, help="samples per network batch")
    s.add_argument("--no-ema", action="store_true", help="use the raw instead of the EMA weights")
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    add_guidance_args(s)  # --label, --cfg/--guidance, --cfg-rescale, --classifier, ...
    add_prompt_args(s)  # --prompt, --prompts-file, --negative-prompt, --guidance-interval
    add_control_args(s)  # --control-image, --controlnet, --control-scale, --control-interval
    s.set_defaults(func=cmd_sample)


DEFAULT_COUNT = 64  # difflab sample's --count


def cmd_sample(args: argparse.Namespace) -> int:
    from difflab.interop import is_diffusers_folder

    args.count_given = args.count is not None  # text-to-image: --count or --per-prompt
    if args.count is None:
        args.count = DEFAULT_COUNT
    if is_diffusers_folder(args.checkpoint):
        return cmd_sample_diffusers(args)
    if args.prompt or args.prompts_file or is_text_to_image(args.checkpoint):
        return cmd_sample_t2i(args)
    if getattr(args, "control_image", None) or is_controlnet(args.checkpoint):
        if not args.control_image:
            raise ParameterError(f"{args.checkpoint} is a ControlNet run: give its control "
                                 f"image with {param('control_image')}")
        return cmd_sample_controlled(args)
    out = check_output(args.out, args.npy_dtype, overwrite=args.overwrite)  # before any work
    samples = generate(args.checkpoint, count=args.count, steps=args.steps,
                       sampler=args.sampler, spacing=args.spacing, seed=args.seed,
                       batch_size=args.batch_size, ema=not args.no_ema, device=args.device,
                       guidance=guidance_from_args(args))
    solver = samples.solver
    w = args.cfg or 0.0  # a class-conditional model's fits are made for one guidance weight
    guided = f" with guidance w = {w:g}" if samples.labels is not None else ""
    if solver.source == "fitted":
        print(f"using the bespoke solver fitted to {args.checkpoint} for {args.steps} steps"
              f"{guided} (--sampler NAME runs a classical one)")
    elif solver.source == "tuned":
        print(f"using the tuned {solver.sampler} {args.steps}-step grid of {args.checkpoint}"
              f"{guided} (--spacing chooses a fixed rule)")
    elif solver.source == "probe":
        print(probe_message(solver))
    cycling = samples.labels is not None and args.label is None
    nrow = int(samples.labels.max()) + 1 if cycling and args.count > 1 else None
    write_samples(samples.images, out, npy_dtype=args.npy_dtype, nrow=nrow,
                  overwrite=args.overwrite)
    print(f"wrote {args.count} samples ({solver.sampler}, {args.steps} steps) to {out}")
    return 0


def probe_message(solver: Solver) -> str:
    """The line saying which plan the default call's probe chose."""
    grid = ", ".join(f"{t:.3f}" for t in solver.fit.ts)
    return (f"using {solver.sampler} on the {solver.steps}-step grid a probe of this model "
            f"chose (t = {grid}; --sampler / --spacing choose a fixed one)")


def cmd_sample_diffusers(args: argparse.Namespace) -> int:
    """``difflab sample FOLDER`` for a local diffusers model or pipeline folder: ``--count``
    samples (with ``--prompt`` / ``--prompts-file``: sample i takes prompt i mod P, or each
    prompt ``--per-prompt`` times), guided and solved as a difflab checkpoint (its stored
    fits in ``FOLDER.difflab/``)."""
    from difflab.commands.t2i import read_prompts
    from difflab.interop import check_safetensors

    check_safetensors(args.checkpoint)  # pickle refused before any work, nothing opened
    out = check_output(args.out, args.npy_dtype, overwrite=args.overwrite)  # before any work
    prompts = read_prompts(args.prompts_file) if args.prompts_file else args.prompt
    count = args.count
    if prompts and args.per_prompt:
        prompts, count = [p for p in prompts for _ in range(args.per_prompt)], \
            len(prompts) * args.per_prompt
    if len(args.control_image) > 1:
        raise ParameterError(f"{param('control_image')}: a diffusers pipeline takes one "
                             "(a .npy of several: sample i takes image i mod N)")
    samples = generate(args.checkpoint, count=count, steps=args.steps, sampler=args.sampler,
                       spacing=args.spacing, seed=args.seed, batch_size=args.batch_size,
                       ema=not args.no_ema, device=args.device,
                       guidance=guidance_from_args(args), prompts=prompts or None,
                       negative_prompt=args.negative_prompt,
                       control=_control_reader(args.control_image[0]) if args.control_image
                       else None)
    solver = samples.solver
    if solver.source in ("fitted", "tuned"):
        print(f"using the {solver.source} {solver.sampler} {args.steps}-step solver stored "
              f"for {args.checkpoint}")
    elif solver.source == "probe":
        print(probe_message(solver))
    write_samples(samples.images, out, npy_dtype=args.npy_dtype, overwrite=args.overwrite)
    print(f"wrote {count} samples ({solver.sampler}, {args.steps} steps) to {out}")
    return 0


def _control_reader(source: str) -> Any:
    """The control image file ``source`` read at the (C, H, W) a ControlNet takes."""
    from difflab.commands.controlnet import read_control_image

    return lambda shape: read_control_image(source, shape, binary=False, notice=print)
