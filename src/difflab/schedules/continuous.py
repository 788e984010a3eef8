"""Continuous-time VP schedules (``num_steps`` is None).

* ``cosine_continuous``  alpha(t) = cos(pi/2 t t_end), sigma(t) = sin(pi/2 t t_end), so
  lambda(t) = -2 log tan(pi/2 t t_end) (the cosine schedule of Nichol & Dhariwal 2021 in
  continuous time, s = 0; as in DPM-Solver, Lu et al. 2022, and Kingma et al. 2021, VDM).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from difflab.schedules.base import NoiseSchedule, ScaledTime, _as_tensor, register

__all__ = ["ContinuousVPSchedule", "cosine_continuous"]


@register
class ContinuousVPSchedule(ScaledTime, NoiseSchedule):
    """A continuous VP schedule with alpha(t) = cos(pi/2 * t * t_end), sigma = sin(...)
    (the continuous cosine schedule; log_snr = -2 log tan(pi/2 t t_end)), where t_end is
    chosen so that log_snr(1) = ``log_snr_min``. Networks receive ``time_scale * t``.
    """

    type_name = "cosine_continuous"

    def __init__(self, log_snr_min: float = -15.0, sigma_min: float = 0.002,
                 time_scale: float = 1000.0):
        super().__init__()
        self.log_snr_min = float(log_snr_min)
        self.t_end = 2 / math.pi * math.atan(math.exp(-0.5 * log_snr_min))
        self.sigma_min = float(sigma_min)
        self.time_scale = float(time_scale)

    def log_snr(self, t: Tensor | float) -> Tensor:
        t64, dtype = _as_tensor(t)
        return (-2 * torch.log(torch.tan(math.pi / 2 * t64 * self.t_end))).to(dtype)

    def d_log_snr_dt(self, t: Tensor | float) -> Tensor:
        """d/dt [-2 log tan(u)], u = pi/2 t t_end: -2 pi t_end / sin(2 u)."""
        t64, dtype = _as_tensor(t)
        return (-2 * math.pi * self.t_end / torch.sin(math.pi * t64 * self.t_end)).to(dtype)

    def t_from_log_snr(self, log_snr: Tensor | float) -> Tensor:
        lam, dtype = _as_tensor(log_snr)
        return (2 / math.pi * torch.atan(torch.exp(-0.5 * lam)) / self.t_end).to(dtype)

    def config(self) -> dict[str, Any]:
        return {"type": "cosine_continuous", "log_snr_min": self.log_snr_min,
                "sigma_min": self.sigma_min, "time_scale": self.time_scale}


def cosine_continuous(log_snr_min: float = -15.0, sigma_min: float = 0.002,
                      time_scale: float = 1000.0) -> ContinuousVPSchedule:
    """Continuous-time cosine schedule; see :class:`ContinuousVPSchedule`."""
    return ContinuousVPSchedule(log_snr_min, sigma_min, time_scale)
