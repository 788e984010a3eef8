"""Tuned time grids stored with a checkpoint, and ``difflab tune-grid``.

``difflab tune-grid CKPT --sampler unipc --steps 10`` fits the grid of one deterministic sampler
and step count to the checkpoint's network (:func:`difflab.samplers.tuning.tune_grid`, on
calibration noise drawn from ``--seed``) and writes it to ``CKPT/grids.json``:

    {"format": "difflab-grids-1",
     "grids": {"unipc/10/ema": {"ts": [...], "eval_ts": [...], "weights_sha256": "...",
                                 "rmse": ..., "rmse_default": ..., ...}}}

(``eval_ts``: the decoupled times the network is told at each grid point; entries written
before they existed have none and mean t'_i = t_i.) ``--sampler bespoke`` fits a bespoke
solver's coefficients (:func:`difflab.samplers.bespoke.tune_solver`) on the grid of its base
solver (``--base``, default unipc: the entry already in grids.json, else tuned first) and
stores them as ``coeffs`` in a ``bespoke/<steps>/<weights>`` entry.

``difflab sample`` and ``difflab eval`` then use that grid for that sampler, step count and
weights (EMA or raw) by default, and say so; ``--spacing`` chooses a fixed rule instead. A grid
belongs to the weights it was fitted to: each entry records the SHA-256 of the weights file,
and a checkpoint whose weights changed (training resumed) ignores it with a warning. The file
is replaced atomically (written beside, then renamed).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from difflab.cli import HelpFormatter

__all__ = ["GRIDS", "grid_key", "load_tuned_grid", "save_tuned_grid", "register",
           "cmd_tune_grid", "weights_sha256", "tuned_grid_entry", "fitted_solvers"]

GRIDS = "grids.json"
FORMAT = "difflab-grids-1"


def grid_key(sampler: str, steps: int, ema: bool) -> str:
    return f"{sampler}/{steps}/{'ema' if ema else 'model'}"


def weights_sha256(ckpt: Path, ema: bool) -> str:
    """SHA-256 of the checkpoint's EMA (or raw) weights file, hashed once per file version
    (an eval sweep asks for it once per sampler and step count)."""
    from difflab.train.checkpoint import EMA, MODEL

    path = (ckpt / (EMA if ema else MODEL)).resolve()
    st = path.stat()
    return _sha256(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=16)
def _sha256(path: str, mtime_ns: int, size: int) -> str:  # keyed by the file's version
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read(ckpt: Path) -> dict[str, Any]:
    path = ckpt / GRIDS
    if not path.is_file():
        return {"format": FORMAT, "grids": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON ({e}); delete it and run "
                         "`difflab tune-grid` again") from e
    if data.get("format") != FORMAT or not isinstance(data.get("grids"), dict):
        raise ValueError(f"{path} is not a difflab grids file (format {data.get('format')!r}, "
                         f"expected {FORMAT!r}); delete it and run `difflab tune-grid` again")
    return data


def save_tuned_grid(path: str | os.PathLike, tuned: dict[str, Any], *, ema: bool = True) -> Path:
    """Add (or replace) one tuned grid in ``CKPT/grids.json``; returns the file's path."""
    from difflab.train.checkpoint import resolve

    ckpt = resolve(path)
    data = _read(ckpt)
    entry = dict(tuned, weights_sha256=weights_sha256(ckpt, ema))
    data["grids"][grid_key(tuned["sampler"], int(tuned["steps"]), ema)] = entry
    tmp = ckpt / f".{GRIDS}.tmp-{os.getpid()}"
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, ckpt / GRIDS)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, f"could not write {ckpt / GRIDS}: {e.strerror or e}; the "
                               "previous grids file (if any) is intact") from e
    return ckpt / GRIDS


def load_tuned_grid(path: str | os.PathLike, sampler: str, steps: int,
                    ema: bool = True) -> list[float] | dict[str, Any] | None:
    """The tuned grid of ``sampler`` at ``steps`` for these weights as ``difflab.sample``'s
    ``grid=`` takes it (the times, or ``{"ts", "eval_ts"}`` with decoupled evaluation times,
    and ``coeffs`` for a bespoke solver), or None (no grid, or a grid fitted to other weights:
    then with a warning)."""
    entry = tuned_grid_entry(path, sampler, steps, ema)
    return None if entry is None else _as_grid(entry)


def _as_grid(entry: dict[str, Any]) -> list[float] | dict[str, Any]:
    ts = [float(t) for t in entry["ts"]]
    if entry.get("eval_ts") is None and entry.get("coeffs") is None:
        return ts
    grid: dict[str, Any] = {"ts": ts, "eval_ts": [float(t) for t in entry.get("eval_ts") or ts]}
    if entry.get("coeffs") is not None:
        grid["coeffs"] = [[float(c) for c in row] for row in entry["coeffs"]]
    return grid


def fitted_solvers(path: str | os.PathLike, ema: bool = True) -> dict[int, dict[str, Any]]:
    """The bespoke solvers in ``CKPT/grids.json`` fitted to these weights, by step count (what
    :func:`~difflab.train.checkpoint.load_denoiser` attaches as ``denoiser.solvers``, so that
    ``difflab.sample`` and ``difflab sample`` use them by default)."""
    from difflab.train.checkpoint import resolve

    ckpt = resolve(path)
    if not (ckpt / GRIDS).is_file():
        return {}
    suffix = "/" + grid_key("", 0, ema).split("/")[-1]
    found = sorted(int(key.split("/")[1]) for key in _read(ckpt)["grids"]
                   if key.startswith("bespoke/") and key.endswith(suffix))
    out = {}
    for steps in found:
        entry = tuned_grid_entry(ckpt, "bespoke", steps, ema)  # None (warned) if stale
        if entry is not None:  # how it was made (rmse, calibration, ...) and the solver
            out[steps] = {**entry, **_as_grid(entry), "sampler": "bespoke", "steps": steps}
    return out


def tuned_grid_entry(path: str | os.PathLike, sampler: str, steps: int,
                     ema: bool = True) -> dict[str, Any] | None:
    """:func:`load_tuned_grid`'s whole grids.json entry (grid ``ts``, calibration size, RMSE
    before and after tuning, ...)."""
    from difflab.train.checkpoint import resolve

    ckpt = resolve(path)
    if not (ckpt / GRIDS).is_file():
        return None
    entry = _read(ckpt)["grids"].get(grid_key(sampler, steps, ema))
    if entry is None:
        return None
    if entry.get("weights_sha256") != weights_sha256(ckpt, ema):
        warnings.warn(f"{ckpt / GRIDS}: the {sampler} {steps}-step grid was tuned for other "
                      "weights (the checkpoint changed since); using the sampler's default "
                      "spacing. Run `difflab tune-grid` again.", stacklevel=2)
        return None
    return entry


# --- command line ---------------------------------------------------------------------------
def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "tune-grid", formatter_class=HelpFormatter,
        help="fit a sampler's time grid to a checkpoint (used by sample/eval afterwards)",
        description="Fit the time grid of a deterministic sampler at a step count to a "
                    "checkpoint's network: minimise the RMSE to an accurate ODE solution from "
                    "the same calibration noise (LD3 objective, Nelder-Mead), then the times "
                    "the network is told at each grid point (LD3's decoupled evaluation "
                    "times). Writes CKPT/grids.json; `difflab sample` and `difflab eval` then "
                    "use the grid for that sampler and step count. --sampler bespoke also fits "
                    "the solver's coefficients on the --base solver's grid (Shaul et al. 2024; "
                    "`difflab sample --sampler bespoke` then uses them).")
    p.add_argument("checkpoint", help="checkpoint directory (or the run directory holding it)")
    p.add_argument("--sampler", default="unipc", help="deterministic sampler name")
    p.add_argument("--steps", type=int, nargs="+", default=[10],
                   help="step counts (one grid each)")
    p.add_argument("--count", type=int, default=64, help="calibration samples")
    p.add_argument("--seed", type=int, default=1000,
                   help="seed of the calibration noise (keep it apart from sampling seeds)")
    p.add_argument("--reference-steps", type=int, default=100,
                   help="dpm_solver_3 steps of the reference solution")
    p.add_argument("--max-evals", type=int, default=None,
                   help="sampler runs per grid (default: 40 x steps, at least 200)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per network batch")
    p.add_argument("--no-ema", action="store_true", help="tune for the raw weights")
    p.add_argument("--no-eval-times", action="store_true",
                   help="fit the grid only, not the decoupled times the network is told")
    p.add_argument("--eval-times-only", action="store_true",
                   help="keep the grid already in grids.json and fit only its evaluation times "
                        "(e.g. a grid tuned on a GPU with more calibration images)")
    p.add_argument("--base", default="unipc",
                   help="--sampler bespoke: the solver whose grid and coefficients it starts "
                        "from")
    p.add_argument("--start", default="tuned",
                   help="--sampler bespoke: the grid the fit starts from: tuned (the --base "
                        "solver's tuned grid, tuned first if grids.json has none), auto "
                        "(fit from the adaptive and the uniform grid, keep the better: no "
                        "grid tuning, what `difflab train` with train.fit_steps does), "
                        "adaptive (the grid equidistributing the reference trajectories' "
                        "local error) or a spacing name (unipc as --base)")
    p.add_argument("--max-iter", type=int, default=100,
                   help="--sampler bespoke: L-BFGS iterations of the coefficient fit")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=cmd_tune_grid)


def cmd_tune_grid(args: argparse.Namespace) -> int:
    import torch

    import difflab
    from difflab.samplers.tuning import reference_profile, tune_grid
    from difflab.train.checkpoint import load_denoiser

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.count < 1:
        raise ValueError(f"--count must be at least 1, got {args.count}")
    starts = ("tuned", "auto", "adaptive", *difflab.samplers.SPACINGS)
    if args.start not in starts:
        raise ValueError(f"unknown --start {args.start!r}; valid: {', '.join(starts)}")
    den, config = load_denoiser(args.checkpoint, ema=not args.no_ema, device=args.device)
    if config.get("data", {}).get("num_classes") and config.get("train", {}).get("conditional"):
        raise ValueError("tune-grid fits unconditional sampling; this checkpoint is "
                         "class-conditional (tune with a guided denoiser from Python: "
                         "difflab.samplers.tuning.tune_grid(..., cond=labels))")
    data = config.get("data", {})
    shape = ((int(data["channels"]), int(data["resolution"]), int(data["resolution"]))
             if data.get("resolution") else (int(data.get("channels", 2)),))
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn((args.count,) + shape, generator=g).to(args.device)
    ref, profile = reference_profile(den, noise, args.reference_steps,
                                     batch_size=args.batch_size)
    if args.eval_times_only and args.no_eval_times:
        raise ValueError("--eval-times-only and --no-eval-times exclude each other")
    if args.eval_times_only and args.sampler == "bespoke":
        raise ValueError("--eval-times-only refits a stored grid's times; a bespoke fit always "
                         "fits its times with its coefficients (drop --eval-times-only)")
    for steps in args.steps:
        if args.sampler == "bespoke":
            _tune_bespoke(args, den, noise, ref, profile, steps)
            continue
        keep = None
        if args.eval_times_only:
            entry = tuned_grid_entry(args.checkpoint, args.sampler, steps, not args.no_ema)
            if entry is None:
                raise ValueError(f"--eval-times-only: {args.checkpoint} has no {args.sampler} "
                                 f"{steps}-step grid for these weights; tune one first")
            keep = entry["ts"]
        tuned = tune_grid(den, args.sampler, steps, noise, reference=ref, grid=keep,
                          max_evals=args.max_evals, eval_times=not args.no_eval_times)
        tuned.update(seed=args.seed, reference_steps=args.reference_steps)
        if keep is not None:  # the grid's own fit, kept beside this one's (eval times only)
            tuned["grid_from"] = {k: entry.get(k) for k in ("calibration", "evals", "seed",
                                                            "reference_steps", "rmse")}
        path = save_tuned_grid(args.checkpoint, tuned, ema=not args.no_ema)
        print(f"{args.sampler} {steps} steps ({tuned['nfe']} NFE): calibration RMSE "
              f"{tuned['rmse']:.4g} (grid alone {tuned['rmse_grid']:.4g}, default "
              f"{tuned['default_spacing']} grid {tuned['rmse_default']:.4g}), "
              f"{tuned['evals']} sampler runs -> {path}", file=sys.stdout)
    return 0


def _tune_bespoke(args: argparse.Namespace, den: Any, noise: Any, ref: Any,
                  profile: dict[str, Any], steps: int) -> None:
    """``tune-grid --sampler bespoke``: coefficients on the base solver's tuned grid."""
    from difflab.samplers.bespoke import describe_fit, fit_solver, tune_solver
    from difflab.samplers.tuning import tune_grid

    ema = not args.no_ema
    if args.start != "tuned":  # from a fixed rule's grid (auto: each of START_GRIDS)
        if args.base != "unipc":
            raise ValueError("--start fits from unipc's coefficients; use --start tuned with "
                             f"--base {args.base}")
        tuned = fit_solver(den, steps, noise, ref, spacing=args.start, profile=profile,
                           max_iter=args.max_iter, batch_size=args.batch_size)
        tuned.update(seed=args.seed, reference_steps=args.reference_steps)
        path = save_tuned_grid(args.checkpoint, tuned, ema=ema)
        print(f"{describe_fit(tuned)} -> {path}")
        return
    entry = tuned_grid_entry(args.checkpoint, args.base, steps, ema)
    if entry is None:
        entry = tune_grid(den, args.base, steps, noise, reference=ref, max_evals=args.max_evals,
                          eval_times=not args.no_eval_times)
        entry.update(seed=args.seed, reference_steps=args.reference_steps)
        save_tuned_grid(args.checkpoint, entry, ema=ema)
        print(f"{args.base} {steps} steps: grid tuned first (calibration RMSE "
              f"{entry['rmse']:.4g})")
    grid = {"ts": entry["ts"], "eval_ts": entry.get("eval_ts") or entry["ts"]}
    tuned = tune_solver(den, steps, noise, base=args.base, grid=grid, reference=ref,
                        max_iter=args.max_iter, batch_size=args.batch_size)
    tuned.update(seed=args.seed, reference_steps=args.reference_steps,
                 grid_from={k: entry.get(k) for k in ("sampler", "calibration", "evals", "seed",
                                                      "reference_steps", "rmse")})
    path = save_tuned_grid(args.checkpoint, tuned, ema=ema)
    print(f"bespoke {steps} steps ({tuned['nfe']} NFE): calibration RMSE {tuned['rmse']:.4g} "
          f"({args.base} on the same grid {tuned['rmse_base']:.4g}), {tuned['iterations']} "
          f"L-BFGS iterations -> {path}", file=sys.stdout)
