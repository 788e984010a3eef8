"""Sampling with ControlNets: ``difflab sample RUN --control-image edges.png`` where RUN is a
ControlNet run (``difflab train-controlnet``); ``--controlnet RUN2 --control-image b.png`` adds
another one (their residuals are summed). ``--control-scale`` and ``--control-interval`` are
given once (for all ControlNets) or once per ControlNet, in order (RUN first).

    samples = generate_controlled(["runs/fm_base_canny"], [edges], count=16)
    write_pairs(samples, "grid.png")                # control | sample pairs

Control images (``read_control_image``): an image file (PNG, ...) or a ``.npy`` array of one
or several images (sample i takes image i mod N), values uint8 0..255, bool, or float in
[0, 1]. Bad input:

* another size than the model's: resized (nearest-neighbour for edges and masks, bilinear
  otherwise) with a notice on stderr;
* grey given to a ControlNet of RGB control images or the reverse: converted with a notice;
  any other channel count: a ParameterError naming ``--control-image``;
* a ControlNet trained for another base (recorded SHA-256 differs): a ParameterError naming
  ``--controlnet`` / the run;
* a scale or interval that is not a number: a ParameterError naming the flag.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from difflab.commands.common import MissingFileError, ParameterError, param

__all__ = ["read_control_image", "parse_scale", "parse_interval", "ControlledSamples",
           "generate_controlled", "write_pairs", "add_control_args", "is_controlnet",
           "cmd_sample_controlled", "BINARY_SIGNALS"]

#: control signals whose images are binary (resized nearest-neighbour)
BINARY_SIGNALS = ("canny", "mask")


def is_controlnet(checkpoint: str | os.PathLike) -> bool:
    """Whether ``checkpoint`` is a ControlNet run / checkpoint."""
    from difflab.train import checkpoint as ckpt

    if not ckpt.is_checkpoint(checkpoint):
        return False
    return ckpt.read(checkpoint).kind == "controlnet"


def parse_scale(value: Any, name: str = "control_scale") -> float:
    """A conditioning scale: a finite number, else ParameterError naming ``name``."""
    try:
        s = float(value)
    except (TypeError, ValueError):
        s = math.nan
    if isinstance(value, bool) or not math.isfinite(s):
        raise ParameterError(f"{param(name)} must be a number, got {value!r}")
    return s


def parse_interval(value: Any, name: str = "control_interval") -> tuple[float, float]:
    """``"lo,hi"`` (noise levels sigma~ = sigma / alpha; either may be empty or ``inf`` for
    unbounded) or a pair; else ParameterError naming ``name``."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    if len(parts) != 2:
        raise ParameterError(f"{param(name)} must be two numbers lo,hi (noise levels sigma/alpha, "
                             f"e.g. 0,5), got {value!r}")
    out = []
    for p, default in zip(parts, (0.0, math.inf)):
        if isinstance(p, str) and p.strip() == "":
            out.append(default)
            continue
        try:
            v = float(p)
        except (TypeError, ValueError):
            v = math.nan
        if math.isnan(v):
            raise ParameterError(f"{param(name)} must be two numbers lo,hi, got {value!r}")
        out.append(v)
    if not 0 <= out[0] <= out[1]:
        raise ParameterError(f"{param(name)} must satisfy 0 <= lo <= hi, got {value!r}")
    return out[0], out[1]


def read_control_image(source: str | os.PathLike | Tensor, shape: Sequence[int], *,
                       binary: bool = True, name: str = "control_image",
                       notice: Callable[[str], None] | None = None) -> Tensor:
    """Control images (N, C, H, W) float in [0, 1] for a ControlNet taking ``shape`` = (C, H,
    W): from an image file, a ``.npy`` array ((H, W) or (H, W, C): one image; (N, H, W): N grey
    images; (N, H, W, C) or (N, C, H, W)) or a tensor. A size other than (H, W) is resized
    (``binary``: nearest-neighbour) and grey <-> RGB converted, each with a ``notice``;
    another channel count is a ParameterError naming ``name``."""
    import numpy as np

    from difflab.conditioning.control import from_image

    C, H, W = (int(s) for s in shape)
    say = notice or (lambda msg: None)
    if isinstance(source, Tensor):
        arrays = [source] if source.ndim <= 3 else list(source)
        label = "the control tensor"
    else:
        path = Path(source)
        if not path.is_file():
            raise MissingFileError(f"{param(name)} {path} does not exist")
        label = str(path)
        if path.suffix == ".npy":
            a = np.load(path, allow_pickle=False)
            # (H, W) and (H, W, C) are one image, (C, H, W) too when C is this
            # ControlNet's channel count (> 1); any other 3-D array is N grey images
            one = a.ndim == 2 or (a.ndim == 3 and (
                (a.shape[-1] in (1, 3, 4) and a.shape[0] not in (1, 3, 4))
                or (C > 1 and a.shape[0] == C)))
            arrays = [a] if one else list(a)
        else:
            arrays = [path]
    out = []
    for a in arrays:
        try:
            img = from_image(a)
        except (ValueError, OSError) as e:
            raise ParameterError(f"{param(name)} {label}: {e}") from None
        c = img.shape[1]
        if c != C:
            if (c, C) in ((1, 3), (3, 1)):
                say(f"{label}: {c}-channel control image converted to {C} channel(s) "
                    f"{'(grey, BT.601)' if C == 1 else '(grey repeated)'}")
                img = from_image(a, channels=C)
            else:
                raise ParameterError(
                    f"{param(name)} {label} has {c} channel(s); this ControlNet takes {C}-"
                    f"channel control images of size {H}x{W}")
        if tuple(img.shape[-2:]) != (H, W):
            say(f"{label}: control image resized from {img.shape[-2]}x{img.shape[-1]} to "
                f"{H}x{W} ({'nearest' if binary else 'bilinear'}) to fit the model")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                img = from_image(img[0], (H, W), channels=C,
                                 resample="nearest" if binary else "bilinear")
        out.append(img)
    if not out:
        raise ParameterError(f"{param(name)} {label} holds no image")
    return torch.cat(out)


@dataclass(frozen=True, eq=False)
class ControlledSamples:
    """``images`` (count, C, H, W) in about [-1, 1]; ``controls``: per ControlNet the control
    image each sample was given (count, C_j, H, W) in [0, 1]; ``solver``; ``seconds``."""

    images: Tensor
    controls: list[Tensor]
    solver: Any
    seconds: float = 0.0


def generate_controlled(controlnets: str | os.PathLike | Sequence[str | os.PathLike],
                        controls: Tensor | Sequence[Tensor], *, count: int = 16,
                        scales: float | Sequence[float] | None = None,
                        intervals: Any = None, guess_mode: bool = False,
                        base: str | os.PathLike | None = None, steps: int = 10,
                        sampler: str = "auto", spacing: str | None = None, seed: int = 0,
                        batch_size: int = 256, ema: bool = True,
                        device: str | torch.device = "cpu", denoiser: Any = None
                        ) -> ControlledSamples:
    """``count`` samples of the base model steered by the ControlNet run(s) ``controlnets``,
    each given its control images (``controls``: one (N, C, H, W) batch in [0, 1] per
    ControlNet; sample i takes image i mod N). ``scales`` / ``intervals``: one for all or one
    per ControlNet (None: the checkpoint's stored settings). Seeding as ``difflab sample``
    (:mod:`difflab.commands.model`): the noise of all images from ``seed``, image i's sampler
    noise from ``mix_seed(seed, i)``. No fitted solver of the base is used (it was fitted to the
    uncontrolled model): ``sampler="auto"`` is dpmpp_2m. ``denoiser``: an already loaded
    controlled denoiser (its settings are then used as they are)."""
    from difflab.commands.model import choose_solver, image_generators, sample_shape
    from difflab.denoiser import Condition
    from difflab.nets.controlnet import ControlSettings
    from difflab.samplers import sample
    from difflab.train.controlnet import BaseMismatchError, load_controlled

    paths = [controlnets] if isinstance(controlnets, (str, os.PathLike)) else list(controlnets)
    controls = [controls] if isinstance(controls, Tensor) else list(controls)
    if len(controls) != len(paths):
        raise ParameterError(f"give one {param('control_image')} per ControlNet ({len(paths)}),"
                             f" got {len(controls)}")
    if not isinstance(count, int) or count < 1:
        raise ParameterError(f"{param('count')} must be at least 1, got {count}")
    n = len(paths)

    def per_net(value: Any, what: str) -> list[Any]:
        if value is None or isinstance(value, (int, float, str)) or (
                what == "control_interval" and isinstance(value, tuple)):
            return [value] * n
        value = list(value)
        if len(value) == 1:
            return value * n
        if len(value) != n:
            raise ParameterError(f"give {param(what)} once or once per ControlNet ({n}), got "
                                 f"{len(value)}")
        return value

    settings = None
    if scales is not None or intervals is not None or guess_mode:
        sc = [1.0 if s is None else parse_scale(s) for s in per_net(scales, "control_scale")]
        iv = [None if i is None else parse_interval(i)
              for i in per_net(intervals, "control_interval")]
        settings = [ControlSettings(s, guess_mode, i) for s, i in zip(sc, iv)]
    if denoiser is None:
        try:
            denoiser, config = load_controlled(paths, base=base, settings=settings, ema=ema,
                                               device=device)
        except BaseMismatchError as e:
            raise ParameterError(f"{param('controlnet')}: {e}") from None
    else:
        config = None
    net = denoiser.net
    shape = sample_shape(config) if config is not None else tuple(controls[0].shape[1:])
    for j, (c, cn) in enumerate(zip(controls, net.controlnets)):
        want = (cn.control_channels,) + tuple(shape[1:])
        if c.ndim != 4 or tuple(c.shape[1:]) != want:
            raise ParameterError(f"{param('control_image')} {j + 1} must be (N,) + {want}, got "
                                 f"{tuple(c.shape)} (read files with read_control_image)")
    solver = choose_solver(None, sampler, steps, spacing=spacing)
    noise = torch.randn((count,) + tuple(shape), generator=torch.Generator().manual_seed(seed))
    idx = [torch.arange(count) % len(c) for c in controls]
    per_image = [c[i].float() for c, i in zip(controls, idx)]
    dev = next(denoiser.parameters()).device
    first = torch.cat([c[:batch_size] for c in per_image], 1).to(dev)
    solver = solver.resolve(denoiser, noise[:batch_size].to(dev), Condition(control=first))
    chunks = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, count, batch_size):
            j = min(count, i + batch_size)
            ctrl = torch.cat([c[i:j] for c in per_image], 1).to(dev)
            x = sample(denoiser, noise[i:j].to(dev), cond=Condition(control=ctrl),
                       generator=image_generators(seed, i, j), **solver.sample_kwargs())
            chunks.append(x.detach().float().cpu())
    return ControlledSamples(torch.cat(chunks), per_image, solver, time.perf_counter() - t0)


def write_pairs(samples: ControlledSamples, out: str | os.PathLike, *, npy_dtype: str = "uint8",
                pairs_per_row: int | None = None, overwrite: bool = False) -> Path:
    """Write ``samples``: a ``.png`` grid of (control_1 | ... | control_k | sample) tuples
    (controls shown grey, 0 black, 1 white), ``pairs_per_row`` tuples a row (default: about
    square); a ``.npy`` or a directory gets the samples only (as ``difflab sample``)."""
    from difflab.commands.images import check_output, write_samples

    out = check_output(out, npy_dtype, overwrite=overwrite)
    x = samples.images
    if out.suffix != ".png":
        return write_samples(x, out, npy_dtype=npy_dtype, overwrite=overwrite)
    C = x.shape[1]
    tiles = []
    for c in samples.controls:
        c = c * 2 - 1
        if c.shape[1] != C:  # show a control of another channel count as grey / its mean
            c = c.mean(1, keepdim=True).expand(-1, C, -1, -1)
        tiles.append(c)
    tiles.append(x)
    k = len(tiles)
    stacked = torch.stack(tiles, 1).reshape((-1,) + tuple(x.shape[1:]))
    per_row = pairs_per_row or max(1, int(math.ceil(math.sqrt(len(x) / k))))
    return write_samples(stacked, out, nrow=per_row * k, overwrite=overwrite)


def add_control_args(s: Any) -> None:
    """The ControlNet options of ``difflab sample``."""
    s.add_argument("--control-image", action="append", default=[], metavar="PATH",
                   help="control image for the ControlNet run given as CHECKPOINT (then one per "
                        "--controlnet): an image file or a .npy of several (sample i takes "
                        "image i mod N); resized to the model's size with a notice. The .png "
                        "grid shows control | sample pairs (repeatable)")
    s.add_argument("--controlnet", action="append", default=[], metavar="RUN",
                   help="a further ControlNet run for the same base (repeatable; residuals "
                        "summed)")
    s.add_argument("--control-scale", action="append", default=[], metavar="S",
                   help="conditioning scale, once for all ControlNets or once per ControlNet "
                        "(0 turns one off; default: the checkpoint's, 1)")
    s.add_argument("--control-interval", action="append", default=[], metavar="LO,HI",
                   help="apply control only at noise levels sigma/alpha in [LO, HI] (either may "
                        "be empty: unbounded), once for all or once per ControlNet")
    s.add_argument("--guess-mode", action="store_true",
                   help="ControlNet guess mode: shallow residuals damped by 0.825 per level")
    s.add_argument("--base", default=None,
                   help="base checkpoint of the ControlNet(s) (default: the path the ControlNet "
                        "recorded); must be the weights it was trained for")


def cmd_sample_controlled(args: Any) -> int:
    """``difflab sample`` with ControlNets (called by :func:`difflab.commands.sample
    .cmd_sample` when CHECKPOINT is a ControlNet run or --control-image is given)."""
    import sys

    from difflab.commands.images import check_output
    from difflab.train import checkpoint as ckpt

    overwrite = bool(getattr(args, "overwrite", False))
    out = check_output(args.out, args.npy_dtype, overwrite=overwrite)
    runs = [args.checkpoint] + list(args.controlnet)
    for r in runs:
        if not is_controlnet(r):
            kind = ckpt.read(r).kind if ckpt.is_checkpoint(r) else None
            what = "--controlnet" if r != args.checkpoint else "checkpoint"
            raise ParameterError(
                f"{param('control_image')} needs ControlNet runs (`difflab train-controlnet`); "
                f"{what} {r} is {'no checkpoint' if kind is None else f'a {kind} checkpoint'}")
    if len(args.control_image) != len(runs):
        raise ParameterError(f"give one {param('control_image')} per ControlNet ({len(runs)}: "
                             f"{', '.join(map(str, runs))}), got {len(args.control_image)}")
    scales = [parse_scale(s) for s in args.control_scale] or None
    intervals = [parse_interval(i) for i in args.control_interval] or None
    if getattr(args, "label", None) is not None or getattr(args, "cfg", 0.0) or getattr(
            args, "classifier", None):
        raise ParameterError(f"{param('label')}, {param('cfg')} and {param('classifier')} are "
                             "not supported together with ControlNets yet")

    def notice(msg: str) -> None:
        print(f"difflab sample: notice: {msg}", file=sys.stderr)

    controls = []
    for r, img in zip(runs, args.control_image):
        c = ckpt.read(r)
        cn_cfg = c.component_config("controlnet")
        ctrl = c.config.get("control", {})
        res = c.config["data"]["resolution"]
        h, w = (res, res) if isinstance(res, int) else res
        controls.append(read_control_image(
            img, (cn_cfg["control_channels"], h, w),
            binary=ctrl.get("preprocessor") in BINARY_SIGNALS, notice=notice))
    samples = generate_controlled(runs, controls, count=args.count, scales=scales,
                                  intervals=intervals, guess_mode=args.guess_mode,
                                  base=args.base, steps=args.steps, sampler=args.sampler,
                                  spacing=args.spacing, seed=args.seed,
                                  batch_size=args.batch_size, ema=not args.no_ema,
                                  device=args.device)
    write_pairs(samples, out, npy_dtype=args.npy_dtype, overwrite=overwrite)
    print(f"wrote {args.count} samples ({samples.solver.sampler}, {args.steps} steps) with "
          f"{len(runs)} ControlNet(s) to {out}"
          + (" (control | sample pairs)" if out.suffix == ".png" else ""))
    return 0
