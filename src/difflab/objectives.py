"""Training objectives: the denoising score-matching loss in its common forms.

Every loss here is  E_{t, x_0, eps} [ w(t) || f_theta(x_t, t) - f(x_0, eps) ||^2 ]  with
x_t = alpha_t x_0 + sigma_t eps and a target f in {eps, x0, v}. All targets are the same
loss in x0-space up to a factor (snr = alpha^2 / sigma^2):

    ||eps_hat - eps||^2 = snr ||x0_hat - x0||^2
    ||v_hat - v||^2     = ((alpha^2 + sigma^2) / sigma)^2 ||x0_hat - x0||^2   (VP: (snr + 1) ...)

Weightings are stated in x0-space and divided by that factor, so each keeps its meaning
whatever the target (the min-SNR v form is min(snr, gamma) / (snr + 1), not min(snr, gamma)/snr;
cf. diffusers #5654):

* ``none``    the target's own plain MSE (eps target: DDPM's L_simple, Ho et al. 2020 Eq. 14)
* ``min_snr`` x0-space weight min(snr, gamma)                     (Hang et al. 2023)
* ``edm``     x0-space weight (sigma~^2 + sd^2) / (sigma~ sd)^2       (Karras et al. 2022, Eq. 8)

Time sampling: ``uniform`` (for discrete schedules, a uniform integer DDPM index) or
``lognormal`` (EDM: ln sigma~ ~ N(P_mean, P_std^2)).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from difflab.denoiser import BaseDenoiser, x0_eps_to_v
from difflab.schedules import DiscreteSchedule, NoiseSchedule

__all__ = ["sample_t", "loss_weight", "diffusion_loss", "TARGETS", "WEIGHTINGS", "T_SAMPLERS"]

TARGETS = ("eps", "x0", "v")
WEIGHTINGS = ("none", "min_snr", "edm")
T_SAMPLERS = ("uniform", "lognormal")


def sample_t(schedule: NoiseSchedule, n: int, *, kind: str = "uniform",
             generator: torch.Generator | None = None, p_mean: float = -1.2,
             p_std: float = 1.2, device: torch.device | str | None = None) -> Tensor:
    """n training times in (0, 1] (float64).

    ``uniform``: t ~ U(0, 1]; for a DiscreteSchedule t = (i + 1) / T with i ~ U{0..T-1}.
    ``lognormal``: ln sigma~ ~ N(p_mean, p_std^2) mapped through the schedule (EDM).
    """
    if kind == "uniform":
        if isinstance(schedule, DiscreteSchedule):
            i = torch.randint(0, schedule.T, (n,), generator=generator)
            t = (i.to(torch.float64) + 1) / schedule.T
        else:
            t = 1 - torch.rand(n, generator=generator, dtype=torch.float64)
    elif kind == "lognormal":
        ln_sigma = p_mean + p_std * torch.randn(n, generator=generator, dtype=torch.float64)
        t = schedule.t_from_log_snr(-2 * ln_sigma).clamp(1e-6, 1.0)
    else:
        raise ValueError(f"unknown t sampler {kind!r}; valid: {list(T_SAMPLERS)}")
    return t.to(device) if device is not None else t


def loss_weight(alpha: Tensor, sigma: Tensor, *, target: str = "eps", weighting: str = "none",
                gamma: float = 5.0, sigma_data: float = 0.5) -> Tensor:
    """w(t) multiplying ||target_hat - target||^2 (see the module docstring)."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; valid: {list(TARGETS)}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; valid: {list(WEIGHTINGS)}")
    if weighting == "none":
        return torch.ones_like(alpha)
    snr = (alpha / sigma) ** 2
    # factor with ||target err||^2 = factor * ||x0 err||^2
    factor = {"eps": snr, "x0": torch.ones_like(snr),
              "v": ((alpha**2 + sigma**2) / sigma) ** 2}[target]
    if weighting == "min_snr":
        w_x0 = snr.clamp(max=gamma)
    else:  # edm
        s_tilde2 = (sigma / alpha) ** 2
        w_x0 = (s_tilde2 + sigma_data**2) / (s_tilde2 * sigma_data**2)
    return w_x0 / factor


def diffusion_loss(denoiser: BaseDenoiser, x0: Tensor, *, cond: Any = None,
                   target: str = "eps", weighting: str = "none", t_sampler: str = "uniform",
                   gamma: float = 5.0, generator: torch.Generator | None = None,
                   t: Tensor | None = None, eps: Tensor | None = None) -> Tensor:
    """Per-example loss w(t) * mean ||target_hat - target||^2, shape (B,).

    ``t`` and ``eps`` may be given (for tests); otherwise they are drawn with ``generator``
    (on the CPU, so the same seed gives the same loss on every device).
    """
    B = x0.shape[0]
    if t is None:
        t = sample_t(denoiser.schedule, B, kind=t_sampler, generator=generator)
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    t = t.to(x0.device)
    _, alpha, sigma = denoiser.coefficients(x0, t)
    x_t = alpha * x0 + sigma * eps
    pred = denoiser.predict(x_t, t, cond)
    truth = {"eps": eps, "x0": x0, "v": x0_eps_to_v(x0, eps, alpha, sigma)}
    if target not in truth:
        raise ValueError(f"unknown target {target!r}; valid: {list(TARGETS)}")
    err = (pred.target(target).float() - truth[target].float()) ** 2
    w = loss_weight(alpha.flatten().float(), sigma.flatten().float(), target=target,
                    weighting=weighting, gamma=gamma,
                    sigma_data=getattr(denoiser, "sigma_data", 0.5))
    return w * err.reshape(B, -1).mean(1)
