"""The rectified-flow schedule (flow matching with straight paths) and its log-SNR shift.

Rectified flow (Liu et al. 2023, "Flow Straight and Fast"; Lipman et al. 2023, "Flow Matching
for Generative Modeling", the conditional OT path with sigma_min = 0; Esser et al. 2024, SD3,
Sec. 2) interpolates linearly between data and noise:

    x_t = (1 - t) x_0 + t eps,        alpha(t) = 1 - t,  sigma(t) = t,
    lambda(t) = log_snr(t) = 2 log((1 - t) / t).

It is not variance preserving (alpha + sigma = 1, not alpha^2 + sigma^2 = 1): alpha(1) = 0
exactly (zero terminal SNR, x_1 = eps) and sigma(0) = 0 exactly.

**The shift** (Esser et al. 2024, Sec. 5.3.2, Eq. 23) is a constant offset in log-SNR,

    lambda_s(t) = lambda(t) - 2 log s,

which in the path's own time is SD3's t_s = s t / (1 + (s - 1) t), so alpha = 1 - t_s =
(1 - t) / (1 + (s - 1) t) and sigma = t_s: the shifted schedule is still a straight path in t_s,
reached by a monotone change of time. Flux's resolution-dependent shift is the same transform
with s = e^mu, mu a linear function of the image's token count (:func:`dynamic_shift`); one
transform covers both. Here t is the *unshifted* time (a uniform grid in t is diffusers'
``linspace`` before its shift) and the shift is applied exactly once, inside the schedule
(diffusers #13243: ``FlowMatchEulerDiscreteScheduler.set_timesteps`` shifts its already
shifted ``sigma_min`` a second time).

**Network time.** diffusers' flow models (SD3, Flux, ``FlowMatchEulerDiscreteScheduler``) take
``timestep = sigma * num_train_timesteps`` with sigma = t_s the shifted time, i.e.
``net_time(t) = time_scale * sigma(t)`` with ``time_scale = 1000``: the network sees the noise
level it was trained on, whatever shift a sampler's grid was built with.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from difflab.schedules.base import NoiseSchedule, _as_tensor, register

__all__ = ["RectifiedFlowSchedule", "rectified_flow", "dynamic_shift"]


@register
class RectifiedFlowSchedule(NoiseSchedule):
    """x_t = alpha x_0 + sigma eps with sigma = s t / (1 + (s - 1) t), alpha = 1 - sigma
    (module docstring; s = ``shift``, 1 for plain rectified flow).

    Args:
        shift: s > 0, the log-SNR offset lambda_s(t) = lambda(t) - 2 log s (SD3: 3.0; for
            Flux's resolution-dependent shift pass ``dynamic_shift(image_seq_len)``).
        time_scale: the network time input is ``time_scale * sigma(t)`` (diffusers:
            ``num_train_timesteps`` = 1000).
        sigma_min: the smallest nonzero VE-equivalent noise level sigma~ = sigma / alpha that
            grids place a point at (``log_snr`` and ``karras`` spacings).
    """

    type_name = "rectified_flow"
    variance_preserving = False

    def __init__(self, shift: float = 1.0, time_scale: float = 1000.0, sigma_min: float = 0.002):
        super().__init__()
        shift, time_scale, sigma_min = float(shift), float(time_scale), float(sigma_min)
        if not (shift > 0 and math.isfinite(shift)):
            raise ValueError(f"shift must be a finite number > 0, got {shift}")
        if not time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        if not sigma_min > 0:
            raise ValueError(f"sigma_min must be > 0, got {sigma_min}")
        self.shift, self.time_scale, self.sigma_min = shift, time_scale, sigma_min

    # -- the shift: t -> sigma = t_s and back ---------------------------------------------
    def _sigma(self, t64: Tensor) -> Tensor:
        """sigma = t_s = s t / (1 + (s - 1) t) (SD3, Eq. 23); exactly t for s = 1."""
        s = self.shift
        return t64 if s == 1.0 else s * t64 / (1 + (s - 1) * t64)

    def _t_of_sigma(self, sigma64: Tensor) -> Tensor:
        """Inverse of :meth:`_sigma`: t = sigma / (s - (s - 1) sigma)."""
        s = self.shift
        return sigma64 if s == 1.0 else sigma64 / (s - (s - 1) * sigma64)

    # -- the interface --------------------------------------------------------------------
    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """alpha = 1 - sigma, sigma = t_s: alpha(1) = 0 and sigma(0) = 0 exactly."""
        t64, dtype = _as_tensor(t)
        sigma = self._sigma(t64)
        return (1 - sigma).to(dtype), sigma.to(dtype)

    def log_snr(self, t: Tensor | float) -> Tensor:
        """lambda = 2 log((1 - t) / t) - 2 log s (+inf at t = 0, -inf at t = 1)."""
        t64, dtype = _as_tensor(t)
        lam = 2 * (torch.log1p(-t64) - torch.log(t64)) - 2 * math.log(self.shift)
        return lam.to(dtype)

    def t_from_log_snr(self, log_snr: Tensor | float) -> Tensor:
        """t = sigmoid(-(lambda + 2 log s) / 2)."""
        lam, dtype = _as_tensor(log_snr)
        return torch.sigmoid(-0.5 * lam - math.log(self.shift)).to(dtype)

    def d_log_snr_dt(self, t: Tensor | float) -> Tensor:
        """d/dt [2 log(1 - t) - 2 log t] = -2 / (t (1 - t)) (the shift is a constant)."""
        t64, dtype = _as_tensor(t)
        return (-2 / (t64 * (1 - t64))).to(dtype)

    def net_time(self, t: Tensor | float) -> Tensor:
        """``time_scale * sigma(t)``: diffusers' flow timestep sigma * num_train_timesteps."""
        t64, dtype = _as_tensor(t)
        return (self.time_scale * self._sigma(t64)).to(dtype)

    def t_from_net_time(self, net_t: Tensor | float) -> Tensor:
        n64, dtype = _as_tensor(net_t)
        return self._t_of_sigma(n64 / self.time_scale).to(dtype)

    def t_from_sigma(self, sigma: Tensor | float) -> Tensor:
        """The time t at which sigma(t) = ``sigma`` (diffusers' flow ``sigmas`` -> difflab
        times, e.g. to run a difflab sampler on a diffusers grid)."""
        s64, dtype = _as_tensor(sigma)
        return self._t_of_sigma(s64).to(dtype)

    def with_shift(self, shift: float) -> RectifiedFlowSchedule:
        """The same schedule with another shift (e.g. Flux's shift for another resolution)."""
        return type(self)(shift, self.time_scale, self.sigma_min)

    def config(self) -> dict[str, Any]:
        return {"type": self.type_name, "shift": self.shift, "time_scale": self.time_scale,
                "sigma_min": self.sigma_min}


def rectified_flow(shift: float = 1.0, time_scale: float = 1000.0,
                   sigma_min: float = 0.002) -> RectifiedFlowSchedule:
    """The rectified-flow schedule alpha = 1 - t_s, sigma = t_s; see
    :class:`RectifiedFlowSchedule`."""
    return RectifiedFlowSchedule(shift, time_scale, sigma_min)


def dynamic_shift(image_seq_len: int, *, base_seq_len: int = 256, max_seq_len: int = 4096,
                  base_shift: float = 0.5, max_shift: float = 1.15,
                  shift_type: str = "exponential") -> float:
    """Flux's resolution-dependent shift s (Black Forest Labs, Flux; diffusers
    ``calculate_shift`` and ``FlowMatchEulerDiscreteScheduler.time_shift``):

        mu = base_shift + (max_shift - base_shift) (n - base_seq_len) / (max_seq_len - base_seq_len)
        s = e^mu   ("exponential"),     s = mu   ("linear"),

    with n = ``image_seq_len`` the number of image tokens (Flux: (H / 16) (W / 16) for an H x W
    image). diffusers' ``time_shift(mu, 1, t) = e^mu / (e^mu + (1 / t - 1))`` is
    s t / (1 + (s - 1) t) with s = e^mu: the same log-SNR offset as SD3's fixed shift.
    """
    if shift_type not in ("exponential", "linear"):
        raise ValueError(f"unknown shift_type {shift_type!r}; valid: ['exponential', 'linear']")
    if max_seq_len == base_seq_len:
        raise ValueError("max_seq_len must differ from base_seq_len")
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    mu = base_shift + m * (image_seq_len - base_seq_len)
    s = math.exp(mu) if shift_type == "exponential" else mu
    if not s > 0:
        raise ValueError(f"the shift must be > 0; got s = {s} (mu = {mu}, shift_type "
                         f"{shift_type!r})")
    return s
