"""``difflab eval RUN --nll``: bits per dimension of a checkpoint's model on a data split, by the
probability-flow ODE (:func:`difflab.likelihood.log_likelihood`: Hutchinson probes, uniform
dequantisation) and, where the model has one (a variance-preserving schedule), by its
variational bound (:func:`difflab.objectives.variational_bound`: the continuous bound, and a
DDPM chain's own discrete bound with DDPM's decoder).

    nll(checkpoint, *, split="test", count=1000, probes=1, rtol=1e-3, batch_size=250, seed=0,
        ema=True, device="cpu", vlb=True, on_batch=None) -> dict

Each figure is the mean over the ``count`` images (a fixed random subset of the split, chosen by
``seed``) with its standard error over them (the spread of the per-image estimates: it covers
the dequantisation, probe and time-sampling noise as well as the images).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from difflab.commands.common import ParameterError, param

__all__ = ["nll", "print_nll"]


def _check(count: int, probes: int, rtol: float, batch_size: int) -> None:
    for name, value in (("count", count), ("probes", probes), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ParameterError(f"{param(name)} must be an integer >= 1, got {value!r}")
    if not (isinstance(rtol, (int, float)) and math.isfinite(rtol) and rtol > 0):
        raise ParameterError(f"{param('rtol')} must be > 0, got {rtol!r}")


def _summary(values: list[torch.Tensor], seconds: float) -> dict[str, float]:
    v = torch.cat(values).to(torch.float64)
    se = float(v.std() / math.sqrt(len(v))) if len(v) > 1 else math.nan
    return {"bits_per_dim": float(v.mean()), "stderr": se, "seconds": seconds,
            "seconds_per_image": seconds / len(v)}


def nll(checkpoint: str | os.PathLike, *, split: str = "test", count: int = 1000,
        probes: int = 1, rtol: float = 1e-3, batch_size: int = 250, seed: int = 0,
        ema: bool = True, device: str | torch.device = "cpu", vlb: bool = True,
        on_batch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Bits/dim of the checkpoint's model on ``count`` images of ``split`` (module docstring);
    ``rtol`` is the ODE solver's (atol = rtol). Returns {"checkpoint", "split", "count",
    "ode": {bits_per_dim, stderr, nfe, seconds, ...}, "vlb": {...} | None, "vlb_chain": ...}."""
    from difflab.likelihood import log_likelihood
    from difflab.objectives import variational_bound
    from difflab.train.checkpoint import load_denoiser
    from difflab.train.trainer import load_training_data

    _check(count, probes, rtol, batch_size)
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
    dequantize = "uniform" if images.dtype == torch.uint8 else None
    out: dict[str, Any] = {"checkpoint": str(checkpoint), "split": split, "count": len(x),
                           "dim": int(x[0].numel()), "dequantize": dequantize}
    # the ODE
    g = torch.Generator().manual_seed(seed + 1)
    t0, bpd, nfe = time.perf_counter(), [], 0
    for i, xb in enumerate(x.split(batch_size)):
        r = log_likelihood(denoiser, xb.to(device), probes=probes, rtol=rtol, atol=rtol,
                           dequantize=dequantize, generator=g)
        bpd.append(r.bits_per_dim.cpu())
        nfe += r.nfe
        if on_batch is not None:
            on_batch({"what": "ode", "batch": i, "images": sum(len(b) for b in bpd),
                      "bits_per_dim": float(torch.cat(bpd).mean())})
    out["ode"] = {**_summary(bpd, time.perf_counter() - t0), "nfe": nfe, "probes": probes,
                  "rtol": rtol}
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
    print(f"  ODE  {o['bits_per_dim']:.4f} bits/dim  (standard error {o['stderr']:.4f}; "
          f"{o['probes']} probe(s), rtol {o['rtol']:g}, {o['nfe']} denoiser calls, "
          f"{o['seconds']:.1f} s)")
    for key, label in (("vlb", "VLB (continuous)"), ("vlb_chain", "VLB (chain)")):
        v = result.get(key)
        if v:
            print(f"  {label}  {v['bits_per_dim']:.4f} bits/dim  (standard error "
                  f"{v['stderr']:.4f}; {v['seconds']:.1f} s)")
    if not result.get("vlb"):
        print("  VLB  - (the model's schedule is not variance preserving)")
