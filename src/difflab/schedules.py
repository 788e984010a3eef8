"""Noise schedules over continuous time t in [0, 1].

Every model in difflab is described by one schedule (DESIGN.md):

    x_t = alpha(t) * x_0 + sigma(t) * eps,        eps ~ N(0, I)
    log_snr(t) = lambda(t) = 2 * log(alpha(t) / sigma(t))      strictly decreasing in t

Conventions kept by every schedule here:

* ``t = 0`` is clean data: ``sigma(0) = 0``, ``log_snr(0) = +inf``. A sampler's time grid
  always ends at ``t = 0``, so "the last step to sigma = 0" is an ordinary grid point.
* ``t = 1`` is the prior end. ``sigma_min`` is the smallest *nonzero* noise level the model
  was trained for: grids such as Karras' place their last nonzero point there.
* ``net_time(t)`` is what the network receives as its time input, and ``t_from_net_time``
  inverts it. For discrete DDPM schedules it is the fractional timestep index in
  [0, T - 1] (the convention of published DDPM checkpoints).

Variance preserving (VP) schedules have alpha^2 + sigma^2 = 1, so
alpha^2 = sigmoid(lambda) and sigma^2 = sigmoid(-lambda). Variance exploding (VE / EDM)
schedules have alpha = 1 and sigma = exp(-lambda / 2).

All arithmetic is done in float64 and returned in the dtype of ``t`` (float64 for Python
floats), so that solvers can precompute their coefficients exactly once.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "NoiseSchedule",
    "DiscreteSchedule",
    "ContinuousVPSchedule",
    "EDMSchedule",
    "linear",
    "scaled_linear",
    "cosine",
    "sigmoid",
    "edm",
    "from_betas",
    "rescale_zero_terminal_snr",
    "from_config",
    "cosine_continuous",
    "NAMES",
]


def _as_tensor(t: Tensor | float) -> tuple[Tensor, torch.dtype]:
    if isinstance(t, Tensor):
        dtype = t.dtype if t.is_floating_point() else torch.float64
        return t.to(torch.float64), dtype
    return torch.tensor(float(t), dtype=torch.float64), torch.float64


class NoiseSchedule(nn.Module):
    """Base class: a monotone map t -> (alpha(t), sigma(t)).

    Subclasses implement :meth:`log_snr` and :meth:`t_from_log_snr` (a default inverse by
    bisection is provided, so a learned schedule need only define ``log_snr``) and
    :meth:`config`. It is an ``nn.Module`` so that a learned schedule can own parameters.
    """

    variance_preserving: bool = True
    sigma_min: float = 0.002

    # -- the interface ----------------------------------------------------------------
    def log_snr(self, t: Tensor | float) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def t_from_log_snr(self, log_snr: Tensor | float) -> Tensor:
        """Inverse of :meth:`log_snr` by bisection (60 halvings: exact in float64)."""
        lam, dtype = _as_tensor(log_snr)
        lo = torch.zeros_like(lam)
        hi = torch.ones_like(lam)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            above = self.log_snr(mid).to(torch.float64) > lam  # log_snr decreasing
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return (0.5 * (lo + hi)).to(dtype)

    def net_time(self, t: Tensor | float) -> Tensor:
        """The time input the network receives (default: t itself)."""
        t64, dtype = _as_tensor(t)
        return t64.to(dtype)

    def t_from_net_time(self, net_t: Tensor | float) -> Tensor:
        n64, dtype = _as_tensor(net_t)
        return n64.to(dtype)

    def config(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- derived quantities (one formula each) ------------------------------------------
    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """(alpha(t), sigma(t)) from log_snr: VP alpha^2 = sigmoid(lambda); VE alpha = 1."""
        t64, dtype = _as_tensor(t)
        lam = self.log_snr(t64).to(torch.float64)
        if self.variance_preserving:
            alpha = torch.sigmoid(lam).sqrt()
            sigma = torch.sigmoid(-lam).sqrt()
        else:
            alpha = torch.ones_like(lam)
            sigma = torch.exp(-0.5 * lam)
        return alpha.to(dtype), sigma.to(dtype)

    def alpha(self, t: Tensor | float) -> Tensor:
        return self.alpha_sigma(t)[0]

    def sigma(self, t: Tensor | float) -> Tensor:
        return self.alpha_sigma(t)[1]

    def log_snr_from_sigma_ratio(self, sigma_ratio: Tensor | float) -> Tensor:
        """lambda = -2 log(sigma / alpha): the VE-equivalent noise level sigma~ = sigma/alpha."""
        s, dtype = _as_tensor(sigma_ratio)
        return (-2.0 * torch.log(s)).to(dtype)

    def t_from_sigma_ratio(self, sigma_ratio: Tensor | float) -> Tensor:
        return self.t_from_log_snr(self.log_snr_from_sigma_ratio(sigma_ratio))

    def prior_std(self, t: float = 1.0) -> float:
        """Standard deviation of x_t for unit-variance data: sqrt(alpha(t)^2 + sigma(t)^2).

        At t = 1: 1 for VP schedules, ~sigma_max for VE/EDM. ``difflab.sample`` multiplies
        standard normal noise by it at the grid's first time.
        """
        a, s = self.alpha_sigma(float(t))
        return float(torch.sqrt(a * a + s * s))

    def sigma_max_ratio(self) -> float:
        """sigma(1) / alpha(1) (inf for a zero-terminal-SNR schedule)."""
        return math.exp(-0.5 * float(self.log_snr(1.0)))

    def check_monotone(self, n: int = 4097) -> None:
        """Raise ValueError unless log_snr is strictly decreasing on a fine grid."""
        t = torch.linspace(0, 1, n, dtype=torch.float64)
        lam = self.log_snr(t)
        if not bool((lam[1:] < lam[:-1]).all()):
            bad = int((lam[1:] >= lam[:-1]).nonzero()[0])
            raise ValueError(
                f"{type(self).__name__}: log_snr must be strictly decreasing in t, but "
                f"log_snr({float(t[bad]):.6f}) = {float(lam[bad]):.6g} <= "
                f"log_snr({float(t[bad + 1]):.6f}) = {float(lam[bad + 1]):.6g}. "
                "For a beta array: every beta must lie in (0, 1)."
            )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config().items() if k != "betas")


# ------------------------------------------------------------------------------------------
# Discrete DDPM schedules
# ------------------------------------------------------------------------------------------


class DiscreteSchedule(NoiseSchedule):
    """The DDPM chain alpha_bar_i = prod_{j <= i} (1 - beta_j), i = 0 .. T-1 (Ho et al. 2020).

    Continuous time follows DPM-Solver (Lu et al. 2022, Sec. 3.4): step i sits at
    t_i = (i + 1) / T, and t = 0 is the clean end (alpha_bar = 1, "index -1"). Between knots
    alpha(t) = sqrt(alpha_bar) is interpolated linearly, which keeps log_snr strictly
    decreasing, reaches sigma = 0 at t = 0 and handles alpha_bar_{T-1} = 0 (zero terminal SNR).
    The network receives the fractional index ``net_time(t) = t * T - 1``.
    """

    def __init__(self, alphas_cumprod: Tensor, *, name: str = "custom", args: dict | None = None):
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
        self.name = name
        self.args = dict(args or {})
        self.register_buffer("alphas_cumprod", ab, persistent=False)
        # knots: a_0 = 1 at t = 0, a_{k} = sqrt(alpha_bar_{k-1}) at t = k / T
        knots = torch.cat([torch.ones(1, dtype=torch.float64), ab.sqrt()])
        self.register_buffer("alpha_knots", knots, persistent=False)
        self.sigma_min = float((1 - ab[0]).sqrt() / ab[0].sqrt())

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

    def _alpha(self, t64: Tensor) -> Tensor:
        knots = self.knots_on(t64.device)
        pos = (t64.clamp(0, 1) * self.T).clamp(0, self.T)
        k = pos.floor().clamp(max=self.T - 1).long()
        frac = pos - k
        a0 = knots[k]
        a1 = knots[k + 1]
        return a0 + (a1 - a0) * frac

    def log_snr(self, t: Tensor | float) -> Tensor:
        t64, dtype = _as_tensor(t)
        a2 = self._alpha(t64) ** 2
        return (torch.log(a2) - torch.log1p(-a2)).to(dtype)

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
        if self.name == "custom":
            return {"type": "betas", "betas": self.betas.tolist()}
        return {"type": self.name, **self.args}


def from_betas(betas: Tensor | list[float]) -> DiscreteSchedule:
    """Any user-given beta array: alpha_bar_i = prod_{j<=i} (1 - beta_j)."""
    b = torch.as_tensor(betas, dtype=torch.float64)
    if not bool(((b > 0) & (b <= 1)).all()):
        raise ValueError(
            "log_snr must be strictly decreasing: every beta must lie in (0, 1]; got "
            f"min={float(b.min()):.4g}, max={float(b.max()):.4g}"
        )
    return DiscreteSchedule(torch.cumprod(1 - b, 0))


def linear(
    beta_start: float = 1e-4, beta_end: float = 0.02, timesteps: int = 1000,
    *, zero_terminal_snr: bool = False,
) -> DiscreteSchedule:
    """DDPM's linear betas (Ho et al. 2020): beta_i = linspace(beta_start, beta_end, T)."""
    b = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    ab = torch.cumprod(1 - b, 0)
    if zero_terminal_snr:
        ab = rescale_zero_terminal_snr(ab)
    args = {"beta_start": beta_start, "beta_end": beta_end, "timesteps": timesteps,
            "zero_terminal_snr": zero_terminal_snr}
    return DiscreteSchedule(ab, name="linear", args=args)


def scaled_linear(
    beta_start: float = 0.00085, beta_end: float = 0.012, timesteps: int = 1000,
    *, zero_terminal_snr: bool = False,
) -> DiscreteSchedule:
    """Stable Diffusion's betas: beta_i = linspace(sqrt(beta_start), sqrt(beta_end), T)^2."""
    b = torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=torch.float64) ** 2
    ab = torch.cumprod(1 - b, 0)
    if zero_terminal_snr:
        ab = rescale_zero_terminal_snr(ab)
    args = {"beta_start": beta_start, "beta_end": beta_end, "timesteps": timesteps,
            "zero_terminal_snr": zero_terminal_snr}
    return DiscreteSchedule(ab, name="scaled_linear", args=args)


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


def cosine(timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> DiscreteSchedule:
    """Nichol & Dhariwal 2021, Eq. 17: alpha_bar(t) = f(t)/f(0),
    f(t) = cos^2(pi/2 (t/T + s)/(1 + s)),
    with beta_t = 1 - alpha_bar_t / alpha_bar_{t-1} clipped to ``max_beta`` (0.999)."""
    i = torch.arange(timesteps + 1, dtype=torch.float64)
    f = torch.cos((i / timesteps + s) / (1 + s) * math.pi / 2) ** 2
    ab = f / f[0]
    b = (1 - ab[1:] / ab[:-1]).clamp(max=max_beta)
    args = {"timesteps": timesteps, "s": s, "max_beta": max_beta}
    return DiscreteSchedule(torch.cumprod(1 - b, 0), name="cosine", args=args)


def sigmoid(
    start: float = -3.0, end: float = 3.0, tau: float = 1.0, timesteps: int = 1000,
    max_beta: float = 0.999,
) -> DiscreteSchedule:
    """Sigmoid schedule (Jabri et al. 2023; Chen 2023, "On the importance of noise scheduling"):

        alpha_bar(t) = (v_end - sigmoid((t (end - start) + start) / tau)) / (v_end - v_start),
        v_start = sigmoid(start / tau),  v_end = sigmoid(end / tau),

    evaluated at t = i / T and discretised like the cosine schedule (beta clipped to max_beta).
    """
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    ab = (v_end - torch.sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)
    b = (1 - ab[1:] / ab[:-1]).clamp(max=max_beta)
    args = {"start": start, "end": end, "tau": tau, "timesteps": timesteps, "max_beta": max_beta}
    return DiscreteSchedule(torch.cumprod(1 - b, 0), name="sigmoid", args=args)


# ------------------------------------------------------------------------------------------
# Continuous schedules
# ------------------------------------------------------------------------------------------


class ContinuousVPSchedule(NoiseSchedule):
    """A continuous VP schedule with alpha(t) = cos(pi/2 * t * t_end), sigma = sin(...)
    (the continuous cosine schedule; log_snr = -2 log tan(pi/2 t t_end)), where t_end is
    chosen so that log_snr(1) = ``log_snr_min``. Networks receive ``time_scale * t``.
    """

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

    def t_from_log_snr(self, log_snr: Tensor | float) -> Tensor:
        lam, dtype = _as_tensor(log_snr)
        return (2 / math.pi * torch.atan(torch.exp(-0.5 * lam)) / self.t_end).to(dtype)

    def net_time(self, t: Tensor | float) -> Tensor:
        t64, dtype = _as_tensor(t)
        return (t64 * self.time_scale).to(dtype)

    def t_from_net_time(self, net_t: Tensor | float) -> Tensor:
        n64, dtype = _as_tensor(net_t)
        return (n64 / self.time_scale).to(dtype)

    def config(self) -> dict[str, Any]:
        return {"type": "cosine_continuous", "log_snr_min": self.log_snr_min,
                "sigma_min": self.sigma_min, "time_scale": self.time_scale}


class EDMSchedule(NoiseSchedule):
    """Variance-exploding schedule of Karras et al. 2022 (EDM): alpha = 1,
    sigma(t) = sigma_max * t^rho, so that a uniform grid in t is the EDM/Karras grid through
    sigma = 0 and sigma(0) = 0. ``sigma_min`` is where default grids put their last nonzero
    point. The network time input is EDM's c_noise = log(sigma) / 4.
    """

    variance_preserving = False

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        super().__init__()
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)

    def log_snr(self, t: Tensor | float) -> Tensor:
        t64, dtype = _as_tensor(t)
        return (-2 * (math.log(self.sigma_max) + self.rho * torch.log(t64))).to(dtype)

    def t_from_log_snr(self, log_snr: Tensor | float) -> Tensor:
        lam, dtype = _as_tensor(log_snr)
        return torch.exp((-0.5 * lam - math.log(self.sigma_max)) / self.rho).to(dtype)

    def net_time(self, t: Tensor | float) -> Tensor:
        t64, dtype = _as_tensor(t)
        return (0.25 * (math.log(self.sigma_max) + self.rho * torch.log(t64))).to(dtype)

    def t_from_net_time(self, net_t: Tensor | float) -> Tensor:
        n64, dtype = _as_tensor(net_t)
        return torch.exp((4 * n64 - math.log(self.sigma_max)) / self.rho).to(dtype)

    def config(self) -> dict[str, Any]:
        return {"type": "edm", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "rho": self.rho}


def edm(sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> EDMSchedule:
    """EDM / VE schedule (alpha = 1); see :class:`EDMSchedule`."""
    return EDMSchedule(sigma_min, sigma_max, rho)


def cosine_continuous(log_snr_min: float = -15.0, sigma_min: float = 0.002) -> ContinuousVPSchedule:
    """Continuous-time cosine schedule; see :class:`ContinuousVPSchedule`."""
    return ContinuousVPSchedule(log_snr_min, sigma_min)


NAMES = {
    "linear": linear,
    "scaled_linear": scaled_linear,
    "cosine": cosine,
    "sigmoid": sigmoid,
    "edm": edm,
    "cosine_continuous": cosine_continuous,
}


def from_config(config: dict[str, Any]) -> NoiseSchedule:
    """Rebuild a schedule from :meth:`NoiseSchedule.config` (JSON-safe dict)."""
    cfg = dict(config)
    kind = cfg.pop("type")
    if kind == "betas":
        return from_betas(cfg["betas"])
    if kind not in NAMES:
        raise ValueError(f"unknown schedule type {kind!r}; valid: {sorted(NAMES)} or 'betas'")
    return NAMES[kind](**cfg)
