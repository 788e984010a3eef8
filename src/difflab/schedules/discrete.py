"""Discrete DDPM chains alpha_bar_i = prod_{j <= i} (1 - beta_j), i = 0 .. T-1 (Ho et al. 2020),
made continuous in t by interpolating alpha = sqrt(alpha_bar) linearly between the knots
(DPM-Solver, Lu et al. 2022, Sec. 3.4). One class per beta family, each owning its config:

* ``linear``         beta_i = linspace(beta_start, beta_end, T)                (Ho et al. 2020)
* ``scaled_linear``  beta_i = linspace(sqrt(beta_start), sqrt(beta_end), T)^2  (Stable Diffusion)
* ``cosine``         alpha_bar(t) = f(t) / f(0), f(t) = cos^2(pi/2 (t/T + s) / (1 + s))
                     (Nichol & Dhariwal 2021, Eq. 17)
* ``sigmoid``        alpha_bar from a shifted sigmoid (Jabri et al. 2023; Chen 2023)
* ``betas``          any user-given beta array

``linear`` and ``scaled_linear`` take ``zero_terminal_snr`` (Lin et al. 2024, Alg. 1).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from difflab.schedules.base import NoiseSchedule, _as_tensor, register

__all__ = [
    "DiscreteSchedule",
    "BetasSchedule",
    "LinearSchedule",
    "ScaledLinearSchedule",
    "CosineSchedule",
    "SigmoidSchedule",
    "linear",
    "scaled_linear",
    "cosine",
    "sigmoid",
    "from_betas",
    "rescale_zero_terminal_snr",
]


class DiscreteSchedule(NoiseSchedule):
    """The DDPM chain alpha_bar_i = prod_{j <= i} (1 - beta_j), i = 0 .. T-1 (Ho et al. 2020).

    Continuous time follows DPM-Solver (Lu et al. 2022, Sec. 3.4): step i sits at
    t_i = (i + 1) / T, and t = 0 is the clean end (alpha_bar = 1, "index -1"). Between knots
    alpha(t) = sqrt(alpha_bar) is interpolated linearly, which keeps log_snr strictly
    decreasing, reaches sigma = 0 at t = 0 and handles alpha_bar_{T-1} = 0 (zero terminal SNR).
    The network receives the fractional index ``net_time(t) = t * T - 1``; ``num_steps = T``.

    Built from any ``alphas_cumprod``, its config is its beta array (type ``"betas"``, rebuilt
    as a :class:`BetasSchedule`); the named families below keep their arguments instead.
    """

    type_name = "betas"

    def __init__(self, alphas_cumprod: Tensor):
        super().__init__()
        ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if ab.numel() < 2:
            raise ValueError("a discrete schedule needs at least 2 timesteps")
        if not bool(((ab >= 0) & (ab < 1)).all()) or not bool((ab[1:] < ab[:-1]).all()):
            raise ValueError(
                "log_snr must be strictly decreasing: alphas_cumprod must decrease strictly "
                "and lie in [0, 1) (every beta in (0, 1]); got "
                f"min={float(ab.min()):.4g}, max={float(ab.max()):.4g}"
            )
        self.T = int(ab.numel())
        self.register_buffer("alphas_cumprod", ab, persistent=False)
        # knots: a_0 = 1 at t = 0, a_{k} = sqrt(alpha_bar_{k-1}) at t = k / T
        knots = torch.cat([torch.ones(1, dtype=torch.float64), ab.sqrt()])
        self.register_buffer("alpha_knots", knots, persistent=False)
        self.sigma_min = float((1 - ab[0]).sqrt() / ab[0].sqrt())

    @property
    def num_steps(self) -> int:
        return self.T

    @property
    def betas(self) -> Tensor:
        prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        return 1 - self.alphas_cumprod / prev

    def knots_on(self, device: torch.device) -> Tensor:
        """The alpha knots on ``device`` (a copy per device, made once): t decides where the
        schedule is evaluated, whether or not the module was moved with ``.to``."""
        knots = self.alpha_knots
        if knots.device == device:
            return knots
        cache = self.__dict__.setdefault("_knots_by_device", {})
        if device not in cache:
            cache[device] = knots.to(device)
        return cache[device]

    def _segment(self, t64: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(a0, a1, frac): the knots around t and t's position between them, in [0, 1]."""
        knots = self.knots_on(t64.device)
        pos = (t64.clamp(0, 1) * self.T).clamp(0, self.T)
        k = pos.floor().clamp(max=self.T - 1).long()
        return knots[k], knots[k + 1], pos - k

    def _alpha(self, t64: Tensor) -> Tensor:
        a0, a1, frac = self._segment(t64)
        return a0 + (a1 - a0) * frac

    def log_snr(self, t: Tensor | float) -> Tensor:
        t64, dtype = _as_tensor(t)
        a2 = self._alpha(t64) ** 2
        return (torch.log(a2) - torch.log1p(-a2)).to(dtype)

    def d_log_snr_dt(self, t: Tensor | float) -> Tensor:
        """lambda = 2 log(a / sqrt(1 - a^2)), so d lambda / dt = 2 / (a (1 - a^2)) * da/dt with
        da/dt = T (a_{k+1} - a_k) on segment k (the right-hand derivative at a knot)."""
        t64, dtype = _as_tensor(t)
        a0, a1, frac = self._segment(t64)
        a = a0 + (a1 - a0) * frac
        da_dt = self.T * (a1 - a0)
        return (2 * da_dt / (a * (1 - a) * (1 + a))).to(dtype)

    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        t64, dtype = _as_tensor(t)
        a = self._alpha(t64)
        return a.to(dtype), (1 - a * a).clamp(min=0).sqrt().to(dtype)

    def t_from_log_snr(self, log_snr: Tensor | float) -> Tensor:
        lam, dtype = _as_tensor(log_snr)
        a = torch.sigmoid(lam).sqrt()
        knots = self.knots_on(a.device)  # decreasing from 1
        # k such that knots[k] >= a > knots[k + 1]
        k = torch.searchsorted(-knots, -a, right=True) - 1
        k = k.clamp(0, self.T - 1)
        a0, a1 = knots[k], knots[k + 1]
        frac = ((a0 - a) / (a0 - a1)).clamp(0, 1)
        return ((k + frac) / self.T).to(dtype)

    def net_time(self, t: Tensor | float) -> Tensor:
        t64, dtype = _as_tensor(t)
        return (t64 * self.T - 1).to(dtype)

    def t_from_net_time(self, net_t: Tensor | float) -> Tensor:
        n64, dtype = _as_tensor(net_t)
        return ((n64 + 1) / self.T).to(dtype)

    def index_to_t(self, i: Tensor | int) -> Tensor:
        """t of DDPM step index i (0-based): (i + 1) / T."""
        return (torch.as_tensor(i, dtype=torch.float64) + 1) / self.T

    def config(self) -> dict[str, Any]:
        return {"type": "betas", "betas": self.betas.tolist()}

    def extra_repr(self) -> str:
        return super().extra_repr() or f"T={self.T}"


def _check_betas(b: Tensor) -> None:
    if not bool(((b > 0) & (b <= 1)).all()):
        raise ValueError(
            "log_snr must be strictly decreasing: every beta must lie in (0, 1]; got "
            f"min={float(b.min()):.4g}, max={float(b.max()):.4g}"
        )


@register
class BetasSchedule(DiscreteSchedule):
    """Any user-given beta array: alpha_bar_i = prod_{j<=i} (1 - beta_j). Its config keeps the
    array as given, so the round trip is exact."""

    type_name = "betas"

    def __init__(self, betas: Tensor | list[float]):
        b = torch.as_tensor(betas, dtype=torch.float64).flatten()
        _check_betas(b)
        super().__init__(torch.cumprod(1 - b, 0))
        self._betas = b.clone()

    @property
    def betas(self) -> Tensor:
        return self._betas

    def config(self) -> dict[str, Any]:
        return {"type": "betas", "betas": self._betas.tolist()}


def from_betas(betas: Tensor | list[float]) -> BetasSchedule:
    """Any user-given beta array: alpha_bar_i = prod_{j<=i} (1 - beta_j)."""
    return BetasSchedule(betas)


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1.

    sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first is unchanged:
    a_i <- (a_i - a_T) * a_1 / (a_1 - a_T). Pair it with v (or x0) prediction: at t = 1,
    alpha = 0 and eps prediction cannot recover x_0.
    """
    a = torch.as_tensor(alphas_cumprod, dtype=torch.float64).sqrt()
    a0, aT = a[0].clone(), a[-1].clone()
    a = (a - aT) * a0 / (a0 - aT)
    return a**2


class _LinearFamily(DiscreteSchedule):
    """Betas from (beta_start, beta_end, timesteps), optionally rescaled to zero terminal SNR."""

    def __init__(self, beta_start: float, beta_end: float, timesteps: int = 1000,
                 *, zero_terminal_snr: bool = False):
        beta_start, beta_end = float(beta_start), float(beta_end)
        timesteps, zero_terminal_snr = int(timesteps), bool(zero_terminal_snr)
        ab = torch.cumprod(1 - self._betas_of(beta_start, beta_end, timesteps), 0)
        super().__init__(rescale_zero_terminal_snr(ab) if zero_terminal_snr else ab)
        self.beta_start, self.beta_end = beta_start, beta_end
        self.timesteps, self.zero_terminal_snr = timesteps, zero_terminal_snr

    @staticmethod
    def _betas_of(beta_start: float, beta_end: float, timesteps: int) -> Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def config(self) -> dict[str, Any]:
        return {"type": self.type_name, "beta_start": self.beta_start, "beta_end": self.beta_end,
                "timesteps": self.timesteps, "zero_terminal_snr": self.zero_terminal_snr}


@register
class LinearSchedule(_LinearFamily):
    """DDPM's linear betas (Ho et al. 2020): beta_i = linspace(beta_start, beta_end, T)."""

    type_name = "linear"

    def __init__(self, beta_start: float = 1e-4, beta_end: float = 0.02, timesteps: int = 1000,
                 *, zero_terminal_snr: bool = False):
        super().__init__(beta_start, beta_end, timesteps, zero_terminal_snr=zero_terminal_snr)

    @staticmethod
    def _betas_of(beta_start: float, beta_end: float, timesteps: int) -> Tensor:
        return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


@register
class ScaledLinearSchedule(_LinearFamily):
    """Stable Diffusion's betas: beta_i = linspace(sqrt(beta_start), sqrt(beta_end), T)^2."""

    type_name = "scaled_linear"

    def __init__(self, beta_start: float = 0.00085, beta_end: float = 0.012,
                 timesteps: int = 1000, *, zero_terminal_snr: bool = False):
        super().__init__(beta_start, beta_end, timesteps, zero_terminal_snr=zero_terminal_snr)

    @staticmethod
    def _betas_of(beta_start: float, beta_end: float, timesteps: int) -> Tensor:
        return torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=torch.float64) ** 2


def _clipped_chain(ab: Tensor, max_beta: float) -> Tensor:
    """alpha_bar on t = i / T (i = 0 .. T) -> the chain with beta_i = 1 - ab_i / ab_{i-1}
    clipped to ``max_beta``."""
    b = (1 - ab[1:] / ab[:-1]).clamp(max=max_beta)
    return torch.cumprod(1 - b, 0)


@register
class CosineSchedule(DiscreteSchedule):
    """Nichol & Dhariwal 2021, Eq. 17: alpha_bar(t) = f(t)/f(0),
    f(t) = cos^2(pi/2 (t/T + s)/(1 + s)),
    with beta_t = 1 - alpha_bar_t / alpha_bar_{t-1} clipped to ``max_beta`` (0.999)."""

    type_name = "cosine"

    def __init__(self, timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999):
        timesteps, s, max_beta = int(timesteps), float(s), float(max_beta)
        i = torch.arange(timesteps + 1, dtype=torch.float64)
        f = torch.cos((i / timesteps + s) / (1 + s) * math.pi / 2) ** 2
        super().__init__(_clipped_chain(f / f[0], max_beta))
        self.timesteps, self.s, self.max_beta = timesteps, s, max_beta

    def config(self) -> dict[str, Any]:
        return {"type": "cosine", "timesteps": self.timesteps, "s": self.s,
                "max_beta": self.max_beta}


@register
class SigmoidSchedule(DiscreteSchedule):
    """Sigmoid schedule (Jabri et al. 2023; Chen 2023, "On the importance of noise scheduling"):

        alpha_bar(t) = (v_end - sigmoid((t (end - start) + start) / tau)) / (v_end - v_start),
        v_start = sigmoid(start / tau),  v_end = sigmoid(end / tau),

    evaluated at t = i / T and discretised like the cosine schedule (beta clipped to max_beta).
    """

    type_name = "sigmoid"

    def __init__(self, start: float = -3.0, end: float = 3.0, tau: float = 1.0,
                 timesteps: int = 1000, max_beta: float = 0.999):
        start, end, tau = float(start), float(end), float(tau)
        timesteps, max_beta = int(timesteps), float(max_beta)
        t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
        v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
        ab = (v_end - torch.sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)
        super().__init__(_clipped_chain(ab, max_beta))
        self.start, self.end, self.tau = start, end, tau
        self.timesteps, self.max_beta = timesteps, max_beta

    def config(self) -> dict[str, Any]:
        return {"type": "sigmoid", "start": self.start, "end": self.end, "tau": self.tau,
                "timesteps": self.timesteps, "max_beta": self.max_beta}


def linear(
    beta_start: float = 1e-4, beta_end: float = 0.02, timesteps: int = 1000,
    *, zero_terminal_snr: bool = False,
) -> LinearSchedule:
    """DDPM's linear betas; see :class:`LinearSchedule`."""
    return LinearSchedule(beta_start, beta_end, timesteps, zero_terminal_snr=zero_terminal_snr)


def scaled_linear(
    beta_start: float = 0.00085, beta_end: float = 0.012, timesteps: int = 1000,
    *, zero_terminal_snr: bool = False,
) -> ScaledLinearSchedule:
    """Stable Diffusion's betas; see :class:`ScaledLinearSchedule`."""
    return ScaledLinearSchedule(beta_start, beta_end, timesteps,
                                zero_terminal_snr=zero_terminal_snr)


def cosine(timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> CosineSchedule:
    """Nichol & Dhariwal's cosine schedule; see :class:`CosineSchedule`."""
    return CosineSchedule(timesteps, s, max_beta)


def sigmoid(
    start: float = -3.0, end: float = 3.0, tau: float = 1.0, timesteps: int = 1000,
    max_beta: float = 0.999,
) -> SigmoidSchedule:
    """The sigmoid schedule; see :class:`SigmoidSchedule`."""
    return SigmoidSchedule(start, end, tau, timesteps, max_beta)
