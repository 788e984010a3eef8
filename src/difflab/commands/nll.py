"""``difflab eval RUN --nll``: bits per dimension of a checkpoint's model on a data split, by the
probability-flow ODE (:func:`difflab.likelihood.log_likelihood`: Hutchinson probes, uniform
dequantisation or by the decoder; the adaptive Dormand-Prince solver or the fixed-step
multistep one) and, where the model has one (a variance-preserving schedule), by its
variational bound (:func:`difflab.objectives.variational_bound`: the continuous bound, and a
DDPM chain's own discrete bound with DDPM's decoder).

    nll(checkpoint, *, split="test", count=1000, probes=1, rtol=1e-3, batch_size=250, seed=0,
        ema=True, device="cpu", vlb=True, solver="dopri5", steps=None, dequantize="uniform",
        workers=1, on_batch=None) -> dict

Each figure is the mean over the ``count`` images (a fixed random subset of the split, chosen by
``seed``) with its standard error over them (the spread of the per-image estimates: it covers
the dequantisation, probe and time-sampling noise as well as the images).

``workers`` > 1 (CPU only) solves the ODE's batches in that many processes of one torch thread
each (on 2 cores, 2 workers ran ~1.2x faster than one process of 2 threads). Batch i's
dequantisation noise and probes come from its own generator, seeded 1 + 65537 seed + i, so the
figures do not depend on the number of workers.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

from difflab.commands.common import ParameterError, param

__all__ = ["nll", "print_nll"]


def _check(count: int, probes: int, rtol: float, batch_size: int, solver: str, steps: int,
           dequantize: str, workers: int, device: str | torch.device) -> None:
    from difflab.likelihood import DEQUANTIZE, SOLVERS

    for name, value in (("count", count), ("probes", probes), ("batch_size", batch_size),
                        ("workers", workers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ParameterError(f"{param(name)} must be an integer >= 1, got {value!r}")
    if not (isinstance(rtol, (int, float)) and math.isfinite(rtol) and rtol > 0):
        raise ParameterError(f"{param('rtol')} must be > 0, got {rtol!r}")
    if solver not in SOLVERS:
        raise ParameterError(f"{param('nll_solver')} must be one of {list(SOLVERS)}, got "
                             f"{solver!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ParameterError(f"{param('nll_steps')} must be an integer >= 2, got {steps!r}")
    if dequantize not in DEQUANTIZE[1:]:
        choices = " or ".join(repr(d) for d in DEQUANTIZE[1:])
        raise ParameterError(f"{param('dequantize')} must be {choices}, got {dequantize!r}")
    if workers > 1 and torch.device(device).type != "cpu":
        raise ParameterError(f"{param('workers')} > 1 runs CPU processes; on {device} use one")


_WORKER: dict[str, Any] = {}  # a worker process's denoiser (loaded once by _init_worker)


def _init_worker(checkpoint: str, ema: bool) -> None:
    from difflab.train.checkpoint import load_denoiser

    torch.set_num_threads(1)
    _WORKER["denoiser"] = load_denoiser(checkpoint, ema=ema)[0]


def _ode_batch(i: int, xb: torch.Tensor, seed: int, kw: dict[str, Any],
               denoiser: Any = None) -> tuple[int, torch.Tensor, int]:
    """Bits/dim of batch i (its own generator: module docstring) and the denoiser calls."""
    from difflab.likelihood import log_likelihood

    denoiser = _WORKER["denoiser"] if denoiser is None else denoiser
    r = log_likelihood(denoiser, xb, generator=torch.Generator().manual_seed(
        1 + 65537 * seed + i), **kw)
    return i, r.bits_per_dim.cpu(), r.nfe


def _summary(values: list[torch.Tensor], seconds: float) -> dict[str, float]:
    v = torch.cat(values).to(torch.float64)
    se = float(v.std() / math.sqrt(len(v))) if len(v) > 1 else math.nan
    return {"bits_per_dim": float(v.mean()), "stderr": se, "seconds": seconds,
            "seconds_per_image": seconds / len(v)}


def nll(checkpoint: str | os.PathLike, *, split: str = "test", count: int = 1000,
        probes: int = 1, rtol: float = 1e-3, batch_size: int = 250, seed: int = 0,
        ema: bool = True, device: str | torch.device = "cpu", vlb: bool = True,
        solver: str = "dopri5", steps: int | None = None, dequantize: str = "uniform",
        workers: int = 1, on_batch: Callable[[dict[str, Any]], None] | None = None
        ) -> dict[str, Any]:
    """Bits/dim of the checkpoint's model on ``count`` images of ``split`` (module docstring);
    ``rtol`` is the adaptive ODE solver's (atol = rtol), ``steps`` the multistep solver's
    (None: :data:`difflab.likelihood.MULTISTEP_STEPS`);
    ``dequantize`` applies to 8-bit data sets; ``workers`` processes solve the ODE (module
    docstring). Returns {"checkpoint", "split", "count",
    "ode": {bits_per_dim, stderr, nfe, seconds, ...}, "vlb": {...} | None, "vlb_chain": ...}."""
    from difflab.likelihood import MULTISTEP_STEPS
    from difflab.objectives import variational_bound
    from difflab.train.checkpoint import load_denoiser
    from difflab.train.trainer import load_training_data

    steps = MULTISTEP_STEPS if steps is None else steps
    _check(count, probes, rtol, batch_size, solver, steps, dequantize, workers, device)
    denoiser, config = load_denoiser(checkpoint, ema=ema, device=device)
    data = config.get("data") or {}
    if not data.get("name"):
        raise ParameterError(f"{checkpoint} names no data set in its config; --nll needs one")
    images = load_training_data({**data, "split": split})[0]
    n = len(images)
    if n == 0:
        raise ParameterError(f"{param('split')} {split!r} of {data['name']!r} has no images")
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:min(count, n)]
    x = images[idx]
    x = (x.float() / 127.5 - 1) if x.dtype == torch.uint8 else x.float()
    dequantize = dequantize if images.dtype == torch.uint8 else None
    out: dict[str, Any] = {"checkpoint": str(checkpoint), "split": split, "count": len(x),
                           "dim": int(x[0].numel()), "dequantize": dequantize}
    # the ODE
    kw = {"probes": probes, "rtol": rtol, "atol": rtol, "dequantize": dequantize,
          "solver": solver, "steps": steps}
    t0, done, nfe = time.perf_counter(), {}, 0

    def record(i: int, b: torch.Tensor, calls: int) -> None:
        nonlocal nfe
        done[i], nfe = b, nfe + calls
        if on_batch is not None:
            on_batch({"what": "ode", "batch": i, "images": sum(len(v) for v in done.values()),
                      "bits_per_dim": float(torch.cat(list(done.values())).mean())})

    batches = list(enumerate(x.split(batch_size)))
    if workers == 1:
        for i, xb in batches:
            record(*_ode_batch(i, xb.to(device), seed, kw, denoiser))
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker, initargs=(str(checkpoint), ema)) as ex:
            for future in [ex.submit(_ode_batch, i, xb, seed, kw) for i, xb in batches]:
                record(*future.result())
    bpd = [done[i] for i in sorted(done)]
    out["ode"] = {**_summary(bpd, time.perf_counter() - t0), "nfe": nfe, "probes": probes,
                  "workers": workers,
                  "solver": solver, **({"steps": steps} if solver == "multistep"
                                       else {"rtol": rtol})}
    # the variational bound, where the model has one
    out["vlb"] = out["vlb_chain"] = None
    if vlb and getattr(denoiser.schedule, "variance_preserving", True):
        forms = [("vlb", None)] + ([("vlb_chain", "chain")]
                                   if denoiser.schedule.num_steps is not None else [])
        decoder = None if dequantize else "gaussian"
        for key, steps in forms:
            t0, vals = time.perf_counter(), []
            g = torch.Generator().manual_seed(seed + 2)
            for xb in x.split(batch_size):
                r = variational_bound(denoiser, xb.to(device), steps=steps, generator=g,
                                      decoder=decoder if steps is None else None)
                vals.append(r.bits_per_dim.cpu())
            out[key] = {**_summary(vals, time.perf_counter() - t0),
                        "form": "continuous" if steps is None else "chain"}
    return out


def print_nll(result: dict[str, Any]) -> None:
    """The CLI's lines for :func:`nll`'s result."""
    print(f"{result['checkpoint']}: {result['count']} images of split {result['split']!r}")
    o = result["ode"]
    how = (f"{o['steps']} multistep steps" if o.get("solver") == "multistep"
           else f"rtol {o['rtol']:g}")
    print(f"  ODE  {o['bits_per_dim']:.4f} bits/dim  (standard error {o['stderr']:.4f}; "
          f"{o['probes']} probe(s), {how}, {o['nfe']} denoiser calls, "
          f"{o['seconds']:.1f} s; dequantisation: {result.get('dequantize')})")
    for key, label in (("vlb", "VLB (continuous)"), ("vlb_chain", "VLB (chain)")):
        v = result.get(key)
        if v:
            print(f"  {label}  {v['bits_per_dim']:.4f} bits/dim  (standard error "
                  f"{v['stderr']:.4f}; {v['seconds']:.1f} s)")
    if not result.get("vlb"):
        print("  VLB  - (the model's schedule is not variance preserving)")
