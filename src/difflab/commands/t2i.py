"""Text-to-image commands: ``difflab train t2i_canvas``, ``difflab sample RUN --prompt ...``,
``difflab eval RUN --prompts FILE``.

    summary = train_text_to_image(t2i_config("t2i_canvas"), "runs/t2i")
    images, prompts = generate_from_prompts("runs/t2i", ["a small bag in the top left"], cfg=2)
    write_captioned_grid(images, prompts, "grid.png")
    table = evaluate_prompts("runs/t2i", read_prompts("prompts.txt"), cfgs=[0, 1, 2])

Training (:mod:`difflab.train.t2i`): one command runs both stages (autoencoder, then latent
diffusion) in one run directory; the stage is recorded in ``RUN/stages.json`` and ``--resume``
continues the one that was running; ``--set autoencoder=RUN`` trains only the diffusion stage
on an autoencoder trained before. ``--max-minutes`` is the budget of both stages together.

Guidance options are those of ``difflab sample`` (``--cfg`` w, w-convention: 0 = unguided;
``--cfg-rescale``) plus ``--negative-prompt`` and ``--guidance-interval LO HI`` (CFG only where
sigma~ = sigma_t / alpha_t lies in [LO, HI]).
"""

from __future__ import annotations

import argparse
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from difflab.commands.common import MissingFileError, ParameterError, param, set_threads

__all__ = ["train_text_to_image", "read_prompts", "generate_from_prompts",
           "write_captioned_grid", "evaluate_prompts", "is_text_to_image", "MAX_PROMPT_CHARS",
           "cmd_train_t2i", "cmd_sample_t2i", "cmd_eval_t2i", "add_prompt_args"]

#: longest prompt accepted before the text encoder's own token limit is asked
MAX_PROMPT_CHARS = 1000


def is_text_to_image(checkpoint: str | os.PathLike) -> bool:
    """Whether ``checkpoint`` (a run or checkpoint directory) is a text-to-image model."""
    from difflab.train import checkpoint as ckpt

    try:
        return ckpt.is_checkpoint(checkpoint) and ckpt.read(checkpoint).kind == "text_to_image"
    except (ValueError, FileNotFoundError):
        return False


# --- training ---------------------------------------------------------------------------------
def train_text_to_image(config: dict[str, Any], out: str | os.PathLike, *,
                        resume: bool = False, device: str | None = None,
                        progress: bool = True) -> dict[str, Any]:
    """Both stages of a text-to-image config into ``out`` (:func:`difflab.train.t2i.
    train_t2i`), with ``train.threads`` torch threads and a progress bar unless
    ``progress=False``."""
    from difflab.train.monitor import ProgressBar
    from difflab.train.t2i import train_t2i

    set_threads(config.get("train", {}).get("threads"))
    return train_t2i(config, out, resume=resume, device=device,
                     callback=ProgressBar(enabled=progress))


def t2i_run_started(out: Path) -> bool:
    """Whether ``out`` holds a text-to-image run, finished or still in stage 1 (an autoencoder
    checkpoint or the stage file, no ``checkpoint`` yet)."""
    from difflab.commands.runs import has_checkpoint
    from difflab.train.t2i import STAGES

    return has_checkpoint(out) or has_checkpoint(out / "autoencoder") or \
        (out / STAGES).is_file()


def cmd_train_t2i(args: argparse.Namespace) -> int:
    """``difflab train t2i_canvas ...`` (called by ``difflab train`` for text-to-image
    configs)."""
    from difflab.train.t2i import T2I_PRESETS, stage_state, t2i_config

    out = Path(args.out) if args.out else Path("runs") / (
        args.config if args.config in T2I_PRESETS else Path(args.config).stem)
    base: Any = args.config
    if args.resume and (out / "checkpoint").exists() or (
            args.resume and (out / "autoencoder" / "config.json").exists()):
        saved = out / "checkpoint" if (out / "checkpoint").exists() else None
        if saved is not None:
            base = str(saved)
    updates = {k: v for k, v in {"steps": args.steps, "max_minutes": args.max_minutes,
                                 "batch_size": args.batch_size, "lr": args.lr,
                                 "seed": args.seed, "threads": args.threads}.items()
               if v is not None}
    if getattr(args, "conditional", False):
        raise ParameterError(f"{param('conditional')} is for class labels; a text-to-image "
                             "model is conditioned on its captions")
    config = t2i_config(base, overrides=args.overrides, train_updates=updates)
    from difflab.commands.runs import open_run

    # claimed as every trainer claims its run; a resumed run's stages are checked by train_t2i
    with open_run(out, resume=args.resume, overwrite=bool(args.overwrite),
                  holds_run=t2i_run_started, resumable=None, what="a text-to-image run"):
        result = train_text_to_image(config, out, resume=args.resume, device=args.device,
                                     progress=not args.quiet)
    ae, dif = result.get("autoencoder"), result.get("diffusion")
    if ae:
        print(f"autoencoder: {ae['steps']} steps in {ae['seconds'] / 60:.1f} min, scale factor "
              f"{ae['scale_factor']:.4f} -> {ae.get('checkpoint')}")
    if dif:
        print(f"diffusion:   {dif['steps']} steps in {dif['seconds'] / 60:.1f} min (stopped by "
              f"{dif['stopped_by']}), final loss {dif['loss']:.4f} -> {dif.get('checkpoint')}")
    print(f"stage: {stage_state(out).get('stage')}. Sample with: difflab sample {out} "
          "--prompt \"a large bag in the top left\" --cfg 2")
    return 0


# --- prompts -------------------------------------------------------------------------------------
def read_prompts(path: str | os.PathLike, name: str = "prompts_file") -> list[str]:
    """The prompts of a text file, one per line (blank lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"{param(name)} {p} does not exist (expected a text file with "
                               "one prompt per line)")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    prompts = [q for q in prompts if q]
    if not prompts:
        raise ParameterError(f"{param(name)} {p} holds no prompts (one per line)")
    return prompts


def _check(prompts: Sequence[str], name: str) -> list[str]:
    prompts = list(prompts)
    if not prompts:
        raise ParameterError(f"{param(name)}: no prompts given")
    for i, q in enumerate(prompts):
        where = f"{param(name)}" + (f" {i + 1}" if len(prompts) > 1 else "")
        if not isinstance(q, str) or not q.strip():
            raise ParameterError(f"{where} is empty; write what the image should show")
        if len(q) > MAX_PROMPT_CHARS:
            raise ParameterError(f"{where} is {len(q)} characters long; at most "
                                 f"{MAX_PROMPT_CHARS}")
    return prompts


def _pipeline(checkpoint: str | os.PathLike, *, ema: bool, device: str | torch.device) -> Any:
    from difflab.pipelines.text_to_image import TextToImagePipeline
    from difflab.train import checkpoint as ckpt

    if not ckpt.is_checkpoint(checkpoint):
        raise MissingFileError(f"{param('checkpoint')} {checkpoint}: no checkpoint there")
    if not is_text_to_image(checkpoint):
        kind = ckpt.read(checkpoint).kind
        raise ParameterError(f"{param('checkpoint')} {checkpoint} has no text encoder (a "
                             f"{kind!r} model), so {param('prompt')} cannot be used with it; "
                             "train a text-to-image model (difflab train t2i_canvas)")
    return TextToImagePipeline.from_checkpoint(checkpoint, ema=ema, device=device)


def _encode_check(pipe: Any, prompts: Sequence[str], name: str) -> None:
    """Over-long prompts (more tokens than the text encoder takes) as a ParameterError."""
    try:
        pipe.text_encoder.encode(list(dict.fromkeys(prompts)))
    except ValueError as e:
        raise ParameterError(f"{param(name)}: {e}") from e


def generate_from_prompts(checkpoint: str | os.PathLike, prompts: Sequence[str], *,
                          negative_prompt: str | None = None, cfg: float | None = None,
                          cfg_rescale: float = 0.0,
                          guidance_interval: tuple[float, float] | None = None,
                          sampler: str = "auto", steps: int | None = None,
                          spacing: str | None = None, seed: int = 0, batch_size: int = 64,
                          ema: bool = True, device: str | torch.device = "cpu",
                          pipeline: Any = None) -> tuple[Tensor, list[str]]:
    """(images (N, C, H, W) in [-1, 1], prompts) of a text-to-image checkpoint, one image per
    prompt in prompt order. ``sampler`` "auto": the solver fitted to the checkpoint for
    ``steps`` and this guidance (``difflab tune-grid --prompts-file F --cfg W``) if there is
    one, else the plan a probe of the guided model picks (a consistency model: its own
    sampler); ``cfg`` None: the checkpoint's default weight.
    """
    from difflab.commands.model import choose_solver, prompt_fits
    from difflab.commands.plan_cache import default_plan as cached_default_plan

    prompts = _check(prompts, "prompt")
    if negative_prompt is not None:
        _check([negative_prompt], "negative_prompt")
    if cfg is not None and cfg < 0:
        raise ParameterError(f"{param('cfg')} must be >= 0 (w-convention: 0 = unguided), got "
                             f"{cfg}")
    if not 0 <= cfg_rescale <= 1:
        raise ParameterError(f"{param('cfg_rescale')} must lie in [0, 1], got {cfg_rescale}")
    if guidance_interval is not None:
        lo, hi = guidance_interval
        if not 0 <= lo <= hi:
            raise ParameterError(f"{param('guidance_interval')} must be LO HI with 0 <= LO <= "
                                 f"HI, got {lo} {hi}")
    pipe = pipeline if pipeline is not None else _pipeline(checkpoint, ema=ema, device=device)
    _encode_check(pipe, prompts, "prompt")
    if negative_prompt is not None:
        _encode_check(pipe, [negative_prompt], "negative_prompt")
    steps = int(steps or pipe.defaults["steps"])
    kw: dict[str, Any] = {}
    if sampler == "auto":  # the fit `tune-grid --prompts-file F --cfg W` made for this w
        w = float(pipe.defaults["cfg"] if cfg is None else cfg)
        fits = prompt_fits(w, cfg_rescale, negative_prompt=negative_prompt is not None,
                           interval=guidance_interval is not None)
        solver = choose_solver(checkpoint, "auto", steps, spacing=spacing, ema=ema,
                               guidance=fits)
        if solver.fit is not None:
            kw["fit"] = solver.fit
        else:
            kw.update(sampler="auto", steps=steps, spacing=spacing,
                      planner=cached_default_plan)  # the probe's plan, kept between runs
    else:
        solver = choose_solver(None, sampler, steps, spacing=spacing)  # checks the names
        kw.update(sampler=solver.sampler, steps=steps, spacing=spacing)
    images = pipe(prompts, negative_prompt=negative_prompt, cfg=cfg, cfg_rescale=cfg_rescale,
                  interval=guidance_interval, seed=seed, batch_size=batch_size, **kw)
    return images, prompts


def write_captioned_grid(images: Tensor, captions: Sequence[str], out: str | os.PathLike, *,
                         nrow: int | None = None, scale: int = 2, width: int = 22) -> Path:
    """A PNG grid of ``images`` (NCHW in [-1, 1]) with each caption drawn under its image
    (PIL's default font, wrapped at ``width`` characters)."""
    import math

    from PIL import Image, ImageDraw

    from difflab import files
    from difflab.data import to_uint8

    n = images.shape[0]
    if len(captions) != n:
        raise ValueError(f"{n} images but {len(captions)} captions")
    u8 = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
    h, w = u8.shape[1] * scale, u8.shape[2] * scale
    lines = [textwrap.wrap(str(c), width) or [""] for c in captions]
    line_h = 11
    text_h = line_h * max(len(x) for x in lines) + 4
    nrow = nrow or min(n, 8) or 1
    ncol = math.ceil(n / nrow)
    pad = 4
    tile_w = max(w, 6 * width + 4)
    grid = Image.new("RGB", (nrow * (tile_w + pad) + pad, ncol * (h + text_h + pad) + pad),
                     "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        r, q = divmod(i, nrow)
        x0, y0 = pad + q * (tile_w + pad), pad + r * (h + text_h + pad)
        a = u8[i][..., 0] if u8.shape[-1] == 1 else u8[i]
        tile = Image.fromarray(a).convert("RGB").resize((w, h), Image.NEAREST)
        grid.paste(tile, (x0 + (tile_w - w) // 2, y0))
        for k, line in enumerate(lines[i]):
            draw.text((x0 + 2, y0 + h + 2 + k * line_h), line, fill="black")
    return files.write_bytes(out, files.png_bytes(grid), what="image grid")


# --- evaluation --------------------------------------------------------------------------------
def evaluate_prompts(checkpoint: str | os.PathLike, prompts: Sequence[str], *,
                     cfgs: Sequence[float] = (0.0,), repeats: int = 1, steps: int | None = None,
                     sampler: str = "auto", seed: int = 0, batch_size: int = 64,
                     ema: bool = True, device: str | torch.device = "cpu",
                     guidance_interval: tuple[float, float] | None = None,
                     negative_prompt: str | None = None, reference: Tensor | None = None,
                     save_samples: str | os.PathLike | None = None,
                     on_record: Any = None) -> dict[str, Any]:
    """Prompt adherence (:func:`difflab.metrics.adherence.adherence`) of a text-to-image
    checkpoint on canvas ``prompts`` (each sampled ``repeats`` times) at each guidance weight
    of ``cfgs``: overall, and split into seen and held-out compositions
    (:data:`difflab.data.canvas.HELD_OUT`). ``reference``: real canvases for the FID of the
    crops. Returns {"checkpoint", "n", "results": [one record per cfg]}."""
    import time

    from difflab.data.canvas import HELD_OUT, parse_caption
    from difflab.metrics.adherence import adherence

    prompts = _check(prompts, "prompts")
    try:
        comps = [parse_caption(p) for p in prompts]
    except ValueError as e:
        raise ParameterError(f"{param('prompts')}: the adherence evaluator reads canvas "
                             f"captions only: {e}") from None
    pipe = _pipeline(checkpoint, ema=ema, device=device)
    asked = [p for p in prompts for _ in range(int(repeats))]
    held = torch.tensor([c in set(HELD_OUT) for c in comps for _ in range(int(repeats))])
    records = []
    for w in cfgs:
        t0 = time.perf_counter()
        images, _ = generate_from_prompts(checkpoint, asked, cfg=float(w), sampler=sampler,
                                          steps=steps, seed=seed, batch_size=batch_size,
                                          ema=ema, device=device, pipeline=pipe,
                                          guidance_interval=guidance_interval,
                                          negative_prompt=negative_prompt)
        seconds = time.perf_counter() - t0
        if save_samples:
            from difflab.commands.images import write_samples

            write_samples(images, Path(save_samples) / f"cfg_{w:g}.npy")
        res = adherence(images, asked, reference=reference)
        rec = {"cfg": float(w), "n": len(asked), "seconds": seconds,
               "images_per_s": len(asked) / seconds, "fid": res["fid"], "label": res["label"]}
        per = res["per_image"]
        for part, sel in (("all", torch.ones_like(held)), ("seen", ~held), ("held_out", held)):
            if not bool(sel.any()):
                continue
            rec[part] = {"n": int(sel.sum()), **{
                k: float(per[f"correct_{k}"][sel].float().mean())
                for k in ("class", "position", "size")},
                "all": float((per["correct_class"] & per["correct_position"]
                              & per["correct_size"])[sel].float().mean())}
        records.append(rec)
        if on_record is not None:
            on_record(rec)
    return {"checkpoint": str(checkpoint), "n": len(asked), "repeats": int(repeats),
            "seed": seed, "results": records}


def format_record(rec: dict[str, Any]) -> str:
    parts = [f"cfg {rec['cfg']:g}:"]
    for part in ("all", "seen", "held_out"):
        if part in rec:
            r = rec[part]
            parts.append(f"{part} (n={r['n']}) class {r['class']:.3f} position "
                         f"{r['position']:.3f} size {r['size']:.3f}")
    if rec.get("fid") is not None:
        parts.append(f"{rec['label']} {rec['fid']:.2f}")
    parts.append(f"{rec['images_per_s']:.1f} img/s")
    return "  ".join(parts)


# --- command line glue (flags added to `difflab sample` and `difflab eval`) ---------------------
def add_prompt_args(parser: argparse.ArgumentParser, *, eval_command: bool = False) -> None:
    """The text-to-image options of ``difflab sample`` (or ``difflab eval``)."""
    grp = parser.add_argument_group("text-to-image", "prompts of a text-to-image checkpoint")
    if eval_command:
        grp.add_argument("--prompts", default=None, metavar="FILE",
                         help="canvas prompts, one per line: report prompt adherence (class / "
                              "position / size, seen and held-out compositions)")
        grp.add_argument("--cfgs", default=None, metavar="W,W,...",
                         help="guidance weights to evaluate (default: --cfg)")
        grp.add_argument("--repeats", type=int, default=1, help="samples per prompt")
    else:
        grp.add_argument("--prompt", action="append", default=None,
                         help="a prompt (repeatable); writes --per-prompt images of each")
        grp.add_argument("--prompts-file", default=None, metavar="FILE",
                         help="prompts, one per line; one image per prompt in file order "
                              "(with --out x.npy: uint8 NHWC for external evaluators)")
        grp.add_argument("--per-prompt", type=int, default=None,
                         help="images per prompt (default: 4 with --prompt, 1 with "
                              "--prompts-file)")
    grp.add_argument("--negative-prompt", default=None,
                     help="guide away from this prompt instead of from the empty prompt "
                          "(its encoding replaces the null branch of CFG)")
    grp.add_argument("--guidance-interval", type=float, nargs=2, default=None,
                     metavar=("LO", "HI"),
                     help="apply CFG only where sigma~ = sigma_t / alpha_t lies in [LO, HI]")


def cmd_sample_t2i(args: argparse.Namespace) -> int:
    """``difflab sample RUN --prompt ... | --prompts-file FILE``."""
    from difflab.commands.images import write_samples

    set_threads(getattr(args, "threads", None))
    if args.prompt and args.prompts_file:
        raise ParameterError(f"give {param('prompt')} or {param('prompts_file')}, not both")
    if not args.prompt and not args.prompts_file:
        raise ParameterError(f"{param('checkpoint')} {args.checkpoint} is a text-to-image "
                             f"model: give {param('prompt')} \"...\" or "
                             f"{param('prompts_file')} FILE")
    base = read_prompts(args.prompts_file) if args.prompts_file else _check(args.prompt,
                                                                             "prompt")
    count = args.count if getattr(args, "count_given", False) else None
    if count is not None and args.per_prompt:
        raise ParameterError(f"give {param('count')} (sample i takes prompt i mod P) or "
                             f"{param('per_prompt')}, not both")
    if count is not None:
        if count < 1:
            raise ParameterError(f"{param('count')} must be >= 1, got {count}")
        per, prompts = 1, [base[i % len(base)] for i in range(count)]
    else:
        per = args.per_prompt or (1 if args.prompts_file else 4)
        if per < 1:
            raise ParameterError(f"{param('per_prompt')} must be >= 1, got {per}")
        prompts = [p for p in base for _ in range(per)]
    from difflab.commands.images import check_output

    overwrite = bool(getattr(args, "overwrite", False))
    out = check_output(args.out, getattr(args, "npy_dtype", "uint8"), overwrite=overwrite)
    cfg = float(args.cfg or 0.0)  # --cfg W, w-convention: 0 (the default) = unguided
    images, prompts = generate_from_prompts(
        args.checkpoint, prompts, negative_prompt=args.negative_prompt, cfg=cfg,
        cfg_rescale=args.cfg_rescale or 0.0,
        guidance_interval=tuple(args.guidance_interval) if args.guidance_interval else None,
        sampler=args.sampler, steps=args.steps, spacing=args.spacing, seed=args.seed,
        batch_size=args.batch_size, ema=not args.no_ema, device=args.device)
    if out.suffix == ".png":
        write_captioned_grid(images, prompts, out, nrow=per if per > 1 else None)
    else:
        write_samples(images, out, npy_dtype=getattr(args, "npy_dtype", "uint8"),
                      overwrite=overwrite)
    how = f"{len(base)} prompts x {per}" if count is None else f"prompt i mod {len(base)}"
    print(f"wrote {len(prompts)} images ({how}) to {out}")
    return 0


def cmd_eval_t2i(args: argparse.Namespace) -> int:
    """``difflab eval RUN --prompts FILE [--cfgs 0,1,2]``."""
    import json

    from difflab import files

    set_threads(getattr(args, "threads", None))
    prompts = read_prompts(args.prompts, name="prompts")
    cfgs = [float(s) for s in args.cfgs.split(",") if s.strip()] if args.cfgs else [args.cfg]
    steps = [int(s) for s in str(args.steps).split(",") if s.strip()][0]
    result = evaluate_prompts(
        args.source, prompts, cfgs=cfgs, repeats=args.repeats, steps=steps,
        sampler=args.sampler, seed=args.seed, batch_size=min(args.batch_size, 256),
        ema=not args.no_ema, device=args.device, negative_prompt=args.negative_prompt,
        guidance_interval=tuple(args.guidance_interval) if args.guidance_interval else None,
        on_record=lambda rec: print(format_record(rec), flush=True))
    if args.out:
        print(f"wrote {files.write_json(args.out, result, what='evaluation results')}")
    else:
        print(json.dumps({"n": result["n"]}))
    return 0
