"""Karras et al. 2022 (EDM) samplers on the VE-scaled probability-flow ODE
dx~/dsigma~ = (x~ - D(x~; sigma~)) / sigma~ with x~ = x / alpha, sigma~ = sigma / alpha.

An Euler step in (sigma~, x~) is exactly the DDIM step (x~_t = (sigma~_t / sigma~_s) x~_s +
(1 - sigma~_t / sigma~_s) D), and since (x~ - D) / sigma~ = eps_hat also x~_t = x~_s +
(sigma~_t - sigma~_s) eps_hat: :func:`difflab.samplers.common.first_order_step` takes the form
the prediction holds (no x0 / eps conversion), the data form from sigma~_s = inf (zero terminal
SNR), where it stays finite. Heun's trapezoid correction
does not exist across sigma~ = inf or to sigma~ = 0, so those steps are Euler steps
(k-diffusion convention: NFE = 2 * steps - 1, one less on a zero-terminal-SNR grid).

Default grid: ``log_snr`` for all three. The Karras grid takes sigma_max from the schedule
(157 for DDPM's linear betas, 2e4 for the discrete cosine schedule), where rho = 7 spends most
steps at huge sigma~ (measured: 15 Heun steps on the cosine schedule put 46% of the samples
near the data, 100% with log_snr). **Heun's limit** (PITFALLS): the trapezoid multiplies the
end-point slope by (sigma~_s - sigma~_t) / sigma~_t, so it amplifies errors when a step shrinks
sigma~ by ~10x or more (half-log-SNR step h >~ 2.3). On DDPM's linear schedule with the default
grid (2-D ring, bench/samplers.py): RMSE 29 at 3 steps (h = 4.8), 1.6 at 5 steps (h = 2.4),
0.12 at 10 steps (h = 1.07); ``uniform`` spacing on the cosine schedule (first step sigma~ = 2e4
-> ~10) fails the same way. Use dpmpp_2m / unipc below ~10 steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from difflab.denoiser import BaseDenoiser
from difflab.samplers.common import (
    Grid,
    check_final,
    final_x0,
    first_order,
    first_order_step,
    predict,
    randn_like,
    register,
    warn_large_steps,
)
from difflab.samplers.dpmpp import data_prediction_multistep

__all__ = ["sample_euler", "sample_heun", "sample_euler_ancestral"]


@register("euler", nfe=lambda steps: steps, nfe_rule="steps", spacing="log_snr", order=1)
@torch.no_grad()
def sample_euler(denoiser: BaseDenoiser, x: Tensor, ts: Tensor, *, cond: Any = None,
                 generator: Any = None, callback: Callable | None = None,
                 final: str = "x0") -> Tensor:
    """Euler, Karras et al. 2022, Alg. 2 without churn (x~ += (sigma~_t - sigma~_s) d): the
    first-order data-prediction step (see the module docstring), shared with dpmpp_2m."""
    return data_prediction_multistep(denoiser, x, ts, cond, callback, final, order=1)


@register("heun", nfe=lambda steps: 2 * steps - 1, nfe_rule="2 * steps - 1",
          spacing="log_snr", order=2)
@torch.no_grad()
def sample_heun(denoiser: BaseDenoiser, x: Tensor, ts: Tensor, *, cond: Any = None,
                generator: Any = None, callback: Callable | None = None,
                final: str = "x0") -> Tensor:
    """Heun's 2nd-order method, Karras et al. 2022, Alg. 1 (deterministic, no churn)."""
    check_final(final)
    g = Grid(denoiser.schedule, ts, x)
    warn_large_steps(g, "heun", "its trapezoid correction amplifies errors (RMSE 82 at 3 steps "
                     "on a trained Fashion-MNIST U-Net)")
    prev = None  # the prediction at the previous grid point
    for i in range(g.n):
        pred = predict(denoiser, x, g, i, cond)
        if g.is_final(i):
            x = final_x0(g, pred.x0, None if prev is None else prev.x0, final, i - 1)
        else:
            x_euler = first_order_step(g, i, x, pred)
            if math.isinf(g.s2[i]):
                x = x_euler
            else:
                nxt = predict(denoiser, x_euler, g, i + 1, cond)
                s_s, s_t, a_t = math.sqrt(g.s2[i]), math.sqrt(g.s2[i + 1]), g.alpha[i + 1]
                if not pred.holds_x0:
                    # x~_t = x~_s + (sigma~_t - sigma~_s) (d_s + d_t) / 2 with d = dx~/dsigma~ =
                    # eps_hat: x_t = x_euler + alpha_t (sigma~_t - sigma~_s) / 2 (eps_t - eps_s),
                    # 2 in-place ops (nxt.eps is read before x_euler changes)
                    k = 0.5 * a_t * (s_t - s_s)
                    x = x_euler.add_(nxt.eps, alpha=k).add_(pred.eps, alpha=-k)
                else:
                    # the same in the data form, d = (x~ - D) / sigma~, x~ = x / alpha: x_t =
                    # a_t/a_s (1 + k_s) x - a_t k_s D_s + k_t x_euler - a_t k_t D_t. With x =
                    # (x_euler - c D_s) / ratio (ratio > 0 inside the grid) it is a combination
                    # of x_euler, D_s and D_t, made in x_euler's memory (3 in-place ops)
                    x0, x0_next, (ratio, c) = pred.x0, nxt.x0, first_order(g, i)
                    k_s, k_t = 0.5 * (s_t - s_s) / s_s, 0.5 * (s_t - s_s) / s_t
                    c_x = a_t / g.alpha[i] * (1 + k_s) + k_t * ratio
                    x = x_euler.mul_(c_x / ratio).add_(
                        x0, alpha=k_t * c - a_t * k_s - c_x * c / ratio)
                    x = x.add_(x0_next, alpha=-a_t * k_t)
        prev = pred
        if callback is not None:
            callback({"i": i, "t": g.times[i], "x": x, "x0": pred.x0})
    return x


@register("euler_ancestral", nfe=lambda steps: steps, nfe_rule="steps",
          spacing="log_snr", order=1, stochastic=True)
@torch.no_grad()
def sample_euler_ancestral(denoiser: BaseDenoiser, x: Tensor, ts: Tensor, *, cond: Any = None,
                           generator: Any = None, callback: Callable | None = None,
                           eta: float = 1.0) -> Tensor:
    """Ancestral Euler (k-diffusion ``sample_euler_ancestral``): an Euler step to sigma~_down,
    then noise sigma~_up, sigma~_up^2 = min(sigma~_t^2, eta^2 sigma~_t^2 (1 - sigma~_t^2 /
    sigma~_s^2)), sigma~_down^2 = sigma~_t^2 - sigma~_up^2 (Song et al. 2021 ancestral step)."""
    g = Grid(denoiser.schedule, ts, x)
    for i in range(g.n):
        pred = predict(denoiser, x, g, i, cond)
        s2_s, s2_t = g.s2[i], g.s2[i + 1]
        q = s2_t / s2_s  # 0 from sigma~ = inf
        s_up = min(math.sqrt(s2_t), eta * math.sqrt(s2_t * (1 - q)))
        s_down = math.sqrt(max(s2_t - s_up * s_up, 0.0))
        # x_t = alpha_t (x~_down + s_up z), x~ = x / alpha, with the Euler step to s_down in
        # the form that needs no conversion of pred (see common.first_order_step): data form
        # x~_down = (s_down / sigma~_s) x~ + (1 - s_down / sigma~_s) D (finite from sigma~_s =
        # inf), noise form x~_down = x~ + (s_down - sigma~_s) eps_hat
        a_t = g.alpha[i + 1]
        if pred.holds_x0 or math.isinf(s2_s):
            d, c_d, c_x = pred.x0, a_t * (1 - s_down / math.sqrt(s2_s)), a_t * s_down / g.sigma[i]
        else:
            d, c_d, c_x = pred.eps, a_t * (s_down - math.sqrt(s2_s)), a_t / g.alpha[i]
        # the noise alpha_t s_up z is drawn first, into the memory of x_t (one pass less)
        x_new = randn_like(x, generator, a_t * s_up).add_(d, alpha=c_d) if s_up > 0 else d.mul(c_d)
        x = x_new.add_(x, alpha=c_x)
        if callback is not None:
            callback({"i": i, "t": g.times[i], "x": x, "x0": pred.x0})
    return x
