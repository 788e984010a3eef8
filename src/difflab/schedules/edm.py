"""The variance-exploding schedule of EDM (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models"): alpha = 1, sigma(t) = sigma_max * t^rho, and EDM's network
time input c_noise(sigma) = log(sigma) / 4 (Table 1), defined once here as :func:`edm_c_noise`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from difflab.schedules.base import NoiseSchedule, _as_tensor, register

__all__ = ["EDMSchedule", "edm", "edm_c_noise"]


def edm_c_noise(sigma_tilde: Tensor) -> Tensor:
    """EDM's noise conditioning c_noise = log(sigma~) / 4 (Karras et al. 2022, Table 1), with
    sigma~ = sigma / alpha the VE-equivalent noise level. The one place of this formula: the
    EDM schedule's ``net_time`` and the EDM parameterisation both call it."""
    return torch.log(sigma_tilde) / 4


@register
class EDMSchedule(NoiseSchedule):
    """Variance-exploding schedule of Karras et al. 2022 (EDM): alpha = 1,
    sigma(t) = sigma_max * t^rho, so that a uniform grid in t is the EDM/Karras grid through
    sigma = 0 and sigma(0) = 0. ``sigma_min`` is where default grids put their last nonzero
    point. The network time input is EDM's c_noise = log(sigma) / 4 (:func:`edm_c_noise`).
    """

    type_name = "edm"
    variance_preserving = False

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        super().__init__()
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)

    def log_snr(self, t: Tensor | float) -> Tensor:
        t64, dtype = _as_tensor(t)
        return (-2 * (math.log(self.sigma_max) + self.rho * torch.log(t64))).to(dtype)

    def d_log_snr_dt(self, t: Tensor | float) -> Tensor:
        """d/dt [-2 (log sigma_max + rho log t)] = -2 rho / t."""
        t64, dtype = _as_tensor(t)
        return (-2 * self.rho / t64).to(dtype)

    def t_from_log_snr(self, log_snr: Tensor | float) -> Tensor:
        lam, dtype = _as_tensor(log_snr)
        return torch.exp((-0.5 * lam - math.log(self.sigma_max)) / self.rho).to(dtype)

    def net_time(self, t: Tensor | float) -> Tensor:
        """c_noise(sigma(t)) with sigma(t) = exp(-lambda(t) / 2)."""
        t64, dtype = _as_tensor(t)
        return edm_c_noise(torch.exp(-0.5 * self.log_snr(t64))).to(dtype)

    def t_from_net_time(self, net_t: Tensor | float) -> Tensor:
        """Inverse of :meth:`net_time`: sigma = exp(4 c_noise), then t(sigma)."""
        n64, dtype = _as_tensor(net_t)
        return self.t_from_sigma_ratio(torch.exp(4 * n64)).to(dtype)

    def config(self) -> dict[str, Any]:
        return {"type": "edm", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "rho": self.rho}


def edm(sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> EDMSchedule:
    """EDM / VE schedule (alpha = 1); see :class:`EDMSchedule`."""
    return EDMSchedule(sigma_min, sigma_max, rho)
