"""Ancestral DDPM and DDIM: the posterior q(x_s | x_t, x0_hat) family."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import difflab.process as process
from difflab.denoiser import BaseDenoiser, interpolated_log_variance
from difflab.samplers.common import Grid, predict, randn_like, register

__all__ = ["sample_ddpm", "sample_ddim"]

VARIANCES = ("posterior", "beta", "learned")


def _pairs(ts: Tensor) -> tuple[Tensor, Tensor]:
    ts = torch.as_tensor(ts, dtype=torch.float64).cpu()
    return ts[1:], ts[:-1]  # (s, t) with s < t for every step t -> s


@register("ddpm", nfe=lambda steps: steps, nfe_rule="steps", spacing="uniform", order=1,
          stochastic=True)
@torch.no_grad()
def sample_ddpm(denoiser: BaseDenoiser, x: Tensor, ts: Tensor, *, cond: Any = None,
                generator: Any = None, callback: Callable | None = None,
                variance: str = "posterior") -> Tensor:
    """Ancestral sampling, Ho et al. 2020, Alg. 2: x_s ~ N(mu~(x_t, x0_hat), var), with
    var = beta~ (``"posterior"``, DDPM's sigma^2 = beta~) or sigma_{t|s}^2 (``"beta"``, = beta_t
    for neighbouring DDPM steps), or the model's learned variance (``"learned"``, Nichol &
    Dhariwal 2021, Eq. 15: log var = v log beta + (1 - v) log beta~ with the prediction's
    ``variance_v``; beta = sigma_{t|s}^2, beta~ the posterior variance, floored at 1e-20). No
    noise is added on the step to sigma = 0."""
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance={variance!r}; valid: {list(VARIANCES)}")
    g = Grid(denoiser.schedule, ts, x)
    s, t = _pairs(ts)
    c_xt, c_x0, var = process.posterior_coefficients(denoiser.schedule, s, t)
    beta = process.transition(denoiser.schedule, s, t)[1]
    log_beta = beta.clamp(min=1e-20).log().tolist()
    log_beta_tilde = var.clamp(min=1e-20).log().tolist()
    if variance == "beta":
        var = beta
    std = var.clamp(min=0).sqrt()
    c_xt, c_x0, std = c_xt.tolist(), c_x0.tolist(), std.tolist()
    for i in range(g.n):
        pred = predict(denoiser, x, g, i, cond)
        x0 = pred.x0
        if variance == "learned" and pred.variance_v is None:
            raise ValueError("variance='learned' needs a denoiser with a learned variance "
                             "(Denoiser(..., learned_variance=True)); this one has none")
        x = torch.add(c_xt[i] * x, x0, alpha=c_x0[i])
        if not g.is_final(i):
            if variance == "learned":
                log_var = interpolated_log_variance(pred.variance_v, log_beta[i],
                                                    log_beta_tilde[i])
                x = x.add_(randn_like(x, generator) * torch.exp(0.5 * log_var))
            else:
                x = x.add_(randn_like(x, generator), alpha=std[i])
        if callback is not None:
            callback({"i": i, "t": g.times[i], "x": x, "x0": x0})
    return x


@register("ddim", nfe=lambda steps: steps, nfe_rule="steps", spacing="uniform", order=1)
@torch.no_grad()
def sample_ddim(denoiser: BaseDenoiser, x: Tensor, ts: Tensor, *, cond: Any = None,
                generator: Any = None, callback: Callable | None = None,
                eta: float = 0.0) -> Tensor:
    """DDIM, Song et al. 2021a, Eq. 12: x_s = alpha_s x0_hat + sqrt(sigma_s^2 - s_eta^2) eps_hat
    + s_eta z, s_eta^2 = eta^2 * posterior variance (eta = 0: deterministic, eta = 1: DDPM)."""
    g = Grid(denoiser.schedule, ts, x)
    s, t = _pairs(ts)
    var = process.posterior_coefficients(denoiser.schedule, s, t)[2]
    s_eta2 = (eta**2 * var).clamp(min=0)
    c_eps = (torch.as_tensor(g.sigma[1:], dtype=torch.float64) ** 2 - s_eta2).clamp(min=0).sqrt()
    c_eps, s_eta = c_eps.tolist(), s_eta2.sqrt().tolist()
    for i in range(g.n):
        pred = predict(denoiser, x, g, i, cond)
        x = torch.add(g.alpha[i + 1] * pred.x0, pred.eps, alpha=c_eps[i])
        if s_eta[i] > 0:
            x = x.add_(randn_like(x, generator), alpha=s_eta[i])
        if callback is not None:
            callback({"i": i, "t": g.times[i], "x": x, "x0": pred.x0})
    return x
