"""One solver step from t_from to t_to: the step the samplers share, for distillation.

A consistency-distillation target (Song et al. 2023, "Consistency Models", Alg. 2) or a
progressive-distillation teacher (Salimans & Ho 2022) needs x at t_to from x at t_from by one
step of an ODE solver on the teacher. :func:`step` is that step, taken by the registered
sampler on the two-point grid [t_from, t_to], so the formula lives in one place. It is the
method's own step only for solvers that keep no history between steps (:data:`STEPS`):

* ``ddim`` / ``euler`` / ``dpm_solver_1`` (first order; DDIM, Song et al. 2021a, Eq. 12,
  eta = 0, = DPM-Solver++(1), Lu et al. 2022b)

      x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) x0_hat(x_s, s),
      h = lam_t - lam_s,  lam = log(alpha / sigma);

* ``heun`` (Karras et al. 2022, Alg. 1; two calls): in VE-scaled variables x~ = x / alpha,
  sigma~ = sigma / alpha, with d(x~, sigma~) = (x~ - D(x~; sigma~)) / sigma~,

      x~' = x~_s + (sigma~_t - sigma~_s) d(x~_s, sigma~_s),
      x~_t = x~_s + (sigma~_t - sigma~_s) (d(x~_s, sigma~_s) + d(x~', sigma~_t)) / 2;

* ``dpm_solver_2`` / ``dpm_solver_3`` (singlestep, Lu et al. 2022, Algs. 1-2).

A multistep solver (dpmpp_2m, unipc, ...) on two points is the first-order step, so it is not
offered. A step to t = 0 (sigma = 0) is the first-order step x_0 = alpha_0 x0_hat for every
solver (the samplers' last step), and a step from alpha = 0 (zero terminal SNR) the DDIM step.
The samplers run without gradients: the step is a teacher's target, not a trained path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from difflab.denoiser import BaseDenoiser
from difflab.samplers.ddpm import sample_ddim
from difflab.samplers.dpm_solver import (
    sample_dpm_solver_1,
    sample_dpm_solver_2,
    sample_dpm_solver_3,
)
from difflab.samplers.euler import sample_euler, sample_heun

__all__ = ["step", "STEPS"]

#: the samplers whose step on the grid [t_from, t_to] is the method's own one-step update
STEPS = {"ddim": sample_ddim, "euler": sample_euler, "heun": sample_heun,
         "dpm_solver_1": sample_dpm_solver_1, "dpm_solver_2": sample_dpm_solver_2,
         "dpm_solver_3": sample_dpm_solver_3}


def _one(denoiser: BaseDenoiser, x: Tensor, t_from: float, t_to: float, sampler: str,
         cond: Any) -> Tensor:
    if t_to == t_from:
        return x
    if not 0.0 <= t_to < t_from <= 1.0:
        raise ValueError(f"a step goes from t_from to an earlier t_to in [0, 1], got t_from = "
                         f"{t_from}, t_to = {t_to}")
    ts = torch.tensor([t_from, t_to], dtype=torch.float64)
    return STEPS[sampler](denoiser, x, ts, cond=cond)


def step(denoiser: BaseDenoiser, x: Tensor, t_from: float | Tensor, t_to: float | Tensor, *,
         sampler: str = "ddim", cond: Any = None) -> Tensor:
    """x at ``t_to`` from ``x`` at ``t_from`` (t_to <= t_from) by one step of ``sampler`` (one
    of :data:`STEPS`; module docstring for the formulas), with ``cond`` (None, labels or a
    Condition) passed on unchanged. ``t_from`` and ``t_to`` are numbers, or tensors with one
    time per row of ``x`` (as distillation draws them): rows sharing a pair of times are
    stepped together (``cond`` is sliced with ``cond[rows]``)."""
    if sampler not in STEPS:
        raise ValueError(f"sampler {sampler!r} has no one-step form; valid: {list(STEPS)}")
    tf = torch.as_tensor(t_from, dtype=torch.float64).detach().cpu().flatten()
    tt = torch.as_tensor(t_to, dtype=torch.float64).detach().cpu().flatten()
    if tf.numel() == 1 and tt.numel() == 1:
        return _one(denoiser, x, float(tf), float(tt), sampler, cond)
    n = x.shape[0]
    if tf.numel() not in (1, n) or tt.numel() not in (1, n):
        raise ValueError(f"t_from and t_to need 1 or {n} (one per row of x) times, got "
                         f"{tf.numel()} and {tt.numel()}")
    pairs = torch.stack([tf.expand(n), tt.expand(n)], 1)
    unique, inverse = torch.unique(pairs, dim=0, return_inverse=True)
    out = torch.empty_like(x)
    for k, (a, b) in enumerate(unique.tolist()):
        rows = (inverse == k).nonzero().flatten().to(x.device)
        out[rows] = _one(denoiser, x[rows], a, b, sampler, None if cond is None else cond[rows])
    return out
