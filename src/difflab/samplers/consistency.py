"""Consistency sampling (Song et al. 2023, "Consistency Models", Alg. 1): one call of the
consistency function per step, with fresh noise in between.

A consistency model is a denoiser with the :class:`~difflab.denoiser.parameterization.
Consistency` parameterisation: ``predict(x, t).x0`` is f(x, t), the end point x~(sigma_min) of
the probability-flow ODE trajectory through x at t. On the grid t_0 > t_1 > ... > t_n (every
point but the last is evaluated; the last is normally t = 0):

    x0_hat = f(x_{t_i}, t_i),
    x_{t_{i+1}} = alpha_{i+1} (x0_hat + sqrt(sigma~_{i+1}^2 - sigma_min^2) z),   z ~ N(0, I),

i.e. in VE terms x~ = x0_hat + sqrt(sigma~^2 - sigma_min^2) z, Song et al.'s re-noising: x0_hat
already carries the noise sigma_min of the trajectory's end, so the total is sigma~^2. With one
step this is f(x_T, T) on the prior noise x_T; at t_n = 0 (sigma = 0) no noise is added and
the result is x0_hat. For a denoiser with another parameterisation sigma_min is 0: x0_hat is
then the posterior mean E[x0 | x_t], not a draw, and the sampler ("denoise, re-noise", LCM's
multistep sampler on any model) loses the posterior variance at the last nonzero noise level
(for a Gaussian of std s, s^2 sigma~^2 / (s^2 + sigma~^2)), which vanishes only as that level
goes to 0 (many steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from difflab.denoiser import BaseDenoiser
from difflab.denoiser.parameterization import Consistency
from difflab.samplers.common import Grid, predict, randn_like, register

__all__ = ["sample_consistency", "boundary_sigma"]


def boundary_sigma(denoiser: BaseDenoiser) -> float:
    """sigma_min of the denoiser's consistency parameterisation (where f is the identity), 0 for
    any other parameterisation (guidance wrappers carry their inner denoiser's)."""
    p = denoiser.parameterization
    return p.sigma_min if isinstance(p, Consistency) else 0.0


@register("consistency", nfe=lambda steps: steps, nfe_rule="steps", spacing="uniform", order=1,
          stochastic=True)
@torch.no_grad()
def sample_consistency(denoiser: BaseDenoiser, x: Tensor, ts: Tensor, *, cond: Any = None,
                       generator: Any = None, callback: Callable | None = None) -> Tensor:
    """Multistep consistency sampling, Song et al. 2023, Alg. 1 (module docstring): NFE =
    steps; stochastic (noise from ``generator``). Every evaluated time but the first must lie
    above the model's sigma_min (a step at or below it calls the identity): on the EDM
    schedule the default uniform grid is Karras' rho = 7 grid to sigma = 0, which keeps at
    most 4 steps above sigma_min = 0.002; pass ``grid=`` for others."""
    g = Grid(denoiser.schedule, ts, x)
    s_min = boundary_sigma(denoiser)
    limit = (s_min * (1 + Consistency.BOUNDARY_RTOL)) ** 2
    for i in range(1, g.n):
        if g.s2[i] <= limit:
            t_min = float(denoiser.schedule.t_from_sigma_ratio(s_min))
            raise ValueError(
                f"sampler 'consistency' with {g.n} steps evaluates grid point {i} (t = "
                f"{g.times[i]:.6g}) at sigma~ = {math.sqrt(g.s2[i]):.4g} <= the consistency "
                f"model's sigma_min = {s_min:g}, where it is the identity: use fewer steps, or "
                f"pass grid= with every time but the last above t(sigma_min) = {t_min:.6g}")
    # std of the fresh noise at each next point: alpha sqrt(sigma~^2 - sigma_min^2), 0 at t = 0
    std = [a * math.sqrt(max(s2 - s_min * s_min, 0.0)) for a, s2 in zip(g.alpha[1:], g.s2[1:])]
    for i in range(g.n):
        x0 = predict(denoiser, x, g, i, cond).x0
        if std[i] > 0:
            x = randn_like(x0, generator, std[i]).add_(x0, alpha=g.alpha[i + 1])
        else:
            x = g.alpha[i + 1] * x0
        if callback is not None:
            callback({"i": i, "t": g.times[i], "x": x, "x0": x0})
    return x
