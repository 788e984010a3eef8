"""The forward process and its posterior (Ho et al. 2020, Sec. 2; Kingma et al. 2021, VDM).

For times s < t on one schedule, with alpha_{t|s} = alpha_t / alpha_s and
sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2:

    q(x_t | x_0)      = N(alpha_t x_0, sigma_t^2 I)                        closed form
    q(x_t | x_s)      = N(alpha_{t|s} x_s, sigma_{t|s}^2 I)                one Markov step;
                        for DDPM's neighbouring steps this is N(sqrt(1 - beta_t) x_{t-1}, beta_t I)
    q(x_s | x_t, x_0) = N(mu, var) with                                     posterior
        mu  = alpha_{t|s} sigma_s^2 / sigma_t^2 x_t + alpha_s sigma_{t|s}^2 / sigma_t^2 x_0
        var = sigma_{t|s}^2 sigma_s^2 / sigma_t^2
    (DDPM Eq. 7: mu~ = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0
                        + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t,
                 beta~ = (1 - abar_{t-1}) / (1 - abar_t) beta_t.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from difflab.schedules import NoiseSchedule

__all__ = ["q_sample", "q_step", "transition", "posterior", "posterior_coefficients"]


def _shape(c: Tensor, x: Tensor) -> Tensor:
    c = torch.as_tensor(c, dtype=torch.float64)
    if c.ndim == 0:
        return c.to(x.dtype)
    return c.to(x.dtype).view((-1,) + (1,) * (x.ndim - 1))


def q_sample(schedule: NoiseSchedule, x0: Tensor, t: Tensor | float, eps: Tensor) -> Tensor:
    """x_t = alpha_t x_0 + sigma_t eps, a draw from q(x_t | x_0)."""
    alpha, sigma = schedule.alpha_sigma(torch.as_tensor(t, dtype=torch.float64))
    return _shape(alpha, x0) * x0 + _shape(sigma, x0) * eps


def transition(schedule: NoiseSchedule, s: Tensor | float,
               t: Tensor | float) -> tuple[Tensor, Tensor]:
    """(alpha_{t|s}, sigma_{t|s}^2) of q(x_t | x_s) for s < t (float64)."""
    a_s, s_s = schedule.alpha_sigma(torch.as_tensor(s, dtype=torch.float64))
    a_t, s_t = schedule.alpha_sigma(torch.as_tensor(t, dtype=torch.float64))
    a_ts = a_t / a_s
    return a_ts, s_t**2 - a_ts**2 * s_s**2


def q_step(schedule: NoiseSchedule, x_s: Tensor, s: Tensor | float, t: Tensor | float,
           eps: Tensor) -> Tensor:
    """One Markov step x_t ~ q(x_t | x_s) = N(alpha_{t|s} x_s, sigma_{t|s}^2 I)."""
    a_ts, var_ts = transition(schedule, s, t)
    return _shape(a_ts, x_s) * x_s + _shape(var_ts.clamp(min=0).sqrt(), x_s) * eps


def posterior_coefficients(schedule: NoiseSchedule, s: Tensor | float,
                           t: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
    """(c_xt, c_x0, var) with q(x_s | x_t, x_0) = N(c_xt x_t + c_x0 x_0, var), s < t (float64)."""
    a_s, s_s = schedule.alpha_sigma(torch.as_tensor(s, dtype=torch.float64))
    _, s_t = schedule.alpha_sigma(torch.as_tensor(t, dtype=torch.float64))
    a_ts, var_ts = transition(schedule, s, t)
    c_xt = a_ts * s_s**2 / s_t**2
    c_x0 = a_s * var_ts / s_t**2
    var = var_ts * s_s**2 / s_t**2
    return c_xt, c_x0, var


def posterior(schedule: NoiseSchedule, x_t: Tensor, x0: Tensor, s: Tensor | float,
              t: Tensor | float) -> tuple[Tensor, Tensor]:
    """Mean and variance of q(x_s | x_t, x_0) for s < t."""
    c_xt, c_x0, var = posterior_coefficients(schedule, s, t)
    return _shape(c_xt, x_t) * x_t + _shape(c_x0, x_t) * x0, _shape(var, x_t)
